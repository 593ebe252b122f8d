"""accuracy.json of `convert` / `quantize`: `koala-trt validate` run on the staged variant folder
(ONNX Runtime) with the held-out prompts, summarised per converted component.

The comparison is validate's (validation/run.py), so its figures are the ones
`koala-trt validate -a FOLDER --prompts FILE --height H --width W --steps N --seed S` prints for
the same folder and prompts (tests/test_precision.py checks they are the same numbers):
- per component, the "prompts" input set: token ids for the text encoders, U-Net inputs of the
  first and last step of the held-out trajectories (CFG batch), the final latents for the VAE
  decoder; validate's random input sets are not run here;
- end to end: the numpy Sampler over the whole variant in ONNX Runtime against the diffusers
  pipeline from the same initial latents.

The gate (exporter/tolerances.py, the converted components' precision rows): relative L2, max abs
and non-finite values of every converted component's prompt inputs. Cosine is reported, not gated;
end to end is reported, only non-finite latents or images fail (differences grow with the steps).
FP32 components (copied unchanged) are compared too, since the end-to-end run needs them, and
shown in `validate`, but not gated here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exporter.tolerances import END_TO_END, TOLERANCES, end_to_end_precision

Log = Callable[[str], None]

GATED = ("rel_l2", "max_abs", "nonfinite")  # per converted component, on the prompt inputs
GATED_END_TO_END = ("nonfinite",)
SEED = 1234  # of the held-out trajectories' initial latents (validate --seed)


@dataclass
class AccuracyOptions:
    prompts: list[str]
    height: int
    width: int
    steps: int = 4  # denoising steps of the held-out trajectories (end-to-end comparison)
    seed: int = SEED
    model: str | None = None  # default: the model the artifacts were exported from


def _metrics(check: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """output -> metric -> value, from validate's JSON form of one check."""
    out: dict[str, dict[str, Any]] = {}
    for m in check["metrics"]:
        out.setdefault(m["output"], {})[m["metric"]] = m["value"]
    return out


def _failures(check: dict[str, Any], gated: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for m in check["metrics"]:
        if m["metric"] in gated and not m["passed"]:
            value = "n/a" if m["value"] is None else f"{m['value']:.3g}"
            bad.setdefault(m["output"], []).append(f"{m['metric']} {value} (limit {m['limit']:.3g})" + (f": {m['note']}" if m["note"] else ""))
    return bad


def summarise(validated: dict[str, Any], converted: list[str], opts: AccuracyOptions) -> dict[str, Any]:
    """accuracy.json from validate's finished report (validation.run.finish)."""
    precision = end_to_end_precision(validated["components"][c] for c in converted)
    checks = {c["id"]: c for c in validated["checks"]}
    report: dict[str, Any] = {
        "precision": precision, "reference": validated["reference"], "heldout_prompts": list(opts.prompts),
        "height": validated["height"], "width": validated["width"], "steps": validated["steps"], "seed": validated["seed"],
        "tolerance": {"rel_l2": TOLERANCES[precision]["rel_l2"], "max_abs_rel": TOLERANCES[precision]["max_abs"]},
        "gated": list(GATED), "components": {}}
    failures = []
    for c in converted:
        chk = checks.get(f"{c}/prompts") or checks.get(f"{c}/interface")
        if chk is None:
            continue
        bad = _failures(chk, GATED + ("interface",))
        report["components"][c] = {"precision": chk["precision"], "check": chk["id"], "inputs": chk["description"],
                                   "samples": chk["samples"], "limits": chk["limits"], "outputs": _metrics(chk), "failures": bad}
        failures += [f"{c}.{o}: {', '.join(why)}" for o, why in bad.items()]
    e2e = checks.get(END_TO_END)
    if e2e is not None:
        values = _metrics(e2e)
        bad = _failures(e2e, GATED_END_TO_END)
        report["end_to_end"] = {"steps": validated["steps"], "prompts": e2e["samples"], "description": e2e["description"],
                                "latents": {"rel_l2": values["latents"]["latent_rel_l2"]},
                                "images": values["images"], "per_prompt": e2e["outputs"],
                                "failures": [f"{o}: {w}" for o, why in bad.items() for w in why]}
        failures += [f"end-to-end {f}" for f in report["end_to_end"]["failures"]]
    report["validate"] = {k: validated[k] for k in ("backend", "components", "checks", "failures", "passed")}
    report["seconds"] = validated["seconds"]
    report["passed"] = not failures
    report["failure_summary"] = failures
    return report


def accuracy_report(folder: Path, opts: AccuracyOptions, log: Log = print) -> dict[str, Any]:
    """Validate the variant in `folder` (a saved, hashed manifest) on the held-out prompts."""
    from exporter.manifest import load_manifest
    from validation.run import ValidateOptions, finish, validate

    manifest = load_manifest(folder)
    converted = [n for n in manifest.components if manifest.precision(n) != "fp32"]
    vopts = ValidateOptions(artifacts=Path(folder), model=opts.model, height=opts.height, width=opts.width, steps=opts.steps,
                            prompts=list(opts.prompts), seed=opts.seed, random_sets=False,
                            verify=False)  # the caller has just hashed every file
    return summarise(finish(validate(vopts, log)), converted, opts)


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows for the printed table: component, precision, output, rel L2, cosine, max abs, samples, gate."""
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    rows = []
    for name, r in report["components"].items():
        for out, s in r["outputs"].items():
            rows.append([name, r["precision"], out, f(s.get("rel_l2"), ".2e"), f(s.get("cosine"), ".6f"), f(s.get("max_abs"), ".2e"),
                         str(r["samples"]), "FAIL" if out in r["failures"] else "ok"])
    if "end_to_end" in report:
        e = report["end_to_end"]
        rows.append([f"end-to-end ({e['steps']} steps)", report["precision"], "latents", f(e["latents"]["rel_l2"], ".2e"),
                     "", "", str(e["prompts"]), "FAIL" if e["failures"] else "ok"])
    return rows


REPORT_HEADER = ["component", "precision", "output", "rel L2", "cosine", "max abs", "samples", "gate"]
