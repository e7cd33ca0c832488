# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if missing, install, start the server on the embedded defaults
#   make test   the same set-up with the test extras, then the whole suite
#   make validate  the phase-1 acceptance suite against a fresh server on a free port
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test validate install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m server

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

validate: $(STAMP)
	$(PY) tools/validate.py --serve $(VALIDATE_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
