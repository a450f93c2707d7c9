# One command to run the broker, one to run the tests; both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup run test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: setup
	test -f deploy/pki/ca.pem || $(BIN)/mqtt-pdp pki
	$(BIN)/mqtt-pdp broker -c deploy/broker.yaml

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench
