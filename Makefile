# cleansight-analysis: the two commands of the README are `make figures` and `make test`.
# Both create .venv and install everything on first use (`make setup`).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cleansight-installed
# Extra pip arguments for the torch install, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup test test-fast figures figures-smoke bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: with no CUDA on the machine this takes the CPU build (never torchvision).
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA found: installing the CUDA build of torch 2.13.0"; $(PY) -m pip install "torch==2.13.0"; \
	else echo "no CUDA: installing the CPU build of torch 2.13.0"; $(PY) -m pip install "torch==2.13.0" $(TORCH_PIP_ARGS); fi
	$(PY) -m pip install -c constraints.txt -e ".[notebooks,dev]"
	$(PY) -m pip check
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=8

# unit tests only (skips the notebook smoke run)
test-fast: setup
	$(PY) -m pytest -q -m "not notebooks"

figures: setup
	$(VENV)/bin/cleansight figures --jobs 2

figures-smoke: setup
	$(VENV)/bin/cleansight figures --smoke --jobs 2

bench: setup
	$(PY) benchmarks/bench_attention_rows.py
	$(PY) benchmarks/bench_stealing_table.py
	$(PY) benchmarks/bench_defense_latency.py

# refresh constraints.txt from the current environment
lock: setup
	( echo "# Exact versions resolved and tested together (CPU, Python 3.11). Used by 'make setup' as pip constraints."; \
	  echo "# Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v "^cleansight" | sed 's/+cpu$$//' | sort -f ) > constraints.txt

clean:
	rm -rf build .pytest_cache
