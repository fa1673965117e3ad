# mdiff: two commands do all the set-up on a fresh machine.
#   make demo   create .venv, install (CPU torch pinned), run the main job on the default toy pair
#   make test   same install, run the whole test suite (CI runs this)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mdiff-installed
THREADS ?= 1
PAIR   ?= toy-lowrank
OUT    ?= results
PYTEST_ARGS ?=

export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install torch==2.13.0 -e '.[dev,ray,slurm]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mdiff demo --pair $(PAIR) --out $(OUT) --threads $(THREADS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_cka.py

lint: $(STAMP)
	$(BIN)/ruff check mdiff tests experiments

clean:
	rm -rf $(VENV) .pytest_cache
