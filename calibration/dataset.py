"""A calibration set on disk: U-Net inputs recorded along denoising trajectories.

CALIB/
  manifest.json          # settings, then one entry per shard: prompt, timesteps, shapes, sha256
  shard-00000.npz ...    # one per prompt: every step's CFG batch as the U-Net engine sees it

A shard holds `sample` [steps, batch, C, h, w] and `timestep` [steps, batch] (they change at every
step) and `encoder_hidden_states`, `text_embeds`, `time_ids` once (they do not). numpy/json only.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from calibration.manifest import (CALIB_FORMAT, CALIB_MANIFEST, CalibrationView, ShardRecord, load_calibration_manifest,
                                  read_calibration, write_calibration)
from exporter.manifest import sha256_file
from exporter.specs import ComponentSpec
from koala_core.errors import KoalaError, UsageError

__all__ = ["CALIB_FORMAT", "CALIB_MANIFEST", "CalibrationSet", "check_same_unet", "load_calibration", "load_prompts",
           "shard_name", "step_feeds"]

PER_STEP = ("sample", "timestep")  # recorded at every step; the other U-Net inputs once per shard


def load_prompts(path: Path | str | None = None, heldout: bool = False) -> list[str]:
    """Prompts from a text file (one a line; blank lines and `#` comments skipped); the shipped
    calibration/prompts.txt (or heldout_prompts.txt) by default."""
    if path is None:
        text = resources.files("calibration").joinpath("heldout_prompts.txt" if heldout else "prompts.txt").read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"prompts file {p} does not exist")
        if not p.is_file():
            raise UsageError(f"prompts file {p} is not a file (one prompt per line)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"prompts file {p} is not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"no prompts in {path or 'the shipped prompt list'}")
    return prompts


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


@dataclass
class CalibrationSet:
    """The folder and its manifest document: `view` for reading, `data` for `koala-trt calibrate`,
    which appends shards to it."""

    root: Path
    data: dict[str, Any]

    @property
    def view(self) -> CalibrationView:
        return read_calibration(self.data, str(self.root / CALIB_MANIFEST))

    @property
    def settings(self) -> dict[str, Any]:
        """The settings as a document (compared whole when a capture resumes)."""
        return self.data["settings"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The shard entries as a document (the capture appends to it); read through `view.shards`."""
        return self.data["shards"]

    @property
    def complete(self) -> bool:
        v = self.view
        return len(v.shards) == len(v.settings.prompts)

    @property
    def num_samples(self) -> int:
        return sum(len(s.timesteps) for s in self.view.shards)

    def save(self) -> None:
        write_calibration(self.root, self.data)

    def verify(self) -> None:
        """Every shard present and matching its sha256 (one clear error for the first that is not)."""
        for entry in self.view.shards:
            self._check_file(entry)

    def _check_file(self, entry: ShardRecord) -> Path:
        path = self.root / entry.file
        where = f"calibration shard {path}"
        if not path.is_file():
            raise KoalaError(f"{where} is missing (re-run `koala-trt calibrate` to resume)")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise KoalaError(f"{where} is corrupt: its sha256 does not match the calibration manifest (delete it and re-run `koala-trt calibrate` to recapture it)")
        return path

    def load_shard(self, entry: ShardRecord, spec: ComponentSpec | None = None) -> dict[str, np.ndarray]:
        """One shard's arrays, checked against its sha256, its recorded shapes and (when given) the
        U-Net spec; any problem is one clear error naming the shard."""
        path = self._check_file(entry)
        where = f"calibration shard {path}"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise KoalaError(f"{where} cannot be read: {e}") from None
        for name, shape in entry.shapes.items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = list(arrays[name].shape) if name in arrays else "missing"
                raise KoalaError(f"{where} does not match its manifest: {name} is {got}, recorded {list(shape)}")
        if spec is not None:
            self.check_spec(spec, entry, arrays)
        return arrays

    def check_spec(self, spec: ComponentSpec, entry: ShardRecord, arrays: dict[str, np.ndarray]) -> None:
        feeds = step_feeds(arrays, 0)
        try:
            spec.check_inputs(feeds)
        except UsageError as e:
            raise KoalaError(f"calibration shard {self.root / entry.file} does not fit this U-Net: {e}") from None

    def samples(self, spec: ComponentSpec | None = None, every: int = 1, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """U-Net feeds, shard by shard and step by step (every `every`-th step; at most `limit`)."""
        n = 0
        for entry in self.view.shards:
            arrays = self.load_shard(entry, spec)
            for s in range(0, arrays["sample"].shape[0], every):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield step_feeds(arrays, s)


def check_same_unet(calib: CalibrationSet, manifest: Any) -> None:
    """The calibration set must come from the U-Net the artifacts folder was exported from."""
    want = manifest.view.source.config_sha256.get("unet")
    settings = calib.view.settings
    got = settings.config_sha256.get("unet")
    if want and got and want != got:
        raise UsageError(f"calibration set {calib.root} was recorded with a different U-Net ({settings.model}) "
                         f"than {manifest.root} holds ({manifest.view.source.model})")


def step_feeds(arrays: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    return {k: (v[step] if k in PER_STEP else v) for k, v in arrays.items()}


def load_calibration(root: Path | str, require_complete: bool = True) -> CalibrationSet:
    root = Path(root)
    data, view = load_calibration_manifest(root)
    cs = CalibrationSet(root, data)
    if require_complete and not cs.complete:
        raise UsageError(f"calibration set {root} is incomplete ({len(view.shards)}/{len(view.settings.prompts)} prompts); "
                         "re-run the same `koala-trt calibrate` command to finish it")
    if not view.shards:
        raise UsageError(f"calibration set {root} has no shards")
    return cs
