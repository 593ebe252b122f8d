"""The two charts of BENCHMARKS.md, drawn from its tables (the figures below are copied from them, with
the date of each run): docs/bench-unet-step.png (U-Net step speed-up against ONNX Runtime FP32 per CPU
kind, each bar labelled with its U-Net rel L2) and docs/bench-image.png (25-step 1024x1024 image time,
labelled with its PSNR against ONNX Runtime FP32's image).

    .venv/bin/python scripts/bench_charts.py [--out docs]

A chart of one `koala-trt bench` run, with the spread of its calls, is `koala-trt bench --plot`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (CPU kind, [(entry, speed-up vs ONNX Runtime FP32, U-Net rel L2 or None for the reference)]):
# BENCHMARKS.md, "U-Net step per backend and precision".
STEP = [
    ("AVX2-only EPYC, 7 Dec", [("onnxruntime fp32", 1.00, None), ("openvino fp32", 1.12, 3.0e-6), ("torch fp32", 1.03, 3.7e-6),
                               ("onnxruntime int8", 1.55, 0.043), ("openvino fp32 on int8", 1.31, 0.043)]),
    ("AVX512-BF16 EPYC, 4 Dec", [("onnxruntime fp32", 1.00, None), ("openvino bf16", 2.18, 0.010), ("onnxruntime int8", 2.13, 0.041),
                                 ("openvino bf16 on int8", 3.23, 0.044), ("openvino fp32 on int8", 2.61, 0.040),
                                 ("torch fp32", 1.00, 2.2e-6), ("torch bf16", 1.82, 0.011)]),
    ("AMX Xeon, 3 Dec", [("onnxruntime fp32", 1.00, None), ("openvino fp32", 1.03, 3.1e-6), ("openvino bf16", 2.81, 0.048)]),
]
# (CPU kind, [(entry, seconds, PSNR dB or None for the reference)]): BENCHMARKS.md, "A 25-step 1024x1024 image".
IMAGE = [
    ("AVX2-only EPYC, 7 Dec", [("onnxruntime fp32", 909.2, None), ("onnxruntime, int8 U-Net", 594.5, 46.3), ("openvino (fp32)", 960.7, 125.7)]),
    ("AVX512-BF16 EPYC, 4 Dec", [("onnxruntime fp32", 866.6, None), ("openvino auto (bf16)", 442.1, 57.8),
                                 ("openvino auto, int8 U-Net", 332.4, 46.3)]),
    ("AMX Xeon, 3 Dec", [("onnxruntime fp32", 1067.3, None), ("openvino fp32", 977.8, 96.5), ("openvino bf16", 327.7, 47.8)]),
]


def _bars(groups: list, path: Path, xlabel: str, label: object, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from koala_core.atomic import staged_file

    rows = sum(len(entries) for _, entries in groups) + len(groups)
    fig, ax = plt.subplots(figsize=(7.5, 0.27 * rows + 1.0), dpi=90)
    y, ticks, names = 0, [], []
    top = max(v for _, entries in groups for _, v, _ in entries)
    colours = ("#4c72b0", "#dd8452", "#55a868")
    for g, (kind, entries) in enumerate(groups):
        ax.text(0, y, kind, fontsize=8, fontweight="bold", va="center")
        y += 1
        for name, value, err in entries:
            ax.barh(y, value, color=colours[g % len(colours)], height=0.7)
            ax.text(value + 0.01 * top, y, label(value, err), va="center", fontsize=7)  # type: ignore[operator]
            ticks.append(y)
            names.append(name)
            y += 1
    ax.set_yticks(ticks, labels=names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    a = ap.parse_args()
    _bars(STEP, a.out / "bench-unet-step.png", "speed-up against ONNX Runtime FP32 (paired rounds)",
          lambda v, e: f"{v:.2f}x" + ("" if e is None else f"  (rel L2 {e:.2g})"),
          "KOALA-700M U-Net step, 1024x1024, CFG batch 2, 2 threads")
    _bars(IMAGE, a.out / "bench-image.png", "seconds per image (lower is faster)",
          lambda v, e: f"{v:,.0f} s" + ("" if e is None else f"  (PSNR {e:.1f} dB)"),
          "KOALA-700M, one 25-step 1024x1024 image, 2 threads")
    print(f"wrote {a.out / 'bench-unet-step.png'} and {a.out / 'bench-image.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
