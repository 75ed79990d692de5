# One-command entry points. `make reproduce` and `make test` each work on a fresh machine (Python 3.10+ with venv).
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
SCALE  ?= smoke
DATA   ?=
QUARTO ?= quarto

.PHONY: install browser reproduce test check export readme docs gpu-stage

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@$(MAKE) --no-print-directory browser
	touch $@

browser:  ## Debian's headless Chromium and its driver, for the browser test of las-app (tests/test_app.py)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
	  || echo "make: could not install chromium: tests/test_app.py will be skipped"; \
	else echo "make: chromium and chromedriver are absent and apt-get needs root: tests/test_app.py will be skipped"; fi

reproduce: install  ## SCALE=smoke|mini|gpu|paper
	$(VENV)/bin/las-reproduce --scale $(SCALE) $(if $(DATA),--data $(DATA),)

test: install  ## the full suite (CI): every notebook and tests/, about 20 minutes on 2 idle CPU cores (19.9 min, AMD EPYC, AVX2 only)
	$(PY) tests/run_all.py

check: install  ## the fast tier while you work (1.9 min there): notebooks without their slow cells, pytest without slow and browser tests
	$(PY) tests/run_all.py --fast

docs:  ## the documentation site into _docs/ (nbdev's docs pass into _proc/, then Quarto; both git-ignored), or one line saying what to install
	@if command -v $(QUARTO) >/dev/null; then $(MAKE) -s --no-print-directory install && $(PY) scripts/docs.py --quarto "$(QUARTO)"; \
	else echo "make docs: install Quarto (https://quarto.org/docs/get-started/) to render the site: '$(QUARTO)' is not on PATH"; fi

export: install
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean

gpu-stage:  ## copy the gpu scale's data into data/ (git-ignored) for a device run: carry ["data"], run scripts/gpu_run.sh
	bash scripts/gpu_stage.sh

readme: install  ## README.md is generated from nbs/index.ipynb (outputs kept, stderr dropped)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace nbs/index.ipynb
	$(PY) -c "import json,sys; p='nbs/index.ipynb'; nb=json.load(open(p)); [c.__setitem__('outputs', [o for o in c['outputs'] if o.get('name') != 'stderr']) for c in nb['cells'] if c['cell_type'] == 'code']; open(p, 'w').write(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')"
	$(VENV)/bin/nbdev_clean --fname nbs/index.ipynb
	$(VENV)/bin/jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md
