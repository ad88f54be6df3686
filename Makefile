# The two set-up commands of the README:
#   make run   — fresh venv (torch first, then the project) and the whole pipeline on the embedded default
#   make test  — fresh venv and the full test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# keep Jupyter, IPython, matplotlib and pip caches out of $HOME
export JUPYTER_CONFIG_DIR  ?= $(CURDIR)/$(VENV)/etc/jupyter-config
export JUPYTER_DATA_DIR    ?= $(CURDIR)/$(VENV)/share/jupyter-data
export JUPYTER_RUNTIME_DIR ?= $(CURDIR)/$(VENV)/share/jupyter-runtime
export IPYTHONDIR          ?= $(CURDIR)/$(VENV)/etc/ipython
export MPLCONFIGDIR        ?= $(CURDIR)/$(VENV)/etc/matplotlib
export PIP_CACHE_DIR       ?= $(CURDIR)/$(VENV)/pip-cache

.PHONY: venv run test test-quick lab export clean-nbs stop

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/yelp-ts run

test: venv
	$(BIN)/pytest -m "slow or not slow"

test-quick: venv
	$(BIN)/pytest

lab: venv
	$(BIN)/jupyter lab nbs/

export: venv
	$(BIN)/nbdev_export

clean-nbs: venv
	$(BIN)/nbdev_clean

stop: venv
	$(BIN)/yelp-ts stop
