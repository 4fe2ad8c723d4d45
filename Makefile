# graft: the two commands that matter on a fresh Debian machine, as root:
#   make demo   - install what is needed, build, and show grafting end to end
#   make test   - install what is needed, build, and run the test suite
PYTHON   ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
# Debian packages the demo and the tests run for real.
APT_PKGS := curl socat nginx-light redis-server redis-tools iperf3 sockperf nftables iproute2 gcc make libc6-dev systemd runc crun podman busybox-static golang-go dnsmasq-base docker.io containerd docker-compose musl-tools
# The commands those packages provide; apt runs only if one is missing.
APT_CMDS := curl socat nginx redis-server redis-cli iperf3 sockperf nft ss cc make systemd-analyze runc crun podman busybox go dnsmasq dockerd containerd docker-compose musl-gcc

.PHONY: all build deps venv demo test lint clean install-service bench bench-deps

all: build

deps:
	@missing=""; for c in $(APT_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		norc=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\n# graft make deps: no service starts while packages install\nexit 101\n' >/usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; norc=1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
		rc=$$?; if [ -n "$$norc" ]; then rm -f /usr/sbin/policy-rc.d; fi; [ $$rc = 0 ] || exit $$rc; \
	fi

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.installed

build: venv
	$(MAKE) -C shim
	$(MAKE) -C broker/seccomp
	$(MAKE) -C broker/confine

demo: deps build
	$(VPY) demo/demo.py

test: deps build
	CI=$${CI:-} $(VPY) -m pytest

# ruff's lint and format checks (ruff.toml); `$(VENV)/bin/ruff format .` applies the format.
$(VENV)/.lint-installed: $(VENV)/.installed setup.py constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,lint]'
	touch $@

lint: deps $(VENV)/.lint-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# make bench [QUICK=1] [ROUNDS=N]: host, nat, pasta, slirp4netns and graft, then DNS lookups through
# the broker's resolver, then the connect rate at 1, 8 and 64 client processes; see docs/benchmarks.md.
# Run as root. ROUNDS: more rounds narrow each ratio's confidence interval.
# Extra Debian packages the benchmarks run, and the commands they provide.
BENCH_APT  := wrk passt slirp4netns
BENCH_CMDS := wrk pasta slirp4netns
QUICK      ?=
ROUNDS     ?=
bench-deps: deps
	@missing=""; for c in $(BENCH_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_APT) >/dev/null; \
	fi

$(VENV)/.bench-installed: $(VENV)/.installed setup.py constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

# broker_load.py first: run.py's nginx-close leaves TIME-WAIT sockets, which slow the broker's
# max_sockets prune when it runs without confinement (with it, the kernel counts and nothing is dumped).
bench: bench-deps build $(VENV)/.bench-installed
	$(VPY) bench/broker_load.py $(if $(QUICK),--quick,--profile 10)
	$(VPY) bench/run.py $(if $(QUICK),--quick) $(if $(ROUNDS),--rounds $(ROUNDS))
	$(VPY) bench/dns_lookup.py $(if $(QUICK),--quick)
	$(VPY) bench/connect_rate.py $(if $(QUICK),--quick) $(if $(ROUNDS),--rounds $(ROUNDS))

clean:
	$(MAKE) -C shim clean
	$(MAKE) -C broker/confine clean
	$(MAKE) -C broker/seccomp clean
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Render and install the systemd unit (docs/systemd.md). Run as root.
UNIT_DIR ?= /etc/systemd/system
POLICY   ?= /etc/graft/policy.toml
install-service: build
	sed -e 's|@GRAFT_BROKER@|$(CURDIR)/$(VENV)/bin/graft-broker|' -e 's|@POLICY@|$(POLICY)|' \
		packaging/graft-broker.service.in > $(UNIT_DIR)/graft-broker.service
	systemctl daemon-reload 2>/dev/null || true
	@echo "installed $(UNIT_DIR)/graft-broker.service; next: systemctl enable --now graft-broker"
