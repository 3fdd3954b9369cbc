# Two commands do all set-up on a fresh clone:  `make bench` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install native test test-all bench demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 CPU lies on this machine's disk; asking for it first keeps pip from fetching a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# native CPU kernels (g++ and torch's headers) into build/native; without them the torch paths run
	$(BIN)/python -m moeinfer.kernels.native build --allow-failure
	touch $(STAMP)

native: $(STAMP)
	$(BIN)/python -m moeinfer.kernels.native build

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not gpu'

bench: $(STAMP)
	$(BIN)/moeinfer bench --model tiny --out bench-results

demo: $(STAMP)
	$(BIN)/moeinfer inspect --model tiny
	$(BIN)/moeinfer generate --model tiny "KING HENRY. My lord," --max-new-tokens 32
	$(BIN)/moeinfer generate --model tiny "def fibonacci(n):" --max-new-tokens 48

clean:
	rm -rf $(VENV) build *.egg-info
