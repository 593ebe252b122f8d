"""The planner chooses (engines/plan_choice.py) and weight streaming's memory model (engines/planner.py):
hand-counted budgets on made-up components, the ladder for tiny and full-size presets, the profile
fields and flags of the aids. Pure computation on the meta device: no TensorRT, no weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

GIB, MIB = 1 << 30, 1 << 20


def _card(memory_gib: float, reserved_gib: float = 0.0, **extra: str) -> object:
    from engines.profile import profile_from_dict

    data = {"name": "card", "gpu": {"compute_capability": "8.6", "memory_gib": memory_gib, "reserved_gib": reserved_gib},
            "build": {"workspace_gib": min(2.0, memory_gib / 2)}}
    for table, line in extra.items():
        data[table] = json.loads(line)
    return profile_from_dict(data, "test card")


def _toy(mode: str, unet_weights_mib: int) -> object:
    from engines.planner import ComponentMemory, MemoryPlan

    unet = ComponentMemory("unet", "fp16", 0, unet_weights_mib * MIB, "parameters", 100 * MIB, 1 * MIB, {},
                           largest_weight_bytes=10 * MIB)
    te = ComponentMemory("text_encoder", "fp16", 0, 200 * MIB, "parameters", 20 * MIB, 1 * MIB, {},
                         largest_weight_bytes=5 * MIB)
    return MemoryPlan("toy", _card(1.0), mode, {"text_encoder": te, "unet": unet}, overhead_bytes=100 * MIB)


def test_resident_budgets_stream_the_once_per_image_component_first() -> None:
    """1 GiB card, 100 MiB overhead, headroom min(256 MiB, 5% of 1 GiB): the text encoder (run once per
    image) streams before the U-Net (run every step); counted by hand."""
    from engines.planner import solve_budgets, streaming_headroom

    plan = _toy("resident", 700)
    assert plan.resident_peak == (100 + (200 + 1) + (700 + 1) + 100) * MIB  # 1102 MiB: does not fit 1024
    target = GIB - int(0.05 * GIB)
    assert streaming_headroom(GIB) == int(0.05 * GIB)
    solve_budgets(plan)
    te, unet = plan.components["text_encoder"], plan.components["unet"]
    # text encoder at budget 0: 100 + (0 + 1) + (700 + 1) + max(100, 20 + 2*5) = 902 MiB; the rest of the
    # target goes back to it
    assert te.device_weights_bytes == target - 902 * MIB and te.scratch_bytes == 10 * MIB
    assert not unet.streams and plan.streamed_per_step_bytes == 0
    assert plan.streamed_per_image_bytes == 200 * MIB - (target - 902 * MIB)
    assert plan.resident_peak == target and plan.fits


def test_resident_budgets_reach_the_unet_when_needed() -> None:
    from engines.planner import solve_budgets

    plan = _toy("resident", 900)
    target = GIB - int(0.05 * GIB)
    solve_budgets(plan)
    te, unet = plan.components["text_encoder"], plan.components["unet"]
    assert te.device_weights_bytes == 0
    # 100 + (0 + 1) + (kept + 1) + max(100 + 2*10, 20 + 2*5) = target
    assert unet.device_weights_bytes == target - (100 + 1 + 1 + 120) * MIB
    assert plan.streamed_per_step_bytes == 900 * MIB - unet.device_weights_bytes
    assert plan.resident_peak == target


def test_sequential_budgets_each_component_on_its_own_and_a_fixed_unet_budget() -> None:
    from engines.planner import solve_budgets

    plan = _toy("sequential", 900)
    target = GIB - int(0.05 * GIB)
    solve_budgets(plan)
    te, unet = plan.components["text_encoder"], plan.components["unet"]
    assert not te.streams  # 100 + 200 + 1 + 20 fits alone
    assert unet.device_weights_bytes == target - (100 + 100 + 20 + 1) * MIB
    assert plan.sequential_peak == target
    solve_budgets(plan, unet_budget=300 * MIB)  # the profile's budget is taken as it is
    assert unet.device_weights_bytes == 300 * MIB and plan.streamed_per_step_bytes == 600 * MIB
    assert plan.sequential_peak == (100 + 300 + 100 + 20 + 1) * MIB
    solve_budgets(plan, unet_budget=2 * GIB)  # more than its weights: all of them stay
    assert not unet.streams


def test_no_budget_fits_leaves_it_at_zero() -> None:
    from engines.planner import solve_budgets

    plan = _toy("sequential", 900)
    plan.components["unet"].activations_bytes = 2 * GIB
    solve_budgets(plan)
    assert plan.components["unet"].device_weights_bytes == 0 and not plan.fits


def test_tiles_per_image() -> None:
    from engines.plan_choice import tiles_per_image

    assert tiles_per_image(1024, 1024, 512) == (9, 9 * 512 * 512 / (1024 * 1024))  # stride 384: 0, 384, 768
    assert tiles_per_image(512, 512, 512) == (1, 1.0)
    assert tiles_per_image(768, 1024, 512) == (6, 6 * 512 * 512 / (768 * 1024))


# ----- the ladder on real configs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def choices() -> dict:
    from engines.plan_choice import choose
    from engines.planner import plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve

    out = {}
    small = _card(4.0, 0.25, build='{"library": "tensorrt-rtx", "workspace_gib": 1}')
    for model in ("koala-700m", "koala-1b", "sdxl-base"):
        source = resolve(f"random:{model}")
        fn = lambda p, s=source: plan_memory(s, p)  # noqa: E731
        out[model, "rtx3060ti"] = choose(load_profile("rtx3060ti"), fn)
        if model == "sdxl-base":
            out[model, "4gb"] = choose(small, fn)
        if model == "koala-1b":
            out[model, "rtx3060ti", "0.5"] = choose(load_profile("rtx3060ti"), fn, min_margin_bytes=GIB // 2)
    return out


def _rung(choice: object, aid: str) -> object:
    return next(r for r in choice.rungs if r.aid == aid)  # type: ignore[attr-defined]


def test_koala_fits_the_3060ti_as_it_is(choices: dict) -> None:
    for model in ("koala-700m", "koala-1b"):
        c = choices[model, "rtx3060ti"]
        assert c.chosen.aids == () and c.first_fit == "profile's own settings"
        assert c.summary().startswith("the profile's own settings (margin +") and c.summary().endswith("; cost: none")


def test_tiled_decode_plans_the_decoder_at_the_tile(choices: dict) -> None:
    """At 512 px tiles the decoder's feature maps hold a quarter of the pixels of 1024x1024, so its peak
    (a full-resolution SiLU output in both) is a quarter; that memory comes back as margin."""
    c = choices["koala-1b", "rtx3060ti"]
    own, tiled = c.rungs[0].plan, _rung(c, "tile").plan
    assert tiled.profile.vae.tile == 512
    a, b = own.components["vae_decoder"], tiled.components["vae_decoder"]
    assert b.max_shapes["latent_sample"] == (1, 4, 64, 64) and a.max_shapes["latent_sample"] == (1, 4, 128, 128)
    assert b.activations_bytes * 4 == a.activations_bytes
    assert tiled.margin_bytes - own.margin_bytes == own.resident_peak - tiled.resident_peak > 2 * GIB
    wide = choices["koala-1b", "rtx3060ti", "0.5"]  # KOALA-1B's 0.11 GiB is too thin for a 0.5 GiB margin
    assert wide.chosen.aids == ("tile",) and wide.chosen.plan.margin_bytes >= GIB // 2


def test_sdxl_base_on_the_3060ti_needs_sequential_residency(choices: dict) -> None:
    c = choices["sdxl-base", "rtx3060ti"]
    assert [r.plan.fits for r in c.rungs] == [False, False, True, True]
    assert c.first_fit == "+ sequential residency"
    assert c.chosen.aids == ("sequential",)  # it fits one at a time without the tiled decode too
    assert c.chosen.plan.peak == c.chosen.plan.sequential_peak
    assert c.summary().startswith("sequential residency (margin +")
    assert "every engine is loaded again for every image" in c.summary()


def test_sdxl_base_on_a_4gb_card_streams_the_unet(choices: dict) -> None:
    """Its FP16 U-Net alone (4.78 GiB) is larger than the card: only streaming fits; the budget is the
    largest that leaves the headroom, and what it leaves off the card is streamed every step."""
    from engines.planner import streaming_headroom

    c = choices["sdxl-base", "4gb"]
    assert [r.plan.fits for r in c.rungs] == [False, False, False, True]
    assert "streaming" in c.chosen.aids and "sequential" in c.chosen.aids
    p = c.chosen.plan
    u = p.components["unet"]
    assert 0 < u.device_weights_bytes < u.weights_bytes
    assert p.overhead_bytes + u.total_bytes == p.usable_bytes - streaming_headroom(p.usable_bytes)
    assert p.streamed_per_step_bytes == u.weights_bytes - u.device_weights_bytes
    assert f"{p.streamed_per_step_bytes / GIB:.2f} GiB streamed per denoising step" in c.summary()
    assert p.to_json()["weight_streaming"]["streamed_per_step_bytes"] == p.streamed_per_step_bytes


def test_tiny_fits_everywhere_with_nothing_to_add() -> None:
    from engines.plan_choice import choose
    from engines.planner import plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve

    source = resolve("random:tiny")
    c = choose(load_profile("rtx3060ti").with_overrides(height=512, width=512), lambda p: plan_memory(source, p))
    assert c.chosen.aids == ()
    assert _rung(c, "tile").note == "the image is not larger than a 512 px tile"
    assert _rung(c, "tile").aids == ()  # a rung that adds nothing keeps the aids before it


def test_plan_cli_prints_the_ladder_and_the_choice() -> None:
    code, out, err = run_cli("plan", "--model", "random:sdxl-base", "--profile", "rtx3060ti")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("choice: sequential residency (margin +") and "GiB of weights uploaded per image" in lines[-1]
    assert [line.split("  ")[0] for line in lines[-5:-1]] == ["profile's own settings", "+ tiled VAE decode",
                                                              "+ sequential residency", "+ weight streaming"]
    code, out, err = run_cli("plan", "--model", "random:sdxl-base", "--profile", "rtx3060ti", "--json")
    d = json.loads(out)
    assert d["fits"] is False and d["first_fit"] == "+ sequential residency"
    assert d["choice"]["aids"] == ["sequential"] and d["choice"]["residency"] == "sequential"
    assert [r["fits"] for r in d["ladder"]] == [False, False, True, True]


# ----- the aids' fields and flags ----------------------------------------------------------------

@pytest.mark.parametrize("toml, line", [
    ("[vae]\ntile = 500", "field vae.tile must be a positive multiple of 8 px (got 500)"),
    ("[vae]\ntile = 2048", "field vae.tile = 2048 px is larger than the image (1024x1024 px, the smallest the profile "
                           "allows); use a tile of at most 1024 px"),
    ("[vae]\ntile = \"512\"", "field vae.tile must be a positive multiple of 8 px (got '512')"),
    ("[shapes]\nheight = 1024\nwidth = [512, 768, 768]\n[vae]\ntile = 1024",
     "field vae.tile = 1024 px is larger than the image (1024x512 px, the smallest the profile allows); use a tile of "
     "at most 512 px"),
    ("[build]\nweight_streaming = 1", "field build.weight_streaming must be true or false (got 1)"),
    ("[build]\nweight_streaming = true\n[runtime]\nweight_streaming_budget_gib = 7.6",
     "field runtime.weight_streaming_budget_gib = 7.6 GiB is larger than the card: card has 7.5 GiB usable "
     "(8 GiB - 0.5 GiB reserved)"),
    ("[runtime]\nweight_streaming_budget_gib = 2", "field runtime.weight_streaming_budget_gib needs "
     "build.weight_streaming = true (a budget applies to streamable engines only)"),
    ("[build]\nweight_streaming = true\n[runtime]\nweight_streaming_budget_gib = -1",
     "field runtime.weight_streaming_budget_gib must be a number of GiB, at least 0 (got -1)"),
])
def test_aid_fields_name_themselves(tmp_path: Path, toml: str, line: str) -> None:
    p = tmp_path / "card.toml"
    head = 'name = "card"\n[gpu]\ncompute_capability = "8.6"\nmemory_gib = 8\nreserved_gib = 0.5\n'
    p.write_text(head + toml + "\n")
    code, _, err = run_cli("profiles", "show", p)
    assert (code, err.strip().splitlines()[-1]) == (2, f"Error: {p}: {line}")


def test_aid_fields_that_are_fine(tmp_path: Path) -> None:
    from engines.profile import load_profile

    p = tmp_path / "card.toml"
    p.write_text('name = "card"\n[gpu]\ncompute_capability = "8.6"\nmemory_gib = 8\n[vae]\ntile = 256\n'
                 '[build]\nweight_streaming = true\n[runtime]\nweight_streaming_budget_gib = 8\n')
    prof = load_profile(p)
    assert (prof.vae.tile, prof.build.weight_streaming, prof.runtime.weight_streaming_budget_gib) == (256, True, 8.0)
    assert prof.shape_range("vae_decoder").height == (256, 256, 256)  # the decoder's engine is built for the tile
    assert prof.shape_range("unet").height == (1024, 1024, 1024)
    with pytest.raises(Exception) as e:
        prof.with_overrides(height=128)
    assert str(e.value) == "--height 128 is smaller than profile card's vae.tile (256 px): the tile must not be larger than the image"


def test_weight_streaming_with_a_library_that_lacks_it() -> None:
    from engines.libraries import TENSORRT, TENSORRT_RTX, check_weight_streaming
    from koala_core.errors import UsageError

    with pytest.raises(UsageError) as e:
        check_weight_streaming(TENSORRT, "8.6.1.6")
    assert str(e.value) == ("weight streaming needs TensorRT 10.0 or newer (BuilderFlag.WEIGHT_STREAMING); this is "
                            "TensorRT 8.6.1.6: upgrade it, or drop build.weight_streaming / --weight-streaming")
    for lib, version in ((TENSORRT, "10.0.1.6"), (TENSORRT, "11.3.0"), (TENSORRT_RTX, "1.7.1.116"), (TENSORRT, None)):
        check_weight_streaming(lib, version)


def test_build_plan_refuses_weight_streaming_with_an_old_tensorrt(tiny_artifacts: Path, tmp_path: Path) -> None:
    """The build plan is made with the library's version before anything is built."""
    from engines.buildplan import make_build_plan
    from engines.profile import load_profile
    from koala_core.errors import UsageError

    prof = load_profile("a10").with_overrides(height=256, width=256, precision="fp32").with_aids(weight_streaming=True)
    with pytest.raises(UsageError) as e:
        make_build_plan([tiny_artifacts], prof, tmp_path / "out", trt_version="8.6.1.6", estimate=False)
    assert str(e.value).startswith("weight streaming needs TensorRT 10.0 or newer")
    plan = make_build_plan([tiny_artifacts], prof, tmp_path / "out", trt_version="10.8.0.43", estimate=False)
    assert plan.flags["weight_streaming"] is True and all(c.engine.endswith(".ws.plan") for c in plan.components.values())
    assert {k: v["from"] for k, v in plan.streaming_budgets().items()} == {c: "automatic" for c in plan.components}


