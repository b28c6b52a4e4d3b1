# postier: `make demo` runs a demo server, `make test` installs test dependencies and runs the suite.
# The first Python >= 3.13 found: python3.13 on PATH, pyenv's 3.13, python3.
PYTHON ?= $(shell for p in python3.13 "$$(PYENV_VERSION=3.13.0 pyenv which python3 2>/dev/null)" python3; do \
	[ -n "$$p" ] && "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && \
	{ "$$p" -c 'import sys; print(sys.executable)'; break; }; done)
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test test-fast lint typecheck bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 13), "postier needs Python 3.13+: set PYTHON=..."'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/postier demo

test: $(VENV)/.installed
	./scripts/install-test-deps
	$(VENV)/bin/ruff check postier tests bench
	$(VENV)/bin/mypy
	POSTIER_REQUIRE_INTEROP=1 $(VENV)/bin/python -m pytest -n 2 -q

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n 2 -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check postier tests bench

# mypy --strict over postier/ (settings in pyproject.toml [tool.mypy]); also run by `make test`.
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench
