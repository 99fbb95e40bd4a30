# Foreshadow: `make demo` runs the multi-region demo, `make test` runs every
# test. Both install what they need on a fresh Debian machine first.

SHELL := /bin/bash
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
# The one pgrx pin lives in Cargo.toml; cargo-pgrx must match it exactly.
PGRX_VERSION := $(shell sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
# pglogical is the peer the benchmarks compare against; faketime skews a
# region's clock in the causality tests.
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 postgresql-15-pglogical libclang-dev clang pkg-config sudo faketime openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PREFIX ?= /usr/local
PGRX_TEST_DATA ?= /tmp/foreshadow-pgrx-test
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps install demo test test-unit test-pg test-integration bench bench-quick chaos lint clean

all: install

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages:" $$missing; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@if [ "$$(cargo pgrx --version 2>/dev/null | awk '{print $$2}')" != "$(PGRX_VERSION)" ]; then \
		echo "installing cargo-pgrx $(PGRX_VERSION)"; \
		cargo install --locked cargo-pgrx --version $(PGRX_VERSION); \
	fi
	@grep -qs '^pg15' $(HOME)/.pgrx/config.toml || cargo pgrx init --pg15 $(PG_CONFIG)

# The extension into the system PostgreSQL 15, the binaries onto the PATH.
install: deps
	cd extension && $(SUDO) env PATH="$(PATH)" cargo pgrx install --release --pg-config $(PG_CONFIG)
	@for f in sql/foreshadow--*--*.sql; do \
		[ -e "$$f" ] && $(SUDO) install -m 644 "$$f" "$$($(PG_CONFIG) --sharedir)/extension/"; true; \
	done
	cargo build --release -p foreshadow-sidecar -p foreshadow-lab
	$(SUDO) install -m 755 target/release/foreshadow-sidecar target/release/foreshadow-lab $(PREFIX)/bin/

demo: install
	foreshadow-lab demo

test: install test-unit test-pg test-integration
	@echo "make test: all test tiers passed"

# Pure logic (model, sidecar units, protocol model checks): no PostgreSQL.
test-unit:
	cargo test -p foreshadow-model -p foreshadow-sidecar

# In-database tests of the SQL API, in a throw-away cluster run as postgres.
test-pg: deps
	$(SUDO) rm -rf $(PGRX_TEST_DATA) && $(SUDO) install -d -o postgres $(PGRX_TEST_DATA)
	# One test at a time: tests that apply set up a replication origin, and
	# an origin is active in one session at a time.
	cd extension && RUST_TEST_THREADS=1 cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_DATA)/data

# End to end on real multi-region labs; each test starts its own, serially.
# Includes the benchmark smoke tests (every scenario, --quick, both engines).
test-integration: install
	cargo build -p foreshadow-sidecar -p foreshadow-lab
	cargo test -p foreshadow-lab -- --test-threads=1

# The full benchmarks beside pglogical (about 17 minutes): results, report
# and plots in bench/results/. `bench-quick` is the one-minute-per-scenario form.
bench: install
	foreshadow-lab bench all

bench-quick: install
	foreshadow-lab bench all --quick --out bench/results/quick

# Ten minutes of faults against 3 regions with a fresh seed (printed, with the
# command that replays it); `make test` runs a short form with a fixed seed.
chaos: install
	foreshadow-lab chaos --regions 3 --minutes 10

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean
