"""KOALA text-to-image as a Triton Python-backend model, written by `koala-trt triton`.

Text prompt in, uint8 image [height, width, 3] out. The denoising loop runs here; every network
(text encoders, U-Net, VAE decoder) is a separate model in this repository, called through Triton's
business-logic scripting (BLS), so Triton batches concurrent requests' U-Net steps together.

Requirements in the Python backend's environment: numpy and the koala-trt package (it provides the
component specs, the tokenizers' wrapper, the scheduler and the sampler loop); install it into the
Triton image (`pip install koala-trt`) or point EXECUTION_ENV_PATH at a packed environment that has it.

The folder `pipeline/` beside this file holds the artifacts manifest (specs, sampler defaults),
the tokenizers, the scheduler config and `triton.json` (component -> Triton model name, batching).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class BlsBackend:
    """koala-trt's runtime `Backend` protocol (runtime/backend.py) over BLS calls to the component models."""

    name = "triton"

    def __init__(self, specs: dict, models: dict) -> None:
        from shipping.triton_io import from_triton, to_triton

        self.specs, self.models = specs, models
        self._to, self._from = to_triton, from_triton

    def run(self, component: str, feeds: dict) -> dict:
        spec, info = self.specs[component], self.models[component]
        spec.check_inputs(feeds)
        batched = bool(info["batched"])
        inputs = [pb_utils.Tensor(t.name, np.ascontiguousarray(self._to(t, feeds[t.name], batched))) for t in spec.inputs]
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):  # Triton >= 23.04: outputs in host memory, as numpy needs
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=info["model"], requested_output_names=[t.name for t in spec.outputs],
                                            inputs=inputs, **kwargs)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{info['model']}: {response.error().message()}")
        out = {}
        for t in spec.outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, t.name)
            if not tensor.is_cpu():
                raise pb_utils.TritonModelException(f"{info['model']}.{t.name} came back in GPU memory; this model needs host tensors")
            out[t.name] = self._from(t, tensor.as_numpy(), batched)
        return out

    def close(self) -> None:
        pass


def make_sampler(backend: BlsBackend, pipeline_dir: Path) -> Callable[..., np.ndarray]:
    """koala-trt's Python API (sampler/api.py, the one path from a request to an image) over
    `backend`, configured from the artifacts manifest in `pipeline_dir`: a function
    (prompt, **inputs) -> (uint8 [H, W, 3] image, (height, width, steps) it ran at). The inputs are
    this model's: negative_prompt, seed, steps, guidance, height, width, scheduler, image, mask_image,
    strength, cache_interval, cache_branch (INPUT_NAMES maps the served names to the API's).

    This is the one place that names the sampler's API."""
    from exporter.manifest import load_manifest
    from sampler.api import Pipeline  # koala-trt, installed in this environment
    from sampler.loop import PipelineAssets, to_uint8

    pipe = Pipeline(backend, PipelineAssets.from_manifest(load_manifest(pipeline_dir)),
                    warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))

    def run(prompt: str, **inputs: object) -> np.ndarray:
        keywords = {INPUT_NAMES.get(k, k): v for k, v in inputs.items()}
        [plan] = pipe.plan(pipe.requests(prompt, num_images_per_prompt=1, **keywords))  # refuses a prompt beyond the U-Net's token range
        images = pipe.run([plan], output_type="np", progress=False).images
        return to_uint8(images)[0], (plan.height, plan.width, plan.steps)

    return run


# This model's request inputs -> the Python API's keywords (diffusers' names), where they differ.
INPUT_NAMES = {"steps": "num_inference_steps", "guidance": "guidance_scale"}


