# -*- test-case-name: tests.unit.test_plugin,tests.unit.test_config -*-
"""twistd entry point: options and the composition root.

This is the only module that touches the global reactor. Bad configuration is
reported as one line naming file, key and problem, and twistd exits non-zero
before anything starts.
"""

import signal
import sys

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, threads
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from ovpnmgr.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, read_secret_file


class Options(usage.Options):
    """``twistd pocketproxy --config FILE``; the config is loaded and validated while parsing."""

    optParameters = [["config", "c", DEFAULT_CONFIG_PATH, "Path to the pocketproxy YAML configuration."]]

    def postOptions(self):
        from ovpnmgr.directory import Directory

        try:
            self.loaded = load_config(self["config"])
            ovpn = self.loaded.openvpn
            if self.loaded.directory.backend == "postgres":
                from ovpnmgr import pgdirectory

                self.directory = pgdirectory.load(self.loaded)  # before the reactor runs: blocking is fine
            else:
                self.directory = Directory.load(self.loaded.directory.file, ovpn.subnet, ovpn.server_address)
            self.password = read_password(self.loaded)
        except ConfigError as e:
            sys.stderr.write("pocketproxy: configuration error: %s\n" % e)
            raise SystemExit(2)


def read_password(config):
    """The management password from ``openvpn.password_file`` (first line), or None."""
    path = config.openvpn.password_file
    if path is None:
        return None
    try:
        return read_secret_file(path)
    except ValueError as e:
        raise ConfigError(config.path, "openvpn.password_file", str(e))


class AdmissionService(service.MultiService):
    """Installs the kernel base rules, then (and only then) attaches to OpenVPN.

    Until the rules are in place nobody answers OpenVPN, so no client can be
    admitted without them; a failed install is retried.
    """

    _log = Logger()

    def __init__(self, clock, firewall, management, retry_delay=5.0):
        super().__init__()
        self.clock = clock
        self.firewall = firewall
        self.management = management
        self.retry_delay = retry_delay
        self._retry = None

    def startService(self):
        service.Service.startService(self)
        self._install()

    def _install(self):
        self._retry = None
        d = self.firewall.install()
        d.addCallbacks(self._installed, self._install_failed)

    def _installed(self, _):
        self._log.info("kernel base rules installed", event="rules-installed")
        if self.running:
            self.management.setServiceParent(self)

    def _install_failed(self, failure):
        self._log.error(
            "could not install kernel rules, retrying in {delay}s: {error}", delay=self.retry_delay, error=failure.value
        )
        if self.running:
            self._retry = self.clock.callLater(self.retry_delay, self._install)

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return super().stopService()