def test_build_auto_takes_the_plan_choice(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A made-up card between random:tiny's one-at-a-time and all-resident peaks (at 512 px, where a
    512 px tile adds nothing): --auto builds for sequential residency, and says so in the rebuild command."""
    from engines.buildplan import auto_plan, make_build_plan, plan_function

    card = _card(1.0, build='{"library": "tensorrt-rtx", "workspace_gib": 0.25}').with_overrides(
        height=512, width=512, precision="fp32")
    own = plan_function(make_build_plan([tiny_artifacts], card, tmp_path / "o", estimate=False))(card)
    assert own.sequential_peak < own.resident_peak
    memory = (own.sequential_peak + own.resident_peak) / 2 / GIB
    card = _card(memory, build='{"library": "tensorrt-rtx", "workspace_gib": 0.25}').with_overrides(
        height=512, width=512, precision="fp32")
    plan, choice = auto_plan([tiny_artifacts], card, tmp_path / "o", trt_version="1.7.1.116", args={"auto": True})
    assert not choice.rungs[0].plan.fits and choice.chosen.aids == ("sequential",)
    assert plan.profile.runtime.residency == "sequential" and plan.memory is choice.chosen.plan and plan.memory.fits
    assert "--residency sequential" in plan.rebuild_command() and "--auto" not in plan.rebuild_command()
    tight = _card(own.overhead_bytes / GIB, build='{"library": "tensorrt-rtx", "workspace_gib": 0.25}').with_overrides(
        height=512, width=512, precision="fp32")
    from koala_core.errors import KoalaError

    with pytest.raises(KoalaError) as e:  # nothing but the runtime's overhead fits: no aid helps
        auto_plan([tiny_artifacts], tight, tmp_path / "o", trt_version="1.7.1.116")
    assert str(e.value).startswith("--auto: no aid makes it fit: ") and str(e.value).endswith(
        "even with sequential residency, weight streaming on card")
