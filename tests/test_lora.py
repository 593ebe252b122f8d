"""LoRA adapters: fused at export (`export --lora`) and patched into an exported folder (`koala-trt lora`).

Adapters are random A/B tensors written here with safetensors, in diffusers/PEFT and kohya layouts,
over Linear and Conv layers of random:tiny's U-Net and both text encoders. Fused weights are checked
against the formula computed independently here and, where peft is installed, against diffusers' own
`load_lora_weights` + `fuse_lora(lora_scale=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

RANK = 2
# (module, layer path, alpha or None): a Linear in attention, 3x3 and 1x1 Convs, a Gemm Linear, CLIP layers.
LAYERS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", None),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 4.0),
    ("unet", "down_blocks.0.resnets.0.conv1", 1.0),
    ("unet", "up_blocks.2.resnets.0.conv_shortcut", None),
    ("unet", "down_blocks.1.resnets.0.time_emb_proj", 3.0),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", None),
    ("text_encoder", "encoder.layers.1.mlp.fc1", 1.0),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj", None),
]
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _weights(source, module: str) -> dict[str, tuple[int, ...]]:
    from exporter.lora import layer_weights

    return layer_weights(source.build(module, device="meta"))


def make_adapter(source, path: Path, layers=LAYERS, kohya: bool = False, seed: int = 0, with_alpha: bool = True) -> dict:
    """Write a random adapter; returns {(module, layer): (A, B, alpha)} for the independent formula."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    truth = {}
    for module, layer, alpha in layers:
        shape = _weights(source, module)[layer + ".weight"]
        a = (rng.standard_normal((RANK, *shape[1:])) * 0.2).astype(np.float32)
        b = (rng.standard_normal((shape[0], RANK, *([1] * (len(shape) - 2)))) * 0.2).astype(np.float32)
        alpha = alpha if with_alpha else None
        if kohya:
            key = KOHYA[module] + ("text_model_" if module == "text_encoder" else "") + layer.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
            if alpha is not None:
                sd[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
        else:
            sd[f"{module}.{layer}.lora_A.weight"], sd[f"{module}.{layer}.lora_B.weight"] = a, b
            if alpha is not None:
                sd[f"{module}.{layer}.alpha"] = np.array(alpha, dtype=np.float32)
        truth[(module, layer)] = (a, b, alpha)
    save_file(sd, str(path))
    return truth


def expected_weight(w: np.ndarray, fused: list[tuple[dict, float]], module: str, layer: str) -> np.ndarray:
    """W + sum over adapters of scale x (alpha / rank) x B @ A, in float64 (independent of exporter.lora)."""
    out = w.astype(np.float64)
    for truth, scale in fused:
        if (module, layer) in truth:
            a, b, alpha = truth[(module, layer)]
            r = a.shape[0]
            d = b.reshape(b.shape[0], r).astype(np.float64) @ a.reshape(r, -1).astype(np.float64)
            out += scale * ((r if alpha is None else alpha) / r) * d.reshape(w.shape)
    return out


def _fused_modules(source, args: list[str]) -> dict[str, object]:
    from exporter.lora import fuse, parse_lora_arg, read_adapter

    adapters = [read_adapter(parse_lora_arg(a)) for a in args]
    mods = {}
    for module in ("unet", "text_encoder", "text_encoder_2"):
        mods[module] = source.build(module)
        fuse(mods[module], module, adapters)
    return mods


# Bound: the fused weight is W + B@A (|W| <= ~0.2, |delta| <= ~0.5) computed in float32 against the
# float64 formula: a few float32 ulps at magnitude < 1, so 1e-6 absolute holds on any CPU (no
# reductions longer than rank 2 are involved, so FMA or not changes the last bit at most).
ATOL = 1e-6


@pytest.mark.parametrize("kohya", [False, True], ids=["peft", "kohya"])
def test_fuse_matches_formula(tiny_source, tmp_path: Path, kohya: bool) -> None:
    t1 = make_adapter(tiny_source, tmp_path / "a.safetensors", kohya=kohya, seed=1)
    t2 = make_adapter(tiny_source, tmp_path / "b.safetensors", layers=LAYERS[:3], kohya=kohya, seed=2, with_alpha=False)
    mods = _fused_modules(tiny_source, [f"{tmp_path / 'a.safetensors'}:0.7", str(tmp_path / "b.safetensors")])
    for module, layer, _ in LAYERS:
        base = dict(tiny_source.build(module).named_parameters())[layer + ".weight"].detach().numpy()
        got = dict(mods[module].named_parameters())[layer + ".weight"].detach().numpy()
        want = expected_weight(base, [(t1, 0.7), (t2, 1.0)], module, layer)
        assert np.abs(got - base).max() > 1e-3, f"{module}.{layer} was not changed"
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{module}.{layer}")
    # an untouched layer stays bit-identical
    untouched = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert np.array_equal(dict(mods["unet"].named_parameters())[untouched].detach().numpy(),
                          dict(tiny_source.build("unet").named_parameters())[untouched].detach().numpy())


@pytest.mark.parametrize("kohya", [False, True], ids=["peft", "kohya"])
def test_fuse_matches_diffusers(tiny_source, tmp_path: Path, kohya: bool) -> None:
    """diffusers' load_lora_weights + fuse_lora(lora_scale=0.6) on the same pipeline is the reference."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    # diffusers' PEFT-layout loader takes no `.alpha` keys (its trainer stores alpha = rank); the
    # kohya layout carries per-layer alphas, which diffusers maps to PEFT's alpha_pattern.
    # kohya's trainer writes an alpha for every layer (diffusers gives a layer without one the file's
    # most common alpha, not its rank), so every kohya layer here has one.
    layers = LAYERS if not kohya else [(m, lay, 2.5 if a is None else a) for m, lay, a in LAYERS if m == "unet"]
    make_adapter(tiny_source, tmp_path / "a.safetensors", layers=layers, kohya=kohya, seed=3, with_alpha=kohya)
    pipe = tiny_source.pipeline()
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"))
    pipe.fuse_lora(lora_scale=0.6, components=["unet", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    mods = _fused_modules(tiny_source, [f"{tmp_path / 'a.safetensors'}:0.6"])
    for module, layer, _ in layers:
        ref = dict(getattr(pipe, module).named_parameters())[layer + ".weight"].detach().numpy()
        got = dict(mods[module].named_parameters())[layer + ".weight"].detach().numpy()
        base = dict(tiny_source.build(module).named_parameters())[layer + ".weight"].detach().numpy()
        assert np.abs(ref - base).max() > 1e-3, f"diffusers did not change {module}.{layer}"
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL, err_msg=f"{module}.{layer}")


# ----- the CLI: export --lora, koala-trt lora, bad input ---------------------------------------

def _graph_weights(folder: Path, component: str) -> dict[str, np.ndarray]:
    """Every Linear/Conv weight of a component's graph by PyTorch name, in PyTorch's layout."""
    import onnx
    from onnx import numpy_helper

    from calibration.lora_patch import WRAPPER_ATTR, weight_sites
    from exporter.manifest import load_manifest

    m = load_manifest(folder)
    model = onnx.load(str(m.onnx_path(component)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sites = weight_sites(model, WRAPPER_ATTR[m.spec(component).kind])
    return {k: (inits[s.initializer].T if s.transposed else inits[s.initializer]) for k, s in sites.items()}


@pytest.fixture(scope="module")
def adapters(tiny_source, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    d = tmp_path_factory.mktemp("lora")
    # the text encoder's last layer (encoder.layers.2) is outside its graph (SDXL reads the penultimate
    # hidden states): an adapter layer there must still be accepted, and change nothing.
    layers = LAYERS + [("text_encoder", "encoder.layers.2.self_attn.k_proj", None)]
    return (d / "peft.safetensors", make_adapter(tiny_source, d / "peft.safetensors", layers=layers, seed=5),
            d / "kohya.safetensors", make_adapter(tiny_source, d / "kohya.safetensors", layers=LAYERS[2:7], kohya=True, seed=6))


@pytest.fixture(scope="module")
def fresh_lora_export(adapters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    peft, _, kohya, _ = adapters
    out = tmp_path_factory.mktemp("lora-export") / "fused"
    code, _, err = run_cli("export", "-m", "random:tiny", "-o", out, "--components", "text_encoder,text_encoder_2,unet",
                           "--lora", f"{peft}:0.8", "--lora", kohya)
    assert code == 0, err
    return out


def test_export_lora_manifest_and_weights(tiny_source, adapters, fresh_lora_export: Path) -> None:
    from exporter.manifest import sha256_file

    peft, t1, kohya, t2 = adapters
    m = json.loads((fresh_lora_export / "manifest.json").read_text())
    assert m["loras"] == [
        {"file": "peft.safetensors", "sha256": sha256_file(peft), "scale": 0.8, "format": "peft",
         "layers": {"unet": 5, "text_encoder": 3, "text_encoder_2": 1}},
        {"file": "kohya.safetensors", "sha256": sha256_file(kohya), "scale": 1.0, "format": "kohya",
         "layers": {"unet": 3, "text_encoder": 2}},
    ]
    # the graphs hold W + deltas (independent formula), transposed back where the exporter folded W^T
    for module in ("unet", "text_encoder"):
        graph = _graph_weights(fresh_lora_export, module)
        base = {n: p.detach().numpy() for n, p in tiny_source.build(module).named_parameters()}
        for (mod, layer), _ in {**t1, **t2}.items():
            if mod != module or layer.startswith("encoder.layers.2."):
                continue
            want = expected_weight(base[layer + ".weight"], [(t1, 0.8), (t2, 1.0)], mod, layer)
            np.testing.assert_allclose(graph[layer + ".weight"], want, rtol=0, atol=ATOL, err_msg=layer)


def test_lora_patch_equals_fresh_export(tiny_artifacts: Path, adapters, fresh_lora_export: Path, tmp_path: Path) -> None:
    from exporter.check import compare, fp32_tolerance, onnx_outputs
    from exporter.manifest import load_manifest

    peft, _, kohya, _ = adapters
    out = tmp_path / "patched"
    code, stdout, err = run_cli("lora", "--artifacts", tiny_artifacts, "--lora", f"{peft}:0.8", "--lora", kohya, "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    # weights: unet 5 + 3 (conv1, conv_shortcut and time_emb_proj shared by both adapters: 5 distinct),
    # text_encoder: q_proj, fc1 (the layers.2 one is outside the graph), text_encoder_2: out_proj
    assert report["weights"] == {"text_encoder": 2, "text_encoder_2": 1, "unet": 5}
    assert [a["file"] for a in report["loras"]] == ["peft.safetensors", "kohya.safetensors"]
    patched, fresh = load_manifest(out), load_manifest(fresh_lora_export)
    assert list(patched.verify()) == []
    for name in ("text_encoder", "text_encoder_2", "unet"):
        a, b = _graph_weights(out, name), _graph_weights(fresh_lora_export, name)
        assert a.keys() == b.keys()
        # same float32 W, same float32 delta added once in the same order: equal to the bit
        assert [k for k in a if not np.array_equal(a[k], b[k])] == [], name
        spec = patched.spec(name)
        feeds = spec.dummy_inputs(2, 128, 128, seed=3)
        result = compare(spec, onnx_outputs(spec, fresh.onnx_path(name), feeds), onnx_outputs(spec, patched.onnx_path(name), feeds),
                         feeds, fp32_tolerance(name))
        assert result.passed, result.failure_message()
    # the source folder is untouched
    assert list(load_manifest(tiny_artifacts).verify()) == []
    assert "loras" not in load_manifest(tiny_artifacts).data


def _int8_copy(tiny_artifacts: Path, dst: Path) -> Path:
    """A copy of the tiny export whose manifest says its U-Net is INT8 (what `quantize` writes)."""
    import shutil

    from exporter.manifest import load_manifest

    shutil.copytree(tiny_artifacts, dst)
    m = load_manifest(dst)
    m.components["unet"]["precision"] = "int8"
    m.save()
    return dst


def test_lora_bad_input(tiny_artifacts: Path, adapters, tmp_path: Path, tiny_source) -> None:
    peft, _, _, _ = adapters
    out = tmp_path / "out"
    notsafe = tmp_path / "x.safetensors"
    notsafe.write_text("not a tensor file")
    alien = tmp_path / "alien.safetensors"
    from safetensors.numpy import save_file

    save_file({f"unet.mid_block.attentions.0.proj_{i}.lora_A.weight": np.zeros((2, 4), np.float32) for i in range(5)}
              | {f"unet.mid_block.attentions.0.proj_{i}.lora_B.weight": np.zeros((4, 2), np.float32) for i in range(5)}, str(alien))
    cases = [
        (["--lora", tmp_path / "none.safetensors"], 2, f"Error: --lora {tmp_path / 'none.safetensors'}: no such file"),
        (["--lora", f"{peft}:strong"], 2, f"Error: --lora {peft}:strong: scale 'strong' is not a number (FILE or FILE:SCALE, e.g. style.safetensors:0.8)"),
        (["--lora", notsafe], 2, f"Error: --lora {notsafe}: not a safetensors file"),
        (["--lora", alien], 2, f"Error: --lora {alien}: 10 key(s) match no layer of the unet: "
                               "unet.mid_block.attentions.0.proj_0.lora_A.weight, unet.mid_block.attentions.0.proj_0.lora_B.weight, "
                               "unet.mid_block.attentions.0.proj_1.lora_A.weight and 7 more"),
    ]
    for extra, rc, line in cases:
        for cmd in (["lora", "--artifacts", tiny_artifacts, "--out", out], ["export", "-m", "random:tiny", "-o", out]):
            code, _, err = run_cli(*cmd, *extra)
            assert (code, err.strip().splitlines()[-1][: len(line)]) == (rc, line), (cmd, err)
            # one Error line, no traceback (export's "exporting ..." progress line may come first)
            assert [ln for ln in err.splitlines() if ln.startswith("Error")] == [err.strip().splitlines()[-1]], err
            assert "Traceback" not in err
            assert not out.exists()
    int8 = _int8_copy(tiny_artifacts, tmp_path / "int8")
    code, _, err = run_cli("lora", "--artifacts", int8, "--lora", peft, "--out", out)
    assert (code, err.strip()) == (2, f"Error: {int8}: the unet is int8; a LoRA cannot be patched into quantized weights. "
                                      "Fuse it at export and quantize again: koala-trt export --model random:tiny --lora FILE[:SCALE] "
                                      "--out FP32_DIR, then koala-trt quantize --onnx FP32_DIR --calib CALIB --out OUT")
    assert not out.exists()


def test_lora_patch_fp16(tiny_artifacts: Path, adapters, fresh_lora_export: Path, tmp_path: Path) -> None:
    """An FP16 folder (AutoCast drops torch's node metadata; the Linear sites come from its FP32 export):
    weights patched in FP32 and cast back, so within two FP16 roundings of the fresh FP32 export's."""
    pytest.importorskip("modelopt", reason="FP16 conversion needs nvidia-modelopt")
    peft, _, kohya, _ = adapters
    fp16 = tmp_path / "fp16"
    code, _, err = run_cli("convert", "--onnx", tiny_artifacts, "--out", fp16, "--components", "text_encoder_2,unet", "--no-accuracy")
    assert code == 0, err
    out = tmp_path / "fp16-lora"
    code, stdout, err = run_cli("lora", "--artifacts", fp16, "--lora", f"{peft}:0.8", "--lora", kohya, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["weights"] == {"text_encoder": 2, "text_encoder_2": 1, "unet": 5}
    for name in ("text_encoder_2", "unet"):
        got, want = _graph_weights_fp16(out, fp16, name), _graph_weights(fresh_lora_export, name)
        changed = [k for k in got if not np.array_equal(got[k], _graph_weights_fp16(fp16, fp16, name)[k])]
        assert len(changed) == {"text_encoder_2": 1, "unet": 5}[name]
        for k in changed:
            # each FP16 rounding is within 2^-11 relative; two of them (convert, then patch) plus the
            # smallest subnormal step near zero bound the difference on any CPU (casts are exact IEEE ops)
            np.testing.assert_allclose(got[k].astype(np.float32), want[k], rtol=2 ** -10, atol=2 ** -14, err_msg=k)


def _graph_weights_fp16(folder: Path, fp16_folder: Path, component: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    from calibration.lora_patch import WRAPPER_ATTR, _add_fp32_sites, weight_sites
    from exporter.manifest import load_manifest

    m, src = load_manifest(folder), load_manifest(fp16_folder)
    model = onnx.load(str(m.onnx_path(component)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sites = weight_sites(model, WRAPPER_ATTR[m.spec(component).kind])
    _add_fp32_sites(fp16_folder, src, component, model, sites)
    return {k: (inits[s.initializer].T if s.transposed else inits[s.initializer]) for k, s in sites.items()}


def test_read_half_precision_adapters(tmp_path: Path) -> None:
    """Adapters are often saved in bf16 (kohya's save_precision) or fp16: read exactly, as float32."""
    import torch
    from safetensors.torch import save_file

    from exporter.lora import LoraArg, read_adapter

    a = torch.randn(2, 8, 3, 3).to(torch.bfloat16)
    b = torch.randn(4, 2, 1, 1).to(torch.float16)
    save_file({"lora_unet_conv_in.lora_down.weight": a, "lora_unet_conv_in.lora_up.weight": b,
               "lora_unet_conv_in.alpha": torch.tensor(1.0, dtype=torch.bfloat16)}, str(tmp_path / "h.safetensors"))
    layer = read_adapter(LoraArg(tmp_path / "h.safetensors")).layers["unet"]["conv_in"]
    assert layer.A.dtype == layer.B.dtype == np.float32
    assert np.array_equal(layer.A, a.float().numpy()) and np.array_equal(layer.B, b.float().numpy())
    assert layer.alpha == 1.0
