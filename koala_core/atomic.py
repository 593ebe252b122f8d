"""Write a folder or a file under a temporary name and rename it into place only when complete,
so a crash or Ctrl-C never leaves something that passes for finished."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from koala_core.errors import UsageError


def check_writable_parent(out: Path) -> None:
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: {probe} is not a writable folder")


def check_new_dir(out: Path, force: bool = False) -> None:
    """The checks staged_dir makes before it writes: `out` is new (or --force), its parent writable."""
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    check_writable_parent(out)


def _remove_stale(out: Path) -> None:
    """Remove staging leftovers of `out` from processes that were killed (SIGKILL, power loss)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # still running: leave it alone
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder beside `out`; on success rename it to `out` (replacing an old
    `out` only with force); on any exception or interrupt remove it."""
    out = Path(out)
    check_new_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` on success, delete it otherwise."""
    out = Path(out)
    check_writable_parent(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