def to_uint8_hwc(image) -> np.ndarray:
    """An image as uint8 [H, W, 3]: from a PIL image, a uint8 HWC array, or a float array in [-1, 1]
    shaped [1, 3, H, W] / [3, H, W] (the VAE decoder's output)."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a[0] if a.ndim == 4 else a
    a = a[0] if a.ndim == 4 else a
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (3, 4):
        a = np.transpose(a, (1, 2, 0))
    return np.clip((a.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def _error(e: Exception):
    """A TritonError for `e`: INVALID_ARG (HTTP 400) for a bad request (koala-trt's UsageError, or an
    input of the wrong shape), INTERNAL (500) for anything else; one line."""
    from koala_core.errors import UsageError

    bad = isinstance(e, (UsageError, BadRequest))
    message = " ".join(str(e).split()) if bad else f"{type(e).__name__}: {' '.join(str(e).split())}"
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if bad else "INTERNAL", None)  # codes: Triton >= 23.04
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


class BadRequest(ValueError):
    pass


def _scalar(request, name: str, kind):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = t.as_numpy()
    if a.size != 1:
        raise BadRequest(f"{name}: one value per request (got shape {list(a.shape)})")
    v = a.reshape(-1)[0]
    if kind is str:
        try:
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError:
            raise BadRequest(f"{name}: not UTF-8 text") from None
    return kind(v)


def _image_inputs(request) -> dict:
    """img2img / inpainting inputs as sampler.loop.Request's fields: `image` (uint8 [H, W, 3]) or
    `image_png` (file bytes), `mask` ([H, W]) or `mask_png`, `strength`; checked by the sampler."""
    out = {}
    for field, pixels, encoded in (("image", "image", "image_png"), ("mask_image", "mask", "mask_png")):
        a, b = pb_utils.get_input_tensor_by_name(request, pixels), pb_utils.get_input_tensor_by_name(request, encoded)
        if a is not None and b is not None:
            raise BadRequest(f"{pixels}: pass {pixels} (pixels) or {encoded} (file bytes), not both")
        if a is not None:
            out[field] = np.ascontiguousarray(a.as_numpy())
        elif b is not None:
            v = b.as_numpy().reshape(-1)
            if v.size != 1:
                raise BadRequest(f"{encoded}: one file per request (got shape {list(b.as_numpy().shape)})")
            out[field] = bytes(v[0]) if isinstance(v[0], (bytes, bytearray)) else str(v[0]).encode()
    strength = _scalar(request, "strength", float)
    if strength is not None:
        out["strength"] = strength
    return out
def _image(request, name: str):
    """An image input (UINT8 [H, W, C] pixels or [1, 1, N] PNG/JPEG bytes) as the sampler takes it, or None."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else np.ascontiguousarray(t.as_numpy())


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from exporter.manifest import load_manifest

        pipeline_dir = Path(__file__).resolve().parent / "pipeline"
        layout = json.loads((pipeline_dir / "triton.json").read_text(encoding="utf-8"))
        manifest = load_manifest(pipeline_dir)
        specs = {c: manifest.spec(c) for c in layout["models"]}
        self.backend = BlsBackend(specs, layout["models"])
        self.sampler = make_sampler(self.backend, pipeline_dir)
        self.name = args.get("model_name", "koala")
        self.instance = args.get("model_instance_name", self.name)
        self.served = 0

    def _log(self, request, kwargs: dict, seconds: float, error: Exception | None) -> None:
        """One line per request on the server's stderr: id, size, steps, seconds, outcome."""
        self.served += 1
        rid = getattr(request, "request_id", lambda: "")() or f"{self.instance}#{self.served}"
        size = f"{kwargs.get('width', 'default')}x{kwargs.get('height', 'default')}"
        outcome = "ok" if error is None else f"error: {' '.join(str(error).split())[:200]}"
        print(f"{self.name}: request {rid} size {size} steps {kwargs.get('steps', 'default')} {seconds:.2f} s {outcome}",
              file=sys.stderr, flush=True)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            t0, kwargs, error = time.perf_counter(), {}, None
            try:
                kwargs = {k: v for k, v in {
                    "negative_prompt": _scalar(request, "negative_prompt", str),
                    "seed": _scalar(request, "seed", int),
                    "steps": _scalar(request, "steps", int),
                    "guidance": _scalar(request, "guidance", float),
                    "height": _scalar(request, "height", int),
                    "width": _scalar(request, "width", int),
                    "scheduler": _scalar(request, "scheduler", str),
                    "cache_interval": _scalar(request, "cache_interval", int),
                    "cache_branch": _scalar(request, "cache_branch", int),
                    "control_image": _image(request, "control_image"),
                    "controlnet_conditioning_scale": _scalar(request, "controlnet_scale", float),
                    "control_guidance_start": _scalar(request, "control_guidance_start", float),
                    "control_guidance_end": _scalar(request, "control_guidance_end", float),
                }.items() if v is not None}
                kwargs.update(_image_inputs(request))
                prompt = _scalar(request, "prompt", str)
                if prompt is None:
                    raise BadRequest("prompt: required input missing")
                image, (h, w, steps) = self.sampler(prompt, **kwargs)
                kwargs.update(height=h, width=w, steps=steps)  # what it ran at, defaults resolved, for the log
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", to_uint8_hwc(image))]))
            except Exception as e:  # one bad request must not take the model down
                error = e
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(e)))
            self._log(request, kwargs, time.perf_counter() - t0, error)
        return responses

    def finalize(self) -> None:
        self.backend.close()
