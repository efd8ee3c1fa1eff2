# The two commands a newcomer runs. Both create .venv and install everything on first use.
#   make demo   train the default config on the embedded stdlib corpus (CPU), then sample from it
#   make test   run the test suite (this is what .ci/run calls)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/installed

# constraints.txt pins torch's CPU build, so a machine without a GPU never pulls CUDA wheels.
$(VENV)/installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	touch $@

# The demo run is replaced each time (its folder is runs/default); train your own runs elsewhere.
demo: install
	rm -rf runs/default
	$(PY) train.py configs/default.toml
	$(PY) sample.py runs/default --prompt "def" --num_samples 3 --max_new_tokens 120

test: install
	$(PY) -m pytest -q tests
