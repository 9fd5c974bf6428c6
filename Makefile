# medgw — `make run` runs the gateway on config/gateway.yaml; `make test` runs every check.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Debian packages the tests' real peers need (later issues add DCMTK, Orthanc, ...)
DEB_PKGS := socat mosquitto dcmtk orthanc dicom3tools chromium

.PHONY: run test venv debs lint typecheck pytest bench clean

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

debs:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

run: venv
	$(BIN)/medgw check-config config/gateway.yaml
	$(BIN)/medgw run --config config/gateway.yaml

lint: venv
	$(BIN)/ruff check gateway drivers dicom ai_models tests bench

typecheck: venv
	$(BIN)/mypy

pytest: venv debs
	$(BIN)/python -m pytest -q -p no:cacheprovider

test: venv debs lint typecheck pytest

bench: venv
	$(BIN)/python bench/mllp.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
