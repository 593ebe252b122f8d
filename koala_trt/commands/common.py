"""Options and output helpers shared by commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from exporter.specs import COMPONENTS


# Click's own types for numbers: 0 or a negative count, size, batch or step count is a usage error
# (exit 2, one line), never "use the default"; leave the option out for the default.
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def check_out_file(out: Path, flag: str = "--out", example: str = "") -> None:
    """A file to write: not a folder, its folder writable; checked before any model work."""
    from koala_core.atomic import check_writable_parent
    from koala_core.errors import UsageError

    if out.is_dir():
        raise UsageError(f"{flag} {out} is a folder; give a file name" + (f" such as {out / example}" if example else ""))
    check_writable_parent(out)


def check_out_dir(out: Path, force: bool, flag: str = "--out") -> None:
    """A folder to write (staged, renamed when complete): refused when it exists without --force, or when
    its parent cannot be written; checked before any model is loaded."""
    from koala_core.atomic import check_new_dir
    from koala_core.errors import UsageError

    check_new_dir(out, force)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file; give a folder name")


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

    if backend in ("onnxruntime", "openvino") and artifacts is None:
        raise UsageError(f"--backend {backend} needs --artifacts DIR (from `koala-trt export`)")
    if backend != "torch" and model is not None:
        raise UsageError("--model is for --backend torch; onnxruntime, openvino and tensorrt read --artifacts / --engines")
    if backend != "tensorrt" and engines is not None:
        raise UsageError("--engines is for --backend tensorrt")


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def cpu_precision_option() -> Callable[[Any], Any]:
    """--cpu-precision for --backend openvino (generate, validate, bench)."""
    return click.option("--cpu-precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                        help="--backend openvino: auto = bf16 where the CPU has AMX-BF16 or AVX512-BF16 (the VAE decoder "
                             "stays fp32), else fp32; fp32/bf16 apply to every component [default: auto].")


# ----- the options every long-running command shares (one definition each) --------------------------------

def _set_progress(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    from koala_core.run_settings import set_progress

    set_progress(not value)
    return value


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    from koala_core.run_settings import set_threads

    set_threads(value)
    return value


def progress_option(expose: bool = False) -> Callable[[Any], Any]:
    """--no-progress: no progress bars or per-file progress lines on stderr (status lines stay). Applied
    process-wide (koala_core.run_settings); `expose` also hands the flag to the command as `no_progress`."""
    return click.option("--no-progress", is_flag=True, expose_value=expose, callback=_set_progress,
                        help="No progress bars (or per-file progress lines) on stderr; status lines stay.")


def json_option(what: str = "the result") -> Callable[[Any], Any]:
    """--json: `what` as JSON on stdout (log lines stay on stderr), passed as `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def threads_option(expose: bool = True, what: str = "ONNX Runtime intra-op / OpenVINO threads") -> Callable[[Any], Any]:
    """--threads N: CPU threads, applied process-wide too (ONNX Runtime sessions made without a count,
    PyTorch's intra-op pool; koala_core.run_settings); `expose` hands it to the command as `threads`."""
    return click.option("--threads", type=POSITIVE, expose_value=expose, callback=_set_threads,
                        help=f"{what}; also PyTorch's [default: all cores].")
