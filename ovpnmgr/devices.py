# -*- test-case-name: tests.unit.test_devices -*-
"""The directory's phones under health watch, and what a phone's health means for its customers.

:mod:`proxy.health` says whether a phone is alive; this module decides who is affected:

* it watches every device that has at least one user (re-read on every reload), probing the
  device's own ``health_target`` or the daemon's ``health.target``;
* a device that goes ``down`` has its customers' proxied connections reset and its DNS tunnel
  closed at once (queries in flight get SERVFAIL, later ones too until it is back), and, with
  ``health.on_down: kill``, its customers' VPN sessions killed; by default they stay up and
  resume when the phone returns;
* while a device is down, a new CONNECT for one of its users is denied TEMP with the reason
  the customer sees, ``device offline`` (``health.when_down: admit`` lets them in anyway);
* a changed exit address resets the device's connections too, so no TCP session spans two
  exit addresses.
"""

from dataclasses import replace

from twisted.application import service
from twisted.logger import Logger

from proxy.health import DOWN, HealthMonitor

__all__ = ["DeviceWatch", "HealthService", "build_health"]


class DeviceWatch:
    """Ties a :class:`~proxy.health.HealthMonitor` to the directory, the proxy, DNS and sessions.

    :param operations: the :class:`~ovpnmgr.operations.Operations` (directory, sessions, kick).
    :param mappings: the proxy's :class:`~proxy.mappings.MappingTable`.
    :param dns_server: the :class:`~proxy.dnsserver.DNSServer`, or None.
    """

    _log = Logger()

    def __init__(self, monitor, config, default_target, operations, mappings, dns_server=None):
        self.monitor = monitor
        self.config = config
        self.default_target = default_target
        self.operations = operations
        self.mappings = mappings
        self.dns_server = dns_server
        monitor.state_changed.append(self._state_changed)
        monitor.exit_changed.append(self._exit_changed)

    def follow(self, directory):
        """Watch the devices of ``directory`` that have users (a directory listener)."""
        used = {u.device.name for u in directory.users.values()}
        watched = {}
        for name in sorted(used):
            device = directory.devices[name]
            target = device.health_target or self.default_target
            if target.scheme == "https" and target.ca_file is None and self.config.ca_file is not None:
                target = replace(target, ca_file=str(self.config.ca_file))
            watched[name] = (device.upstream, target)
        self.monitor.watch(watched)

    def admits(self, name):
        """May a new customer of device ``name`` be admitted now?"""
        return self.config.when_down == "admit" or self.monitor.alive(name)

    def _state_changed(self, health, old):
        if health.state != DOWN:
            return
        self._reset(health.name, "device down")
        if self.config.on_down == "kill":
            self._kill_sessions(health.name)

    def _exit_changed(self, health, old):
        self._reset(health.name, "exit address changed")

    def _reset(self, name, why):
        count = self.mappings.reset_device(name, why)
        if self.dns_server is not None:
            self.dns_server.close_tunnel(name, why)
        self._log.info(
            "device {device}: {why}: reset {count} proxied connections", device=name, why=why, count=count, event="device-reset"
        )

    def _kill_sessions(self, name):
        users = sorted({s.name for s in self.operations.client_list() if s.user is not None and s.user.device.name == name})
        if not users or not self.operations.management_ready:
            return
        self._log.info(
            "device {device} down: killing the sessions of {users} (health.on_down: kill)",
            device=name,
            users=", ".join(users),
            event="device-down-kill",
        )
        for user in users:
            self.operations.kick(user).addErrback(self._kill_failed, user, name)

    def _kill_failed(self, failure, user, device):
        self._log.warn("killing {user} (device {device} down) failed: {e}", user=user, device=device, e=failure.getErrorMessage())


class HealthService(service.Service):
    """Starts the probes with the daemon and stops them (and their timers) with it."""

    def __init__(self, monitor):
        self.monitor = monitor

    def startService(self):
        super().startService()
        self.monitor.start()

    def stopService(self):
        self.monitor.stop()
        return super().stopService()


def build_health(reactor, config, operations, controller, mappings, proxy_factory, dns_server):
    """Wire device health for ``config`` (a :class:`~ovpnmgr.config.Config`); returns
    ``(HealthService, DeviceWatch)``, or ``(None, None)`` when ``health.enabled`` is false."""
    if not config.health.enabled:
        return None, None
    from ovpnmgr.process import ProcessRunner
    from ovpnmgr.rotation import Rotator, action_runner

    h = config.health
    monitor = HealthMonitor(reactor, h.settings())
    watch = DeviceWatch(monitor, h, config.probe_target, operations, mappings, dns_server)
    watch.follow(operations.directory)
    operations.directory_listeners.append(watch.follow)
    operations.health = monitor
    run = action_runner(reactor, ProcessRunner(reactor, h.rotation_timeout), h.rotation_timeout)
    operations.rotator = Rotator(
        reactor, monitor, lambda: operations.directory.devices, run, h.rotation_timeout, h.rotation_min_interval
    )
    controller.device_alive = watch.admits
    proxy_factory.health = monitor
    if dns_server is not None:
        dns_server.health = monitor
    return HealthService(monitor), watch
