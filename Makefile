# prm_det: `make demo` and `make test` are all a new user needs.
VENV ?= .venv
PY := $(VENV)/bin/python
export PRM_DET_VENV := $(abspath $(VENV))

.PHONY: setup test test-fast demo bench clean-demo

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# the fast tier: every promise in-process, the expensive variants (tool
# subprocesses, fresh venvs, kills, Inductor, compiler checks) left out
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) benchmarks/bench_backbones.py
	$(PY) benchmarks/bench_local_relation.py

clean-demo:
	rm -rf data/prm_demo work_dirs/demo
