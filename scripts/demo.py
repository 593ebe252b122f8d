"""`make demo`: the main job on the built-in default model, end to end, through the real CLI.

Each step is one `koala-trt` command; the demo stops at the first failure with its exit code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from koala_trt.cli import main as koala_trt


def step(title: str, *args: str) -> None:
    print(f"\n=== {title}\n$ koala-trt {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = koala_trt(list(args))
    if code != 0:
        print(f"demo: step failed with exit code {code}", file=sys.stderr)
        sys.exit(code)
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


def run(model: str, out: Path) -> None:
    art = out / "artifacts"
    step("Inspect the model", "inspect", model)
    step("Export every component to ONNX, each checked against PyTorch", "export", "--model", model, "--out", str(art), "--force")
    step("Inspect the artifacts", "inspect", str(art))
    print(f"\nartifacts: {art.resolve()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--out", type=Path, default=Path("out"))
    a = p.parse_args()
    run(a.model, a.out)
