"""`koala-trt lora`: LoRA adapters patched straight into an exported folder's ONNX initializers.

No PyTorch: each adapted layer's weight is found among the graph's initializers, by name where
torch's exporter kept the parameter's name (Conv, Gemm), or, for a Linear whose weight the
exporter's constant folding transposed into an anonymous `val_N` initializer (MatMul), by the
node metadata torch writes (`pkg.torch.onnx.name_scopes`: the module path). The delta is the one
`export --lora` adds (exporter/lora.py), transposed where the graph holds W^T, added in FP32 and
cast back to the initializer's dtype (FP16 folders). Quantized folders are refused: their weights
are Q/DQ-scaled, so the adapter has to be fused before quantizing.
"""

from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.artifacts import ACCURACY, copy_artifacts, save_onnx
from exporter.lora import Adapter, check_adapters, resolve_layers
from exporter.manifest import Manifest, file_record, load_manifest
from koala_core.atomic import staged_dir
from koala_core.errors import KoalaError, UsageError

Log = Callable[[str], None]

PATCHABLE = ("fp32", "fp16")
WRAPPER_ATTR = {"unet": "unet.", "text_encoder": "encoder."}  # exporter/wrappers.py: the wrapped module's attribute
LINEAR_ARG = re.compile(r"aten\.linear\.default\]\(args = \(%[\w.]+, %p_(\w+)")


@dataclass(frozen=True)
class Site:
    """Where a layer weight lives in a graph: the initializer and whether it holds W^T."""

    initializer: str
    transposed: bool
    shape: tuple[int, ...]  # the PyTorch weight's shape ([out, in, *k])


def weight_sites(model: Any, prefix: str) -> dict[str, Site]:
    """Linear/Conv weights of an exported graph, by their module-relative PyTorch name."""
    g = model.graph
    inits = {i.name: tuple(int(d) for d in i.dims) for i in g.initializer}
    produced_by = {o: n for n in g.node for o in n.output}

    def source(name: str) -> str | None:  # through Casts an FP16 conversion may insert
        while name not in inits:
            n = produced_by.get(name)
            if n is None or n.op_type != "Cast":
                return None
            name = n.input[0]
        return name

    sites: dict[str, Site] = {}
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            init = source(n.input[1])
            if init is None:
                continue
            if init.startswith(prefix) and init.endswith(".weight") and len(inits[init]) >= 2 and n.op_type != "MatMul":
                trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
                if n.op_type == "Conv" or trans_b == 1:
                    sites[init[len(prefix):]] = Site(init, False, inits[init])
                    continue
            meta = {p.key: p.value for p in n.metadata_props}
            m = LINEAR_ARG.search(meta.get("pkg.torch.onnx.fx_node", ""))
            scopes = meta.get("pkg.torch.onnx.name_scopes")
            if m is None or not scopes or len(inits[init]) != 2:
                continue
            module = ast.literal_eval(scopes)[-2]
            name = f"{module}.weight"
            if not name.startswith(prefix) or name.replace(".", "_") != m.group(1):
                continue
            sites[name[len(prefix):]] = Site(init, True, inits[init][::-1])
    return sites


def add_pruned_last_layer(sites: dict[str, Site]) -> int:
    """A text encoder's graph has no last transformer layer (SDXL reads the penultimate hidden
    states, so the exporter drops it): an adapter's layers there change nothing the graph computes.
    They are given placeholder sites (no initializer; the shapes of the layer before, CLIP's layers
    being alike) so they match as they do at export; the number added."""
    layer = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
    found = [(int(m.group(1)), m.group(2), s) for k, s in sites.items() if (m := layer.match(k))]
    if not found:
        return 0
    last = max(i for i, _, _ in found)
    extra = {f"encoder.layers.{last + 1}.{rest}": Site("", s.transposed, s.shape) for i, rest, s in found if i == last}
    sites.update(extra)
    return len(extra)


def quantized_refusal(root: Path, src: Manifest, name: str, precision: str) -> str:
    model = src.data.get("source", {}).get("model", "MODEL")
    return (f"{root}: the {name} is {precision}; a LoRA cannot be patched into quantized weights. Fuse it at export "
            f"and quantize again: koala-trt export --model {model} --lora FILE[:SCALE] --out FP32_DIR, then "
            f"koala-trt quantize --onnx FP32_DIR --calib CALIB --out OUT")


def _add_fp32_sites(src_dir: Path, src: Manifest, name: str, header: Any, sites: dict[str, Site]) -> None:
    """An FP16 conversion (ModelOpt AutoCast) keeps initializer names but drops torch's node
    metadata, so the Linear weights' module paths are read from the FP32 export it was made from."""
    import onnx

    origin = Path(src.data.get("variant", {}).get("from", ""))
    try:
        fp32 = load_manifest(origin)
        header32 = onnx.load(str(fp32.onnx_path(name)), load_external_data=False)
    except (KoalaError, OSError):
        raise UsageError(f"{src_dir}: the {name} is FP16 and its FP32 export {origin} (where its layer names are read) "
                         "is not there; patch the FP32 export with `koala-trt lora` and convert it again") from None
    dims = {i.name: tuple(int(d) for d in i.dims) for i in header.graph.initializer}
    for k, s in weight_sites(header32, WRAPPER_ATTR[src.spec(name).kind]).items():
        if k not in sites and dims.get(s.initializer) == (s.shape[::-1] if s.transposed else s.shape):
            sites[k] = s


