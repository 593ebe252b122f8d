"""Export of random:tiny (and a tiny SDXL-shaped U-Net with a mid block), checked in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli


def test_tiny_export_layout_and_manifest(tiny_artifacts: Path) -> None:
    from exporter.manifest import load_manifest

    m = load_manifest(tiny_artifacts)
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    for name in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (tiny_artifacts / name).is_file()
    assert list(m.verify()) == []
    assert m.data["source"]["model"] == "random:tiny" and m.data["opset"] == 18
    for name, comp in m.components.items():
        assert comp["check"]["passed"] is True
        assert comp["export"]["nodes"] < comp["export"]["nodes_before_cleanup"]
        assert m.data["files"][comp["file"]]["sha256"]
    assert not list(tiny_artifacts.parent.glob(".*partial*"))


def test_graph_io_matches_the_specs(tiny_artifacts: Path) -> None:
    from exporter.manifest import load_manifest

    m = load_manifest(tiny_artifacts)
    for name, spec in m.specs().items():
        model = onnx.load(str(m.onnx_path(name)), load_external_data=False)
        onnx.checker.check_model(model)
        ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
        assert ins == {t.name: list(t.dims) for t in spec.inputs}
        assert outs == {t.name: list(t.dims) for t in spec.outputs}
    unet = m.spec("unet")
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in m.spec("text_encoder_2").outputs] == ["hidden_states", "text_embeds"]


@pytest.mark.parametrize("component,batch,size", [("unet", 3, 384), ("unet", 1, 128), ("vae_decoder", 1, 320),
                                                  ("text_encoder", 5, 0), ("text_encoder_2", 1, 0)])
def test_dynamic_axes_run_at_other_sizes(tiny_artifacts: Path, tiny_source, component: str, batch: int, size: int) -> None:
    """The graphs run, and still match PyTorch, at a batch and size other than the export's."""
    from exporter.check import compare, onnx_outputs, torch_outputs
    from exporter.manifest import load_manifest
    from exporter.wrappers import wrap

    m = load_manifest(tiny_artifacts)
    spec = m.spec(component)
    feeds = spec.dummy_inputs(batch, size, size, seed=7)
    ref = torch_outputs(spec, wrap(spec, tiny_source.build(spec.module)), feeds)
    result = compare(spec, ref, onnx_outputs(spec, m.onnx_path(component), feeds), feeds)
    assert result.passed, result.failure_message()
    out = next(iter(ref.values()))
    assert out.shape[0] == batch


def test_sdxl_shaped_unet_with_mid_block(tmp_path: Path) -> None:
    """Static shapes here (dynamic axes are covered on random:tiny above): a third of the export time."""
    out = tmp_path / "sdxl"
    code, stdout, err = run_cli("export", "--model", "random:tiny-sdxl", "--out", out, "-c", "unet", "--height", "128", "--width", "192", "--static")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["configs"]["unet"]["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert m["components"]["unet"]["check"]["passed"]
    assert m["components"]["unet"]["check"]["inputs"]["sample"] == [2, 4, 16, 24]
    assert m["components"]["unet"]["shape_range"] == {"batch": [2, 2, 2], "height": [128, 128, 128], "width": [192, 192, 192],
                                                      "prompt_chunks": [1, 1, 1]}  # static: one chunk of 77 tokens
    graph = onnx.load(str(out / "unet" / "model.onnx"))
    assert any(n.op_type == "Softmax" for n in graph.graph.node)
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 16, 24]


def test_tolerance_failure_fails_and_names_the_output(tmp_path: Path, tiny_source) -> None:
    from exporter.export import ExportOptions, export
    from exporter.metrics import Tolerance
    from koala_core.errors import CheckFailed

    opts = ExportOptions(components=["text_encoder"], tolerance=Tolerance(rel_l2=0.0, max_abs_rel=0.0))
    with pytest.raises(CheckFailed, match=r"text_encoder\.hidden_states: relative L2 .* > 0"):
        export(tiny_source, tmp_path / "strict", opts, log=lambda s: None)
    assert not (tmp_path / "strict").exists()
    assert not list(tmp_path.iterdir())


