"""--scheduler for the commands that run the sampler (`generate`, `validate`, `bench`, `serve`)."""

from __future__ import annotations

from typing import Any, Callable

import click

from sampler.schedulers import DEFAULT, SCHEDULERS, check_name


def scheduler_option() -> Callable[..., Any]:
    """--scheduler NAME, a plain string checked by check_scheduler (one line listing the names, exit 2)."""
    return click.option("--scheduler", metavar="NAME",
                        help=f"Sampler: {', '.join(SCHEDULERS)} (docs/generate.md) [default: {DEFAULT}, the model's own scheduler config].")


def check_scheduler(name: str | None) -> str | None:
    """--scheduler's name, before any model work: UsageError in one line listing the known ones."""
    if name is not None:
        try:
            check_name(name)
        except Exception as e:
            raise type(e)(f"--scheduler: {e}") from None
    return name
