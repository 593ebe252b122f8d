"""`koala-trt validate --html`: one self-contained page, checked as a reader sees it, in headless
Chromium (tests/browser.py drives the system's browser over the DevTools protocol): the verdict, each
prompt's reference, candidate and heatmap images actually decoded (naturalWidth > 0), failures first
and marked, the baseline rows, no console errors; a screenshot of each page is saved.

The browser comes from `make install` (Debian's chromium); where none could be installed, the browser
tests skip with that reason, and the page's structure is still checked without one."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.browser import Browser, find_chromium
from tests.conftest import run_cli
from validation.html_report import PromptImages, colorize, error_map, html_report

SIZE = ["--height", "128", "--width", "128", "--steps", "2", "--random-samples", "1"]
PROMPTS = 2  # validate's default: the first 2 held-out prompts
KINDS = ("reference", "candidate", "heatmap")

needs_browser = pytest.mark.skipif(find_chromium() is None,
                                   reason="no chromium on PATH (make install installs Debian's chromium where apt-get runs as root)")

# What the page shows, read in the browser: the verdict, every image with its decoded width, the order
# and marking of the prompt and check sections.
_READ = """(() => ({
  verdict: document.getElementById('verdict').textContent,
  title: document.title,
  images: [...document.querySelectorAll('section.prompt img')].map(i => ({
     kind: i.className, prompt: i.closest('section').dataset.prompt, complete: i.complete, width: i.naturalWidth})),
  prompts: [...document.querySelectorAll('section.prompt')].map(s => ({fail: s.classList.contains('fail'),
     tag: s.querySelector('.tag').textContent})),
  checks: [...document.querySelectorAll('section.check')].map(s => ({fail: s.classList.contains('fail'),
     id: s.querySelector('h3').textContent})),
  scale: [...document.querySelectorAll('.scale')].map(s => s.textContent),
  baseline_rows: [...document.querySelectorAll('td')].filter(t => t.textContent.endsWith('@baseline')).length,
  external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
     .filter(u => !u.startsWith('data:')),
  scripts: document.scripts.length,
}))()"""


def _open(html: Path, screenshot: Path) -> tuple[dict, list[str]]:
    with Browser.start() as browser:
        page = browser.open(html)
        seen = page.evaluate(_READ)
        page.screenshot(screenshot)
        return seen, page.errors


def _screenshot_ok(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 600, im.size


@pytest.fixture(scope="module")
def passing(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("html-pass")
    code, _, err = run_cli("validate", "--artifacts", tiny_artifacts, *SIZE, "--html", tmp / "report.html",
                           "--save-baseline", tmp / "baseline.json")
    assert code == 0, err
    assert f"HTML report: {tmp / 'report.html'}" in err
    return tmp


@pytest.fixture(scope="module")
def failing(tiny_artifacts: Path, passing: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VAE decoder's largest weight scaled by 1.5 (a rebuilt artifact: new hashes), validated end to end
    against the passing run's baseline: the images drift, the page must say so."""
    from exporter.manifest import load_manifest

    tmp = tmp_path_factory.mktemp("html-fail")
    art = tmp / "art"
    shutil.copytree(tiny_artifacts, art)
    path = art / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    t = max(floats, key=lambda t: int(np.prod(t.dims)))
    new = numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name)
    i = list(model.graph.initializer).index(t)
    model.graph.initializer.remove(t)
    model.graph.initializer.insert(i, new)
    onnx.save(model, str(path))
    m = load_manifest(art)
    m.rehash()
    m.save()
    # the end-to-end PSNR limit raised above what the drift leaves (73 dB measured), so the prompts fail too
    code, _, err = run_cli("validate", "--artifacts", art, *SIZE, "--html", tmp / "report.html", "--report", tmp / "report.json",
                           "--baseline", passing / "baseline.json", "-t", "end_to_end.psnr=150")
    assert code == 1, err
    return tmp


