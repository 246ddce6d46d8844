# make run: set up and start the gateway with its defaults. make test: set up and run every test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3.11
DEB_PACKAGES := sip-tester baresip-core espeak-ng libespeak-ng1 sox opus-tools tshark chromium chromium-driver kamailio kamailio-tls-modules redis-server janus libjs-janus-gateway
STAMP := $(VENV)/.installed

.PHONY: install run test perf fuzz lint clean debs

install: debs $(STAMP)

debs:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "wireshark-common wireshark-common/install-setuid boolean false" | $$SUDO debconf-set-selections; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+)"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: install
	$(VENV)/bin/gateway run

TEST_JOBS ?= 2
# two passes: the suite in TEST_JOBS processes (a test file stays in one; each process hands out ports of its own),
# then the tests marked serial, one at a time (browsers, timing, CPU and memory measurements, deliberate load)
test: install
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile -m "not serial" --durations=10
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m serial --durations=5

FUZZ_RUNS ?= 1000000
# every fuzz target for FUZZ_RUNS inputs (make test runs 3000 each); a corpus per target under .fuzz/
fuzz: install
	@set -o pipefail; for t in $$($(PY) -c "from tests.fuzz.targets import TARGETS; print(' '.join(TARGETS))"); do \
	  mkdir -p .fuzz/$$t && cp -n tests/fuzz/seeds/*/* ../shared/rfc4475/*.dat .fuzz/$$t/ 2>/dev/null; \
	  echo "fuzz $$t: $(FUZZ_RUNS) inputs"; \
	  $(PY) tests/fuzz/run.py $$t -runs=$(FUZZ_RUNS) -max_len=4096 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=.fuzz/$$t- .fuzz/$$t 2>&1 | grep -E "^(stat::|==|SUMMARY|Done)" || exit 1; \
	done

perf: install
	$(VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/perf

lint: install
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/mypy gateway

clean:
	rm -rf $(VENV) data .pytest_cache
