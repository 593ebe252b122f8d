"""GPU profiles: the shipped cards load, a user's own TOML works the same, schema errors name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from engines.profile import builtin_names, load_profile, profile_from_dict
from koala_core.errors import UsageError
from test_cli import assert_one_line_error

SHIPPED = {"rtx3060ti": ("8.6", 8), "rtx2080ti": ("7.5", 11), "rtx4090": ("8.9", 24), "l4": ("8.9", 24),
           "a10": ("8.6", 24), "a100-40gb": ("8.0", 40), "a100-80gb": ("8.0", 80), "h100-80gb": ("9.0", 80),
           "jetson-agx-orin": ("8.7", 64), "rtx5090": ("12.0", 32), "rtx-portable": ("8.6", 8)}
# The library each card's engines are built with: TensorRT-RTX for the GeForce cards (here, on a CPU),
# standard TensorRT on the card for the datacenter cards and Jetson (TensorRT-RTX has no sm_87/sm_90).
LIBRARY = {"rtx3060ti": "tensorrt-rtx", "rtx2080ti": "tensorrt-rtx", "rtx4090": "tensorrt-rtx", "rtx5090": "tensorrt-rtx",
           "rtx-portable": "tensorrt-rtx"}
TARGETS = {"rtx-portable": ("8.6", "8.9", "12.0")}

BASE = """
name = "mycard"
[gpu]
compute_capability = "8.6"
memory_gib = 8
"""


def test_every_card_is_shipped_with_its_compute_capability_and_memory() -> None:
    assert set(builtin_names()) == set(SHIPPED)
    for name, (cc, mem) in SHIPPED.items():
        p = load_profile(name)
        assert (p.name, p.gpu.compute_capability, p.gpu.memory_gib) == (name, cc, mem)
        assert p.source == "builtin"
        assert 0 < p.gpu.usable_bytes < mem * (1 << 30)
        assert p.components() == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
        if name == "rtx2080ti":  # Turing: TensorRT-RTX has no FP32 GEMM, so only the VAE's GEMMs are FP16
            assert (p.vae.precision, p.vae.fp16_ops, p.vae.fp16_safe) == ("fp16", "gemm", False)
        else:
            assert p.vae.precision == "fp32"  # SDXL's VAE overflows in FP16
        assert p.build.hardware_compatibility == "none" and p.build.refit == "none"  # opt-in features
        assert p.build.library == LIBRARY.get(name, "tensorrt")
        assert p.build.targets == TARGETS.get(name, (cc,))


def test_paper_cards_default_to_static_1024_batch_1() -> None:
    for name in ("rtx3060ti", "rtx2080ti", "rtx4090"):
        s = load_profile(name).shapes
        assert (s.batch, s.height, s.width, s.static) == ((1, 1, 1), (1024,) * 3, (1024,) * 3, True)


def test_user_toml_loads_like_a_builtin(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "engines" / "profiles" / "rtx3060ti.toml").read_text()
    own = tmp_path / "my-3060ti.toml"
    own.write_text(text)
    a, b = load_profile("rtx3060ti"), load_profile(own)
    assert b.source == str(own.resolve())
    assert (a.gpu, a.precision, a.vae, a.shapes, a.build, a.runtime) == (b.gpu, b.precision, b.vae, b.shapes, b.build, b.runtime)
    code, out, err = run_cli("profiles", "show", own, "--json")
    assert code == 0, err
    assert json.loads(out)["gpu"]["compute_capability"] == "8.6"


def test_minimal_profile_gets_documented_defaults() -> None:
    import tomllib

    p = profile_from_dict(tomllib.loads(BASE), "test")
    assert p.precision == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16"}
    assert p.shapes.batch == (1, 1, 1) and p.shapes.guidance
    assert (p.build.optimization_level, p.build.refit, p.runtime.residency) == (3, "none", "resident")


@pytest.mark.parametrize("extra, field", [
    ("[shapes]\nheigth = 1024\n", "shapes.heigth"),
    ("[precision]\nunet = \"fp4\"\n", "precision.unet"),
    ("[shapes]\nheight = [1024, 512, 2048]\n", "shapes.height"),
    ("[shapes]\nwidth = 1020\n", "shapes.width"),
    ("[shapes]\nbatch = \"one\"\n", "shapes.batch"),
    ("[build]\noptimization_level = 7\n", "build.optimization_level"),
    ("[build]\nrefit = \"plain\"\n", "build.refit"),
    ("[build]\nworkspace_gib = 9\n", "build.workspace_gib"),
    ("[vae]\nprecision = \"fp16\"\n", "vae.precision"),
    ("[runtime]\nresidency = \"sometimes\"\n", "runtime.residency"),
    ("[runtime]\ncuda_graphs = \"yes\"\n", "runtime.cuda_graphs"),
    ("colour = \"green\"\n", "colour"),
])
def test_schema_errors_name_the_field(extra: str, field: str) -> None:
    import tomllib

    text = BASE + extra if extra.startswith("[") else extra + BASE
    with pytest.raises(UsageError) as e:
        profile_from_dict(tomllib.loads(text), "my.toml")
    assert f"field {field} " in str(e.value), str(e.value)
    assert str(e.value).startswith("my.toml: ")


@pytest.mark.parametrize("text, field", [
    ("name = \"x\"\n[gpu]\nmemory_gib = 8\n", "gpu.compute_capability"),
    ("name = \"x\"\n[gpu]\ncompute_capability = \"sm86\"\nmemory_gib = 8\n", "gpu.compute_capability"),
    ("name = \"x\"\n[gpu]\ncompute_capability = \"8.6\"\n", "gpu.memory_gib"),
    ("name = \"x\"\n[gpu]\ncompute_capability = \"8.6\"\nmemory_gib = 8\nreserved_gib = 9\n", "gpu.reserved_gib"),
    ("[gpu]\ncompute_capability = \"8.6\"\nmemory_gib = 8\n", "name"),
    ("name = \"My Card\"\n[gpu]\ncompute_capability = \"8.6\"\nmemory_gib = 8\n", "name"),
    ("name = \"t\"\n[gpu]\ncompute_capability = \"7.5\"\nmemory_gib = 11\n[build]\nhardware_compatibility = \"ampere_plus\"\n",
     "build.hardware_compatibility"),
])
def test_required_and_cross_field_errors(text: str, field: str) -> None:
    import tomllib

    with pytest.raises(UsageError, match=f"field {field.replace('.', r'[.]')} "):
        profile_from_dict(tomllib.loads(text), "p.toml")


def test_fp16_vae_is_allowed_only_when_declared_safe() -> None:
    import tomllib

    p = profile_from_dict(tomllib.loads(BASE + "[vae]\nprecision = \"fp16\"\nfp16_safe = true\n"), "t")
    assert p.precision_for("vae_decoder") == "fp16"


def test_shape_ranges_per_component_follow_guidance() -> None:
    import tomllib

    p = profile_from_dict(tomllib.loads(BASE + "[shapes]\nbatch = [1, 2, 3]\nheight = [768, 1024, 1024]\n"), "t")
    assert p.shape_range("unet").batch == (2, 4, 6)
    assert p.shape_range("text_encoder").batch == (1, 4, 6)  # one prompt set per call, or both at once
    assert p.shape_range("vae_decoder").batch == (1, 2, 3)
    assert p.shape_range("unet").height == (768, 1024, 1024)
    q = p.with_overrides(batch=1, height=256, width=512, precision="fp32")
    assert q.shape_range("unet") .batch == (2, 2, 2) and q.shapes.height == (256,) * 3 and q.shapes.width == (512,) * 3
    assert q.precision_for("unet") == "fp32" and q.precision_for("vae_decoder") == "fp32"
    no_cfg = profile_from_dict(tomllib.loads(BASE + "[shapes]\nguidance = false\n"), "t")
    assert no_cfg.shape_range("unet").batch == (1, 1, 1)


def test_invalid_toml_and_missing_file_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    code, _, err = run_cli("profiles", "show", bad)
    assert_one_line_error(code, err, 2, "not valid TOML")
    code, _, err = run_cli("profiles", "show", tmp_path / "none.toml")
    assert_one_line_error(code, err, 2, "does not exist")
    code, _, err = run_cli("profiles", "show", "rtx9999")
    assert_one_line_error(code, err, 2, "unknown GPU profile", "rtx3060ti")


def test_profiles_cli_list_and_show() -> None:
    code, out, err = run_cli("profiles", "list")
    assert code == 0, err
    for name in SHIPPED:
        assert name in out
    code, out, _ = run_cli("profiles", "list", "--json")
    names = [p["name"] for p in json.loads(out)["profiles"]]
    assert sorted(names) == sorted(SHIPPED)
    code, out, _ = run_cli("profiles", "show", "rtx2080ti")
    assert code == 0 and "compute_capability = 7.5" in out
