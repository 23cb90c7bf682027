# Two commands from a clean clone: `make train` (the embedded default, end to end) and `make test`.
# Both create .venv and install everything on first use; later calls reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train curriculum test test-fast lint clean

setup: $(VENV)/.installed

# CPU torch first: with no torch present, pip would resolve the range in pyproject to a 5 GB CUDA build.
# openai-whisper is installed without its triton dependency (CUDA-only, 1 GB); its real needs are the
# [whisper] extra; lmms-eval likewise (its full dependency list upgrades torch), its real needs being the [lmms]
# extra (docs/lmms-eval.md). DeepSpeed's setup imports torch, so it is built against the torch already installed
# (no build isolation, which would fetch a CUDA torch) and with its C++/CUDA ops compiled on first use only.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=68' wheel
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev,whisper,demo,deepspeed,serve,lmms]'
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

train: setup
	$(PY) -m diffa2.stages.sft

# Stages 1 -> 4 of the embedded default, each from the previous one's checkpoint (runs/<stage>/final).
curriculum: setup
	$(PY) -m diffa2.stages.curriculum

# Every test, the slow end-to-end ones included (CI runs this).
test: setup
	$(PY) -m pytest -q

# The fast tier only, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check diffa2 tests bench demo

clean:
	rm -rf $(VENV) runs outputs
