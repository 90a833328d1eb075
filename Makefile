# Two commands do all set-up on a fresh machine:
#   make demo   installs into .venv and runs the whole pipeline (`hf-matta run`) on the embedded offline default;
#               EVAL_DATA_DIR=DIR adds SAT Math and LAMBADA from local files (e.g. ../shared/data/benchmarks)
#   make test   installs into .venv and runs the default test suite (under 10 minutes on 2 cores)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch: installed before the package so that pip never resolves a CUDA build.
TORCH ?= torch==2.13.0

# The oldest transformers each kind of saved model loads on (measured by `make test-conformance`, README "Conformance").
OLDEST_TRANSFORMERS_4 ?= 4.30.2
OLDEST_TRANSFORMERS ?= 5.24.0
CONFORMANCE_DIR ?= .conformance

.PHONY: install demo test test-slow test-conformance lint clean

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

# Not part of `make test`: downloads transformers' source distribution and older transformers from PyPI.
test-conformance: install
	$(BIN)/pip install -q parameterized
	$(BIN)/python -m tests.conformance.prepare $(CONFORMANCE_DIR)
	CONFORMANCE_DIR=$(CONFORMANCE_DIR) OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/conformance/common.py \
		-p no:cacheprovider -o addopts=-q -o filterwarnings= -W ignore::pytest.PytestUnknownMarkWarning \
		--junitxml=$(CONFORMANCE_DIR)/common.xml || true
	$(BIN)/python -m tests.conformance.summary $(CONFORMANCE_DIR)/common.xml
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m tests.conformance.old_transformers $(CONFORMANCE_DIR) \
		$(OLDEST_TRANSFORMERS_4) $(OLDEST_TRANSFORMERS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info $(CONFORMANCE_DIR)
