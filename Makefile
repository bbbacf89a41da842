# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv it needs.

PYTHON ?= python3
VENV ?= .venv
VENV314 ?= .venv314
VENV313 ?= .venv313
BIN := $(VENV)/bin
PIP_FLAGS ?= -q --disable-pip-version-check
COMMA := ,

.PHONY: demo test test-313 test-314 test-all lint typecheck check bench bench-profile bench-guard clean

$(BIN)/.installed: pyproject.toml setup.py asynctrace/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

# Python 3.13 and 3.14 from Debian's packages (see .ci/debian-python.sh), each in its own
# virtualenv: $(call debian_venv,<version>,<venv>,<extras>)
define debian_venv
	set -e; py=$$(bash .ci/debian-python.sh $(1)); \
	wheel=$$(ls $$(dirname $$py)/../share/python-wheels/pip-*.whl | head -n 1); \
	$$py -m venv --without-pip $(2); \
	$(2)/bin/python $$wheel/pip install $(PIP_FLAGS) $$wheel; \
	$(2)/bin/pip install $(PIP_FLAGS) -e '.[$(3)]'
	touch $@
endef

$(VENV314)/bin/.installed: pyproject.toml setup.py asynctrace/_speedups.c .ci/debian-python.sh
	$(call debian_venv,3.14,$(VENV314),dev)

$(VENV313)/bin/.installed: pyproject.toml setup.py asynctrace/_speedups.c .ci/debian-python.sh
	$(call debian_venv,3.13,$(VENV313),dev)

# The benchmark needs the peers (opentelemetry-instrumentation-asyncio, sentry-sdk), which pin
# other OpenTelemetry versions than the tests use: their own virtualenvs.
.venv-bench/bin/.installed: pyproject.toml setup.py asynctrace/_speedups.c
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install $(PIP_FLAGS) --upgrade pip
	.venv-bench/bin/pip install $(PIP_FLAGS) -e '.[bench,uvloop]'
	touch $@

.venv314-bench/bin/.installed: pyproject.toml setup.py asynctrace/_speedups.c .ci/debian-python.sh
	$(call debian_venv,3.14,.venv314-bench,bench$(COMMA)uvloop)

BENCH_ARGS ?= --rounds 3 --memory 50000 --in-flight 100000
BENCH_UVLOOP_ARGS ?= --rounds 2 --modes bare asynctrace-metrics asynctrace-metrics-handle \
	asynctrace-tracing asynctrace-tracing-otlp otel-asyncio-metrics otel-asyncio-spans-otlp

bench: .venv-bench/bin/.installed .venv314-bench/bin/.installed
	.venv-bench/bin/python bench/run.py $(BENCH_ARGS)
	.venv-bench/bin/python bench/run.py --loop uvloop $(BENCH_UVLOOP_ARGS)
	.venv314-bench/bin/python bench/run.py $(BENCH_ARGS)
	.venv314-bench/bin/python bench/run.py --loop uvloop $(BENCH_UVLOOP_ARGS)
	.venv-bench/bin/python bench/plot.py
	$(MAKE) bench-profile

# Where the time goes: py-spy (native frames) on the fan-out, bare / metrics / tracing with
# OTLP export; and the collector's share alone, with no profiler attached (gc-*.md).
bench-profile: .venv-bench/bin/.installed .venv314-bench/bin/.installed
	.venv-bench/bin/python bench/profile.py --out docs/performance/profile-py3.11.md
	.venv314-bench/bin/python bench/profile.py --out docs/performance/profile-py3.14.md
	.venv-bench/bin/python bench/profile.py --no-spy --seconds 10 --out docs/performance/gc-py3.11.md
	.venv314-bench/bin/python bench/profile.py --no-spy --seconds 10 --out docs/performance/gc-py3.14.md

# CI's coarse guard: asynctrace against bare only, small sizes; fails on gross regressions.
bench-guard: $(BIN)/.installed
	$(BIN)/python bench/run.py --quick --modes bare asynctrace-metrics asynctrace-tracing --guard
	ASYNCTRACE_PURE_PYTHON=1 $(BIN)/python bench/run.py --quick --modes bare asynctrace-metrics \
		asynctrace-tracing --guard

demo: $(BIN)/.installed
	$(BIN)/python examples/ingestion_service/demo.py $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-314: $(VENV314)/bin/.installed
	$(VENV314)/bin/python -m pytest $(PYTEST_ARGS)

test-313: $(VENV313)/bin/.installed
	$(VENV313)/bin/python -m pytest $(PYTEST_ARGS)

test-all: test test-314

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(BIN)/.installed
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(VENV313) $(VENV314) .venv-bench .venv314-bench .pytest_cache .mypy_cache .ruff_cache
