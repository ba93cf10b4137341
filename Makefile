.DEFAULT_GOAL := help
PYTHON ?= python3

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

.PHONY: install
install: ## build the abi3 wheel and install it (pip install .)
	$(PYTHON) -m pip install .

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
test: test-rust test-python ## the whole test suite, Rust and Python

.PHONY: lint
lint: ## rustfmt, clippy with and without the python feature, ruff and mypy.stubtest
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo clippy --all-targets --features python,cuda -- -D warnings
	$(PYTHON) -m ruff check python tests
	$(PYTHON) -m ruff format --check python tests
	$(PYTHON) -m mypy.stubtest batchnorm._core

.PHONY: bench-rust
bench-rust: ## criterion benches of the CPU kernels
	cargo bench