class PocketproxyService(service.MultiService):
    """The daemon; a proxy port that cannot be bound stops it at startup with one clear line.

    :ivar log_observer: an ``ILogObserver`` for twistd to log to (``log.format: json``), or None.
    """

    _log = Logger()
    log_observer = None

    def setServiceParent(self, parent):
        """``IService.setServiceParent``; twistd's parent is the Application, which takes our
        log observer as its ``ILogObserver`` component (read by twistd when logging starts)."""
        from ovpnmgr.logs import install

        install(parent, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        from twisted.internet.error import CannotListenError

        try:
            super().privilegedStartService()
        except CannotListenError as e:
            self._log.critical(
                "pocketproxy: cannot listen on {address} port {port}: {error}; exiting",
                address=e.interface,
                port=e.port,
                error=e.socketError,
            )
            raise SystemExit(1)


class ReloadOnSignal(service.Service):
    """SIGHUP re-reads the users file, as ``pp reload`` does.

    The handler only schedules the reload on the reactor thread
    (``callFromThread`` is safe from a signal handler). twistd itself binds no
    SIGHUP handler (checked with Twisted 22.4 and 26.x: only SIGUSR1, for log
    rotation with a log file); if something else installed one before us it
    is still called after scheduling the reload. The previous handler is
    restored when the service stops.
    """

    _log = Logger()

    def __init__(self, reactor, operations, signum=signal.SIGHUP):
        self.reactor = reactor
        self.operations = operations
        self.signum = signum
        self._previous = None

    def startService(self):
        super().startService()
        self._previous = signal.signal(self.signum, self._received)

    def stopService(self):
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(self.signum, previous)
        return super().stopService()

    def _received(self, signum, frame):
        self.reactor.callFromThread(self.reload)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def reload(self):
        """Reload now; a bad file is logged (by the controller) and the old one stays."""
        self._log.info("SIGHUP: reloading the users file", event="sighup")
        try:
            result = self.operations.reload_file()
        except ConfigError:
            return None
        except Exception:
            self._log.failure("reload after SIGHUP failed")
            return None
        if isinstance(result, defer.Deferred):  # the directory is in PostgreSQL: read in a thread
            result.addErrback(self._refused)
        return result

    def _refused(self, failure):
        if failure.check(ConfigError):
            self._log.error("reload after SIGHUP refused: {error}", error=str(failure.value), event="reload-refused")
        else:
            self._log.failure("reload after SIGHUP failed", failure)
        return None


@implementer(IStreamClientEndpoint)
class LoggingEndpoint:
    """Wraps the management endpoint so every failed attempt says why (ClientService only says it retries)."""

    _log = Logger()

    def __init__(self, endpoint, description):
        self._endpoint = endpoint
        self._description = description

    def connect(self, factory):
        d = self._endpoint.connect(factory)

        def failed(failure):
            self._log.warn(
                "cannot reach OpenVPN management at {where}: {why}",
                where=self._description,
                why=failure.getErrorMessage(),
            )
            return failure

        return d.addErrback(failed)


def proxy_settings(config):
    """:class:`proxy.server.ProxySettings` from the ``proxy`` config section."""
    from dataclasses import fields

    from proxy.settings import ProxySettings

    return ProxySettings(**{f.name: getattr(config.proxy, f.name) for f in fields(ProxySettings)})


def device_networks(directory, extra, connected):
    """What the proxy refuses as "device": the firewall's device networks (every device's
    IP-literal upstream host plus ``extra``, :class:`~ovpnmgr.rules.Devices`) and the
    server's on-link networks (``connected``) that hold one of them."""
    from ovpnmgr.rules import Devices

    guarded = Devices.of(directory, extra).networks
    on_link = {net for net in connected for dev in guarded if net.version == dev.version and dev.subnet_of(net)}
    return list(guarded) + sorted(on_link, key=lambda n: (n.version, n))


def destination_policy(config, directory, connected):
    """The proxy's :class:`~proxy.destinations.DestinationPolicy` for ``config`` and the devices
    of ``directory``, and ``rewire(directory)`` that refreshes its device networks after a reload."""
    from proxy.destinations import DestinationPolicy

    p = config.proxy
    policy = DestinationPolicy(deny_private=p.deny_private, deny_names=p.deny_names)
    fixed = (config.openvpn.subnet,) + p.deny_networks

    def rewire(directory):
        policy.set_networks(fixed=fixed, devices=device_networks(directory, config.firewall.device_networks, connected()))

    rewire(directory)
    return policy, rewire


def build_proxy(reactor, config, mappings, destinations=None):
    """The transparent proxy service for ``config.proxy`` over ``mappings``."""
    from proxy.server import ProxyFactory, fd_derived_limit, raise_nofile_limit
    from proxy.service import ProxyService
    from proxy.splice import SplicePolicy

    p = config.proxy
    nofile = raise_nofile_limit()
    splice = None
    if p.splice:
        # A spliced connection holds 4 pipe fds on top of its 2 sockets. The
        # fd-derived cap C is a third of the limit L: 2C + 4S <= L allows
        # S = C/4 spliced connections at once, i.e. C/2 pipes.
        cap = p.max_connections or fd_derived_limit(True)
        splice = SplicePolicy(max_pipes=max(2, cap // 2))
        if not splice.available:
            Logger().warn("splice(2) is not available here; using the plain relay")
            splice = None
    transparent = p.mode == "tproxy"
    factory = ProxyFactory(
        reactor, mappings, proxy_settings(config), splice=splice, transparent=transparent, destinations=destinations
    )
    Logger().info("open-file limit {nofile}; proxy connection cap {cap}", nofile=nofile, cap=factory.max_connections)
    default_bind = p.bind == type(p)().bind
    optional = ("::",) if default_bind else ()
    return ProxyService(reactor, factory, p.listen, p.bind, optional=optional, transparent=transparent), factory


def status_pages(config, operations, proxy_stats, dns_stats):
    """``{b"status": ..., b"status.json": ...}`` for the metrics listener, or {} when off."""
    if not config.metrics.status_page:
        return {}
    from ovpnmgr.statuspage import StatusJSON, StatusPage

    password = None
    if config.metrics.status_password_file is not None:
        try:
            password = read_secret_file(config.metrics.status_password_file)
        except ValueError as e:
            raise ConfigError(config.path, "metrics.status_password_file", str(e))
    args = (operations, proxy_stats, dns_stats, password)
    return {b"status": StatusPage(*args), b"status.json": StatusJSON(*args)}


def build(reactor, config, directory, password, ipset=None):
    """Wire every component for ``config``; returns ``(MultiService, controller)``.

    :param ipset: the kernel-set adapter; default a :class:`~ovpnmgr.ipset.NetlinkIPSet`
        for ``config.firewall.ipset`` (benchmarks pass an alternative).
    """
    from ovpnmgr.controller import Controller
    from ovpnmgr.operations import Operations
    from ovpnmgr.firewall import Firewall
    from ovpnmgr.ipset import NetlinkIPSet
    from ovpnmgr.logs import observer_for
    from ovpnmgr.pool import AddressPool
    from ovpnmgr.process import ProcessRunner
    from ovpnmgr.protocol import ManagementProtocol
    from ovpnmgr.verify import FirewallVerifier
    from proxy.mappings import MappingTable

    from dataclasses import replace

    from ovpnmgr.dns import build_dns

    ovpn = config.openvpn
    dns_option = "dhcp-option DNS %s" % (config.dns_address[0],) if config.dns_address else None
    if dns_option is not None and config.dns.push and dns_option not in ovpn.push:
        ovpn = replace(ovpn, push=ovpn.push + (dns_option,))
    pool = AddressPool(ovpn.subnet, ovpn.server_address, static=directory.static_addresses())
    mappings = MappingTable()
    fw = config.firewall
    if ipset is None:
        ipset = NetlinkIPSet(fw.ipset, maxelem=fw.maxelem)
    firewall = Firewall(
        fw,
        config.proxy.listen,
        ovpn.subnet,
        ipset,
        ProcessRunner(reactor, fw.command_timeout),
        mode=config.proxy.mode,
        dns=config.dns_address,
        directory=directory,  # its devices' addresses are guarded from the first install on
    )
    controller = Controller(
        reactor,
        ovpn,
        directory,
        pool,
        firewall,
        mappings,
        run_blocking=threads.deferToThread,
    )
    operations = Operations(controller)
    controller.warn_split_tunnels()
    operations.directory_listeners.append(firewall.follow)  # a reload re-installs the device guard
    factory = Factory.forProtocol(lambda: ManagementProtocol(reactor, password, ovpn.command_timeout))
    management = ClientService(
        LoggingEndpoint(clientFromString(reactor, ovpn.management), ovpn.management),
        factory,
        retryPolicy=backoffPolicy(initialDelay=ovpn.reconnect_initial, maxDelay=ovpn.reconnect_max),
        clock=reactor,
        prepareConnection=controller.attach,
    )
    top = PocketproxyService()
    top.log_observer = observer_for(config.log)
    from proxy.localaddr import connected_networks

    destinations, rewire = destination_policy(config, directory, connected_networks)
    operations.directory_listeners.append(rewire)
    proxy_service, proxy_factory = build_proxy(reactor, config, mappings, destinations)
    proxy_service.setServiceParent(top)  # listening before any client can be admitted
    dns_service, dns_server = build_dns(reactor, config, mappings)
    if dns_service is not None:
        dns_service.setServiceParent(top)  # answering before any client is told to ask it
    dns_stats = dns_server.stats if dns_server is not None else None
    from ovpnmgr.devices import build_health

    health_service, _ = build_health(reactor, config, operations, controller, mappings, proxy_factory, dns_server)
    if health_service is not None:
        health_service.setServiceParent(top)
    holders = [h for h in (operations.health, dns_server) if h is not None]
    proxy_factory.sockets_elsewhere = lambda: sum(h.sockets_held() for h in holders)
    if config.admin.socket is not None:
        from ovpnmgr.admin import AdminService

        AdminService(
            reactor, config.admin, operations, proxy_stats=proxy_factory.stats, dns_stats=dns_stats
        ).setServiceParent(top)
    verifier = None
    if fw.verify_interval:
        verifier = FirewallVerifier(reactor, operations, fw.verify_interval, repair=fw.repair)
        verifier.setServiceParent(top)
    if config.metrics.listen is not None:
        from ovpnmgr.metrics import MetricsResource, MetricsService

        resource = MetricsResource(
            operations, proxy_stats=proxy_factory.stats, splice=proxy_factory.splice, verifier=verifier, dns_stats=dns_stats
        )
        MetricsService(reactor, config.metrics.listen, resource, status_pages(config, operations, proxy_factory.stats, dns_stats)).setServiceParent(top)
    AdmissionService(reactor, firewall, management).setServiceParent(top)
    if config.directory.backend == "postgres":
        from ovpnmgr.pgdirectory import PostgresDirectory

        operations.directory_reader = PostgresDirectory(reactor, config, operations)
        operations.directory_reader.setServiceParent(top)
    ReloadOnSignal(reactor, operations).setServiceParent(top)
    return top, controller


def makeService(options):
    """twistd's hook: the whole daemon as one ``MultiService``."""
    from twisted.internet import reactor

    top, _ = build(reactor, options.loaded, options.directory, options.password)
    return top
