# -*- test-case-name: tests.unit.test_plugin -*-
"""twistd dropin: ``twistd -n pocketproxy --config FILE``.

Import-light on purpose: plugin-cache generation imports every dropin, so
this file must not import the reactor, pyroute2 or the package itself.
"""

from twisted.application.service import ServiceMaker

pocketproxy = ServiceMaker(
    "pocketproxy",
    "ovpnmgr.tap",
    "OpenVPN admission controller and transparent proxy through device proxies",
    "pocketproxy",
)
