"""Tiled VAE decode (sampler/vae_tiling.py, Sampler.decode): the grid and blend weights, tiled against
untiled decode of the same latents on random:tiny's VAE over ONNX Runtime, the profile's [vae] tile,
the engine built for the tile, and the sampler's refusals. The full-size check (SDXL's VAE at
1024x1024, PSNR >= 40 dB) is scripts/bench_vae_tiling.py (minutes on a CPU; BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.specs import check_tile
from sampler.vae_tiling import TileGrid, axis_weights, decode_tiled, tile_starts
from tests.conftest import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ----- the grid and the weights ---------------------------------------------------------------------

@pytest.mark.parametrize("length, tile, overlap", [(128, 64, 16), (113, 64, 16), (65, 64, 16), (300, 48, 12),
                                                    (64, 64, 16), (40, 64, 16), (97, 32, 0)])
def test_tiles_are_one_size_and_cover_the_image(length: int, tile: int, overlap: int) -> None:
    s = tile_starts(length, tile, overlap)
    assert s[0] == 0
    if length <= tile:
        assert s == (0,)
        return
    assert s[-1] + tile == length  # the last tile ends at the edge, full size
    gaps = np.diff(s)
    assert (gaps >= 1).all() and (tile - gaps >= overlap).all()  # neighbours overlap by at least `overlap`
    assert gaps.max() - gaps.min() <= 1  # spread evenly
    # as few tiles as that overlap allows: one fewer could not cover the length
    assert (len(s) - 1) * (tile - overlap) + tile >= length > (len(s) - 2) * (tile - overlap) + tile


@pytest.mark.parametrize("blend", ["cosine", "linear"])
@pytest.mark.parametrize("starts, tile", [((0, 24, 49), 64), ((0, 32, 64), 64), ((0, 3), 8), ((0,), 16)])
def test_weights_are_a_partition_of_unity(blend: str, starts: tuple[int, ...], tile: int) -> None:
    f = 8
    w = axis_weights(starts, tile, f, blend)
    total = np.zeros((starts[-1] + tile) * f)
    for s, wi in zip(starts, w):
        total[s * f:(s + tile) * f] += wi
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert (w >= 0).all()
    # where one tile alone covers a pixel it has weight 1; at its inner edges it has the least
    first_alone = (starts[1] * f) if len(starts) > 1 else tile * f
    assert (w[0][:first_alone] == 1.0).all()
    if len(starts) > 1:
        assert w[0][-1] < w[0][first_alone - 1] and w[1][0] < w[1][tile * f // 2]


def test_cosine_ramp_gives_the_edge_pixels_less_weight_than_linear() -> None:
    lin, cos = axis_weights((0, 48), 64, 8, "linear"), axis_weights((0, 48), 64, 8, "cosine")
    edge = slice(0, 16)  # the first 2 latent cells of tile 1, next to its inner edge
    assert (cos[1][edge] < lin[1][edge]).all()


def _pointwise(lat: np.ndarray) -> np.ndarray:
    """A decoder with no context: each latent cell to an 8x8 block of a fixed function of it."""
    rgb = np.stack([np.tanh(lat[:, 0] - lat[:, 1]), np.tanh(lat[:, 2]), np.tanh(lat[:, 3] * lat[:, 0])], axis=1)
    return np.repeat(np.repeat(rgb, 8, axis=2), 8, axis=3).astype(np.float32)


def test_a_decoder_without_context_is_blended_back_exactly() -> None:
    """Weights summing to one reproduce any decoder whose pixels depend on their own latent cell only."""
    lat = np.random.default_rng(0).standard_normal((2, 4, 40, 56), dtype=np.float32)
    grid = TileGrid.make(40, 56, 128)
    assert (len(grid.rows), len(grid.cols), grid.tile, grid.overlap) == (3, 5, 16, 4)
    calls: list[tuple[int, ...]] = []

    def dec(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        return _pointwise(t)

    got = decode_tiled(dec, lat, grid)
    assert got.shape == (2, 3, 320, 448) and got.dtype == np.float32
    assert calls == [(2, 4, 16, 16)] * 15  # every tile the same size: one static engine runs them all
    np.testing.assert_allclose(got, _pointwise(lat), rtol=0, atol=2e-6)  # float32 rounding of the weights


def test_a_tile_as_large_as_the_image_is_the_untiled_decode_bit_for_bit() -> None:
    lat = np.random.default_rng(1).standard_normal((1, 4, 16, 16), dtype=np.float32)
    grid = TileGrid.make(16, 16, 128)
    assert grid.count == 1
    np.testing.assert_array_equal(decode_tiled(_pointwise, lat, grid), _pointwise(lat))


@pytest.mark.parametrize("tile, height, width, reason", [
    (100, 1024, 1024, "must be a positive multiple of 8 px (got 100)"),
    (0, 1024, 1024, "must be a positive multiple of 8 px (got 0)"),
    (-512, 1024, 1024, "must be a positive multiple of 8 px (got -512)"),
    (True, 1024, 1024, "must be a positive multiple of 8 px (got True)"),
    ("512", 1024, 1024, "must be a positive multiple of 8 px (got '512')"),
    (1024, 768, 1024, "must not be larger than the image (1024 px > 1024x768 px)"),
])
def test_bad_tile_sizes(tile: object, height: int, width: int, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        check_tile(tile, height, width)
    assert str(e.value) == reason


# ----- tiled against untiled on random:tiny's VAE ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sampler(tiny_artifacts: Path):
    from exporter.manifest import load_manifest
    from runtime.backend import OnnxRuntimeBackend
    from sampler.loop import PipelineAssets, Sampler

    m = load_manifest(tiny_artifacts)
    return Sampler(OnnxRuntimeBackend(m, threads=2), PipelineAssets.from_manifest(m))


# The PSNR floors: the tiles' own GroupNorm statistics and mid-block attention, and the zero padding
# at their inner edges, make tiled differ from untiled by ~1e-2 (random:tiny's VAE, 256x256 px, the
# VAE spec's dummy latents of seed 0, 2 images): measured 45.5 dB for 2x2 tiles of 192 px and 36.6 dB
# for 3x3 tiles of 128 px (43.0-45.6 and 35.7-38.2 dB over seeds 0-5). ONNX Runtime's kernels on the
# two CPU kinds (AVX2 against AVX-512/VNNI) differ by ~1e-6 relative, 4 orders of magnitude below
# that difference, so the PSNR moves by far less than 0.01 dB between them; the floors leave 3.5 dB
# below the seed-0 figures for the latents' luck, none needed for the CPU.
@pytest.mark.parametrize("tile, grid_shape, floor_db", [(192, (2, 2), 42.0), (128, (3, 3), 33.0)])
def test_tiled_decode_matches_untiled_on_tiny(tiny_sampler, tile: int, grid_shape: tuple[int, int], floor_db: float) -> None:
    from sampler.loop import Timings
    from validation.images import psnr

    s = tiny_sampler
    lat = s.vae.dummy_inputs(2, 256, 256, seed=0)["latent_sample"]
    untiled = s.decode(lat)
    timings = Timings()
    tiled = s.decode(lat, timings, tile=tile)
    grid = TileGrid.make(32, 32, tile)
    assert (len(grid.rows), len(grid.cols)) == grid_shape
    assert len(timings.stages["vae_decoder"]) == grid.count  # one decoder run per tile
    assert tiled.shape == untiled.shape == (2, 3, 256, 256) and tiled.dtype == untiled.dtype == np.float32
    a, b = np.clip(untiled / 2 + 0.5, 0, 1), np.clip(tiled / 2 + 0.5, 0, 1)  # the images the sampler returns
    assert psnr(a, b) >= floor_db
    # value ranges: the same extremes within 5% of the untiled span, the same share clipped within 0.5 pt
    span = float(untiled.max() - untiled.min())
    assert abs(float(tiled.min() - untiled.min())) < 0.05 * span and abs(float(tiled.max() - untiled.max())) < 0.05 * span
    assert abs(float((np.abs(tiled) > 1).mean() - (np.abs(untiled) > 1).mean())) < 0.005
    # The blend is convex (weights >= 0 summing to 1), so by Jensen each pixel's squared error is at
    # most the weighted mean of the covering tiles' own squared errors against the untiled decode:
    # an exact bound, checked from tiles decoded here independently of decode_tiled.
    f, t = 8, grid.tile
    wy, wx = axis_weights(grid.rows, t, f), axis_weights(grid.cols, t, f)
    bound = np.zeros_like(untiled, dtype=np.float64)
    for i, y in enumerate(grid.rows):
        for j, x in enumerate(grid.cols):
            own = s.backend.run("vae_decoder", {"latent_sample": np.ascontiguousarray(lat[:, :, y:y + t, x:x + t])})["sample"]
            win = (slice(None), slice(None), slice(y * f, (y + t) * f), slice(x * f, (x + t) * f))
            bound[win] += np.outer(wy[i], wx[j]) * (own.astype(np.float64) - untiled[win]) ** 2
    err = (tiled.astype(np.float64) - untiled) ** 2
    assert (err <= bound * (1 + 1e-4) + 1e-10).all()
    assert float(np.mean(err)) > 0  # tiles do differ: the test could see a blend that went wrong


def test_sampler_samples_tiled_with_the_same_noise(tiny_sampler) -> None:
    """The whole loop: the same latents give the same image shapes, tiled or not, in [0, 1]."""
    from sampler.loop import Request
    from validation.images import psnr

    s = tiny_sampler
    plans = [s.plan(Request("a koala", steps=2, seed=3, height=256, width=256, vae_tile=t)) for t in (None, 192)]
    assert (plans[0].vae_tile, plans[1].vae_tile) == (None, 192)
    (img0, t0), (img1, t1) = (s.sample(p, progress=False) for p in plans)
    assert img0.shape == img1.shape == (1, 256, 256, 3)
    assert 0 <= img1.min() and img1.max() <= 1
    assert (len(t0.stages["vae_decoder"]), len(t1.stages["vae_decoder"])) == (1, 4)
    assert psnr(img0, img1) >= 40.0  # as the decode test: the same decoder on denoised latents


# ----- what refuses a tile ----------------------------------------------------------------------------

class _BuiltForTiles:
    """A backend whose VAE engine was built for 128 px tiles (as a TensorRT engines folder records it)."""

    def __init__(self, inner) -> None:
        self.inner, self.specs = inner, inner.specs

    def vae_tile(self) -> int:
        return 128

    def shape_range(self, component: str):
        from exporter.specs import ShapeRange

        r = self.inner.shape_range(component)
        return ShapeRange(r.batch, (128, 128, 128), (128, 128, 128)) if component == "vae_decoder" else r

    def run(self, component, feeds):
        return self.inner.run(component, feeds)


def test_an_engine_built_for_tiles_decodes_tiles_by_default(tiny_sampler) -> None:
    from koala_core.errors import UsageError
    from sampler.loop import Request, Sampler

    s = Sampler(_BuiltForTiles(tiny_sampler.backend), tiny_sampler.assets)
    assert s.plan(Request("x", height=256, width=256)).vae_tile == 128
    assert s.tile_grid(s.plan(Request("x", height=256, width=384))).describe() == \
        "3x4 tiles of 128x128 px, overlap >= 32 px, cosine blend"
    with pytest.raises(UsageError) as e:
        s.plan(Request("x", height=256, width=256, vae_tile=192))
    assert str(e.value) == ("192x192 is outside the sizes vae_decoder was exported for (height 128..128, width 128..128); "
                            "the VAE decodes 192x192 tiles: pick a --vae-tile inside that range")
    with pytest.raises(UsageError) as e:
        s.plan(Request("x", height=128, width=96))
    assert str(e.value) == ("the VAE engine's tile (built for 128 px) must not be larger than the image (128 px > 96x128 px); "
                            "generate at least 128x128 px, or rebuild the VAE engine with a smaller [vae] tile")


# ----- the profile's [vae] tile and the engine built for it ---------------------------------------

PROFILE = """name = "tiled"
[gpu]
compute_capability = "8.6"
memory_gib = 8
[build]
library = "tensorrt-rtx"
[precision]
text_encoder = "fp32"
text_encoder_2 = "fp32"
unet = "fp32"
[shapes]
batch = 1
height = {h}
width = 256
[vae]
precision = "fp32"
tile = {tile}
"""


def test_profile_tile_sets_the_decoder_shapes() -> None:
    from engines.profile import profile_from_dict

    p = profile_from_dict(tomllib.loads(PROFILE.format(h=256, tile=128)), "t.toml")
    assert p.vae.tile == 128
    assert p.shape_range("vae_decoder").to_json() == {"batch": [1, 1, 1], "height": [128, 128, 128], "width": [128, 128, 128]}
    assert p.shape_range("vae_encoder").height == (256, 256, 256)  # the encoder is not tiled
    assert p.shape_range("unet").height == (256, 256, 256)
    assert p.to_json()["vae"]["tile"] == 128
    with pytest.raises(Exception) as e:
        p.with_overrides(height=120)
    assert str(e.value) == "--height 120 is smaller than profile tiled's vae.tile (128 px): the tile must not be larger than the image"


@pytest.mark.parametrize("h, tile, line", [
    (256, 100, "t.toml: field vae.tile must be a positive multiple of 8 px (got 100)"),
    (256, 0, "t.toml: field vae.tile must be a positive multiple of 8 px (got 0)"),
    (256, '"512"', "t.toml: field vae.tile must be a positive multiple of 8 px (got '512')"),
    (256, "true", "t.toml: field vae.tile must be a positive multiple of 8 px (got True)"),
    ("[128, 256, 512]", 256, "t.toml: field vae.tile = 256 px is larger than the image (128x256 px, the smallest the "
                             "profile allows); use a tile of at most 128 px"),
])
def test_profile_tile_refusals(h: object, tile: object, line: str) -> None:
    from engines.profile import profile_from_dict
    from koala_core.errors import UsageError

    with pytest.raises(UsageError) as e:
        profile_from_dict(tomllib.loads(PROFILE.format(h=h, tile=tile)), "t.toml")
    assert str(e.value) == line


def test_build_plan_builds_the_decoder_for_the_tile(tiny_artifacts: Path, tmp_path: Path) -> None:
    prof = tmp_path / "tiled.toml"
    prof.write_text(PROFILE.format(h=256, tile=128))
    code, out, err = run_cli("build", "--profile", prof, "--onnx", tiny_artifacts, "--out", tmp_path / "e",
                             "--dry-run", "--json", "--no-estimate")
    assert code == 0, err
    comps = json.loads(out)["components"]
    vae, unet = comps["vae_decoder"], comps["unet"]
    assert vae["vae_tile"] == 128 and "vae_tile" not in unet
    assert vae["inputs"]["latent_sample"] == {"min": [1, 4, 16, 16], "opt": [1, 4, 16, 16], "max": [1, 4, 16, 16]}
    assert ".b1.128x128." in vae["engine"] and ".b2.256x256." in unet["engine"]
    # a tile outside the sizes the export checked (random:tiny: 128..512 px) is refused with its field
    prof.write_text(PROFILE.format(h=256, tile=64))
    code, out, err = run_cli("build", "--profile", prof, "--onnx", tiny_artifacts, "--out", tmp_path / "e", "--dry-run",
                             "--no-estimate")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"Error: vae_decoder: input latent_sample needs height 64 px, outside the range its export recorded (height "
        f"128..512 px, {tiny_artifacts.resolve()}): the limit is at least 128 px; set [vae] tile within it (the decoder is "
        "built for 64 px tiles), or re-export at a size whose range covers it")


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None,
                    reason="TensorRT-RTX is not installed (make install installs it)")
def test_tensorrt_rtx_builds_the_decoder_for_the_tile(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A real engine (no GPU needed to build it), its profile the tile's, recorded for the sampler."""
    from engines.engine_manifest import load_engines_manifest
    from tests.test_rtx_build import koala

    prof = tmp_path / "tiled.toml"
    prof.write_text(PROFILE.format(h=256, tile=128))
    koala("build", "--profile", prof, "--onnx", tiny_artifacts, "-c", "vae_decoder", "--no-estimate", "--out", tmp_path / "e")
    m = load_engines_manifest(tmp_path / "e")
    e = m.entry("vae_decoder")
    assert m.vae_tile() == 128 and e["static"] is True
    assert e["inputs"]["latent_sample"] == {"min": [1, 4, 16, 16], "opt": [1, 4, 16, 16], "max": [1, 4, 16, 16]}
    assert m.shape_range("vae_decoder").height == (128, 128, 128)
    assert (tmp_path / "e" / e["file"]).stat().st_size > 0 and ".b1.128x128." in e["file"]
