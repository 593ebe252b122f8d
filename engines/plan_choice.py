"""The planner chooses: the memory aids for a card, tried in order of cost, the first that fits.

    1. the profile's own settings
    2. + tiled VAE decode       (vae.tile, default DEFAULT_TILE px): the decoder's peak is one tile's
                                (not tried where the image is no larger than a tile, or the smallest
                                image is smaller than one)
    3. + sequential residency   one engine on the device at a time: every engine is loaded again per image
    4. + weight streaming       the largest weight budgets that fit: what does not fit streams from host
                                memory, the U-Net's share at every denoising step

Each rung adds its aid to the ones before. The choice is the first rung that fits, less the earlier aids
it does not need: an aid is dropped when the plan without it still fits and streams no more per step
(SDXL-Base on an 8 GB card: rung 3 fits, and it fits without the tiled decode too, so the choice is
sequential residency alone). An aid the profile already has is kept and its rung adds nothing.

`plan_fn(profile) -> MemoryPlan` makes the plans (engines/planner.py: plan_memory), so `koala-trt plan`
and `build --auto` (weights from the ONNX files) choose the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from engines.planner import MemoryPlan
from engines.profile import GIB, GpuProfile

DEFAULT_TILE = 512  # px: the tile a decoder engine is built for when the profile names none
# The overlap between neighbouring tiles assumed for the cost (diffusers' tile_overlap_factor 0.25);
# the decoder's memory does not depend on it (one tile at a time).
TILE_OVERLAP_FRACTION = 0.25
AIDS = ("tile", "sequential", "streaming")
RUNG_NAMES = {"": "profile's own settings", "tile": "+ tiled VAE decode", "sequential": "+ sequential residency",
              "streaming": "+ weight streaming"}
AID_NAMES = {"tile": "tiled VAE decode", "sequential": "sequential residency", "streaming": "weight streaming"}


def profile_aids(profile: GpuProfile) -> tuple[str, ...]:
    """The aids a profile already has."""
    return tuple(a for a, on in (("tile", bool(profile.vae.tile)), ("sequential", profile.runtime.residency == "sequential"),
                                 ("streaming", profile.build.weight_streaming)) if on)


def with_aids(profile: GpuProfile, aids: tuple[str, ...], base: GpuProfile) -> GpuProfile:
    """`base` with `aids` switched on (those it has stay on)."""
    p = base
    if "tile" in aids and not p.vae.tile:
        p = p.with_aids(tile=DEFAULT_TILE, flags=False)
    if "sequential" in aids:
        p = p.with_aids(residency="sequential")
    if "streaming" in aids:
        p = p.with_aids(weight_streaming=True)
    return p


def tiles_per_image(height: int, width: int, tile: int) -> tuple[int, float]:
    """(tiles, decoded pixels / image pixels) for a tiled decode with TILE_OVERLAP_FRACTION overlap."""
    overlap = int(tile * TILE_OVERLAP_FRACTION)

    def n(size: int) -> int:
        return 1 if size <= tile else math.ceil((size - tile) / (tile - overlap)) + 1

    ny, nx = n(height), n(width)
    th, tw = min(tile, height), min(tile, width)
    return ny * nx, ny * nx * th * tw / (height * width)


def aid_costs(plan: MemoryPlan, aids: tuple[str, ...]) -> list[str]:
    """What each aid in force costs, in words with its figures (each led by the aid's name)."""
    p = plan.profile
    out = []
    if "tile" in aids and "vae_decoder" in plan.components:
        h, w = p.shapes.height[2], p.shapes.width[2]
        n, ratio = tiles_per_image(h, w, p.vae.tile)
        out.append(f"tiled VAE decode: {n} tile(s) of {p.vae.tile} px per {h}x{w} image, about {ratio:.2f}x the "
                   f"decoder's work (overlap {TILE_OVERLAP_FRACTION:g} of a tile assumed)")
    if "sequential" in aids:
        total = sum(m.weights_bytes for m in plan.components.values())
        out.append(f"sequential residency: every engine is loaded again for every image "
                   f"({total / GIB:.2f} GiB of weights uploaded per image)")
    if "streaming" in aids:
        u = plan.components.get("unet")
        text = ("weight streaming: " if u is None else
                f"weight streaming: U-Net budget {u.device_weights_bytes / GIB:.2f} of {u.weights_bytes / GIB:.2f} GiB, "
                f"{plan.streamed_per_step_bytes / GIB:.2f} GiB streamed per denoising step")
        if plan.streamed_per_image_bytes:
            text += (f"{' (and ' if u else ''}{plan.streamed_per_image_bytes / GIB:.2f} GiB of the other engines' weights "
                     f"once per image{')' if u else ''}")
        out.append(text)
    return out


@dataclass
class Rung:
    aid: str  # "" for the profile's own settings, else the aid this rung adds
    aids: tuple[str, ...]
    plan: MemoryPlan
    note: str = ""  # why the rung adds nothing

    @property
    def name(self) -> str:
        return RUNG_NAMES[self.aid]

    def to_json(self) -> dict[str, Any]:
        return {"rung": self.name, "aids": list(self.aids), "peak_bytes": self.plan.peak, "fits": self.plan.fits,
                "margin_bytes": self.plan.margin_bytes, "margin_gib": round(self.plan.margin_bytes / GIB, 2),
                "streamed_per_step_bytes": self.plan.streamed_per_step_bytes,
                "costs": aid_costs(self.plan, self.aids), **({"note": self.note} if self.note else {})}


@dataclass
class Choice:
    rungs: list[Rung] = field(default_factory=list)
    chosen: Rung | None = None  # None: nothing fits
    first_fit: str | None = None  # the name of the first rung that fits
    min_margin_bytes: int = 0

    @property
    def profile(self) -> GpuProfile | None:
        return self.chosen.plan.profile if self.chosen else None

    def summary(self) -> str:
        if self.chosen is None:
            last = self.rungs[-1].plan
            short = self.min_margin_bytes - last.margin_bytes
            asked = f" of a {self.min_margin_bytes / GIB:g} GiB margin" if self.min_margin_bytes else ""
            return (f"no aid makes it fit: {short / GIB:.2f} GiB short{asked} even with "
                    f"{', '.join(AID_NAMES[a] for a in self.rungs[-1].aids)}")
        c = self.chosen
        what = ", ".join(AID_NAMES[a] for a in c.aids) or "the profile's own settings"
        costs = aid_costs(c.plan, c.aids)
        if len(c.aids) == 1:  # the aid is named once
            costs = [x.split(": ", 1)[1] for x in costs]
        return (f"{what} (margin {c.plan.margin_bytes / GIB:+.2f} GiB); cost: "
                f"{'; '.join(costs) if costs else 'none'}")

    def to_json(self) -> dict[str, Any]:
        return {"ladder": [r.to_json() for r in self.rungs], "first_fit": self.first_fit,
                "choice": None if self.chosen is None else {**self.chosen.to_json(), "summary": self.summary(),
                                                            "vae_tile": self.chosen.plan.profile.vae.tile or None,
                                                            "residency": self.chosen.plan.profile.runtime.residency,
                                                            "weight_streaming": self.chosen.plan.profile.build.weight_streaming},
                "summary": self.summary()}


def choose(profile: GpuProfile, plan_fn: Callable[[GpuProfile], MemoryPlan], components: list[str] | None = None,
           min_margin_bytes: int = 0) -> Choice:
    """Plan every rung of the ladder for `profile` and choose (see the module docstring); a rung fits
    when its margin is at least `min_margin_bytes` (0: the peak is at most the usable memory)."""
    base = profile_aids(profile)
    comps = components or profile.components()
    plans: dict[tuple[str, ...], MemoryPlan] = {}

    def plan_for(aids: tuple[str, ...]) -> MemoryPlan:
        key = tuple(a for a in AIDS if a in aids)
        if key not in plans:
            plans[key] = plan_fn(with_aids(profile, key, profile))
        return plans[key]

    choice = Choice(min_margin_bytes=min_margin_bytes)
    aids = base
    choice.rungs.append(Rung("", aids, plan_for(aids)))
    for aid in AIDS:
        note = ""
        if aid in base:
            note = "already in the profile"
        elif aid == "tile" and "vae_decoder" not in comps:
            note = "no vae_decoder planned"
        elif aid == "tile" and min(profile.shapes.height[2], profile.shapes.width[2]) <= DEFAULT_TILE:
            note = f"the image is not larger than a {DEFAULT_TILE} px tile"
        elif aid == "tile" and min(profile.shapes.height[0], profile.shapes.width[0]) < DEFAULT_TILE:
            note = f"the smallest image is smaller than a {DEFAULT_TILE} px tile"
        else:
            aids = tuple(a for a in AIDS if a in aids or a == aid)
        choice.rungs.append(Rung(aid, aids, plan_for(aids), note))
    def ok(p: MemoryPlan) -> bool:
        return p.margin_bytes >= min_margin_bytes

    first = next((r for r in choice.rungs if ok(r.plan)), None)
    if first is None:
        return choice
    choice.first_fit = first.name
    keep = first.aids
    for aid in first.aids:
        if aid in base or aid == first.aid:
            continue
        fewer = tuple(a for a in keep if a != aid)
        p = plan_for(fewer)
        if ok(p) and p.streamed_per_step_bytes <= plan_for(keep).streamed_per_step_bytes:
            keep = fewer
    choice.chosen = Rung(first.aid if first.aid in keep else "", keep, plan_for(keep))
    return choice
