# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the pinned dev torch (a CPU build here; users may use any
# torch>=2.4) and this package in editable mode with its extras, then runs.
# `make test` also installs the integrations (Lightning, Accelerate, transformers, PEFT)
# and matplotlib so that their tests run instead of being skipped.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_EXTRAS ?= dev
TEST_EXTRAS ?= dev,plot,lightning,accelerate,transformers,peft
BENCH_EXTRAS ?= dev,bench

.PHONY: demo test bench clean

define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(1)]" "$(TORCH_PIN)"
	touch $@
endef

$(VENV)/.demo-installed: setup.cfg pyproject.toml
	$(call install,$(DEMO_EXTRAS))

$(VENV)/.test-installed: setup.cfg pyproject.toml
	$(call install,$(TEST_EXTRAS))

$(VENV)/.bench-installed: setup.cfg pyproject.toml
	$(call install,$(BENCH_EXTRAS))

demo: $(VENV)/.demo-installed
	$(PY) -m ema_optim.demo $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
