# Two set-up commands on a fresh machine:  `make book`  and  `make test`.
# Both create .venv and install what they need (CPU PyTorch pinned; a CUDA torch already on the
# machine, e.g. Colab's, is reused instead of being replaced).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PROFILE ?= cpu
PYTEST_ARGS ?=

.PHONY: install install-browser test test-fast book notebooks clean-venv

$(BIN)/activate:
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "Using the CUDA torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else $(PY) -m venv $(VENV); fi

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,book,cluster]"
	@touch $@

install: $(VENV)/.installed

# Debian Chromium for the browser test of the book (needs root and the Debian archive; skipped,
# with a message, where it cannot be installed -- the test then reports itself as skipped)
install-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and cannot be installed here: the browser test will be skipped"; fi; }

test: install install-browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The inner loop: every test not marked slow (no book build, no browser, no killed processes, no
# torch.compile), under 2 minutes on 2 cores. `make test` (what CI runs) is the full suite.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Execute every chapter with papermill under PROFILE (smoke | cpu | paper) and build _build/html.
# Needs npm (Node.js) once, for the JavaScript the pages serve offline: checked before any chapter runs.
book: install
	$(BIN)/lvae book --profile $(PROFILE)

# Regenerate the Colab notebooks book/*.ipynb from the book/*.md chapters
notebooks: install
	$(BIN)/lvae book --sync-notebooks

clean-venv:
	rm -rf $(VENV)
