"""The `koala-trt` command line: thin wrappers that parse, call one function and print.

Commands live in koala_trt/commands/<name>.py and are imported only when invoked, so
`koala-trt --help` stays instant and the ONNX Runtime path never imports torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Sequence

import click

from koala_trt import __version__
from koala_core.errors import KoalaError

# name -> (module, attribute, one-line help). Add a command by adding a line here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("koala_trt.commands.inspect", "inspect_cmd", "Components, parameter counts and configs of a model or artifacts folder."),
    "export": ("koala_trt.commands.export", "export_cmd", "Export every component to ONNX, each checked against PyTorch."),
    "profiles": ("koala_trt.commands.profiles", "profiles_cmd", "GPU profiles (list, show): what to build per card."),
    "plan": ("koala_trt.commands.plan", "plan_cmd", "Device-memory plan and fit verdict of a model on a GPU profile."),
    "build": ("koala_trt.commands.build", "build_cmd", "Build strongly typed TensorRT engines for a GPU profile (--dry-run: the plan)."),
    "calibrate": ("koala_trt.commands.calibrate", "calibrate_cmd", "Record U-Net inputs along denoising trajectories for INT8 calibration."),
    "convert": ("koala_trt.commands.convert", "convert_cmd", "Make an FP16 artifacts folder (FP32 islands where ranges demand them)."),
    "lora": ("koala_trt.commands.lora", "lora_cmd", "Patch LoRA adapters into an FP32/FP16 artifacts folder's ONNX weights (no re-export)."),
    "refit": ("koala_trt.commands.refit", "refit_cmd", "Refit refittable TensorRT engines with a LoRA-patched folder's weights (GPU; no rebuild)."),
    "quantize": ("koala_trt.commands.quantize", "quantize_cmd", "Make an INT8 artifacts folder (explicit Q/DQ U-Net) from a calibration set."),
    "generate": ("koala_trt.commands.generate", "generate_cmd", "Text to PNG with the numpy sampler on onnxruntime, tensorrt or torch."),
    "pack": ("koala_trt.commands.bundle", "pack_cmd", "Pack artifacts (and engines) into one archive with sha256s and runtime requirements."),
    "unpack": ("koala_trt.commands.bundle", "unpack_cmd", "Unpack a bundle safely, checking every file as it is written."),
    "verify": ("koala_trt.commands.bundle", "verify_cmd", "Check a bundle's hashes, completeness and, for engines, this machine's GPU/TensorRT."),
    "validate": ("koala_trt.commands.validate", "validate_cmd", "Accuracy-drift gate: artifacts or engines against PyTorch, per component and end to end."),
    "bench": ("koala_trt.commands.bench", "bench_cmd", "Latency (median, p90), peak memory and images/minute per component and end to end."),
    "serve": ("koala_trt.commands.serve", "serve_cmd", "Serve the pipeline as Triton model `koala` on a real tritonserver (HTTP, gRPC, metrics)."),
    "triton": ("koala_trt.commands.triton", "triton_cmd", "Write a Triton model repository: one model per component plus a sampler model."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="koala-trt")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Export KOALA text-to-image models to ONNX and strongly typed TensorRT engines, check every
    artifact against PyTorch, and sample 1024x1024 images without torch at run time."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _terminate_as_interrupt() -> None:
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so staged folders are cleaned up."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _terminate_as_interrupt()
    debug = "--debug" in args or os.environ.get("KOALA_TRT_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="koala-trt", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.ClickException as e:
        e.show()
        return 2 if isinstance(e, click.UsageError) else e.exit_code
    except click.exceptions.Abort as e:  # Click turns Ctrl-C / SIGTERM inside a command into Abort
        interrupted = isinstance(e.__context__, KeyboardInterrupt)
        click.echo("Interrupted: nothing was left half-written." if interrupted else "Aborted.", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("Interrupted: nothing was left half-written.", err=True)
        return 130
    except KoalaError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        return e.exit_code
    except MemoryError:
        click.echo("Error: out of memory (try a smaller --height/--width or fewer components at a time)", err=True)
        return 1
    except Exception as e:  # a bug or an unforeseen library failure: one line unless --debug
        if debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"Error: {type(e).__name__}: {msg[:300]} (run with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
