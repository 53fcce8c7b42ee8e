# otad developer entry points. The README documents the two that matter:
#   make demo   - run the main job end to end on this machine
#   make check  - install what the tests need and run every test
PYTHON ?= python3
VENV := .venv
VENV_BOOKWORM := .venv-bookworm
PIP_FLAGS := --quiet --disable-pip-version-check
INTEROP_JS := tests/interop/sigstore_js

.PHONY: all demo check soak soak-short test test-bookworm interop-js browser-deps tls-deps fuse-deps fuzz bench bench-deps bench-release bench-gateway bench-polls bench-robot bench-telemetry bench-rollout-halt bench-rollout-view bench-rollout-view-deps bench-durability bench-durability-deps bench-orchestration-outage bench-orchestration-makespan clean deb deb-check deb-deps soak-power soak-chaos

all: check

$(VENV)/.installed: setup.cfg setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

# A second environment pinned to Debian bookworm's library versions. The suite runs
# there too, less the tests marked slow (the long kill -9 and power-cut loops, the
# netns fleet and the rollout daemons' tests), which exercise our code,
# not the libraries', and already ran once above.
$(VENV_BOOKWORM)/.installed: setup.cfg setup.py ci/bookworm-constraints.txt
	test -x $(VENV_BOOKWORM)/bin/python || $(PYTHON) -m venv $(VENV_BOOKWORM)
	$(VENV_BOOKWORM)/bin/pip install $(PIP_FLAGS) -c ci/bookworm-constraints.txt -e '.[test]'
	touch $@

# The independent Sigstore verifier (npm @sigstore/verify) used by the interop test.
# Without node/npm the test skips and says why.
interop-js:
	@if command -v npm >/dev/null 2>&1; then \
	  test -d $(INTEROP_JS)/node_modules || npm ci --silent --no-audit --no-fund --prefix $(INTEROP_JS); \
	else echo "npm not found: the @sigstore/verify interop test will be skipped"; fi

demo: $(VENV)/.installed
	$(VENV)/bin/python -m otad.demo

# Headless Chromium for the /status page browser test (tests/test_status_browser.py).
# Installed with apt when we are root; otherwise the test skips and says why.
browser-deps:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "could not install chromium: the status page browser test will be skipped"; \
	else echo "chromium not found (installing it needs root and apt-get): the status page browser test will be skipped"; fi

# nginx (Debian's nginx-light) terminates TLS in front of the dashboard in tests/test_tls.py,
# as an operator's would (docs/security.md). Installed with apt when we are root; else those tests skip.
tls-deps:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light; } || \
	  echo "could not install nginx-light: the nginx TLS tests will be skipped"; \
	else echo "nginx not found (installing it needs root and apt-get): the nginx TLS tests will be skipped"; fi

# The power-loss layer (tests/lazyfs.py): fusepy (a test extra, pure Python) drives
# libfuse2 through ctypes; fuse3 brings fusermount3 and /etc/fuse.conf. Installed with apt
# when we are root (mounting needs root anyway); otherwise those tests skip and say why.
fuse-deps:
	@if ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 '; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libfuse2 fuse3 >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libfuse2 fuse3; } || \
	  echo "could not install libfuse2: the power-loss tests will be skipped"; \
	else echo "libfuse2 not found (installing it needs root and apt-get): the power-loss tests will be skipped"; fi

# Two workers, a test file each at a time (--dist loadfile keeps a file's module fixtures,
# e.g. the namespace topology, in one worker); the slowest tests are listed at the end.
PYTEST_PARALLEL := -n 2 --dist loadfile

test: $(VENV)/.installed interop-js browser-deps tls-deps fuse-deps
	$(VENV)/bin/python -m pytest $(PYTEST_PARALLEL) --durations=15

# Longer fuzzing of every parser (tests/test_fuzz_parsers.py, tests/test_fuzz_orchestration.py): FUZZ_SECONDS per parser, fresh
# random seeds, examples kept in .hypothesis/. `make check` runs the short deterministic pass.
FUZZ_SECONDS ?= 60
fuzz: $(VENV)/.installed
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz_parsers.py tests/test_fuzz_orchestration.py

test-bookworm: $(VENV_BOOKWORM)/.installed interop-js tls-deps fuse-deps
	$(VENV_BOOKWORM)/bin/python -m pytest $(PYTEST_PARALLEL) -q -p no:cacheprovider -m "not slow"

check: test test-bookworm deb-check soak-short

# Chaos soak on a namespace topology (tests/soak.py, docs/reliability.md): SOAK_SECONDS of
# seeded faults (SOAK_SEED replays one; soak-short has a fixed one), then the invariants; exit 1 if any failed.
# Needs root (ip netns); without it, prints "soak skipped" and why.
SOAK_SECONDS ?= 600
soak: soak-chaos soak-power

soak-chaos: $(VENV)/.installed
	SOAK_SECONDS=$(SOAK_SECONDS) $(VENV)/bin/python tests/soak.py

