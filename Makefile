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

.PHONY: venv demo broker-demo browser test lint typecheck unit integration e2e

venv: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The demo: a local broker (or $$ENSYNC_KAFKA_BOOTSTRAP), topics, a worker process, real deferrals.
demo: venv
	$(BIN)/python -m ensync_kafka.demo

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

# Headless Chromium for the dashboard test, from Debian's packages when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || echo "could not install chromium: the dashboard test will fail and say why"

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
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
