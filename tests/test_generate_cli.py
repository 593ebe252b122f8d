"""`koala-trt generate` on random:tiny: the happy path, the torch-free ONNX Runtime run, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "128", "--width", "128", "--steps", "2", "--no-progress"]
LONG_PROMPT = " ".join(["a fluffy koala"] * 20)  # 140 tokens with random:tiny's tokenizers: 2 chunks of 75


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-line errors are what is tested: an earlier in-process `--debug` run must not leak tracebacks in."""
    monkeypatch.delenv("KOALA_TRT_DEBUG", raising=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_generate_json_numbered_pngs_and_long_prompt(tiny_artifacts: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "imgs" / "koala.png"
    code, stdout, stderr = run_cli("generate", "--artifacts", tiny_artifacts, "--prompt", LONG_PROMPT, "--negative-prompt", "blurry",
                                   "--seed", "3", "--batch", "2", *SMALL, "--out", out, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["images"] == [str(tmp_path / "imgs" / "koala-0.png"), str(tmp_path / "imgs" / "koala-1.png")]
    assert (result["seed"], result["steps"], result["guidance"], result["batch"]) == (3, 2, 5.0, 2)  # guidance: the manifest's
    assert result["timings"]["stages"]["unet"]["calls"] == 2 and result["timings"]["overhead"]["per_step_ms"] > 0
    assert "truncated" not in stderr  # a prompt over 77 tokens is chunked, not cut (tests/test_long_prompt.py)
    assert _leftovers(out.parent) == ["koala-0.png", "koala-1.png"]
    a, b = (np.asarray(Image.open(p)) for p in result["images"])
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)  # seeds 3 and 4


def test_generate_table_and_latents_file(tiny_artifacts: Path, tmp_path: Path) -> None:
    """--latents takes the noise before scaling by the initial sigma: the seed's noise saved to a file
    gives the seed's image; sizes default to the latents' own."""
    from sampler.loop import initial_noise

    np.save(tmp_path / "noise.npy", initial_noise(5, 1, (4, 16, 16)))
    code, stdout, stderr = run_cli("generate", "-a", tiny_artifacts, "-p", "a koala", "--seed", "5", *SMALL, "--out", tmp_path / "seed.png")
    assert code == 0, stderr
    assert "image: " in stdout and "unet (per step)" in stdout and "non-model overhead" in stdout and "per denoising step" in stdout
    code, stdout, stderr = run_cli("generate", "-a", tiny_artifacts, "-p", "a koala", "--latents", tmp_path / "noise.npy",
                                   "--steps", "2", "--no-progress", "--out", tmp_path / "latents.png")
    assert code == 0, stderr
    assert (tmp_path / "seed.png").read_bytes() != b""
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seed.png")), np.asarray(Image.open(tmp_path / "latents.png")))


BLOCKER = r"""
import importlib.abc, sys
BLOCKED = {"torch", "diffusers", "transformers", "onnxscript", "accelerate"}
attempts = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Blocker())
from koala_trt.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("BLOCKED-ATTEMPTS", attempts, "LOADED", loaded, file=sys.stderr)
sys.exit(code if not loaded else 99)
"""


def test_onnxruntime_sampler_runs_without_torch(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchfree.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "generate", "--artifacts", str(tiny_artifacts), "--prompt", "a koala",
                           "--seed", "1", *SMALL, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "BLOCKED-ATTEMPTS [] LOADED []" in proc.stderr  # nothing on this path even tried to import them
    assert out.is_file() and "image: " in proc.stdout


@pytest.fixture(scope="module")
def broken_copy(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("broken") / "tiny"
    shutil.copytree(tiny_artifacts, dst)
    return dst


@pytest.mark.parametrize("args, code, message", [
    (["--height", "100"], 2, "multiples of 8"),
    (["--height", "136"], 2, "multiples of 32"),
    (["--height", "1024"], 2, "outside the sizes unet was exported for"),
    (["--batch", "5"], 2, "batch 10 (2 x --batch with classifier-free guidance)"),
    (["--steps", "5000"], 2, "--steps must be between 1 and 1000"),  # 0 is Click's range error: tests/test_bad_inputs_generate.py
    (["--guidance", "nan"], 2, "--guidance must be a finite number"),
    (["--latents", "{tmp}/wrong_shape.npy"], 2, "--latents: shape (1, 4, 8, 8), expected (1, 4, 16, 16)"),
    (["--latents", "{tmp}/wrong_dtype.npy"], 2, "--latents: dtype float64, expected float32"),
    (["--latents", "{tmp}/not_npy.npy"], 2, "is not a readable .npy file"),
    (["--backend", "torch"], 2, "--backend torch needs --model"),
    (["--seed", "1", "--latents", "{tmp}/wrong_shape.npy"], 2, "--seed and --latents both set the initial noise"),
], ids=["height-not-8", "height-not-32", "outside-range", "batch-range", "steps", "guidance", "latents-shape",
        "latents-dtype", "latents-not-npy", "torch-without-model", "seed-and-latents"])
def test_bad_inputs_fail_cleanly(args: list[str], code: int, message: str, tiny_artifacts: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wrong_shape.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp_path / "wrong_dtype.npy", np.zeros((1, 4, 16, 16), np.float64))
    (tmp_path / "not_npy.npy").write_text("hello")
    out = tmp_path / "out" / "x.png"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--height", "128", "--width", "128"] if "--height" not in args else []
    got, stdout, stderr = run_cli("generate", "--artifacts", tiny_artifacts, "--prompt", "a koala", "--no-progress",
                                  *base, *args, "--out", out)
    assert got == code, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr and not out.exists() and _leftovers(out.parent) == []


def test_tensorrt_backend_unavailable(tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where runtime.tensorrt_backend (or TensorRT under it) cannot be imported: one line, exit 1, no PNG.
    With the module present, a folder that is not an engines folder is refused by the backend itself
    (its manifest is read before TensorRT is looked for, so the same usage error on every machine)."""
    out = tmp_path / "out" / "x.png"
    args = ["generate", "--artifacts", tiny_artifacts, "--backend", "tensorrt", "--engines", tmp_path, "--prompt", "a koala",
            "--height", "128", "--width", "128", "--out", out]
    code, _, stderr = run_cli(*args)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert errors == [f"Error: {tmp_path} is not a koala-trt engines folder (no manifest.json); create one with `koala-trt build`"]
    # An engines folder (read first, on every machine) whose backend module cannot be imported.
    from engines_helpers import fake_engines_dir

    args[args.index("--engines") + 1] = fake_engines_dir(tiny_artifacts, tmp_path / "eng")
    monkeypatch.setitem(sys.modules, "runtime.tensorrt_backend", None)  # `import` now raises ImportError
    code, _, stderr = run_cli(*args)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert code == 1 and "Traceback" not in stderr, stderr
    assert errors == ["Error: the tensorrt backend is not available here (import of runtime.tensorrt_backend halted; None in sys.modules); "
                      "it needs the [gpu] extra on a machine with an NVIDIA GPU"]
    assert not out.exists() and _leftovers(out.parent) == []


def test_missing_and_corrupt_artifacts(tiny_artifacts: Path, broken_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    common = ["--prompt", "a koala", "--no-progress", "--height", "128", "--width", "128", "--steps", "1", "--out", str(out)]
    code, _, stderr = run_cli("generate", "--artifacts", tmp_path / "nope", *common)
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = run_cli("generate", "--artifacts", tmp_path, *common)
    assert code == 2 and "not a koala-trt artifacts folder" in stderr
    unet = broken_copy / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    unet.write_bytes(bytes(data))
    code, _, stderr = run_cli("generate", "--artifacts", broken_copy, *common)
    assert code == 2 and "unet/model.onnx is corrupt: its sha256 does not match" in stderr
    unet.write_bytes(bytes(data[:1000]))  # truncated: caught even with --no-verify
    code, _, stderr = run_cli("generate", "--artifacts", broken_copy, "--no-verify", *common)
    assert code == 2 and "unet/model.onnx is corrupt: 1,000 bytes" in stderr
    (broken_copy / "tokenizer_2" / "tokenizer.json").unlink()
    code, _, stderr = run_cli("generate", "--artifacts", broken_copy, *common)
    assert code == 2 and "missing artifact file" in stderr and "tokenizer_2/tokenizer.json" in stderr
    assert _leftovers(tmp_path) == []


def test_defaults_read_from_the_manifest_sampler_entry(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A Lightning-style manifest (10 steps, guidance 3.5, trailing) is sampled that way unless overridden."""
    from exporter.manifest import load_manifest

    dst = tmp_path / "lightning"
    shutil.copytree(tiny_artifacts, dst)
    m = load_manifest(dst)
    m.data["sampler"].update(steps=3, guidance=3.5)
    sched = dst / m.data["scheduler"]
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "timestep_spacing": "trailing"}))
    m.rehash()
    m.save()
    code, stdout, stderr = run_cli("generate", "-a", dst, "-p", "a koala", "--seed", "0", "--height", "128", "--width", "128",
                                   "--no-progress", "--out", tmp_path / "l.png", "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert (r["steps"], r["guidance"], r["scheduler"]["timestep_spacing"]) == (3, 3.5, "trailing")
    assert r["scheduler"]["timesteps"] == [999.0, 666.0, 332.0]
    code, stdout, stderr = run_cli("generate", "-a", dst, "-p", "a koala", "--seed", "0", "--height", "128", "--width", "128",
                                   "--steps", "1", "--guidance", "1", "--no-progress", "--out", tmp_path / "l1.png", "--json")
    assert code == 0, stderr
    assert (json.loads(stdout)["steps"], json.loads(stdout)["guidance"]) == (1, 1.0)
