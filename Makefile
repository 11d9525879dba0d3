# `make demo` and `make test` work from a fresh clone: they build .venv themselves.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[test,otlp]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/turnfleet demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Regenerate the pinned constraints from the current venv (after changing pyproject.toml).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .turnfleet .pytest_cache

# Benchmarks (not tests: speed is never asserted). Write BENCHMARKS.md; see bench/run.py.
.PHONY: bench bench-quick
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick
