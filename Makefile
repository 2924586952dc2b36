# make test: create .venv if missing, install the pinned requirements, run the test suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@echo "==> creating $(VENV) and installing pinned requirements (first time only)"
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-build-isolation -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	@echo "==> running the test suite"
	$(VPY) -m pytest tests

clean:
	@echo "==> removing caches"
	rm -rf .pytest_cache __pycache__ */__pycache__