def _rehash_patched(manifest: Manifest, folders: list[Path]) -> None:
    """Hash only the rewritten components' files: the copied ones keep their verified records
    (re-hashing a full-size folder would cost more than the patch)."""
    rels = [f.relative_to(manifest.root).as_posix() + "/" for f in folders]
    files = {k: v for k, v in manifest.data.get("files", {}).items() if k != ACCURACY and not k.startswith(tuple(rels))}
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                files[p.relative_to(manifest.root).as_posix()] = file_record(p)
    manifest.data["files"] = dict(sorted(files.items()))


class _Weights:
    """A graph's initializers, read and rewritten in place: in the external data file when the graph
    has one (same dtype, same byte length, same offset: the graph itself is unchanged, so nothing
    but the patched bytes is rewritten), else in the loaded model, saved on close."""

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = path
        self.model = onnx.load(str(path), load_external_data=False)
        self.inits = {i.name: i for i in self.model.graph.initializer}
        self.external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in self.inits.values())
        self.dirty = False  # an embedded initializer of an external-data graph was rewritten
        if self.external:
            self.files: dict[str, Any] = {}
        else:
            onnx.load_external_data_for_model(self.model, str(path.parent))

    def _where(self, name: str) -> tuple[Any, int, int] | None:
        import onnx

        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in t.external_data}
        loc = info["location"]
        if loc not in self.files:
            self.files[loc] = open(self.path.parent / loc, "r+b")
        return self.files[loc], int(info.get("offset", 0)), int(info["length"])

    def _dtype(self, name: str) -> np.dtype:
        import onnx

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.inits[name].data_type))

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        where = self._where(name) if self.external else None
        if where is None:
            return numpy_helper.to_array(self.inits[name])
        f, offset, length = where
        f.seek(offset)
        return np.frombuffer(f.read(length), dtype=self._dtype(name).newbyteorder("<")).reshape(tuple(self.inits[name].dims))

    def write(self, name: str, w: np.ndarray, component: str) -> None:
        from onnx import numpy_helper

        dtype = self._dtype(name)
        cast = w.astype(dtype)
        if not np.isfinite(cast).all():
            raise KoalaError(f"{component}: patched weight {name} is not finite in {dtype.name}")
        where = self._where(name) if self.external else None
        if where is None:
            self.inits[name].CopyFrom(numpy_helper.from_array(cast, name))
            self.dirty = True
            return
        f, offset, length = where
        data = cast.astype(dtype.newbyteorder("<"), copy=False).tobytes()
        assert len(data) == length, (name, len(data), length)
        f.seek(offset)
        f.write(data)

    def close(self) -> None:
        if self.external:
            for f in self.files.values():
                f.close()
            if self.dirty:  # the proto keeps its external references; only it is rewritten
                import onnx

                onnx.save_model(self.model, str(self.path))
        else:
            save_onnx(self.model, self.path)


def patch_artifacts(src_dir: Path, adapters: list[Adapter], out: Path, force: bool = False, log: Log = print) -> Manifest:
    """Copy `src_dir` to `out` with every adapter's deltas added to the graphs' initializers."""
    import onnx

    started = time.perf_counter()
    src = load_manifest(src_dir)
    problems = list(src.verify())
    if problems:
        raise UsageError(f"{src_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    wanted = sorted({m for a in adapters for m, v in a.layers.items() if v})
    sites: dict[str, dict[str, Site]] = {}
    for name in wanted:
        if name not in src.components:
            continue  # check_adapters names the keys
        precision = src.precision(name)
        if precision not in PATCHABLE:
            raise UsageError(quantized_refusal(src_dir, src, name, precision))
        header = onnx.load(str(src.onnx_path(name)), load_external_data=False)
        kind = src.spec(name).kind
        sites[name] = weight_sites(header, WRAPPER_ATTR[kind])
        if precision != "fp32":
            _add_fp32_sites(src_dir, src, name, header, sites[name])
        if kind == "text_encoder" and not src.spec(name).outputs[1:]:  # no pooled output: penultimate layer is the last one kept
            add_pruned_last_layer(sites[name])
        del header
    check_adapters(adapters, {m: {k: s.shape for k, s in v.items()} for m, v in sites.items()})
    log(f"patching {', '.join(a.arg.label for a in adapters)} into {src_dir} -> {out}")

    with staged_dir(out, force=force) as stage:
        manifest = copy_artifacts(src, stage)
        counts: dict[str, int] = {}
        for name, by_weight in sites.items():
            t0 = time.perf_counter()
            path = manifest.onnx_path(name)
            store = _Weights(path)
            touched: dict[str, np.ndarray] = {}
            for a in adapters:
                for weight, layer in resolve_layers(a, name, {k: s.shape for k, s in by_weight.items()}).items():
                    site = by_weight[weight]
                    if not site.initializer:
                        continue  # in the pruned last layer: nothing to patch
                    if site.initializer not in touched:
                        touched[site.initializer] = store.read(site.initializer).astype(np.float32)
                    d = layer.delta(a.arg.scale, site.shape)
                    touched[site.initializer] += d.T if site.transposed else d
            for init_name, w in touched.items():
                store.write(init_name, w, name)
            store.close()
            counts[name] = len(touched)
            log(f"{name}: patched {len(touched)} weight(s) in {time.perf_counter() - t0:.1f} s")
        manifest.data["loras"] = manifest.data.get("loras", []) + [dict(a.record(), applied="patch") for a in adapters]
        manifest.data["lora_patch"] = {"from": str(src_dir), "weights": counts, "seconds": round(time.perf_counter() - started, 1)}
        _rehash_patched(manifest, [manifest.onnx_path(n).parent for n in counts])
        manifest.save()
    manifest.root = out
    return manifest
