"""A Triton Inference Server model repository from an artifacts folder (and an engines folder).

    REPO/
      koala_text_encoder/config.pbtxt   1/model.onnx            platform onnxruntime_onnx
      koala_text_encoder_2/...
      koala_unet/config.pbtxt           1/model.onnx(+.data) or 1/model.plan (platform tensorrt_plan)
      koala_vae_decoder/...
      koala/config.pbtxt                backend python: prompt in, image out
      koala/1/model.py                  the sampler loop, calling the models above through BLS
      koala/1/pipeline/                 manifest.json, tokenizers, scheduler config, triton.json

Flavour `python` (for servers without the ONNX Runtime / TensorRT backends, such as the tritonserver
that `koala-trt serve` runs): the same models, names, inputs, outputs and batching, but each component
model runs on the Python backend over koala-trt's own runtime backend (templates/triton_component.py):

      koala_unet/config.pbtxt           backend python
      koala_unet/1/model.py             opens the onnxruntime (or tensorrt) backend over 1/
      koala_unet/1/component.json       component, runtime, batching
      koala_unet/1/manifest.json        the artifacts (or engines) manifest, this component's files beside it

Inputs, outputs, dtypes and dims come from the component specs in the manifest; batching follows
the rule in shipping/triton_io.py. Every file is written under a temporary name and the repository
renamed into place when complete; graphs and engines are copied in chunks and checked against the
sha256 their manifest records while they are copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from exporter.manifest import MANIFEST, Manifest, load_manifest
from exporter.specs import ComponentSpec
from koala_core import __version__
from koala_core.atomic import staged_dir
from koala_core.errors import UsageError
from engines.compat import describe as describe_engines
from engines.engine_manifest import EnginesManifest, load_engines_manifest
from shipping.triton_io import TritonTensor, batchable, triton_tensor

PIPELINE_INPUTS = (  # name, Triton type, optional
    ("prompt", "TYPE_STRING", False),
    ("negative_prompt", "TYPE_STRING", True),
    ("seed", "TYPE_INT64", True),
    ("steps", "TYPE_INT32", True),
    ("guidance", "TYPE_FP32", True),
    ("height", "TYPE_INT32", True),
    ("width", "TYPE_INT32", True),
    ("scheduler", "TYPE_STRING", True),  # a sampler.schedulers name; absent: the model's own
    ("cache_interval", "TYPE_INT32", True),  # feature caching (sampler/feature_cache.py): needs unet_deep and unet_shallow
    ("cache_branch", "TYPE_INT32", True),
    ("controlnet_scale", "TYPE_FP32", True),  # ControlNet (artifacts exported with --controlnet): diffusers' controlnet_conditioning_scale
    ("control_guidance_start", "TYPE_FP32", True),
    ("control_guidance_end", "TYPE_FP32", True),
)
IMAGE_INPUTS = (  # img2img / inpainting (sampler/img2img.py), all optional: name, Triton type, dims
    ("image", "TYPE_UINT8", (-1, -1, 3)),  # RGB pixels [H, W, 3]
    ("mask", "TYPE_UINT8", (-1, -1)),  # [H, W], white = repaint
    ("image_png", "TYPE_STRING", (1,)),  # or the image / mask as PNG (or JPEG) file bytes
    ("mask_png", "TYPE_STRING", (1,)),
    ("strength", "TYPE_FP32", (1,)),
)
# Images: UINT8 pixels [H, W, C] (C 1, 3 or 4), or a PNG/JPEG file's bytes as UINT8 [1, 1, N].
PIPELINE_IMAGES = ("control_image",)
CHUNK = 4 << 20
FLAVOURS = ("production", "python")
PYTHON_RUNTIMES = ("onnxruntime", "openvino")  # what the python flavour runs ONNX components on

Log = Callable[[str], None]


@dataclass
class RepoResult:
    path: Path
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # Triton model name -> summary


# ---------------------------------------------------------------------------------------------
# config.pbtxt (protobuf text format of inference.ModelConfig, Triton's model_config.proto)
# ---------------------------------------------------------------------------------------------
def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(d: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(x) for x in d) + " ]" if d else "[ ]"


def _tensor_block(t: TritonTensor, optional: bool = False) -> str:
    lines = [f"    name: {_q(t.name)}", f"    data_type: {t.data_type}", f"    dims: {_dims(t.dims)}"]
    if t.reshape is not None:
        lines.append(f"    reshape: {{ shape: {_dims(t.reshape)} }}")
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _list(key: str, blocks: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(blocks) + "\n]"


def component_config(model: str, spec: ComponentSpec, platform: str, max_batch: int, kind: str,
                     filename: str, note: str) -> str:
    """config.pbtxt of one component model (platform "python": the Python backend, flavour python)."""
    batched = batchable(spec) and max_batch > 0
    runs_on = 'backend: "python"' if platform == "python" else f"platform: {_q(platform)}"
    parts = [f"# {note}", f"name: {_q(model)}", runs_on, f"max_batch_size: {max_batch if batched else 0}",
             _list("input", [_tensor_block(triton_tensor(t, batched)) for t in spec.inputs]),
             _list("output", [_tensor_block(triton_tensor(t, batched)) for t in spec.outputs])]
    if batched:
        parts.append("dynamic_batching { }")
    parts.append(f"instance_group [ {{ kind: {kind}, count: 1 }} ]")
    if platform != "python":
        parts.append(f"default_model_filename: {_q(filename)}")
    return "\n".join(parts) + "\n"


def pipeline_config(model: str, instances: int, note: str) -> str:
    """config.pbtxt of the Python-backend model: one prompt per request, image [H, W, 3] uint8 out."""
    inputs = [_tensor_block(TritonTensor(n, t, (1,), None), optional=o) for n, t, o in PIPELINE_INPUTS]
    inputs += [_tensor_block(TritonTensor(n, t, d, None), optional=True) for n, t, d in IMAGE_INPUTS]
    inputs += [_tensor_block(TritonTensor(n, "TYPE_UINT8", (-1, -1, -1), None), optional=True) for n in PIPELINE_IMAGES]
    outputs = [_tensor_block(TritonTensor("image", "TYPE_UINT8", (-1, -1, 3), None))]
    return "\n".join([f"# {note}", f"name: {_q(model)}", 'backend: "python"', "max_batch_size: 0",
                      _list("input", inputs), _list("output", outputs),
                      f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]"]) + "\n"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _copy_checked(src: Path, dst: Path, sha256: str | None, hardlink: bool) -> None:
    """Copy src to dst in chunks, checking its sha256 on the way (a hard link skips the read)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if hardlink:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while b := fi.read(CHUNK):
            h.update(b)
            fo.write(b)
    if sha256 is not None and h.hexdigest() != sha256:
        raise UsageError(f"{src} does not match the sha256 its manifest records (changed or corrupt); nothing was written")


