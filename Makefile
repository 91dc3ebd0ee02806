# make demo  - set up .venv if needed, then run the demo
# make test  - set up .venv if needed, then lint, type-check and run every test suite
#
# Needs python3 (3.11+), Java 17+ and, the first time only, Maven (to fetch the Kafka jars).
# The venv is reinstalled only when pyproject.toml changes (a stamp keyed on its hash).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYPROJECT_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:16])")
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)
PYTEST_ARGS ?=

.PHONY: venv demo broker-demo test lint typecheck unit integration e2e

venv: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The demo: ensync_kafka/demo.py when it exists, else a check of the local broker.
demo: venv
	@if [ -f ensync_kafka/demo.py ]; then \
		$(BIN)/python -m ensync_kafka.demo; \
	else \
		$(MAKE) --no-print-directory broker-demo; \
	fi

# Start (or reuse) the local broker, show it, list its topics, stop it.
broker-demo: venv
	@set -e; \
	$(BIN)/ensync-kafka broker start; \
	trap '$(BIN)/ensync-kafka broker stop' EXIT; \
	echo '--- status'; \
	$(BIN)/ensync-kafka broker status; \
	bootstrap=$$($(BIN)/ensync-kafka broker status | tail -n 1); \
	echo "--- topics on $$bootstrap"; \
	$(BIN)/python -c "import sys; from confluent_kafka.admin import AdminClient; \
	topics = AdminClient({'bootstrap.servers': sys.argv[1]}).list_topics(timeout=30).topics; \
	print('\n'.join(sorted(topics)) or '(no topics yet)')" "$$bootstrap"

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit tests/integration tests/e2e

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit

integration: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests/integration

e2e: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests/e2e
