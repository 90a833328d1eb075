# Two commands do all set-up on a fresh machine:
#   make demo   installs into .venv and runs the whole pipeline (`hf-matta run`) on the embedded offline default;
#               EVAL_DATA_DIR=DIR adds SAT Math and LAMBADA from local files (e.g. ../shared/data/benchmarks)
#   make test   installs into .venv and runs the default test suite (under 10 minutes on 2 cores)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: installed before the package so that pip never resolves a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/hf-matta run recipes/configs/tiny_cpu.yaml \
		$(if $(EVAL_DATA_DIR),--eval_data_dir $(EVAL_DATA_DIR))

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

test-slow: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
