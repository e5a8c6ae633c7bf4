# The two set-up commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use, installs vlrl with its dependencies, then does its job.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned as a pair that imports together; override for another platform,
# e.g. `make test TORCH="torch==2.9.1 torchvision==0.24.1"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,qlora,wandb]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-cli fit --config configs/demo/grpo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src callbacks tests benchmarks
	$(BIN)/ruff format --check src callbacks tests benchmarks

clean:
	rm -rf $(VENV) outputs lightning_logs
