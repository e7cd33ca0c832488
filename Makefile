# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if missing, install, start the server on the embedded defaults
#   make test   the same set-up with the test extras, the static checks, then the whole suite
#   make check  the static checks alone: ruff, mypy and the import-linter layer contract
#   make validate  the acceptance suite against a fresh server on a free port
#   make cluster   3 instances behind nginx on local Redis and PostgreSQL (tools/cluster.py)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

NODE_STAMP = node_modules/.package-lock.json

.PHONY: run test check validate cluster install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m server

# The browser tests drive Debian's Chromium with playwright-core from npm; without npm
# (or without /usr/bin/chromium) they skip and say why.
$(NODE_STAMP): package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund; \
	else echo "npm not found: browser tests will be skipped"; fi

# ruff (pyflakes, isort, bugbear, pyupgrade), mypy --strict on server/, and the layers of
# ARCHITECTURE.md as an import-linter contract (all configured in pyproject.toml)
check: $(STAMP)
	$(VENV)/bin/ruff check server tests tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test: check $(NODE_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

validate: $(STAMP)
	$(PY) tools/validate.py --serve $(VALIDATE_ARGS)

cluster: $(STAMP)
	$(PY) tools/cluster.py $(CLUSTER_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache node_modules
