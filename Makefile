# One-command entry points. `make reproduce` and `make test` each work on a fresh machine (Python 3.10+ with venv).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PRESET ?= smoke
DATA   ?=

.PHONY: install reproduce test export readme

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

reproduce: install
	$(VENV)/bin/las-reproduce --preset $(PRESET) $(if $(DATA),--data $(DATA),)

test: install
	$(PY) tests/run_all.py

export: install
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean

readme: install  ## README.md is generated from nbs/index.ipynb (outputs kept)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace nbs/index.ipynb
	$(VENV)/bin/nbdev_clean --fname nbs/index.ipynb
	$(VENV)/bin/jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md