soak-short: $(VENV)/.installed
	SOAK_SECONDS=120 SOAK_SEED=$${SOAK_SEED:-20261202} $(VENV)/bin/python tests/soak.py

# Power cuts on the power-loss layer (tests/lazyfs.py), one loop per daemon
# (tests/powercut_<loop>.py, docs/reliability.md "Power loss"): POWER_CUTS cuts each, at
# random instants and named steps; POWER_SEED replays a run (each loop prints its seed);
# exit 1 on any invariant violation, every loop run. Needs root and FUSE; without them,
# each prints "skipped" and why. `make check` runs a few cuts of each (tests/test_powercut_*.py).
POWER_CUTS ?= 200
POWER_LOOPS := robot gateway agent dashboard
soak-power: $(VENV)/.installed fuse-deps
	@failed=""; for loop in $(POWER_LOOPS); do \
	  POWER_CUTS=$(POWER_CUTS) $(VENV)/bin/python tests/powercut_$$loop.py || failed="$$failed $$loop"; done; \
	if [ -n "$$failed" ]; then echo "power-cut soak failed:$$failed"; exit 1; fi

# Debian packages, built from a clean copy of the tree into build/deb/
# (tests/deb/build-debs.sh; installs missing build dependencies as root).
deb:
	tests/deb/build-debs.sh build/deb

# The packages installed with apt into a clean Debian bookworm booted under
# systemd-nspawn, and exercised there (tests/deb/deb_check.py). Needs root;
# without root or systemd-nspawn it prints SKIPPED and why.
deb-check: deb-deps
	$(PYTHON) tests/deb/deb_check.py

# What deb-check needs beyond the base system, installed with apt when we are root
# (a fresh machine has none of them); otherwise deb-check prints SKIPPED and why.
deb-deps:
	@missing=""; for tool in systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux dpkg-buildpackage:dpkg-dev; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } || \
	  echo "could not install$$missing: deb-check will be skipped"; fi

# Benchmarks measure against reference tools in the same run (docs/benchmarks.md).
# They are not tests: they print ratios and PASS/MISS and always exit 0.
bench: bench-release bench-gateway bench-polls bench-robot bench-telemetry bench-rollout-halt bench-rollout-view bench-durability \
	bench-orchestration-outage bench-orchestration-makespan

bench-deps:
	@missing=""; for tool in curl:curl nginx:nginx-light ab:apache2-utils wrk:wrk; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then apt-get install -y -q $$missing; fi

bench-release: $(VENV)/.installed
	$(VENV)/bin/python bench/release_build.py

bench-gateway: $(VENV)/.installed bench-deps
	$(VENV)/bin/python bench/gateway_serving.py

bench-polls: $(VENV)/.installed bench-deps
	$(VENV)/bin/python bench/dashboard_polls.py

bench-robot: $(VENV)/.installed bench-deps
	$(VENV)/bin/python bench/robot_install.py

bench-telemetry: $(VENV)/.installed bench-deps
	$(VENV)/bin/python bench/telemetry.py

# Time from a rollout canary's first failure to the halt, at a dark site and fleet-wide, in poll
# intervals (real dashboard and gateways on loopback; no outside tools).
bench-rollout-halt: $(VENV)/.installed
	$(VENV)/bin/python bench/rollout_halt.py

# The rollout console at 10,000 robots in 200 sites (generated, loaded through POST /metrics):
# p50/p99 of /rollouts/<id>, its JSON status and /status, against /healthz and the sqlite3 CLI.
bench-rollout-view-deps:
	@command -v sqlite3 >/dev/null 2>&1 || apt-get install -y -q sqlite3

bench-rollout-view: $(VENV)/.installed bench-rollout-view-deps
	$(VENV)/bin/python bench/rollout_view.py

# A diagnostic, no targets: fsyncs per robot install and per 1,000 telemetry records, counted
# with strace, and the time they cost against the same runs under eatmydata (no fsync).
bench-durability-deps:
	@missing=""; for tool in strace:strace eatmydata:eatmydata; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then apt-get install -y -q $$missing; fi

bench-durability: $(VENV)/.installed bench-durability-deps
	$(VENV)/bin/python bench/durability.py

# Site orchestration (issue 16), real dashboard, gateway and robots on loopback, no outside tools:
# a robot's time out of service per update with download-ahead (256 MiB), against the download it
# hides; the makespan of a 6-robot site update with SITE_MAX_CONCURRENT 1, 2 and all.
bench-orchestration-outage: $(VENV)/.installed
	$(VENV)/bin/python bench/orchestration_outage.py

bench-orchestration-makespan: $(VENV)/.installed
	$(VENV)/bin/python bench/orchestration_makespan.py

clean:
	rm -rf $(VENV) $(VENV_BOOKWORM) $(INTEROP_JS)/node_modules build dist *.egg-info .pytest_cache
