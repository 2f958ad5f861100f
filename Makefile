# triaged: `make run` starts the node on the embedded defaults, `make test` runs every check.
# A fresh machine needs only Python 3.11, gcc, make and apt: everything else is installed here.
# Research use only - not for diagnosis.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := dcmtk dicom3tools orthanc
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench soak lint typecheck contracts pytest sysdeps venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# CPU torch first, from the exact pinned release, so nothing can pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Test peers: DCMTK (storescu, echoscu, storescp, findscu), dicom3tools (dciodvfy) and Orthanc with its
# DICOMweb plugin (STOW-RS destination tests); openssl makes the throwaway CA and certificates of the DICOM
# TLS tests; chromium is the real browser of the dashboard test; postgresql gives initdb/pg_ctl for the
# throwaway PostgreSQL cluster the ledger tests start themselves (no system service is used).
# Debian's orthanc package starts a system service on 4242/8042; the tests run their own, so stop it.
sysdeps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc  >/dev/null || missing="$$missing orthanc"; \
	command -v openssl  >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  ($(SUDO) systemctl disable --now orthanc || $(SUDO) service orthanc stop) >/dev/null 2>&1 || true; \
	  ($(SUDO) systemctl disable --now postgresql || $(SUDO) service postgresql stop) >/dev/null 2>&1 || true; \
	fi

run: $(STAMP)
	$(BIN)/triaged check-config config.yaml
	exec $(BIN)/triaged serve --config config.yaml

lint: $(STAMP)
	$(BIN)/ruff check triaged tests bench soak

typecheck: $(STAMP)
	$(BIN)/mypy

contracts: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP) sysdeps
	$(BIN)/triaged check-config config.yaml
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not soak and not slow"  # two workers (2-core CI); a file's tests share one worker

test: lint typecheck contracts pytest

bench: $(STAMP) sysdeps
	$(BIN)/python bench/run.py
	$(BIN)/python bench/analysis.py

# The longer suites: the tests marked slow (learned pipelines' cards reproduced on whole real series, ~40 s)
# and the fault-injection suite: its short form (the pytest test marked soak, ~70 s), then the long form (~7 min on 2 cores): kill -9 during receive/analysis/dispatch, full
# file systems (a tmpfs: needs root), >= 200 malformed inputs and connection attacks, a hung destination.
# Exits non-zero if any promise failed; its final block is quoted in README.md and docs/security.md.
soak: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q -m "soak or slow"
	$(BIN)/python -m soak

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
