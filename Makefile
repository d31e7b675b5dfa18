# The two commands of the README: `make run` and `make test`. Both set up
# everything on a fresh machine (Python 3.11 and the package registries).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing logferry with the dev extra into $(VENV) ..."
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Bytecode, as a pip install of the package writes it: with PYTHONDONTWRITEBYTECODE
# set (as on our machines) an editable install would compile every module at
# every start (~0.04 CPU-s of each agent start). Up-to-date files are skipped.
install: $(STAMP)
	@$(BIN)/python -m compileall -q -j 0 agent collector pipelines plugins > /dev/null

## Start a collector on 127.0.0.1:8080 (chDB under ./data/clickhouse) and an agent
## tailing a generated demo log; prints a ready-to-paste query. Ctrl-C stops all.
run: install
	@$(BIN)/python -m collector.demo

## ruff, mypy and every test.
test: install lint typecheck pytest

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

# PYTEST_ARGS: more pytest options (.ci/run fixes hypothesis's seed there).
pytest: install
	$(BIN)/pytest -q -p no:cacheprovider -n auto $(PYTEST_ARGS)

## Benchmarks: print figures (they are not timed tests). BENCH_ARGS=--quick for a short run.
bench: install
	@for script in bench/bench_*.py; do \
		echo "== $$script"; \
		$(BIN)/python $$script $(BENCH_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
