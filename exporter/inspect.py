"""What a model or an artifacts folder holds: components, parameter counts, key config values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.manifest import MANIFEST, load_manifest
from exporter.sources import MODULES, resolve

KEY_CONFIG = {
    "unet": ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "mid_block_type",
             "attention_head_dim", "cross_attention_dim", "sample_size"),
    "text_encoder": ("hidden_size", "num_hidden_layers", "num_attention_heads", "projection_dim", "vocab_size", "hidden_act"),
    "text_encoder_2": ("hidden_size", "num_hidden_layers", "num_attention_heads", "projection_dim", "vocab_size", "hidden_act"),
    "vae": ("block_out_channels", "latent_channels", "scaling_factor", "force_upcast"),
}


def inspect_model(ref: str) -> dict[str, Any]:
    """Parameter counts on the meta device: full-size presets allocate no weights."""
    source = resolve(ref)
    comps = {}
    for module in MODULES:
        cfg = source.configs[module]
        comps[module] = {"parameters": source.parameter_count(module), "class": cfg.get("_class_name") or (cfg.get("architectures") or ["?"])[0],
                         "config": {k: cfg.get(k) for k in KEY_CONFIG[module] if k in cfg}}
    return {"model": source.ref, "kind": source.kind, "description": source.description,
            "sampler": {"steps": source.sampler.steps, "guidance": source.sampler.guidance,
                        "timestep_spacing": source.scheduler_config.get("timestep_spacing")},
            "default_size": source.default_size, "components": comps,
            "total_parameters": sum(c["parameters"] for c in comps.values())}


def inspect_artifacts(root: Path) -> dict[str, Any]:
    m = load_manifest(root)
    from koala_core.machine import cpu_isa, cpu_model, resolve_cpu_precision

    cpu = {"model": cpu_model(), "isa": cpu_isa(), "openvino_auto_precision": resolve_cpu_precision("auto")}
    return {"artifacts": str(root), **m.data, "cpu": cpu}


def inspect(target: str) -> dict[str, Any]:
    path = Path(target).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return inspect_artifacts(path)
    return inspect_model(target)
