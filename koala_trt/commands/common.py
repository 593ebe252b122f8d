"""Options and output helpers shared by commands."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from exporter.specs import COMPONENTS


def log(message: str) -> None:
    """Progress and status lines go to stderr, so stdout stays clean for --json."""
    click.echo(message, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def components_option(default_help: str) -> Callable[[Any], Any]:
    return click.option("--components", "-c", multiple=True, metavar="NAMES",
                        help=f"Comma-separated components ({', '.join(COMPONENTS)}); {default_help}.")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def numeric(c: Any) -> bool:
        return str(c).replace(",", "").replace(".", "").replace("-", "").replace("e", "").replace("+", "").rstrip("MGx%").isdigit()

    def fmt(r: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if numeric(c) else str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def check_backend_sources(backend: str, artifacts: Any, model: str | None, engines: Any) -> None:
    """Which of --artifacts / --model / --engines each runtime backend reads (generate, bench)."""
    from koala_core.errors import UsageError

    if backend == "onnxruntime" and artifacts is None:
        raise UsageError("--backend onnxruntime needs --artifacts DIR (from `koala-trt export`)")
    if backend != "torch" and model is not None:
        raise UsageError("--model is for --backend torch; onnxruntime and tensorrt read --artifacts / --engines")
    if backend != "tensorrt" and engines is not None:
        raise UsageError("--engines is for --backend tensorrt")


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
