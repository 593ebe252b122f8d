"""The visual report of a validation run (`koala-trt validate --html REPORT.html`): one self-contained
HTML file a person opens when a precision variant drifts.

Everything is inside the file: the images are PNG data URIs, the style sheet is inline, there is no
script and no network reference, so it opens the same from a CI artifact, an e-mail or a laptop
without network. Layout, top to bottom: the verdict; the failures (non-finite values first, as the
JSON report lists them); per end-to-end prompt the reference image (diffusers on PyTorch), the
candidate image (the numpy sampler on the backend) and a heatmap of their absolute difference with
its colour scale (failing prompts first, marked); per check the metrics against their limits (failing
checks first, marked); the baseline comparison where `--baseline` was given.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from koala_core.atomic import staged_file
from validation.reports import _fmt

# The heatmap's colour ramp: black through purple, red and orange to pale yellow (a perceptually
# ordered ramp after matplotlib's "inferno", written as anchors so no plotting library is needed).
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float64)
_LOWER_IS_BETTER = ("rel_l2", "max_abs", "latent_rel_l2", "nonfinite", "interface", "shape")


@dataclass
class PromptImages:
    """One end-to-end prompt: the reference and the candidate image, [H, W, 3] floats in [0, 1]."""

    prompt: str
    reference: np.ndarray
    candidate: np.ndarray
    psnr: float | None = None
    ssim: float | None = None


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ([H, W]) as uint8 RGB ([H, W, 3]) on the heatmap's ramp; NaN shows as cyan."""
    v = np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    rgb[np.isnan(values)] = (0, 255, 255)
    return rgb.round().astype(np.uint8)


