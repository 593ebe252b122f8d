# koala-trt: `make test` and `make demo` set everything up on a fresh machine (a .venv at the root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-cpu
OUT    ?= out
DEMO_MODEL ?= random:tiny
TORCH  := torch==2.13.0

.PHONY: install install-gpu browser test test-gpu demo bench optimum-venv genai-venv serve-venv clean

install: $(STAMP) browser

# torch first, from the pinned version (a CPU build here), so nothing pulls a CUDA build of several GB.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[export,cpu,validate,test,precision,rtx,serve,plot]'
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	$(MAKE) serve-venv
	@touch $@

# `koala-trt serve`: the environment its models run in. The Python-backend stub in nvidia-pytriton 0.7.0
# was built against numpy 1 (under numpy 2 it hands models arrays read with stride 0), so the runtime
# core (no torch) with numpy 1.26; the pins follow constraints.txt except numpy.
serve-venv:
	$(PYTHON) -m venv .venv-serve
	.venv-serve/bin/python -m pip install -q 'numpy==1.26.4' 'onnxruntime==1.31.1' 'openvino==2026.4.1' 'openvino-telemetry==2025.2.0' 'tokenizers==0.23.3' 'pillow==13.0.0' 'click==8.5.1' 'tqdm==4.70.1' 'onnx==1.23.2' 'protobuf==7.36.2'
	.venv-serve/bin/python -m pip install -q --no-deps -e .

# The HTML report's test opens it in a real browser: Debian's chromium where none is installed (as
# root, where apt-get exists); anywhere else the install goes on and that test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null \
	  || echo "make install: chromium could not be installed; the browser test of the HTML report will skip" >&2; \
	else echo "make install: no chromium here and no apt-get as root to install it; the browser test of the HTML report will skip" >&2; fi

# On a GPU machine: onnxruntime-gpu and TensorRT instead of the CPU onnxruntime (never both).
install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	-$(BIN)/python -m pip uninstall -q -y onnxruntime
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[export,gpu,precision,rtx,test]'
	@touch $(VENV)/.installed-gpu

test: install
	$(BIN)/python -m pytest -q

# Fails, with a one-line reason, where it cannot test: TensorRT/cuda-python/GPU missing (conftest's
# --require-gpu), any GPU test skipped, or no test collected (pytest's exit 5).
test-gpu:
	@$(BIN)/python -m pytest -q -m gpu -rs --require-gpu; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: no GPU test ran (exit 5: none collected)" >&2; exit 1; fi; exit $$rc

demo: install
	$(BIN)/python scripts/demo.py --model $(DEMO_MODEL) --out $(OUT)

bench: install
	$(BIN)/python scripts/bench.py

# Hugging Face Optimum's exporter for the side-by-side export row of `make bench`, in its own venv:
# optimum-onnx pins transformers below 4.58, which koala-trt's environment does not use.
optimum-venv:
	$(PYTHON) -m venv .venv-optimum
	.venv-optimum/bin/python -m pip install -q --upgrade pip
	.venv-optimum/bin/python -m pip install -q $(TORCH)
	.venv-optimum/bin/python -m pip install -q 'optimum-onnx==0.1.0' 'transformers==4.57.6' 'diffusers==0.39.0' 'onnx==1.23.2' 'onnxruntime==1.31.1'

# Intel's own pipeline for the side-by-side of scripts/bench_genai.py: openvino-genai (Text2ImagePipeline) and
# optimum-intel (`optimum-cli export openvino`), in their own venv; openvino at the pin koala-trt runs. optimum-intel
# 2.2.0 resolves to diffusers 0.39 and torch 2.14 (not koala-trt's 0.42 / 2.13): pinned as it resolved.
genai-venv:
	$(PYTHON) -m venv .venv-genai
	.venv-genai/bin/python -m pip install -q --upgrade pip
	.venv-genai/bin/python -m pip install -q 'torch==2.14.1'
	.venv-genai/bin/python -m pip install -q 'openvino-genai==2026.4.1.0' 'openvino-tokenizers==2026.4.1.0' 'openvino==2026.4.1' \
		'optimum-intel[openvino,diffusers]==2.2.0' 'optimum==2.3.0' 'nncf==3.4.0' 'diffusers==0.39.0' 'transformers==5.5.4' \
		'huggingface_hub==1.21.0' 'tokenizers==0.22.2'

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
