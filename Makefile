# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the pinned dev torch (a CPU build here) and this package in
# editable mode with its extras, then runs. `make test` also installs the trainer
# integrations (Lightning, Accelerate, transformers, PEFT), matplotlib and the EMA libraries that
# docs/migration.md covers (ema-pytorch, diffusers, torch-ema, NeMo) so that their tests run
# instead of being skipped.
#
# Further targets (used by .ci/run):
#   make test-compat TORCH_PIN=torch==2.15.0   the whole suite on another torch, in its own
#                                              venv (.venv-torch-2.15.0), same extras as `make test`;
#                                              on torch 2.15.0 also torchvision + timm (the
#                                              peers-timm extra), so the timm migration tests run
#   make wheel-check    build the wheel, install it with the pinned torch into a clean venv
#                       and run the README quick start from outside the checkout
#   make lint           mypy ema_optim, ruff check, ruff format --check
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_EXTRAS ?= dev
TEST_EXTRAS ?= dev,plot,lightning,accelerate,transformers,peft,qlora,peers
# torchvision (for timm) is built for one torch release, so its extra goes only into the venv of
# that torch; on the dev pin (the local CPU build) no PyPI torchvision imports.
comma := ,
COMPAT_EXTRAS ?= $(TEST_EXTRAS)$(if $(filter torch==2.15.0,$(TORCH_PIN)),$(comma)peers-timm)
# tests/test_migration.py runs NeMo's EMAOptimizer from this release's callback file; NeMo's
# requirements (lightning<=2.4, hydra, ...) are not needed for it and would downgrade Lightning.
NO_DEPS_PEERS ?= nemo-toolkit==3.0.0
BENCH_EXTRAS ?= dev,bench
COMPAT_VENV ?= $(VENV)-$(subst ==,-,$(subst $() ,,$(TORCH_PIN)))
COMPAT_PY := $(COMPAT_VENV)/bin/python

.PHONY: demo test test-compat wheel-check lint bench clean

# $(1): extras, $(2): venv, $(3): packages to install without their requirements
define install
	test -x $(2)/bin/python || { $(PYTHON) -m venv $(2) && echo '*' > $(2)/.gitignore; }
	$(2)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(2)/bin/python -m pip install -q -e ".[$(1)]" "$(TORCH_PIN)"
	$(if $(3),$(2)/bin/python -m pip install -q --no-deps $(3))
	$(2)/bin/python -c "import torch; print('torch', torch.__version__)"
	touch $@
endef

$(VENV)/.demo-installed: setup.cfg pyproject.toml
	$(call install,$(DEMO_EXTRAS),$(VENV))

$(VENV)/.test-installed: setup.cfg pyproject.toml
	$(call install,$(TEST_EXTRAS),$(VENV),$(NO_DEPS_PEERS))

$(VENV)/.bench-installed: setup.cfg pyproject.toml
	$(call install,$(BENCH_EXTRAS),$(VENV))

$(COMPAT_VENV)/.test-installed: setup.cfg pyproject.toml
	$(call install,$(COMPAT_EXTRAS),$(COMPAT_VENV),$(NO_DEPS_PEERS))

demo: $(VENV)/.demo-installed
	$(PY) -m ema_optim.demo $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q $(ARGS)

test-compat: $(COMPAT_VENV)/.test-installed
	$(COMPAT_PY) -m pytest -q $(ARGS)

wheel-check: $(VENV)/.test-installed
	rm -rf dist
	$(PY) -m build --wheel --outdir dist .
	PYTHON=$(PYTHON) .ci/wheel_check.sh dist/ema_optim-*.whl "$(TORCH_PIN)"

lint: $(VENV)/.test-installed
	$(PY) -m mypy ema_optim
	$(PY) -m ruff check .
	$(PY) -m ruff format --check --extend-exclude '*.md' .

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV)-torch-* *.egg-info .hypothesis dist build
