# One-command set-up and runs. Everything is installed into .venv by the project's own files.
#   make demo   set up, then run the main job
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench-quick

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

demo: setup
	$(PY) -m knn_memory.agreement_cli --backend faiss --index IVF256,Flat --nprobe 32 --source attention --keys 32768 --queries 512 --heads 4 --k 128

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench-quick: setup
	$(PY) -m benchmarks.scaling --quick
