"""accuracy.json for a precision variant: every converted component against the FP32 PyTorch
reference on held-out prompts (never in the calibration set), and an end-to-end latent comparison
after a few denoising steps.

- Text encoders: token ids of the held-out prompts; PyTorch vs the variant's graph in ONNX Runtime.
- U-Net: the inputs the PyTorch pipeline gives its U-Net along the held-out trajectories (CFG
  batch, every step) and the outputs it returns; the variant's U-Net runs on the same inputs.
- VAE decoder (when converted): the reference's final latents decoded by both; non-finite outputs
  fail (SDXL's VAE overflows in FP16).
- End to end: the same pipeline, seed and initial latents, once all in PyTorch and once with the
  variant's text encoders and U-Net in ONNX Runtime; the final latents are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from exporter.manifest import Manifest
from exporter.metrics import ErrorStats, Tolerance, error_stats
from exporter.tolerances import tolerance
from koala_core.errors import KoalaError
from koala_core.meter import Meter

Log = Callable[[str], None]

# The gates against FP32 PyTorch: the fp16 / int8 rows of the one table (exporter/tolerances.py).
TOLERANCES: dict[str, Tolerance] = {p: tolerance("", p) for p in ("fp16", "int8")}


@dataclass
class AccuracyOptions:
    prompts: list[str]
    height: int
    width: int
    steps: int = 4  # denoising steps of the held-out trajectories (end-to-end comparison)
    seed: int = 1234
    gate: bool = True


def _stats_json(s: ErrorStats) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in s.to_json().items()}


def _concat(outs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([o.reshape(-1) for o in outs])


def _sessions(manifest: Manifest, names: list[str]) -> dict[str, Any]:
    from koala_core.ort import make_session

    return {n: make_session(manifest.onnx_path(n), providers=["CPUExecutionProvider"]) for n in names}


def _run(session: Any, spec: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [t.name for t in spec.outputs]
    return dict(zip(names, session.run(names, {t.name: feeds[t.name] for t in spec.inputs})))


def accuracy_report(variant: Manifest, source_ref: str, opts: AccuracyOptions, log: Log = print) -> dict[str, Any]:
    """Compare `variant`'s converted components (precision != fp32) with the PyTorch reference."""
    import torch

    from calibration.capture import UNetRecorder
    from calibration.inputs import token_ids
    from exporter.check import torch_outputs
    from exporter.sources import resolve
    from exporter.wrappers import wrap

    converted = [n for n in variant.components if variant.precision(n) != "fp32"]
    precision = "int8" if any(variant.precision(n) == "int8" for n in converted) else "fp16"
    tol = TOLERANCES[precision]
    with Meter() as meter:
        source = resolve(source_ref)
        pipe = source.pipeline()
        pipe.set_progress_bar_config(disable=True)
        specs = variant.specs()
        report: dict[str, Any] = {
            "precision": precision, "reference": f"PyTorch FP32 ({source.ref})", "heldout_prompts": opts.prompts,
            "height": opts.height, "width": opts.width, "steps": opts.steps, "seed": opts.seed,
            "tolerance": {"rel_l2": tol.rel_l2, "max_abs_rel": tol.max_abs_rel}, "components": {}}

        # 1. The reference trajectories: U-Net inputs and outputs at every step, and final latents.
        recorder = UNetRecorder()
        outputs: list[np.ndarray] = []
        pre = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
        post = pipe.unet.register_forward_hook(lambda m, a, o: outputs.append(o[0].detach().float().numpy().copy()))
        latents0, ref_latents = [], []
        shape = (1, pipe.unet.config.in_channels, opts.height // source.vae_scale_factor, opts.width // source.vae_scale_factor)
        try:
            for i, prompt in enumerate(opts.prompts):
                lat = torch.randn(shape, generator=torch.Generator().manual_seed(opts.seed + i))
                latents0.append(lat)
                with torch.no_grad():
                    out = pipe(prompt=prompt, height=opts.height, width=opts.width, num_inference_steps=opts.steps,
                               guidance_scale=source.sampler.guidance, latents=lat.clone(), output_type="latent")
                ref_latents.append(out.images.float().numpy())
        finally:
            pre.remove()
            post.remove()
        log(f"      reference: {len(opts.prompts)} held-out prompts x {opts.steps} steps at {opts.width}x{opts.height} in PyTorch")

        sessions = _sessions(variant, [n for n in converted if n in specs])
        for name in converted:
            spec = specs[name]
            if spec.kind == "text_encoder":
                feeds = token_ids(variant, name, opts.prompts)
                ref = torch_outputs(spec, wrap(spec, getattr(pipe, name)), feeds)
                cand = _run(sessions[name], spec, feeds)
                stats = {k: error_stats(ref[k], cand[k].astype(np.float32)) for k in ref}
                inputs = f"token ids of {len(opts.prompts)} held-out prompts"
                n = len(opts.prompts)
            elif name == "unet":
                cand_outs = [_run(sessions[name], spec, feeds)["out_sample"] for feeds in recorder.calls]
                stats = {"out_sample": error_stats(_concat(outputs), _concat(cand_outs).astype(np.float32))}
                inputs = f"U-Net inputs along {len(opts.prompts)} held-out trajectories (CFG batch, every step)"
                n = len(recorder.calls)
            elif name == "vae_decoder":
                lat = np.concatenate(ref_latents) / np.float32(variant.data["vae"]["scaling_factor"])
                feeds = {"latent_sample": lat.astype(np.float32)}
                ref = torch_outputs(spec, wrap(spec, pipe.vae), feeds)
                cand = _run(sessions[name], spec, feeds)
                stats = {"sample": error_stats(ref["sample"], cand["sample"].astype(np.float32))}
                inputs = "the reference's final latents"
                n = lat.shape[0]
            else:
                continue
            report["components"][name] = {"precision": variant.precision(name), "inputs": inputs, "samples": n,
                                          "outputs": {k: _stats_json(v) for k, v in stats.items()},
                                          "failures": {k: f for k, v in stats.items() if (f := tol.check(v))}}

        # 2. End to end: the variant's text encoders and U-Net inside the same pipeline.
        report["end_to_end"] = _end_to_end(pipe, variant, sessions, specs, opts, latents0, ref_latents, source)
        nonfinite = report["end_to_end"]["latents"]["nonfinite"]
        report["end_to_end"]["failures"] = [f"{nonfinite} non-finite values"] if nonfinite else []
    report["seconds"] = round(meter.seconds, 1)
    report["peak_rss_mb"] = round(meter.peak_rss_mb, 1)
    failures = [f"{c}.{o}: {', '.join(why)}" for c, r in report["components"].items() for o, why in r["failures"].items()]
    failures += [f"end-to-end latents: {f}" for f in report["end_to_end"]["failures"]]
    report["passed"] = not failures
    report["failure_summary"] = failures
    return report


def _end_to_end(pipe: Any, variant: Manifest, sessions: dict[str, Any], specs: dict[str, Any], opts: AccuracyOptions,
                latents0: list[Any], ref_latents: list[np.ndarray], source: Any) -> dict[str, Any]:
    """Final latents with the variant's text encoders and U-Net (ONNX Runtime) in the reference
    pipeline (same scheduler, seed, initial latents) against the all-PyTorch run. Differences in the
    latents grow with the number of steps, so this is reported, not gated (non-finite fails)."""
    import torch

    from calibration.inputs import token_ids

    unet_spec = specs["unet"]
    original = pipe.unet.forward

    def unet_forward(sample: Any, timestep: Any, encoder_hidden_states: Any, timestep_cond: Any = None,
                     cross_attention_kwargs: Any = None, added_cond_kwargs: Any = None, return_dict: bool = False, **_: Any) -> Any:
        batch = sample.shape[0]
        feeds = {"sample": sample.float().numpy(),
                 "timestep": torch.as_tensor(timestep).reshape(-1).float().expand(batch).numpy().copy(),
                 "encoder_hidden_states": encoder_hidden_states.float().numpy(),
                 "text_embeds": added_cond_kwargs["text_embeds"].float().numpy(),
                 "time_ids": added_cond_kwargs["time_ids"].float().numpy()}
        if "unet" in sessions:
            out = _run(sessions["unet"], unet_spec, feeds)["out_sample"]
            return (torch.from_numpy(out.astype(np.float32)),)
        return original(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                        cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs, return_dict=False)

    cands = []
    pipe.unet.forward = unet_forward
    try:
        for i, prompt in enumerate(opts.prompts):
            kwargs: dict[str, Any] = {"prompt": prompt}
            if any(n in sessions for n in ("text_encoder", "text_encoder_2")):
                embeds = []
                pooled = None
                for name in ("text_encoder", "text_encoder_2"):
                    feeds = token_ids(variant, name, [prompt])
                    if name in sessions:
                        out = _run(sessions[name], specs[name], feeds)
                    else:
                        from exporter.check import torch_outputs
                        from exporter.wrappers import wrap

                        out = torch_outputs(specs[name], wrap(specs[name], getattr(pipe, name)), feeds)
                    embeds.append(torch.from_numpy(out["hidden_states"].astype(np.float32)))
                    pooled = out.get("text_embeds", pooled)
                kwargs = {"prompt_embeds": torch.cat(embeds, dim=-1),
                          "pooled_prompt_embeds": torch.from_numpy(np.asarray(pooled, np.float32))}
            with torch.no_grad():
                out = pipe(height=opts.height, width=opts.width, num_inference_steps=opts.steps,
                           guidance_scale=source.sampler.guidance, latents=latents0[i].clone(), output_type="latent", **kwargs)
            cands.append(out.images.float().numpy())
    finally:
        pipe.unet.forward = original
    stats = error_stats(np.concatenate(ref_latents), np.concatenate(cands))
    return {"steps": opts.steps, "prompts": len(opts.prompts), "latents": _stats_json(stats),
            "components_in_onnxruntime": sorted(n for n in sessions if n != "vae_decoder")}


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows for the printed table: component, precision, output, rel L2, cosine, max abs, samples."""
    def f(v: Any, fmt: str) -> str:
        return "nan" if v is None else format(v, fmt)

    rows = []
    for name, r in report["components"].items():
        for out, s in r["outputs"].items():
            rows.append([name, r["precision"], out, f(s["rel_l2"], ".2e"), f(s["cosine"], ".6f"), f(s["max_abs"], ".2e"),
                         str(r["samples"]), "FAIL" if out in r["failures"] else "ok"])
    e = report["end_to_end"]["latents"]
    rows.append([f"end-to-end ({report['end_to_end']['steps']} steps)", report["precision"], "latents", f(e["rel_l2"], ".2e"),
                 f(e["cosine"], ".6f"), f(e["max_abs"], ".2e"), str(report["end_to_end"]["prompts"]),
                 "FAIL" if report["end_to_end"]["failures"] else "ok"])
    return rows


REPORT_HEADER = ["component", "precision", "output", "rel L2", "cosine", "max abs", "samples", "gate"]


def raise_if_failed(report: dict[str, Any]) -> None:
    from koala_core.errors import CheckFailed

    if not report["passed"]:
        raise CheckFailed("accuracy gate failed: " + "; ".join(report["failure_summary"]))


__all__ = ["AccuracyOptions", "TOLERANCES", "accuracy_report", "report_rows", "REPORT_HEADER", "raise_if_failed", "KoalaError"]
