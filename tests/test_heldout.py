"""accuracy.json's gate over validate's checks (validation/heldout.summarise), on a
hand-written validate report: which metrics fail convert/quantize and which are only reported."""

from __future__ import annotations

from typing import Any

from validation.heldout import AccuracyOptions, report_rows, summarise


def _metric(output: str, metric: str, value: float | None, limit: float, passed: bool) -> dict[str, Any]:
    return {"output": output, "metric": metric, "value": value, "limit": limit, "passed": passed, "note": ""}


def _validated(unet_rel_l2: float = 0.01, unet_cosine: float = 0.9999, psnr: float = 40.0, e2e_nonfinite: float = 0.0) -> dict[str, Any]:
    unet = {"id": "unet/prompts", "component": "unet", "inputs": "prompts", "precision": "fp16", "description": "U-Net inputs",
            "samples": 2, "limits": {"rel_l2": 0.02, "max_abs": 0.1, "cosine": 0.999, "nonfinite": 0.0}, "outputs": {},
            "metrics": [_metric("out_sample", "rel_l2", unet_rel_l2, 0.02, unet_rel_l2 <= 0.02),
                        _metric("out_sample", "max_abs", 0.01, 0.1, True),
                        _metric("out_sample", "cosine", unet_cosine, 0.999, unet_cosine >= 0.999),
                        _metric("out_sample", "nonfinite", 0.0, 0.0, True)]}
    vae = {"id": "vae_decoder/prompts", "component": "vae_decoder", "inputs": "prompts", "precision": "fp32", "description": "latents",
           "samples": 1, "limits": {}, "outputs": {}, "metrics": [_metric("sample", "rel_l2", 0.5, 1e-3, False)]}
    e2e = {"id": "end_to_end", "component": "end_to_end", "inputs": "end_to_end", "precision": "fp16", "description": "sampler",
           "samples": 1, "limits": {}, "outputs": {"latents": {"rel_l2": [0.01]}},
           "metrics": [_metric("latents", "latent_rel_l2", 0.5, 0.02, False), _metric("images", "psnr", psnr, 35.0, psnr >= 35.0),
                       _metric("images", "ssim", 0.99, 0.98, True),
                       _metric("latents+images", "nonfinite", e2e_nonfinite, 0.0, e2e_nonfinite == 0)]}
    return {"reference": "PyTorch FP32", "height": 128, "width": 128, "steps": 2, "seed": 1234, "backend": "onnxruntime",
            "components": {"unet": "fp16", "vae_decoder": "fp32"}, "checks": [unet, vae, e2e], "failures": ["..."],
            "passed": False, "seconds": 1.0}


OPTS = AccuracyOptions(prompts=["a red bicycle"], height=128, width=128, steps=2)


def test_gate_is_the_converted_components_rel_l2_max_abs_nonfinite() -> None:
    # The FP32 VAE (not converted), the end-to-end latents and PSNR break their validate limits
    # here: reported, not gated. A cosine below its limit is reported, not gated.
    report = summarise(_validated(unet_cosine=0.99, psnr=10.0), ["unet"], OPTS)
    assert report["passed"] and report["failure_summary"] == []
    assert report["precision"] == "fp16" and report["tolerance"] == {"rel_l2": 0.02, "max_abs_rel": 0.1}
    assert set(report["components"]) == {"unet"}
    assert report["components"]["unet"]["outputs"] == {"out_sample": {"rel_l2": 0.01, "max_abs": 0.01, "cosine": 0.99, "nonfinite": 0.0}}
    assert report["end_to_end"]["latents"] == {"rel_l2": 0.5} and report["end_to_end"]["images"] == {"psnr": 10.0, "ssim": 0.99}
    assert [r[0] for r in report_rows(report)] == ["unet", "end-to-end (2 steps)"]


def test_gate_fails_on_rel_l2_and_on_nonfinite_end_to_end() -> None:
    report = summarise(_validated(unet_rel_l2=0.05, e2e_nonfinite=3.0), ["unet"], OPTS)
    assert not report["passed"]
    assert report["failure_summary"] == ["unet.out_sample: rel_l2 0.05 (limit 0.02)",
                                         "end-to-end latents+images: nonfinite 3 (limit 0)"]
    assert report["components"]["unet"]["failures"] == {"out_sample": ["rel_l2 0.05 (limit 0.02)"]}
