"""`koala-trt bench --plot CHART.png`: one chart of a bench run (matplotlib, the `plot` extra).

Per entry (backend and precision), one horizontal bar per timed stage: the U-Net step, and the whole
image where the run timed end to end. The bar is the median, the whisker spans the fastest and the
slowest timed call, the dots are the calls themselves; beside each bar its median and each entry's
error against the first entry on the same inputs (the U-Net output's relative L2, the images' PSNR).
Written atomically, as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from koala_core.atomic import staged_file
from koala_core.errors import UsageError

# What each panel shows: (stage key, title, the `against` key its error comes from)
_PANELS = (("unet", "One U-Net step", "unet.out_sample"), ("end_to_end", "One image (end to end)", "images"))


def check_plot_path(path: Path) -> None:
    """--plot: a .png file name, matplotlib importable; checked before any model work."""
    import importlib.util

    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: give a .png file name")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'koala-trt[plot]'")


def _entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A side-by-side document's entries, or a one-backend record as the only entry."""
    if "backends" in doc:
        return [e for e in doc["backends"] if "error" not in e]
    return [{**doc, "entry": doc.get("entry", doc.get("backend", "?"))}]


def _stage(entry: dict[str, Any], key: str) -> dict[str, Any] | None:
    return entry.get("end_to_end") if key == "end_to_end" else entry.get("components", {}).get(key)


def _error_text(entry: dict[str, Any], key: str, first: bool) -> str:
    if first:
        return "reference"
    a = entry.get("against", {}).get(key)
    if a is None:
        return ""
    if key == "images":
        return "images identical" if a.get("psnr") is None else f"PSNR {a['psnr']:.1f} dB"
    return f"rel L2 {a['rel_l2']:.2g}"


def _fmt_s(v: float) -> str:
    return f"{v:.2f} s" if v >= 1 else f"{1e3 * v:.1f} ms"


def plot(doc: dict[str, Any], path: Path, title: str | None = None) -> list[str]:
    """Draw the chart of a `bench --json` document (one backend or side by side) into `path`; returns the
    panels drawn. UsageError when the run timed neither a U-Net step nor an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _entries(doc)
    panels = [(k, t, a) for k, t, a in _PANELS if any(_stage(e, k) for e in entries)]
    if not entries or not panels:
        raise UsageError("--plot draws the U-Net step and the image time: time the unet (-c unet) or end to end")
    labels = [e["entry"] for e in entries]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.0, 1.3 + 0.55 * len(entries) * len(panels) + 0.6 * len(panels)),
                             squeeze=False, dpi=100)
    for ax, (key, panel_title, against) in zip(axes[:, 0], panels):
        rows = [(i, e, _stage(e, key)) for i, e in enumerate(entries)]
        top = max(s["max"] for _, _, s in rows if s) or 1.0
        for y, (i, e, s) in enumerate(rows):
            if not s:
                ax.text(0, y, "  not timed", va="center", fontsize=8, color="#666")
                continue
            ax.barh(y, s["median"], color="#4c72b0" if i == 0 else "#dd8452", height=0.6)
            ax.errorbar(s["median"], y, xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], fmt="none",
                        ecolor="black", capsize=3, lw=1)
            calls = s.get("calls", [])
            ax.plot(calls, [y] * len(calls), "o", ms=3, color="black", alpha=0.6)
            err = _error_text(e, against, i == 0)
            ax.text(s["max"] + 0.02 * top, y, f"{_fmt_s(s['median'])}" + (f"  ({err})" if err else ""), va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels=labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.6)
        ax.set_xlabel("seconds (bar: median; whisker: fastest to slowest call; dots: each call)", fontsize=8)
        any_s = next(s for _, _, s in rows if s)
        batch = f", batch {any_s['batch']}" if key == "unet" and "batch" in any_s else ""
        steps = f", {entries[0]['end_to_end']['steps']} steps" if key == "end_to_end" and entries[0].get("end_to_end") else ""
        ax.set_title(f"{panel_title}{batch}{steps}", fontsize=10, loc="left")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    e0 = entries[0]
    m = doc.get("machine") or e0.get("machine") or {}
    fig.suptitle(title or f"koala-trt bench, {e0.get('width')}x{e0.get('height')}; {m.get('cpu', '?')}, {m.get('cores', '?')} cores",
                 fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    with staged_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return [k for k, _, _ in panels]
