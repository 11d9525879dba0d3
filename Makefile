# `make demo` and `make test` work from a fresh clone: they build .venv themselves.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[test,otlp,litellm]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/turnfleet demo

# The whole suite on .venv's Python, then the quick subset on each other supported Python
# present here (tools/other-pythons says which it ran and which it skipped).
QUICK_TESTS := tests/test_layering.py tests/test_events.py tests/test_job.py tests/test_producer.py \
	tests/test_support_desk.py tests/test_cli.py
test: $(STAMP) browser
	$(BIN)/python -m pytest -n 2
	QUICK_TESTS="$(QUICK_TESTS)" tools/other-pythons

# Only the other Pythons' quick subset.
.PHONY: test-pythons
test-pythons: $(STAMP)
	QUICK_TESTS="$(QUICK_TESTS)" tools/other-pythons

# The console's browser tests drive Debian's Chromium through Playwright (never a downloaded
# browser); the completion tests load the generated script into real bash and zsh. Chromium
# and zsh are installed with apt when missing; TURNFLEET_SKIP_BROWSER=1 skips the install and
# the browser tests. Without apt the tests run and fail, saying what is missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: browser
browser:
	@missing=""; [ -x $(CHROMIUM) ] || [ "$$TURNFLEET_SKIP_BROWSER" = 1 ] || missing="chromium"; \
	command -v zsh >/dev/null 2>&1 || missing="$$missing zsh"; \
	[ -z "$$missing" ] && exit 0; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: missing$$missing and there is no apt-get: install it there (or TURNFLEET_SKIP_BROWSER=1 for Chromium)" >&2; \
	  exit 0; \
	fi; \
	echo "make: installing Debian's$$missing for the console's browser tests and the completion tests"; \
	$(SUDO) apt-get update -qq && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

# Regenerate the pinned constraints from the current venv (after changing pyproject.toml).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) $(VENV)-3.* $(PHOENIX_VENV) $(PEERS_VENV) .turnfleet .pytest_cache

# The README's pictures of the web console, from a real run (see tests/console_screenshots.py).
.PHONY: screenshots
screenshots: $(STAMP) browser
	$(BIN)/python -m tests.console_screenshots --out docs

# Benchmarks (not tests: speed is never asserted). Write BENCHMARKS.md; see bench/run.py.
# They need py-spy (CPU split, from PyPI) and wrk (HTTP load, Debian's package).
# Section 14 runs the peers' instrumentations (OpenInference, Logfire) beside ours, from a venv of
# their own: bench-only, never runtime dependencies. The project with our pins, then each peer
# with its own dependencies pinned, under the same constraints (so none moves a pin of ours). A
# peer that will not install beside our pins is reported here and "not run" in the section's table.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_OPENINFERENCE := openinference-instrumentation-openai-agents==2.6.0 openinference-instrumentation==0.1.72 \
	opentelemetry-instrumentation==0.66b2 wrapt==2.5.2
PEERS_LOGFIRE := logfire==5.4.0 logfire-sdk==5.4.0 executing==2.3.0 opentelemetry-instrumentation==0.66b2 wrapt==2.5.2
PEERS_PIP := $(PEERS_VENV)/bin/python -m pip install -qq --disable-pip-version-check -c constraints.txt
$(PEERS_STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PIP) -e '.[otlp]'
	$(PEERS_PIP) $(PEERS_OPENINFERENCE) || echo "make: OpenInference's instrumentation does not install beside our pins" >&2
	$(PEERS_PIP) $(PEERS_LOGFIRE) || echo "make: Logfire does not install beside our pins" >&2
	touch $(PEERS_STAMP)

.PHONY: bench bench-quick bench-tools
bench-tools: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m pip install -qq --disable-pip-version-check py-spy==0.4.3
	command -v wrk >/dev/null || { $(SUDO) apt-get install -y -qq --no-install-recommends wrk || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends wrk; }; }

bench: bench-tools
	$(BIN)/python -m bench.run

bench-quick: bench-tools
	$(BIN)/python -m bench.run --quick

# Tables 1 and 4 of this checkout against another commit, side by side in one run:
#   make bench-compare AGAINST=<commit> [REPS=5]   (builds that commit in a worktree under /tmp)
AGAINST ?= HEAD~1
REPS ?= 5
AGAINST_DIR := /tmp/turnfleet-against-$(shell git rev-parse --short $(AGAINST) 2>/dev/null)
.PHONY: bench-compare
bench-compare: $(STAMP)
	test -d $(AGAINST_DIR) || git worktree add --detach $(AGAINST_DIR) $(AGAINST)
	$(MAKE) -C $(AGAINST_DIR) install
	$(BIN)/python -m bench.before_after --against $(AGAINST_DIR) --reps $(REPS)

# The OTLP export read back by a real Arize Phoenix (not part of `make test`): Phoenix in its
# own venv (pinned whole by e2e/phoenix-constraints.txt; the stamp makes a second run install
# nothing), a Phoenix server, the fleet on an embedded Redis running conversations with a
# retried and a failed turn, then checks of what Phoenix shows (e2e/e2e_phoenix.py says which).
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed
$(PHOENIX_STAMP): e2e/phoenix-constraints.txt
	test -x $(PHOENIX_VENV)/bin/python || $(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -qq --disable-pip-version-check \
	  -c e2e/phoenix-constraints.txt arize-phoenix arize-phoenix-client
	touch $(PHOENIX_STAMP)

.PHONY: e2e-phoenix
e2e-phoenix: $(STAMP) $(PHOENIX_STAMP)
	$(BIN)/python -m e2e.e2e_phoenix --phoenix-venv $(PHOENIX_VENV)
