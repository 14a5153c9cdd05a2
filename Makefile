# The two commands of the README. Each one sets everything up itself (idempotently) first.
.PHONY: demo test test-unit test-server setup clean

PY := .venv/bin/python

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(PY) -m kvlab.demo

test: setup
	@bash scripts/run_tests.sh

test-unit: setup
	@$(PY) -m pytest -m "not server and not gpu" tests

test-server: setup
	@$(PY) -m pytest -m server tests

clean:
	rm -rf build .venv .cache
