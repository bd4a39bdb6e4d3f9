# pocketproxy: every target works on a fresh Debian 12 machine as root.
# `make demo` runs the lab; `make test` runs the whole suite on Debian's
# packaged libraries and again on current PyPI releases, and the soak tests once.
# `make deps` installs tools the tests drive (tinyproxy, dante-server, redsocks)
# without starting their system services (a temporary policy-rc.d).

PY       ?= /usr/bin/python3
VENV     ?= .venv-pypi
PYTEST   ?= -q -ra
APT_DEPS  = make openvpn ipset iptables iproute2 openssl procps curl \
            tinyproxy dante-server socat redsocks dnsmasq-base postgresql chromium \
            python3 python3-venv python3-pip \
            python3-twisted python3-pyroute2 python3-yaml python3-txaio python3-service-identity python3-openssl python3-psycopg \
            python3-pytest python3-pytest-twisted python3-hypothesis python3-cryptography ca-certificates

export POCKETPROXY_REQUIRE_INTEGRATION ?= 1

.PHONY: deps test test-debian test-pypi test-long unit demo bench-admission bench-proxy bench-scale bench-dns bench-path clean package package-test

deps:
	@missing=$$(for p in $(APT_DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; rc=$$?; \
	  if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

test: deps test-debian test-pypi test-long

test-debian: deps
	$(PY) -m pytest $(PYTEST) -m "not long" tests

# Soak tests (minutes each, e.g. 10 minutes of device health over the emulated WAN): once per run.
test-long: deps
	$(PY) -m pytest $(PYTEST) -m long tests

$(VENV)/.done: setup.py
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q . pytest pytest-twisted hypothesis openvpn-monitor
	touch $@

test-pypi: deps $(VENV)/.done
	$(VENV)/bin/pip install -q --force-reinstall --no-deps .
	$(VENV)/bin/twistd --help | grep -qw pocketproxy
	$(VENV)/bin/python -c "import twisted, importlib.metadata as m; print('PyPI leg: Twisted', twisted.__version__, 'pyroute2', m.version('pyroute2'))"
	cd tests/.. && $(VENV)/bin/python -m pytest $(PYTEST) -p no:cacheprovider -m "not long" tests

unit: deps
	$(PY) -m pytest $(PYTEST) tests/unit

demo: deps
	$(PY) -m tests.lab.demo $(ARGS)

bench-admission: deps
	$(PY) -m tests.bench.admission

bench-proxy: deps
	$(PY) -m tests.bench.proxy

bench-scale: deps
	$(PY) -m tests.bench.scale

bench-dns: deps
	$(PY) -m tests.bench.dns

bench-path: deps
	$(PY) -m tests.bench.path $(ARGS)

# The Debian package: dist/pocketproxy_<version>_all.deb (unit tests run at build time on
# Debian's libraries). package-test is the CI leg: build, lintian, install, smoke test of the
# installed daemon as user pocketproxy with the unit's capabilities, purge (see .ci/package).
PKG_DEPS = build-essential debhelper dh-python python3-all python3-setuptools lintian systemd

package: deps
	@missing=$$(for p in $(PKG_DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing: $$missing"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi
	env -i HOME=$$HOME PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 dpkg-buildpackage -us -uc -b
	mkdir -p dist
	mv ../pocketproxy_*.deb ../pocketproxy_*.buildinfo ../pocketproxy_*.changes dist/
	@ls -l dist/pocketproxy_*_all.deb

package-test:
	.ci/package

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
