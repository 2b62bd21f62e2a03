# Tollgate: `make up` runs the whole stack locally, `make test` runs every test.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.tollgate-deps
WASM := target/wasm32-wasip1/release/tollgate_filter.wasm

.PHONY: up down test deps sysdeps build wasm lint unit e2e clean

up: deps build
	./target/debug/tollgate-dev up

down:
	@if [ -f .tollgate/up.pid ]; then kill -TERM $$(cat .tollgate/up.pid) 2>/dev/null || true; rm -f .tollgate/up.pid; fi
	@if [ -f .tollgate/children.pids ]; then for p in $$(cat .tollgate/children.pids); do kill -TERM $$p 2>/dev/null || true; done; rm -f .tollgate/children.pids; fi
	@echo "stopped"

# Installs what is missing: the wasm target, Envoy and the Python clients in .venv.
deps: $(STAMP)
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

$(STAMP): tests/requirements.txt
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@touch $(STAMP)

# The servers the tests start for real (Redis, PostgreSQL), the openssl CLI (test
# certificates) and the sqlite3 CLI (holds a database lock): installed with apt when running
# as root, otherwise named, and make stops.
sysdeps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v sqlite3 >/dev/null || missing="$$missing sqlite3"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "make test needs these Debian packages:$$missing"; \
	    echo "install them as root: apt-get install$$missing"; \
	    exit 1; \
	  fi; \
	fi

wasm: deps
	cargo build -p tollgate-filter --target wasm32-wasip1 --release

build: wasm
	cargo build --workspace --bins

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p tollgate-filter --target wasm32-wasip1 -- -D warnings

test: sysdeps deps build lint
	cargo test --workspace --no-fail-fast

clean:
	cargo clean
	rm -rf .tollgate
