# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PY := .venv/bin/python

.PHONY: demo test lint setup

setup:
	scripts/bootstrap.sh demo

demo: setup
	$(PY) -m gemma_batch demo

test:
	scripts/bootstrap.sh test
	$(PY) -m gemma_batch model prepare gemma-3-270m
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
