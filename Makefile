# Two commands do all set-up on a fresh machine:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel of torch when there is one; plain torch elsewhere.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	# PyPI's torchvision/torchaudio/torchcodec break against a +cpu torch and then transformers fails.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/evomerge demo --out demo-out

test: venv
	bash bench/vllm_env.sh
	bash bench/mergekit_env.sh
	$(BIN)/ruff check evomerge tests bench
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	$(BIN)/python bench/run

lint: venv
	$(BIN)/ruff check evomerge tests bench

clean:
	rm -rf $(VENV) .venv-mergekit demo-out .pytest_cache