def _graph_files(m: Manifest, component: str) -> list[str]:
    graph = m.record(component).file
    folder = PurePosixPath(graph).parent.as_posix()
    files = m.view.files
    return [rel for rel in files if folder not in ("", ".") and rel.startswith(folder + "/")] or [graph]


def _python_component(m: Manifest, comp: str, em: EnginesManifest | None, version_dir: Path, hardlink: bool,
                      log: Log, model: str, runtime: str, runtime_options: dict[str, Any], in_place: bool) -> str:
    """Flavour python: 1/model.py over koala-trt's runtime backend `runtime` (onnxruntime or openvino
    over the graph, tensorrt over the engine), its manifest and files at the paths that manifest names
    (so the backend opens 1/ as it opens an artifacts or engines folder); returns the runtime used.
    in_place: no copy, component.json names the artifacts (or engines) folder the backend opens
    (`koala-trt serve`: a repository on this machine for the server's lifetime; ONNX Runtime refuses
    hard-linked external data, and a full-size U-Net is gigabytes)."""
    engine = em is not None and comp in em.record.engines
    runtime = "tensorrt" if engine else runtime
    if in_place:
        folder = (em.root if engine else m.root).resolve()  # type: ignore[union-attr]
        log(f"  {model}: {comp} of {folder} in place (Python backend, {runtime})")
        info = {"component": comp, "runtime": runtime, "folder": str(folder), **runtime_options}
    elif engine:
        e = em.record.engines[comp]
        log(f"  {model}: TensorRT engine {e.file} (Python backend)")
        _copy_checked(em.root / e.file, version_dir / e.file, e.sha256, hardlink)
        data = dict(em.data, engines={comp: em.engines[comp]})  # this process holds this engine only
    else:
        log(f"  {model}: ONNX {m.record(comp).file} (Python backend, {runtime})")
        for rel in _graph_files(m, comp):
            meta = m.view.files.get(rel)
            _copy_checked(m.root / rel, version_dir / rel, meta.sha256 if meta else None, hardlink)
        data = dict(m.data, components={comp: m.component(comp)})
    if not in_place:
        (version_dir / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        info = {"component": comp, "runtime": runtime, **runtime_options}
    (version_dir / "component.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    template = resources.files("shipping").joinpath("templates/triton_component.py").read_text(encoding="utf-8")
    (version_dir / "model.py").write_text(template, encoding="utf-8")
    return runtime


def write_repository(artifacts: Path, out: Path, engines: Path | None = None, name: str = "koala",
                     device: str = "gpu", max_batch: int | None = None, instances: int = 1,
                     hardlink: bool = False, force: bool = False, log: Log = lambda _: None,
                     flavour: str = "production", runtime: str = "onnxruntime",
                     runtime_options: dict[str, Any] | None = None, in_place: bool = False) -> RepoResult:
    """Write the model repository; returns the models written (name -> platform, files, batching).

    Flavour python only: `runtime` (onnxruntime or openvino) runs the ONNX components (an engine runs on
    tensorrt), with `runtime_options` (openvino: cpu_precision, cache_dir) passed to it; in_place: the
    component models open the artifacts (engines) folder where it is instead of a copy."""
    if flavour not in FLAVOURS:
        raise UsageError(f"--flavour must be one of {', '.join(FLAVOURS)} (got {flavour!r})")
    if runtime not in PYTHON_RUNTIMES:
        raise UsageError(f"the python flavour runs ONNX components on {' or '.join(PYTHON_RUNTIMES)} (got {runtime!r})")
    if flavour != "python" and (runtime != "onnxruntime" or runtime_options or in_place):
        raise UsageError("a runtime backend is for --flavour python (the production flavour uses Triton's own backends)")
    m = load_manifest(artifacts)
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise UsageError(f"--name {name!r}: use letters, digits, '_' and '-' (it names Triton models and folders)")
    if device not in ("gpu", "cpu"):
        raise UsageError(f"--device must be gpu or cpu (got {device!r})")
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1 (got {max_batch})")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1 (got {instances})")
    em = load_engines_manifest(engines) if engines is not None else None
    info = em.record if em is not None else None
    if info is not None and info.compat.library.name != "tensorrt" and flavour != "python":  # python: koala-trt's runtime loads either
        raise UsageError(f"{engines} holds {info.compat.library.name} engines, but Triton's TensorRT backend (platform "
                         "tensorrt_plan) loads standard TensorRT plans only: serve the ONNX models (omit --engines), or "
                         "build the engines with --library tensorrt on the card")
    if info is not None:
        unknown = [c for c in info.engines if c not in m.components]
        if unknown:
            raise UsageError(f"{engines} has engines for {', '.join(unknown)}, which {artifacts} does not hold")
    files = m.view.files
    for comp in m.components:  # everything present before anything is written
        if info is not None and comp in info.engines:
            e = info.engines[comp]
            plan = Path(engines) / e.file  # type: ignore[arg-type]
            if not plan.is_file():
                raise UsageError(f"{engines} is incomplete: engine {e.file} of {comp} is missing")
            if plan.stat().st_size != e.bytes:
                raise UsageError(f"{plan} has {plan.stat().st_size} bytes, the engines manifest says {e.bytes} (changed or corrupt)")
        else:
            lacking = [rel for rel in _graph_files(m, comp) if not (m.root / rel).is_file()]
            if lacking:
                raise UsageError(f"{comp}: {lacking[0]} is missing from {artifacts} (a bundle packed with --no-graphs? "
                                 "pass its engines with --engines)")
            for rel in _graph_files(m, comp):  # a cut-short graph, before any copy (its sha256 is checked as it is copied)
                size, meta = (m.root / rel).stat().st_size, files.get(rel)
                if meta and size != meta.bytes:
                    raise UsageError(f"{m.root / rel} has {size} bytes, its manifest records {meta.bytes} (changed or corrupt)")
    result = RepoResult(Path(out))
    graph_files: set[str] = set()
    layout: dict[str, dict[str, Any]] = {}
    log(f"writing Triton model repository {out}")
    with staged_dir(Path(out), force) as stage:
        for comp in m.components:
            spec = m.spec(comp)
            model = f"{name}_{comp}"
            version_dir = stage / model / "1"
            version_dir.mkdir(parents=True)
            mb = m.shape_range(comp).batch[2]
            if em is not None and info is not None and comp in info.engines:
                # a plan serves only the batches its profile was built for: Triton refuses a larger
                # max_batch_size (server#7056) and cannot batch a static batch dim (server#1105)
                lo, _, hi = em.shape_range(comp).batch
                mb = hi if lo == 1 < hi else 0
            if max_batch is not None:
                mb = min(mb, max_batch)
            batched = batchable(spec)
            note = f"koala-trt {__version__}: {comp} of {m.view.source.model}, precision {m.precision(comp)}"
            graph_files.update(_graph_files(m, comp))  # the pipeline model's folder holds the rest
            if flavour == "python":
                runs_on = _python_component(m, comp, em, version_dir, hardlink, log, model, runtime, runtime_options or {}, in_place)
                platform, filename, kind = "python", "model.py", "KIND_CPU"
                note += f", on the Python backend over koala-trt's {runs_on} backend"
            elif info is not None and comp in info.engines:
                e = info.engines[comp]
                log(f"  {model}: TensorRT engine {e.file}")
                _copy_checked(Path(engines) / e.file, version_dir / "model.plan", e.sha256, hardlink)
                platform, filename, kind = "tensorrt_plan", "model.plan", "KIND_GPU"
                note += f", engine {describe_engines(info.compat)}"
            else:
                graph = PurePosixPath(m.record(comp).file)
                log(f"  {model}: ONNX {graph}")
                for rel in _graph_files(m, comp):
                    meta = files.get(rel)
                    sub = PurePosixPath(rel).relative_to(graph.parent) if str(graph.parent) != "." else PurePosixPath(rel)
                    _copy_checked(m.root / rel, version_dir / sub, meta.sha256 if meta else None, hardlink)
                platform, filename, kind = "onnxruntime_onnx", graph.name, ("KIND_GPU" if device == "gpu" else "KIND_CPU")
            (stage / model / "config.pbtxt").write_text(component_config(model, spec, platform, mb, kind, filename, note), encoding="utf-8")
            batched = batched and mb > 0
            layout[comp] = {"model": model, "platform": platform, "batched": batched, "max_batch_size": mb if batched else 0}
            result.models[model] = {"component": comp, **layout[comp]}

        # the Python-backend model: model.py + what the sampler reads besides the networks
        pipe = stage / name / "1" / "pipeline"
        pipe.mkdir(parents=True)
        shutil.copyfile(m.root / MANIFEST, pipe / MANIFEST)
        for rel, meta in files.items():
            if rel not in graph_files:
                _copy_checked(m.root / rel, pipe / rel, meta.sha256, False)
        (pipe / "triton.json").write_text(json.dumps({"format": "koala-trt/triton-pipeline", "koala_trt_version": __version__,
                                                      "models": layout}, indent=2) + "\n", encoding="utf-8")
        template = resources.files("shipping").joinpath("templates/triton_model.py").read_text(encoding="utf-8")
        (stage / name / "1" / "model.py").write_text(template, encoding="utf-8")
        note = f"koala-trt {__version__}: text-to-image over {', '.join(v['model'] for v in layout.values())} (BLS)"
        (stage / name / "config.pbtxt").write_text(pipeline_config(name, instances, note), encoding="utf-8")
        result.models[name] = {"component": None, "platform": "python", "batched": False, "max_batch_size": 0}
    return result
