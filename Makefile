# One-command set-up and runs. Everything is installed into .venv by the project's own files.
#   make demo   set up, then run the main job
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench-quick

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml setup.py indexes/_inverted_lists.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# eval: lm-evaluation-harness, so that its test runs here too (tests/test_lm_eval.py)
	$(PY) -m pip install -q -e ".[test,bench,eval]"
	touch $@

# the main job: passkey retrieval on the embedded model, exact dense memory vs Faiss top-k (exact Flat,
# and the auto index, which is exact up to 8192 keys per head, so its 16k runs search its IVF)
demo: setup
	$(PY) -m longllama.tools.passkey_cli --lengths 4k,16k --seeds 3 --backend exact --backend faiss:Flat \
		--backend faiss:auto --top-k 32 --threads 1 --out passkey_results

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench-quick: setup
	$(PY) -m benchmarks.scaling --quick
