# Two commands for a new user (see README.md):
#   make demo   - create .venv, install otwatch, replay a bundled capture (learn, then alert), score it
#   make test   - install test extras and system tools (tshark, prometheus, tcpreplay), run pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_PCAP ?= pcaps/mixed.pcap
PYTEST_ARGS ?=

.PHONY: demo test install test-deps bench fuzz clean

$(BIN)/otwatch: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || sh deploy/install-test-deps.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

install: $(BIN)/otwatch

demo: install
	$(BIN)/otwatch replay $(DEMO_PCAP) --learn 15m --alerts demo-alerts.jsonl
	@echo "alerts written to demo-alerts.jsonl (one ECS JSON record per line)"
	$(BIN)/otwatch eval $(DEMO_PCAP) --labels $(DEMO_PCAP:.pcap=.labels.csv) --html demo-report.html
	@echo "report written to demo-report.html (open it in a browser)"

test-deps:
	@sh deploy/install-test-deps.sh

test: install test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Long property-based run: 100,000 cases per parser (not part of `make test`).
fuzz: install
	OTWATCH_FUZZ_EXAMPLES=100000 $(BIN)/python -m pytest -q -m slow tests/

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
