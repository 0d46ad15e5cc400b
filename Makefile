# sferp developer targets. Every target that needs Python depends on the venv,
# so `make demo` and `make test` work as the first command on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow test-fast bench bench-quick lint fmt fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

demo: venv
	$(BIN)/sferp demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: venv  # long tests (for example the 2-million-row extract's memory)
	$(BIN)/python -m pytest -q -s -m slow

bench: venv
	$(BIN)/sferp bench

bench-quick: venv
	$(BIN)/sferp bench --quick

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

fuzz: venv  # ~13 min on 2 cores: 1.25 M messages (hypothesis + bulk mutations), 1 M atheris runs
	SFERP_FUZZ_EXAMPLES=10000 SFERP_FUZZ_MESSAGES=1000000 $(BIN)/python -m pytest tests/test_decode_fuzz.py -q -s
	$(BIN)/python tests/fuzz_atheris.py -atheris_runs=1000000 -max_len=70000

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache *.egg-info
