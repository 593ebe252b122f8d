#!/usr/bin/env bash
# The prepared GPU check (docs/bench.md, "On an NVIDIA GPU"), for a session lent an NVIDIA GPU
# through the device tool: that machine has PyTorch with CUDA but no TensorRT and no diffusers, and
# only 64 MiB of files travel. Under 8 minutes on an H100 or an RTX 4090.
#
#   scripts/gpu_check.sh prepare     # here: the pinned wheels it needs into .gpu-wheels/ (about 25 MiB, ignored by git)
#   scripts/gpu_check.sh             # there (device tool: carry [".gpu-wheels"]): install them, time, compare, one table
#
# It times PyTorch FP16 25-step 1024x1024 U-Net loops (CFG batch 2) of random KOALA-700M, KOALA-1B and
# SDXL-Base (the seed's RTX 4090 table: 1.257 / 1.604 / 3.133 s), and runs the sampler of
# `koala-trt generate --backend torch` on CUDA against diffusers' pipeline from the same latents.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu-wheels
# What the torch backend and the reference import beside torch and numpy, at constraints.txt's pins.
NEEDS="diffusers transformers tokenizers huggingface_hub safetensors regex click tqdm"

pins() { for n in $NEEDS; do grep -i "^$n==" constraints.txt; done; }

if [ "${1:-}" = "prepare" ]; then
    mkdir -p "$WHEELS"
    # tokenizers and safetensors are binary (abi3) wheels: fetched for Linux x86-64, CPython 3.11 (diffusers 0.42 needs 3.11+; GPU_PYTHON_VERSION=3.12 for another, regex is per version).
    $PY -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version "${GPU_PYTHON_VERSION:-3.11}" \
        -d "$WHEELS" $(pins)
    du -sh "$WHEELS"
    exit 0
fi

$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs an NVIDIA GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
# Install only what is missing, from the carried wheels (the machine reaches no index).
missing=$($PY - <<PY
import importlib.util
print(" ".join(n for n in "$NEEDS".split() if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check: missing $missing and no $WHEELS/ (run 'scripts/gpu_check.sh prepare' here, carry $WHEELS)" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" $(for n in $missing; do pins | grep -i "^$n=="; done)
fi
exec timeout 450 env PYTHONPATH="$PWD" $PY scripts/gpu_check.py "$@"
