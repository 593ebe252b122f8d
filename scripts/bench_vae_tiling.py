"""Tiled against untiled VAE decode of the same latents over ONNX Runtime on the CPU: time, peak RSS
and how close the images are (PSNR, value ranges).

Each decode runs in a process of its own (so one's peak RSS does not hide the other's), through
Sampler.decode as `koala-trt generate` runs it: the artifacts folder's vae_decoder ONNX, one session,
one decode of the latents (the VAE spec's dummy latents: standard normal / scaling factor, the spread
of SDXL latents in the VAE's space). Printed and written as JSON (--json FILE):

- per mode: decode seconds (session creation excluded), peak RSS of the decode (the kernel's mark
  reset after the session is made: weights plus activations) and of the whole process;
- tiled against untiled: PSNR of the [0, 1] images the sampler returns (peak 1), PSNR of the raw
  decoder output over its nominal [-1, 1] range (peak-to-peak 2, before the clip), max |difference|,
  both outputs' min/max and the share of pixels outside [-1, 1] (clipped by the sampler);
- with --blends, the PSNR of every blend of sampler/vae_tiling.py (cosine, the sampler's, and linear)
  from the same tiles: the tiled process then keeps each tile's output while it decodes (3 x tile^2
  floats per tile and image: 28 MiB for 3x3 tiles of 512 px), which its peak RSS includes.

  PYTHONPATH=. python scripts/bench_vae_tiling.py --artifacts ARTIFACTS --size 1024 --tile 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(args: argparse.Namespace) -> None:
    import numpy as np

    from exporter.manifest import load_manifest
    from koala_core.meter import Meter, process_peak_rss_mb
    from runtime.backend import OnnxRuntimeBackend
    from sampler.loop import PipelineAssets, Sampler, Timings

    m = load_manifest(args.artifacts)
    sampler = Sampler(OnnxRuntimeBackend(m, threads=args.threads), PipelineAssets.from_manifest(m))
    lat = sampler.vae.dummy_inputs(args.batch, args.size, args.size, seed=args.seed)["latent_sample"]
    sampler.backend.load(["vae_decoder"])
    tiles: list[np.ndarray] = []
    if args.blends and args.child_tile:
        run = sampler.backend.run

        def recording(component: str, feeds: dict) -> dict:
            out = run(component, feeds)
            tiles.append(out["sample"])
            return out

        sampler.backend.run = recording  # type: ignore[method-assign]
    timings = Timings()
    with Meter() as meter:
        image = sampler.decode(lat, timings, args.child_tile or None)
    np.save(args.child_out, image)
    if tiles:
        from sampler.vae_tiling import BLENDS, TileGrid, decode_tiled

        for blend in BLENDS:
            grid = TileGrid.make(lat.shape[2], lat.shape[3], args.child_tile, blend=blend)
            feed = iter(tiles)
            np.save(args.child_out.with_name(f"tiled-{blend}.npy"), decode_tiled(lambda _t: next(feed), lat, grid))
    print(json.dumps({"seconds": meter.seconds, "peak_rss_mb": meter.peak_rss_mb, "process_peak_rss_mb": process_peak_rss_mb(),
                      "decoder_calls": len(timings.stages.get("vae_decoder", [])), "shape": list(image.shape)}))


def _run_mode(args: argparse.Namespace, tile: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--artifacts", str(args.artifacts), "--size", str(args.size), "--batch", str(args.batch),
           "--seed", str(args.seed), "--child-tile", str(tile), "--child-out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.blends:
        cmd += ["--blends"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"Error: the {'tiled' if tile else 'untiled'} decode failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path, help="an artifacts folder holding vae_decoder (fp32)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--blends", action="store_true", help="also compare the blends (cosine, linear) from the same tiles")
    ap.add_argument("--child-tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_out is not None:
        _child(args)
        return

    import numpy as np

    from koala_core.machine import cores, cpu_model, load_average
    from sampler.vae_tiling import TileGrid
    from validation.images import psnr

    grid = TileGrid.make(args.size // 8, args.size // 8, args.tile)
    with tempfile.TemporaryDirectory(prefix="bench-vae-tiling-") as tmp:
        untiled = _run_mode(args, 0, Path(tmp) / "untiled.npy")
        tiled = _run_mode(args, args.tile, Path(tmp) / "tiled.npy")
        a, b = np.load(Path(tmp) / "untiled.npy"), np.load(Path(tmp) / "tiled.npy")
        blends = {p.stem[len("tiled-"):]: p for p in Path(tmp).glob("tiled-*.npy")}
        img_a = np.clip(a / 2 + 0.5, 0, 1)
        by_blend = {k: psnr(img_a, np.clip(np.load(p) / 2 + 0.5, 0, 1)) for k, p in sorted(blends.items())}
    img_a, img_b = np.clip(a / 2 + 0.5, 0, 1), np.clip(b / 2 + 0.5, 0, 1)
    result = {
        "artifacts": str(args.artifacts), "size": args.size, "tile": args.tile, "batch": args.batch, "grid": grid.describe(),
        "work_ratio": grid.cells_decoded / (grid.height * grid.width),
        "untiled": untiled, "tiled": tiled,
        "psnr_images_db": psnr(img_a, img_b), "psnr_raw_db": psnr(a, b, data_range=2.0),
        **({"psnr_images_db_by_blend": by_blend} if by_blend else {}),
        "max_abs_diff_raw": float(np.abs(a - b).max()),
        "range_untiled": [float(a.min()), float(a.max())], "range_tiled": [float(b.min()), float(b.max())],
        "outside_unit_untiled": float((np.abs(a) > 1).mean()), "outside_unit_tiled": float((np.abs(b) > 1).mean()),
        "cpu": cpu_model(), "cores": cores(), "load_average": load_average(),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        from koala_core.atomic import staged_file

        with staged_file(args.json) as t:
            Path(t).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
