# Two commands on a fresh machine:  `make serve`  and  `make test`  (CI runs `make test`).
# Both are idempotent and create the virtual environment when there is none.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch must come first: any other torch spec pulls gigabytes of CUDA packages.
TORCH ?= torch==2.13.0
APT_PACKAGES := redis-server espeak-ng chromium nodejs openssl alsa-utils
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve install install-test system-test-deps test lint bench clean

serve: install
	$(BIN)/livevoice serve

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "livevoice needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# Debian packages the tests use: a real redis-server, espeak-ng (a second voice), chromium (the
# widget test), nodejs (the JS codec test), alsa-utils (its recordings of a human voice: the
# bench's matching scenario, run by the bench smoke test). Each one missing fails its tests.
system-test-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: install-test system-test-deps
	$(BIN)/ruff check live protocol clients tests bench
	$(BIN)/mypy
	$(BIN)/pytest -rs --cov=live --cov=protocol --cov=clients --cov-report=term:skip-covered

lint:
	$(BIN)/ruff check live protocol clients tests bench
	$(BIN)/ruff format --check live protocol clients tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
