"""One KOALA component (text encoder, U-Net, VAE decoder) as a Triton Python-backend model, written by
`koala-trt triton --flavour python` (and `koala-trt serve`) for servers without the ONNX Runtime or
TensorRT backends. Same name, inputs, outputs and batching as the production flavour's model, so the
pipeline model (`koala`) calls it through BLS unchanged.

It runs on koala-trt's own runtime backend (runtime/backend.py: onnxruntime or openvino over the graph
beside this file, or tensorrt over the engine), opened over this version folder: `manifest.json` here is the
artifacts (or engines) manifest cut to this one component, its files at the paths it names (or, as
`koala-trt serve` writes it, over the folder that component.json names).

Requests that Triton's dynamic batcher hands over together are run as one batch when their non-batch
shapes agree and the batch stays within the component's range (e.g. two prompts' CFG U-Net steps:
batch 2 + 2 = 4), else one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


def _error(e: Exception):
    code = getattr(pb_utils.TritonError, "INTERNAL", None)
    return pb_utils.TritonError(f"{type(e).__name__}: {e}", code) if code is not None else pb_utils.TritonError(f"{type(e).__name__}: {e}")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from runtime.backend import open_backend  # koala-trt, installed in this environment
        from shipping.triton_io import from_triton, to_triton

        info = json.loads((Path(__file__).resolve().parent / "component.json").read_text(encoding="utf-8"))
        here = Path(info.get("folder") or Path(__file__).resolve().parent)  # in place (koala-trt serve), else this folder
        self.component = info["component"]
        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.max_batch = int(config.get("max_batch_size", 0))
        if info["runtime"] == "openvino":  # its compiled-model cache where the writer said (serve: beside the artifacts)
            from exporter.manifest import load_manifest
            from runtime.openvino_backend import OpenVinoBackend

            cache = info.get("cache_dir")
            self.backend = OpenVinoBackend(load_manifest(here), cpu_precision=info.get("cpu_precision"),
                                           cache_dir=Path(cache) if cache else None)
        else:
            folder = {"engines": here} if info["runtime"] == "tensorrt" else {"artifacts": here}
            self.backend = open_backend(info["runtime"], **folder)
        load = getattr(self.backend, "load", None)
        if load is not None:
            load([self.component])
        self.spec = self.backend.specs[self.component]
        self._to, self._from = to_triton, from_triton

    def _feeds(self, request) -> dict:
        feeds = {}
        for t in self.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is None:
                raise ValueError(f"missing input {t.name}")
            feeds[t.name] = self._from(t, tensor.as_numpy(), self.batched)
        return feeds

    def _response(self, outs: dict):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(t.name, np.ascontiguousarray(self._to(t, outs[t.name], self.batched))) for t in self.spec.outputs])

    def _groups(self, feeds: list) -> list:
        """Indices of requests run together: same non-batch shapes, total batch within max_batch_size."""
        if not self.batched:
            return [[i] for i in range(len(feeds))]
        groups: list = []
        for i, f in enumerate(feeds):
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(f.items()))
            size = next(iter(f.values())).shape[0]
            for g in groups:
                if g["key"] == key and g["size"] + size <= self.max_batch:
                    g["items"].append(i)
                    g["size"] += size
                    break
            else:
                groups.append({"key": key, "size": size, "items": [i]})
        return [g["items"] for g in groups]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        feeds: list = []
        for i, request in enumerate(requests):
            try:
                feeds.append(self._feeds(request))
            except Exception as e:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error(e))
                feeds.append(None)
        ok = [i for i, f in enumerate(feeds) if f is not None]
        for group in self._groups([feeds[i] for i in ok]):
            items = [ok[j] for j in group]
            try:
                if len(items) == 1:
                    responses[items[0]] = self._response(self.backend.run(self.component, feeds[items[0]]))
                    continue
                sizes = [next(iter(feeds[i].values())).shape[0] for i in items]
                joined = {k: np.concatenate([feeds[i][k] for i in items]) for k in feeds[items[0]]}
                outs = self.backend.run(self.component, joined)
                start = 0
                for i, n in zip(items, sizes):
                    responses[i] = self._response({k: v[start:start + n] for k, v in outs.items()})
                    start += n
            except Exception as e:
                for i in items:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error(e))
        return responses

    def finalize(self) -> None:
        self.backend.close()
