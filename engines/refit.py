"""`koala-trt refit`: give refittable standard TensorRT engines the weights of a LoRA-patched
artifacts folder (`koala-trt lora`), on the GPU, without running the builder again.

Only engines built with `refit = "weights"` in their profile (bare REFIT) take other weights;
REFIT_IDENTICAL engines accept only the weights they were built from, and TensorRT-RTX engines
(built on a CPU, never refittable: engines/libraries.py) are rebuilt from the patched folder
instead. Everything is checked before TensorRT is imported: the library, the refit flag, the
artifacts' files against their sha256, and that each graph is the one the engine was built from
(same component, precision and I/O spec). The new folder is staged beside the target and renamed
into place; unchanged files are hard-linked (copied across filesystems). Each refitted engine's
manifest entry gets its new sha256, source files and LoRA record.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from engines.engine_manifest import MANIFEST, EnginesManifest, check_compatible, load_engines_manifest
from engines.libraries import RTX_REFIT_REFUSAL, TENSORRT
from exporter.manifest import Manifest, load_manifest, sha256_file
from koala_core.atomic import check_new_dir, staged_dir
from koala_core.errors import KoalaError, UsageError
from koala_core.jsonfile import write_json

Log = Callable[[str], None]


def rebuild_hint(em: EnginesManifest, artifacts: Path) -> str:
    """The build command that makes these engines again from `artifacts` (a patched folder replaces
    the folder it was patched from among the build's --onnx folders)."""
    args = dict(em.data.get("build", {}).get("args", {}))
    origin = load_manifest(artifacts).data.get("lora_patch", {}).get("from")
    onnx = [str(artifacts) if origin and Path(d).resolve() == Path(origin).resolve() else str(d) for d in args.get("onnx", [])]
    args["onnx"] = onnx if str(artifacts) in onnx else [str(artifacts)]
    from engines.buildplan import build_command

    return build_command(args, em.root)


def _refusal(em: EnginesManifest, artifacts: Path) -> str | None:
    """Why these engines cannot be refitted (one line with the way out), or None."""
    if em.record.library.name == "tensorrt-rtx":
        return (f"{em.root}: {RTX_REFIT_REFUSAL}; rebuild them from the patched folder (TensorRT-RTX builds on a CPU): "
                f"{rebuild_hint(em, artifacts)}")
    refit = em.record.refit
    if refit == "REFIT":
        return None
    how = ("with refit = \"identical\" (REFIT_IDENTICAL + STRIP_PLAN: they take only the weights they were built from)"
           if refit == "REFIT_IDENTICAL+STRIP_PLAN" else "without refit")
    return (f"{em.root}: the engines were built {how}; build them refittable with refit = \"weights\" in the profile's "
            f"[build] table, or rebuild them from the patched folder: {rebuild_hint(em, artifacts)}")


def _same_graph(em: EnginesManifest, art: Manifest, component: str) -> str | None:
    entry = em.entry(component)
    if component not in art.components:
        return f"{art.root} has no {component} (it holds {', '.join(art.components)})"
    if art.precision(component) != entry.get("precision"):
        return (f"the {component} engine is {entry.get('precision')} but {art.root}'s {component} is "
                f"{art.precision(component)}: refit from the patched folder of the precision the engine was built from")
    if art.component(component).get("spec") != entry.get("spec"):
        return f"{art.root}'s {component} graph has other inputs or outputs than the graph the engine was built from"
    return None


def _source_files(art: Manifest, component: str) -> dict[str, dict[str, Any]]:
    return {rel: f.to_json() for rel, f in art.view.files.items() if rel.startswith(f"{component}/")}


def plan_refit(engines_dir: Path, artifacts_dir: Path, components: list[str] | None = None) -> tuple[EnginesManifest, Manifest, list[str]]:
    """Check everything a refit needs but the GPU; returns the manifests and the components whose
    engine weights differ from the artifacts' (the others are already these weights)."""
    em = load_engines_manifest(engines_dir)
    art = load_manifest(artifacts_dir)
    problem = _refusal(em, Path(artifacts_dir))
    if problem:
        raise UsageError(problem)
    names = list(components or em.engines)
    for name in names:
        em.entry(name)  # an unknown component is refused naming the engines held
        why = _same_graph(em, art, name)
        if why:
            raise UsageError(why)
    bad = list(art.verify())
    if bad:
        raise UsageError(f"{artifacts_dir}: {bad[0]}" + (f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""))
    todo = [n for n in names if em.entry(n)["source"].get("files") != _source_files(art, n)]
    return em, art, todo


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_refit(engines_dir: Path, artifacts_dir: Path, out: Path | None = None, components: list[str] | None = None,
              force: bool = False, verbose: bool = False, log: Log = print) -> dict[str, Any]:
    """Refit the engines of `engines_dir` from `artifacts_dir` into `out` (default: in place);
    returns {"refitted": {component: {...}}, "unchanged": [...], "manifest": the new manifest's data}."""
    target = Path(out) if out is not None else Path(engines_dir)
    if out is not None:
        check_new_dir(target, force)
    em, art, todo = plan_refit(engines_dir, artifacts_dir, components)
    unchanged = [n for n in (components or list(em.engines)) if n not in todo]
    for n in unchanged:
        log(f"{n}: the engine already has {artifacts_dir}'s weights")
    if not todo and out is None:
        return {"engines": str(target), "refitted": {}, "unchanged": unchanged, "manifest": em.data}
    from engines.build import missing_requirements

    missing = missing_requirements(TENSORRT)
    if missing:
        raise KoalaError(f"cannot refit TensorRT engines on this machine, missing: {'; '.join(missing)} "
                         "(refit runs on a GPU the engines run on)")
    from engines import cuda, trt

    trt.use_library(TENSORRT.name)
    for w in check_compatible(em, cuda.device_info(), trt.version()):
        log(f"warning: {w}")
    data = dict(em.data)
    data["engines"] = {k: dict(v) for k, v in em.engines.items()}
    done: dict[str, Any] = {}
    replaced = {em.entry(n)["file"] for n in todo}
    with staged_dir(target, force=True if out is None else force) as stage:
        for p in sorted(Path(engines_dir).rglob("*")):
            rel = p.relative_to(engines_dir).as_posix()
            if p.is_file() and rel != MANIFEST and rel not in replaced:
                _link_or_copy(p, stage / rel)
        for name in todo:
            entry = data["engines"][name]
            plan = em.engine_path(name)
            raw = plan.read_bytes()
            if len(raw) != entry["bytes"] or sha256_file(plan) != entry["sha256"]:
                raise KoalaError(f"{plan} does not match its sha256 in the engines manifest (changed or corrupt); "
                                 f"rebuild: {em.rebuild_command()}")
            log(f"{name}: refitting {entry['file']} from {art.onnx_path(name)}")
            t0 = time.perf_counter()
            r = trt.refit_engine(raw, art.onnx_path(name), verbose=verbose)
            del raw
            seconds = time.perf_counter() - t0
            (stage / entry["file"]).write_bytes(r.data)
            files = _source_files(art, name)
            graph = art.record(name).file
            entry.update(bytes=len(r.data), sha256=sha256_file(stage / entry["file"]),
                         loras=[a.to_json() for a in art.view.adapters(name)],
                         source={"artifacts": str(art.root), "onnx": str(art.onnx_path(name)),
                                 "onnx_sha256": files[graph]["sha256"], "onnx_bytes": sum(f["bytes"] for f in files.values()),
                                 "files": files},
                         refit={"from": str(art.root), "weights": r.weights, "seconds": round(seconds, 2),
                                "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
            done[name] = {"file": entry["file"], "weights": r.weights, "seconds": round(seconds, 2), "loras": entry["loras"]}
            log(f"  {name}: {r.weights} weights refitted in {seconds:.1f} s")
        write_json(stage / MANIFEST, data)
    return {"engines": str(target), "refitted": done, "unchanged": unchanged, "manifest": data}
