# Developer commands. Tools come from the virtualenv that scripts/bootstrap.sh creates.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help install protos lint fmt typecheck test check bench up down status

help:
	@echo "make install    create $(VENV) and install kvtier with dev tools (and etcd via apt)"
	@echo "make protos     regenerate libs/kvtier/proto from protos/"
	@echo "make lint       ruff (lint + format check) and import-linter contracts"
	@echo "make fmt        format the code"
	@echo "make typecheck  mypy --strict"
	@echo "make test       the whole pytest suite (unit, component, integration)"
	@echo "make check      lint + typecheck + test (what CI runs)"
	@echo "make bench      benchmarks; writes docs/benchmarks.md and docs/img/*.png"
	@echo "                (first installs the KV-cache peers into .bench-venvs/: scripts/bench_peers.sh)"
	@echo "make up|down|status   the dev cluster in .kvtier"
	@echo "make dashboard  deploy/grafana/kvtier.json's expressions on a dev cluster through Debian's"
	@echo "                prometheus (installed via apt when missing); draws docs/img/dashboard.png"
	@echo "make e2e        restore a transformer's prefix KV from kvtier vs recompute it (bench/e2e;"
	@echo "                installs the e2e extra first: torch CPU, transformers, redis-py)"

install:
	scripts/bootstrap.sh install

protos:
	$(BIN)/python scripts/gen_protos.py

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

fmt:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck:
	$(BIN)/mypy

# pytest exits 5 when it collected no tests: that is a failure here.
test:
	@$(BIN)/pytest --durations=30; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

check: lint typecheck test

# Speed targets are checked here, as ratios of ceilings measured in the same run; never in tests.
bench:
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m bench.run

up:
	$(BIN)/kvtier up --state-dir .kvtier

down:
	$(BIN)/kvtier down --state-dir .kvtier

status:
	$(BIN)/kvtier status --state-dir .kvtier

# The end-to-end proof (bench/e2e; also `make bench`'s e2e section): installs the e2e extra and
# redis-server when missing, then the sweep; writes docs/benchmarks.md's e2e section and
# docs/img/e2e_*.png. Its correctness check runs in `make test` (tests/e2e).
.PHONY: e2e
e2e:
	@$(BIN)/python -c 'import torch, transformers, redis, hiredis' 2>/dev/null || \
		$(BIN)/pip install -q -e '.[e2e]'
	@command -v redis-server >/dev/null 2>&1 || PYTHON=$(BIN)/python scripts/bench_peers.sh redis
	$(BIN)/python -m bench.e2e

# The Grafana board proved on real data (bench/dashboard_figure.py): a dev cluster, a short
# workload, Debian's prometheus scraping it; every panel's expression evaluated, then drawn
# (matplotlib, not Grafana) into docs/img/dashboard.png. Fails on a PromQL error or a panel
# without data that the script does not expect.
.PHONY: dashboard
dashboard:
	@command -v prometheus >/dev/null 2>&1 || { sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends prometheus; }
	$(BIN)/python -m bench.dashboard_figure