def test_page_is_self_contained(passing: Path) -> None:
    text = (passing / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text.lower()
    # every src/href is a data URI: nothing fetched from a network or a CDN, nothing beside the file
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert not re.search(r"https?://", text)
    assert text.count('class="reference"') == PROMPTS and text.count('class="heatmap"') == PROMPTS


def test_failing_page_structure(failing: Path) -> None:
    """Without a browser too: failures first, marked, and the baseline rows present."""
    text = (failing / "report.html").read_text(encoding="utf-8")
    data = json.loads((failing / "report.json").read_text())
    assert 'class="verdict fail">FAILED<' in text
    first_check = text.index('<section class="check')
    assert text[first_check:].startswith('<section class="check fail"')  # failing checks first
    assert "vae_decoder" in text[first_check:text.index("</section>", first_check)]
    assert "@baseline" in text and data["baseline"]["worse"]
    for line in data["failures"]:
        assert line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in text


@needs_browser
def test_passing_report_in_chromium(passing: Path) -> None:
    seen, errors = _open(passing / "report.html", passing / "report.png")
    assert errors == []
    assert seen["verdict"] == "PASSED" and seen["title"] == "koala-trt validate: PASSED"
    assert seen["external"] == [] and seen["scripts"] == 0
    # one image per prompt and kind, each decoded by the browser
    got = sorted((im["prompt"], im["kind"]) for im in seen["images"] if im["kind"] in KINDS)
    assert got == sorted((str(i), k) for i in range(PROMPTS) for k in KINDS)
    assert all(im["complete"] and im["width"] == 128 for im in seen["images"] if im["kind"] in KINDS), seen["images"]
    assert all(im["width"] > 0 for im in seen["images"])  # the colour scales too
    assert len(seen["scale"]) == PROMPTS and all(s.startswith("0") for s in seen["scale"])
    assert not any(c["fail"] for c in seen["checks"]) and len(seen["checks"]) == 9
    _screenshot_ok(passing / "report.png")


@needs_browser
def test_failing_report_in_chromium(failing: Path) -> None:
    seen, errors = _open(failing / "report.html", failing / "report.png")
    assert errors == []
    assert seen["verdict"] == "FAILED"
    assert all(im["complete"] and im["width"] > 0 for im in seen["images"]), seen["images"]
    assert len([im for im in seen["images"] if im["kind"] in KINDS]) == PROMPTS * len(KINDS)
    # failures first, and marked
    fails = [c["fail"] for c in seen["checks"]]
    assert any(fails) and fails == sorted(fails, reverse=True)
    assert all("FAIL" in c["id"] for c in seen["checks"] if c["fail"])
    assert "vae_decoder" in seen["checks"][0]["id"]
    p = [x["fail"] for x in seen["prompts"]]
    assert p == [True] * PROMPTS and all(x["tag"] == "FAIL" for x in seen["prompts"])
    assert seen["baseline_rows"] > 0
    _screenshot_ok(failing / "report.png")


def test_heatmap_scale_and_colours() -> None:
    ref = np.zeros((4, 4, 3), np.float32)
    cand = ref.copy()
    cand[0, 0] = 0.5
    cand[1, 1, 0] = np.nan
    diff, top = error_map(ref, cand)
    assert top == pytest.approx(0.5) and diff[0, 0] == pytest.approx(0.5) and math.isnan(diff[1, 1])
    rgb = colorize(diff / top)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == (252, 255, 164) and tuple(rgb[0, 1]) == (0, 0, 4) and tuple(rgb[1, 1]) == (0, 255, 255)
    _, top_same = error_map(ref, ref)
    assert top_same == 1e-6  # identical images: an all-black map with a readable scale


def test_prompts_fail_first_and_text_is_escaped() -> None:
    ok = np.full((8, 8, 3), 0.5, np.float32)
    report = {"passed": False, "artifacts": "a<b>", "model": "m", "backend": "onnxruntime", "width": 8, "height": 8,
              "steps": 1, "prompts": ["x", "y"], "seconds": 1.0, "failures": ["end_to_end: images psnr 10 (limit >= 30)"],
              "checks": [{"id": "end_to_end", "component": "end_to_end", "precision": "fp32", "passed": False,
                          "limits": {"psnr": 30.0, "ssim": 0.9}, "metrics": []}]}
    page = html_report(report, [PromptImages("<good>", ok, ok, math.inf, 1.0), PromptImages("bad", ok, ok * 0, 6.0, 0.1)])
    assert page.index("Prompt 2: bad") < page.index("Prompt 1: &lt;good&gt;")
    assert "a&lt;b&gt;" in page and "<good>" not in page
    assert "inf (identical)" in page
