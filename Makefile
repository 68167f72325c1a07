# The two set-up commands:  make demo   and   make test
# Both install first (Python venv in .venv, JVM jars in jvm/lib via Maven); a second install is a no-op.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL_PACKAGE := pneumonia-model-package==0.3.0

.PHONY: install system-deps k8s-tools validate-k8s demo test test-unit test-faults fuzz-long lint bench bench-isolation bench-worklist bench-cluster bench-exporters clean

install: $(VENV)/.installed jvm/lib/.resolved system-deps

# System parts the tests need, from Debian: a real PACS (Orthanc and its DICOMweb plugin) for the PACS tests and
# `cxr demo --pacs`, and a real browser (chromium and its driver) for the worklist page tests.
# Installed when we can (root with apt-get, as in CI); elsewhere the line says what to install.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb chromium chromium-driver fonts-liberation
SYSTEM_FILES := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/chromium /usr/bin/chromedriver
system-deps:
	@missing=0; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing orthanc, orthanc-dicomweb, chromium and chromium-driver (Debian) for the PACS and page tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else \
		echo "note: the PACS tests, cxr demo --pacs and the worklist page tests need: sudo apt-get install $(SYSTEM_PACKAGES)"; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cxr-stream needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The demo model and sample X-rays; its declared dependencies pin ancient versions, so none are taken.
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $@

jvm/lib/.resolved: $(VENV)/.installed jvm/pom.xml jvm/kafka/pom.xml jvm/spark/pom.xml
	@command -v java >/dev/null || { echo "cxr-stream needs Java 17 on PATH"; exit 1; }
	@command -v mvn >/dev/null || { echo "cxr-stream needs Maven on PATH"; exit 1; }
	mvn -B -q -f jvm/pom.xml package -Dspark.version=$$($(BIN)/python -c 'import pyspark; print(pyspark.__version__)')
	touch $@

# kustomize for the offline validation of k8s/ (tests/k8s; `make test` needs it, `make demo` does not), built from the Go module proxy into .tools/bin at the
# pinned version (a no-op when that version is there). Go, its module and build caches all stay under .tools/.
KUSTOMIZE_VERSION := v5.7.1
TOOLS := $(CURDIR)/.tools
KUSTOMIZE := $(TOOLS)/bin/kustomize
k8s-tools:
	@if [ "$$($(KUSTOMIZE) version 2>/dev/null)" = "$(KUSTOMIZE_VERSION)" ]; then :; \
	elif ! command -v go >/dev/null; then \
		echo "cxr-stream's k8s/ validation needs Go 1.22+ on PATH to build kustomize $(KUSTOMIZE_VERSION) (https://go.dev/dl/)"; exit 1; \
	else \
		echo "building kustomize $(KUSTOMIZE_VERSION) into .tools/bin (Go module proxy)"; \
		GOBIN=$(TOOLS)/bin GOPATH=$(TOOLS)/go GOCACHE=$(TOOLS)/cache GOFLAGS=-modcacherw GO111MODULE=on \
			go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION); \
	fi

# The manifests under k8s/ rendered (base and overlays) and checked offline: schemas, CRDs, PromQL, settings.
validate-k8s: $(VENV)/.installed k8s-tools
	$(BIN)/pytest tests/k8s -q

demo: install
	$(BIN)/cxr demo

test: install k8s-tools
	$(BIN)/pytest --durations=25

test-unit: install
	$(BIN)/pytest tests/unit

test-faults: install
	$(BIN)/pytest -m fault -s

# The long fuzz run (over 100,000 inputs, about 15 minutes on one core); CI runs the short profile.
fuzz-long: install
	CXR_FUZZ_PROFILE=long $(BIN)/pytest tests/unit/streaming/test_fuzz.py -p no:cacheprovider --hypothesis-show-statistics -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# cxr-stream against its peers, side by side (about 40 minutes on 2 cores); writes bench/results/.
bench: install
	$(BIN)/python -m bench.compare

bench-isolation: install
	$(BIN)/python -m bench.isolation

# The worklist's store: per-poll against per-record commits, and queue reads at 1k, 5k and 20k open studies.
bench-worklist: install
	$(BIN)/python -m bench.worklist

# Images/s per executor core: local[1], local[2] and a standalone cluster of one and two workers, side by side.
bench-cluster: install
	$(BIN)/python -m bench.cluster

# The FHIR and SR exporters end to end, against copying the results topic with and without a wait per result.
bench-exporters: install
	$(BIN)/python -m bench.exporters

clean:
	rm -rf $(VENV) jvm/lib jvm/target jvm/*/target .cxr .pytest_cache .mypy_cache .ruff_cache .tools
