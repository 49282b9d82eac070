# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the pinned dev torch (a CPU build here; any torch>=2.4 works
# for users) and this package in editable mode with its dev extra, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= dev

.PHONY: demo test bench clean

$(VENV)/.installed-$(EXTRAS): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	touch $@

demo: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m ema_optim.demo $(ARGS)

test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed-$(EXTRAS)
	$(PY) benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
