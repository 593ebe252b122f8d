"""`koala-trt serve` and `koala-trt triton --flavour python` usage errors: one line, exit 2, before any
server starts or model loads (no tritonserver needed; tests/test_serve.py runs the server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.parametrize("args,expected", [
    ([], "Error: give --artifacts DIR (from `koala-trt export`) or --repository DIR"),
    (["--repository", "R", "--artifacts", "A"], "Error: --repository serves a written repository as it is; omit --artifacts and --engines"),
    (["--repository", "R", "--backend", "openvino"], "Error: --backend, --cpu-precision, --max-batch and --instances were fixed when "
                                                     "the repository was written (`koala-trt triton --flavour python`); omit them with --repository"),
    (["--artifacts", "A", "--host", "localhost"], "Error: --host must be an IP address such as 127.0.0.1 (got 'localhost')"),
    (["--artifacts", "A", "--http-port", "9000", "--grpc-port", "9000"],
     "Error: --http-port, --grpc-port and --metrics-port must differ (got 9000, 9000, 8002)"),
    (["--artifacts", "A", "--metrics-port", "70000"], "Error: --metrics-port must be between 1 and 65535 (got 70000)"),
    (["--artifacts", "A", "--cpu-precision", "bf16"], "Error: --cpu-precision is for --backend openvino (not onnxruntime)"),
    (["--artifacts", "A", "--engines", "E"], "Error: --engines is for --backend tensorrt"),
    (["--artifacts", "A", "--backend", "tensorrt"], "Error: --backend tensorrt needs --engines DIR (a `koala-trt build` folder)"),
])
def test_serve_usage_errors(args: list[str], expected: str) -> None:
    code, out, err = run_cli("serve", *args)
    assert (code, out, err.strip()) == (2, "", expected)


def test_serve_refuses_the_production_flavour_and_a_folder_without_a_repository(tiny_artifacts: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", tmp_path / "prod", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("serve", "--repository", tmp_path / "prod")
    assert code == 2
    assert err.strip() == (f"Error: --repository {tmp_path / 'prod'} is the production flavour (components on onnxruntime_onnx, which "
                           "the bundled tritonserver lacks): write it with `koala-trt triton --flavour python`")
    code, _, err = run_cli("serve", "--repository", tmp_path)
    assert (code, err.strip()) == (2, f"Error: --repository {tmp_path} is not a koala-trt model repository (no single "
                                      "*/1/pipeline/triton.json; write one with `koala-trt triton --flavour python`)")


@pytest.mark.parametrize("args,expected", [
    (["--backend", "openvino"], "Error: --backend and --cpu-precision are for --flavour python (production components run on Triton's own backends)"),
    (["--flavour", "python", "--cpu-precision", "fp32"], "Error: --cpu-precision is for --backend openvino (not onnxruntime)"),
])
def test_triton_python_flavour_usage_errors(tmp_path: Path, args: list[str], expected: str) -> None:
    code, out, err = run_cli("triton", "--artifacts", tmp_path, "--out", tmp_path / "repo", *args)
    assert (code, err.strip()) == (2, expected)
    assert not (tmp_path / "repo").exists()


def test_triton_python_flavour_writes_component_models_on_the_python_backend(tiny_artifacts: Path, tmp_path: Path) -> None:
    import json

    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", tmp_path / "repo", "--device", "cpu", "--flavour", "python")
    assert code == 0, err
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        version = tmp_path / "repo" / f"koala_{comp}" / "1"
        assert 'backend: "python"' in (version.parent / "config.pbtxt").read_text()
        assert json.loads((version / "component.json").read_text()) == {"component": comp, "runtime": "onnxruntime"}
        manifest = json.loads((version / "manifest.json").read_text())
        assert list(manifest["components"]) == [comp]  # this model's process opens its own component only
        assert (version / manifest["components"][comp]["file"]).is_file()
    layout = json.loads((tmp_path / "repo" / "koala" / "1" / "pipeline" / "triton.json").read_text())
    assert {v["platform"] for v in layout["models"].values()} == {"python"}
    assert layout["models"]["unet"]["max_batch_size"] == 8
