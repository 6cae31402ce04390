# The two commands: `make demo` (sample an image) and `make test` (the whole suite).
# Both set up .venv first, at the versions in constraints.txt (the lock: every package at the
# version the suite last passed with; `make lock` moves it forward). TORCH picks the torch build:
# the default pin takes the local CPU wheel on CPU-only machines and the CUDA build from PyPI on
# CUDA machines. `LOCK=` installs the newest versions pyproject.toml allows instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
LOCK ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)
PIP_LOCK := $(if $(LOCK),-c $(LOCK))

.PHONY: setup demo test browser references lock default-model bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_LOCK) --upgrade pip
	$(PY) -m pip install -q $(PIP_LOCK) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_LOCK) -e ".[$(EXTRAS)]"
	touch $@

# Moves the lock forward: the newest versions pyproject.toml and lock-holds.txt allow, in a fresh
# venv; constraints.txt is rewritten only if the whole suite passes there.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -c lock-holds.txt "$(TORCH)"
	$(LOCK_VENV)/bin/pip install -q -c lock-holds.txt -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pytest -q -p no:cacheprovider tests
	{ echo "# The lock: every package at the version \`make test\` last passed with ($$(date -u +%F), Python"; \
	  echo "# $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $(TORCH)). Written by \`make lock\`; do not edit."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt updated; commit it"

# Samples from the bundled default model; until it exists, from a small model built on the spot.
demo: setup
	@if [ -f gen/assets/default/model_index.json ]; then \
	  $(VENV)/bin/gen sample "a red circle left of a blue square" --num-images 4 --out out/demo; \
	else \
	  $(PY) -m gen.models.tiny out/demo-model && \
	  $(VENV)/bin/gen sample "a red circle left of a blue square" --model out/demo-model --num-images 4 --out out/demo; \
	fi
	@echo "gen is installed in $(VENV)/bin: run 'source $(VENV)/bin/activate' to call gen directly (or $(VENV)/bin/gen)"

test: setup browser references
	$(PY) -m pytest -q --durations=15 tests

# k-diffusion's package, whose sampling.py tests/vendor/k_diffusion copies (the test compares the two); --no-deps:
# the file needs nothing the venv lacks, the package's other modules (torchvision, wandb, ...) are never imported.
references: setup
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('k_diffusion') is None)" \
	  || $(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1

# Debian's chromium for the web page's test (tests/test_serve.py), where apt can install it; else that test skips.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium chromium-driver \
	  >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } || echo "no chromium: the page's browser test skips (apt-get install chromium chromium-driver)"

# Trains the bundled default model from scratch (CLIP, VAE, DiT-flow on the shapes world; see
# configs/default-model.yaml), then trains its DiT on (configs/default/dit-polish.yaml, then dit-purple.yaml), and installs it into
# gen/assets/default/ with its training log.
default-model: setup
	mkdir -p runs
	@echo "training (about 2 h on a 2-core CPU); progress in runs/default-model.log"
	$(VENV)/bin/gen train configs/default-model.yaml $(ARGS) > runs/default-model.log 2>&1 \
	  && $(VENV)/bin/gen train configs/default/dit-polish.yaml >> runs/default-model.log 2>&1 \
	  && $(VENV)/bin/gen train configs/default/dit-purple.yaml >> runs/default-model.log 2>&1 \
	  || (tail -5 runs/default-model.log; exit 1)
	rm -rf gen/assets/default && mkdir -p gen/assets
	cp -r runs/default/purple/model gen/assets/default
	cp runs/default/clip/model/stage.json gen/assets/default/stage-clip.json
	cp runs/default/vae/model/stage.json gen/assets/default/stage-vae.json
	tr '\r' '\n' < runs/default-model.log | grep -v '^train: ' > gen/assets/default/train.log
	$(VENV)/bin/gen eval adherence --n 16 --diversity --json gen/assets/default/adherence.json
	$(PY) -c "from gen import Pipeline; from train.loop import grid; from train.evaluate import SHOWCASE; \
	  p = Pipeline.from_pretrained(); grid([p(t, seed=0).images[0] for t in SHOWCASE], 6).save('gen/assets/samples.png')"

clean:
	rm -rf $(VENV) $(LOCK_VENV) out