def error_map(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel absolute difference, the mean over the colour channels ([H, W]), and the top of its
    scale: the largest finite difference (at least 1e-6, so identical images show an all-black map
    with a readable scale). Non-finite candidate pixels stay NaN."""
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).mean(axis=-1)
    finite = diff[np.isfinite(diff)]
    top = float(finite.max()) if finite.size else 0.0
    return diff, max(top, 1e-6)


def png_data_uri(rgb: np.ndarray) -> str:
    """uint8 or [0, 1] float RGB as a base64 PNG data URI."""
    from PIL import Image

    if rgb.dtype != np.uint8:
        rgb = (np.nan_to_num(np.clip(rgb, 0.0, 1.0)) * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scale_bar(width: int = 256, height: int = 12) -> str:
    return png_data_uri(colorize(np.tile(np.linspace(0.0, 1.0, width), (height, 1))))


def _limit_text(m: dict[str, Any]) -> str:
    base = m["metric"].split("@")[0]
    op = "<=" if base in _LOWER_IS_BETTER else ">="
    return f"{op} {_fmt(m['limit'], m['metric'])}"


def _prompt_failed(p: PromptImages, limits: dict[str, float]) -> bool:
    """A prompt fails when its PSNR or SSIM is below the end-to-end limit, or is not finite."""
    for metric, value in (("psnr", p.psnr), ("ssim", p.ssim)):
        if metric in limits and (value is None or (not math.isinf(value) and (math.isnan(value) or value < limits[metric]))):
            return True
    return False


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;max-width:1200px;color:#1b1b1b;padding:0 1rem}
h1{margin:.2rem 0}.verdict{font-size:1.6rem;font-weight:700;padding:.6rem 1rem;border-radius:6px;display:inline-block}
.verdict.pass{background:#e3f5e1;color:#11611a}.verdict.fail{background:#fde2e1;color:#a1140f}
.meta{color:#444;margin:.6rem 0 1rem}table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #d4d4d4;padding:.25rem .55rem;text-align:left}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.fail td{background:#fff0ef}
.tag{font-weight:700;border-radius:3px;padding:0 .35rem;font-size:.85rem}.tag.ok{color:#11611a;background:#e3f5e1}
.tag.fail{color:#fff;background:#c0201a}section.check,section.prompt{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
section.fail{border:2px solid #c0201a}.images{display:flex;gap:1rem;flex-wrap:wrap}
figure{margin:0}figure img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccc;display:block}
figcaption{font-size:.85rem;color:#333;margin-top:.2rem}.scale{display:flex;align-items:center;gap:.3rem;font-size:.8rem}
.scale img{width:160px;height:10px;border:1px solid #ccc;image-rendering:auto}ul.failures li{color:#a1140f}
code{background:#f4f4f4;padding:0 .2rem;border-radius:3px}
"""


def html_report(report: dict[str, Any], images: Sequence[PromptImages] = ()) -> str:
    """The page for a finished report (validation.run.finish) and the end-to-end images per prompt."""
    passed = bool(report.get("passed"))
    verdict = "PASSED" if passed else "FAILED"
    checks = list(report.get("checks", []))
    n_failed = sum(not c["passed"] for c in checks)
    e2e = next((c for c in checks if c["component"] == "end_to_end"), None)
    limits = e2e["limits"] if e2e else {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>koala-trt validate: {verdict}</title><style>{_CSS}</style></head><body>",
           "<h1>koala-trt validate</h1>",
           f'<div id="verdict" class="verdict {"pass" if passed else "fail"}">{verdict}</div>',
           f'<p class="meta">Artifacts <code>{escape(str(report.get("artifacts", "")))}</code> ({escape(str(report.get("model", "")))}) '
           f'on <b>{escape(str(report.get("backend_description", report.get("backend", ""))))}</b> against '
           f'{escape(str(report.get("reference", "PyTorch")))}; {report.get("width")}x{report.get("height")}, '
           f'{report.get("steps")} denoising steps, {len(report.get("prompts", []))} prompts; '
           f'{len(checks) - n_failed}/{len(checks)} checks passed in {float(report.get("seconds", 0.0)):.1f} s.</p>']
    if report.get("failures"):
        out.append('<h2>Failures</h2><ul class="failures">')
        out += [f"<li>{escape(f)}</li>" for f in report["failures"]]
        out.append("</ul>")
    if report.get("baseline"):
        b = report["baseline"]
        out.append(f'<p class="meta">Baseline <code>{escape(str(b["path"]))}</code>: {b["compared"]} metrics compared, '
                   f'{len(b["worse"])} worse beyond the margin ({b["margin"]:g} relative + {b["floor_of_tolerance"]:g} x tolerance).</p>')

    if images:
        out.append("<h2>End to end, per prompt</h2>")
        out.append('<p class="meta">Reference: the diffusers pipeline on PyTorch. Candidate: koala-trt\'s sampler on '
                   f'{escape(str(report.get("backend", "")))}, from the same initial latents. Heatmap: the absolute '
                   'difference of the two [0, 1] images, averaged over the colour channels, on the scale shown under it '
                   '(cyan: not a finite value).</p>')
        bar = _scale_bar()
        order = sorted(range(len(images)), key=lambda i: not _prompt_failed(images[i], limits))
        for i in order:
            p = images[i]
            bad = _prompt_failed(p, limits)
            diff, top = error_map(p.reference, p.candidate)
            heat = colorize(diff / top)
            psnr = "n/a" if p.psnr is None else ("inf (identical)" if math.isinf(p.psnr) else f"{p.psnr:.2f} dB")
            ssim = "n/a" if p.ssim is None else f"{p.ssim:.4f}"
            lim = (f' (limits: PSNR &gt;= {limits["psnr"]:g} dB, SSIM &gt;= {limits["ssim"]:g})'
                   if "psnr" in limits and "ssim" in limits else "")
            out.append(f'<section class="prompt{" fail" if bad else ""}" data-prompt="{i}">'
                       f'<h3>{_tag(not bad)} Prompt {i + 1}: {escape(p.prompt)}</h3>'
                       f'<p>PSNR {psnr}, SSIM {ssim}{lim}</p><div class="images">')
            h, w = p.reference.shape[:2]
            for kind, uri, caption in (("reference", png_data_uri(p.reference), f"reference (PyTorch), {w}x{h}"),
                                       ("candidate", png_data_uri(p.candidate), f"candidate ({escape(str(report.get('backend', '')))})"),
                                       ("heatmap", png_data_uri(heat), "|candidate - reference|")):
                out.append(f'<figure><img class="{kind}" alt="{kind} image of prompt {i + 1}" src="{uri}">'
                           f"<figcaption>{caption}</figcaption>")
                if kind == "heatmap":
                    out.append(f'<div class="scale"><span>0</span><img alt="colour scale" src="{bar}">'
                               f"<span>{top:.3g}</span></div>")
                out.append("</figure>")
            out.append("</div></section>")

    out.append("<h2>Checks</h2>")
    for c in sorted(checks, key=lambda c: c["passed"]):
        out.append(f'<section class="check{"" if c["passed"] else " fail"}"><h3>{_tag(c["passed"])} {escape(c["id"])} '
                   f'<small>({escape(str(c["precision"]))})</small></h3>')
        if c.get("description"):
            out.append(f"<p>{escape(c['description'])}; {c.get('samples', 0)} samples.</p>")
        out.append("<table><tr><th>output</th><th>metric</th><th>value</th><th>limit</th><th>verdict</th><th>note</th></tr>")
        for m in sorted(c["metrics"], key=lambda m: m["passed"]):
            out.append(f'<tr class="{"ok" if m["passed"] else "fail"}"><td>{escape(m["output"])}</td><td>{escape(m["metric"])}</td>'
                       f'<td class="num">{_fmt(m["value"], m["metric"])}</td><td class="num">{escape(_limit_text(m))}</td>'
                       f'<td>{_tag(m["passed"])}</td><td>{escape(m.get("note", ""))}</td></tr>')
        out.append("</table></section>")
    out.append('<p class="meta">Written by <code>koala-trt validate --html</code>; the same metrics are in its JSON, '
               "JUnit and Markdown reports.</p></body></html>")
    return "\n".join(out) + "\n"


def _tag(ok: bool) -> str:
    return '<span class="tag ok">ok</span>' if ok else '<span class="tag fail">FAIL</span>'


def write_html(path: Path, report: dict[str, Any], images: Sequence[PromptImages] = ()) -> None:
    """The page, written atomically (nothing half-written under `path`)."""
    with staged_file(path) as tmp:
        tmp.write_text(html_report(report, images), encoding="utf-8")
