"""Errors the CLI turns into one-line messages and exit codes (no traceback unless --debug)."""

from __future__ import annotations


class KoalaError(Exception):
    """A failure the user can act on: the message is printed as `Error: ...`, exit code 1."""

    exit_code = 1


class UsageError(KoalaError):
    """Bad input (missing path, unknown name, wrong shape): exit code 2."""

    exit_code = 2


class CheckFailed(KoalaError):
    """An accuracy check failed (tolerance exceeded, non-finite output): exit code 1."""

    exit_code = 1
