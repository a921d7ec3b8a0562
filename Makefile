# answersheet — make targets users expect. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= detect,airflow,dev
SHARED ?= ../shared
# Real COCO weights for tests/demo when present (the tests skip the real-weights checks without them).
ANSWERSHEET_WEIGHTS ?= $(if $(wildcard $(SHARED)/models/yolov5n.pt),$(abspath $(SHARED)/models/yolov5n.pt),)
export ANSWERSHEET_WEIGHTS

.PHONY: help install demo test
help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed ## create .venv with the package, torch/yolov5, Airflow and test tools

demo: install ## run one road-day end to end on a local S3 (moto) and write ./demo-output/
	$(PY) -m answersheet.demo --out demo-output

test: install ## run the test suite (real S3 server, real Airflow, real yolov5)
	$(PY) -m pytest -q $(PYTEST_ARGS)
