.DEFAULT_GOAL := help

# The Python every target uses. An active virtualenv is used as it is; with none active, targets
# use (and first create) ./.venv, so nothing is ever installed into a system Python. Pass
# PYTHON=... to choose another interpreter yourself.
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= .venv/bin/python
endif

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Python: $(PYTHON) (an active virtualenv, else ./.venv, created on first use; override with PYTHON=...)"

.venv/bin/python:
	@echo "make: no virtualenv is active, so the targets use ./.venv (creating it now with python3 -m venv)"
	python3 -m venv .venv

.PHONY: python-env
python-env: $(if $(VIRTUAL_ENV),,$(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python))
	@$(PYTHON) -c "import sys; print('make: using', sys.executable)"

# Installed before any Rust test runs, so a missing package fails in seconds, not after the build.
.PHONY: test-deps
test-deps: python-env
	@$(PYTHON) -m pip install --quiet "pytest>=7" "hypothesis>=6" "numpy>=1.23" || \
	  { echo "make: could not install pytest, hypothesis and numpy into $(PYTHON) (is PyPI reachable?)" >&2; exit 1; }

.PHONY: install
install: python-env ## build the abi3 wheel (release, fat LTO) and install it with the test extra
	$(PYTHON) -m pip install ".[test]"

.PHONY: dev
dev: python-env ## quick rebuild for development: maturin develop with the incremental `quick` profile
	$(PYTHON) -m pip install --quiet "maturin>=1.16,<2"
	$(PYTHON) -m maturin develop --profile quick

.PHONY: demo
demo: install ## install, then run the demonstration (python -m batchnorm)
	$(PYTHON) -m batchnorm

.PHONY: test-rust
test-rust: ## the pure-Rust core (unit, integration, doc tests), then again with the CUDA backend built in
	cargo test
	cargo test --features cuda

.PHONY: test-python
test-python: install ## pytest against the installed package (PyTorch cases run when torch imports)
	$(PYTHON) -m pytest tests -q

.PHONY: test
test: test-deps test-rust test-python ## the whole test suite: Python test tools first, then Rust, then pytest

.PHONY: lint
lint: ## rustfmt, clippy with and without the python feature, ruff and mypy.stubtest
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo clippy --all-targets --features python,cuda -- -D warnings
	$(PYTHON) -m ruff check python tests
	$(PYTHON) -m ruff format --check python tests
	$(PYTHON) -m mypy.stubtest batchnorm._core

.PHONY: gpu-prep
gpu-prep: ## build what benches/gpu_session.sh runs on a GPU machine into .gpu/: the wheel and the Rust GPU tests
	rm -rf .gpu && mkdir -p .gpu
	$(PYTHON) -m pip install --quiet "maturin>=1.16,<2"
	$(PYTHON) -m maturin build --release -o .gpu
	cp "$$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
	  | $(PYTHON) -c "import json, sys; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")" \
	  .gpu/cuda-tests

.PHONY: bench-rust
bench-rust: ## criterion benches of the CPU kernels
	cargo bench