def test_interrupted_export_leaves_nothing_complete(tmp_path: Path, tiny_source, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.onnx_export as onnx_export
    from exporter.export import ExportOptions, export

    real = onnx_export.export_onnx
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_source, tmp_path / "out", ExportOptions(components=["text_encoder", "text_encoder_2"]), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_local_diffusers_folder_source(tmp_path: Path, tiny_source) -> None:
    """A diffusers folder: configs read from the folder (not assumed), weights loaded from it."""
    import torch

    pipe = tiny_source.pipeline()
    pipe.unet.register_to_config(sample_size=24)  # a config value only the folder knows
    pipe.save_pretrained(str(tmp_path / "koala-folder"))
    from exporter.sources import resolve

    src = resolve(str(tmp_path / "koala-folder"))
    assert src.kind == "folder" and src.configs["unet"]["sample_size"] == 24 and src.default_size == 192
    te = src.build("text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(te.parameters(), pipe.text_encoder.parameters()))
    code, out, err = run_cli("export", "--model", tmp_path / "koala-folder", "--out", tmp_path / "art", "-c", "text_encoder_2")
    assert code == 0, err
    assert (tmp_path / "art" / "tokenizer_2" / "tokenizer.json").is_file()


def test_inspect_artifacts(tiny_artifacts: Path) -> None:
    code, out, err = run_cli("inspect", tiny_artifacts, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["components"]["unet"]["precision"] == "fp32"
    code, out, err = run_cli("inspect", tiny_artifacts)
    assert code == 0, err
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[3:7]}  # after the title, header and rule lines
    assert out.splitlines()[0] == f"artifacts {tiny_artifacts}: from random:tiny (opset 18)"
    assert rows["unet"] == ["unet", "fp32", "1.7M", "sample[B,4,h,w]", "timestep[B]", "encoder_hidden_states[B,T,96]",
                            "text_embeds[B,64]", "time_ids[B,6]", "out_sample[B,4,h,w]", "1..8", "128..512", "x", "128..512"]
    assert rows["text_encoder_2"] == ["text_encoder_2", "fp32", "0.2M", "input_ids[B,77]", "hidden_states[B,77,64]",
                                      "text_embeds[B,64]", "1..8", "-"]
    assert list(rows) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert "T prompt tokens (77 per chunk, 77..231)" in out


def test_corrupt_onnx_is_a_clear_error(tmp_path: Path) -> None:
    from koala_core.errors import KoalaError
    from koala_core.ort import make_session

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf" * 10)
    with pytest.raises(KoalaError, match="ONNX Runtime cannot load"):
        make_session(bad)


def test_dummy_inputs_follow_the_specs(tiny_source) -> None:
    from exporter.specs import specs_from_configs

    for spec in specs_from_configs(tiny_source.configs).values():
        feeds = spec.dummy_inputs(2, 256, 256)
        spec.check_inputs(feeds)
        for t in spec.inputs:
            assert feeds[t.name].shape == spec.input_shapes(2, 256, 256)[t.name]
            assert np.isfinite(feeds[t.name]).all()


def test_separate_vae_folder(tmp_path: Path, tiny_source) -> None:
    """--vae replaces the pipeline's VAE (as with an fp16-safe SDXL VAE): weights and config from the folder."""
    import torch

    vae = tiny_source.build("vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(str(tmp_path / "vae-fix"))
    from exporter.sources import with_vae

    loaded = with_vae(tiny_source, tmp_path / "vae-fix").build("vae")
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), vae.parameters()))
    code, _, err = run_cli("export", "--model", "random:tiny", "--vae", tmp_path / "vae-fix", "--out", tmp_path / "a", "-c", "vae_decoder")
    assert code == 0, err
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["source"]["vae"].endswith("vae-fix") and m["components"]["vae_decoder"]["check"]["passed"]
    code, _, err = run_cli("export", "--model", "random:tiny", "--vae", tmp_path / "nothing", "--out", tmp_path / "b")
    assert code == 2 and "not an AutoencoderKL folder" in err
