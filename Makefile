# Two set-up commands on a fresh machine:  `make book`  and  `make test`.
# Both create .venv and install what they need (CPU PyTorch pinned; a CUDA torch already on the
# machine, e.g. Colab's, is reused instead of being replaced).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PROFILE ?= cpu
PYTEST_ARGS ?=

.PHONY: install test book clean-venv

$(BIN)/activate:
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "Using the CUDA torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else $(PY) -m venv $(VENV); fi

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

book: install
	$(BIN)/lvae demo

clean-venv:
	rm -rf $(VENV)
