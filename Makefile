# tenantgate — the two commands of the quick start are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PGBIN := /usr/lib/postgresql/15/bin
STATE_DIR ?= $(CURDIR)/.tenantgate/demo
LISTEN ?= 127.0.0.1:6432
# make run METRICS_PORT=9127 (a number, auto: a free port, off: no metrics); POOL_MODE=session|transaction
METRICS_PORT ?= auto
POOL_MODE ?= transaction

.PHONY: install node-clients run lint test bench fuzz-rewrite fuzz-wire fuzz-lexer postgres prometheus jdbc clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed node-clients

# The Node.js modules of the client conformance suite (tests/clients/node, pinned by its
# package-lock.json), when node and npm exist. Without node the Node.js client tests are
# skipped; if npm ci fails they fail (the rest of the suite still runs).
NODE_CLIENTS := tests/clients/node
node-clients: $(NODE_CLIENTS)/node_modules/.package-lock.json

$(NODE_CLIENTS)/node_modules/.package-lock.json: $(NODE_CLIENTS)/package-lock.json $(NODE_CLIENTS)/package.json
	@if command -v node >/dev/null && command -v npm >/dev/null; then \
	  npm ci --prefix $(NODE_CLIENTS) --no-audit --no-fund --loglevel=error \
	    || echo "npm ci --prefix $(NODE_CLIENTS) failed: the Node.js client tests will fail"; \
	elif command -v node >/dev/null; then echo "npm not found: the Node.js client tests will fail (node without its modules)"; \
	else echo "node not found: the Node.js client tests will be skipped"; fi

# PostgreSQL 15 server, psql and pgbench from Debian when they are missing.
postgres:
	@if [ ! -x $(PGBIN)/postgres ] || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then \
	  echo "installing PostgreSQL 15 with apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 postgresql-contrib >/dev/null; \
	fi

# promtool and prometheus (Debian's prometheus package) for tests/test_observability_prometheus.py;
# the package's service is not left running.
prometheus:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  echo "installing Prometheus (promtool) with apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  (systemctl stop prometheus 2>/dev/null; systemctl disable prometheus 2>/dev/null) || true; \
	fi

# pgjdbc (Debian's libpostgresql-jdbc-java) for tests/clients/test_java_clients.py, only when a
# JDK is present (without java that test is skipped; with java but without the jar it fails).
PGJDBC_JAR := /usr/share/java/postgresql.jar
jdbc:
	@if command -v java >/dev/null && [ ! -f $(PGJDBC_JAR) ]; then \
	  echo "installing pgjdbc (libpostgresql-jdbc-java) with apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpostgresql-jdbc-java >/dev/null; \
	fi

run: install postgres
	$(BIN)/tenantgate demo --state-dir $(STATE_DIR) --listen $(LISTEN) --metrics-port $(METRICS_PORT) --pool-mode $(POOL_MODE)

# ruff's rule set and import-linter's contracts are in pyproject.toml
lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/lint-imports

test: install postgres prometheus jdbc lint
	$(BIN)/python -m pytest -p no:cacheprovider -rs tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install postgres
	@command -v pgbouncer >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null)
	@[ -x $(BIN)/py-spy ] || $(BIN)/pip install --quiet py-spy || echo "py-spy not installed: BENCH_PROFILE=1 is skipped"
	$(BIN)/python -m bench.run

fuzz-rewrite: install postgres
	TENANTGATE_FUZZ_EXAMPLES=200000 $(BIN)/python -m pytest -p no:cacheprovider tests/test_rewrite_differential.py tests/test_rewrite_families.py -x -q -s

# The wire codec and a live proxy under malformed input: 1,000,000 codec inputs (one seed per case),
# 30,000 round-trip examples per message type, 3,000 malformed streams against a live proxy.
fuzz-wire: install postgres
	TENANTGATE_WIRE_FUZZ_INPUTS=1000000 TENANTGATE_WIRE_FUZZ_EXAMPLES=30000 TENANTGATE_WIRE_FUZZ_LIVE=3000 \
	  $(BIN)/python -m pytest -p no:cacheprovider tests/test_wire_roundtrip.py tests/test_wire_fuzz.py \
	  tests/test_wire_fuzz_live.py -x -q

# 1,000,000 token soups through the policy engine; pglast judges every forwarded case, a
# throwaway PostgreSQL 15 executes every 20th (prints cases/s and disagreements; goal 0)
fuzz-lexer: install postgres
	$(BIN)/python tests/support/lexer_fuzz.py --cases $${LEXER_FUZZ_CASES:-1000000} --start-pg

clean:
	rm -rf $(VENV) .tenantgate build *.egg-info $(NODE_CLIENTS)/node_modules
