# -*- test-case-name: tests.unit.test_open_tunnel -*-
"""One tunnel through a device proxy: the one way anything here reaches a destination from a phone.

The transparent proxy, the per-device DNS resolvers and the DoH endpoint all do the same
thing: dial the device's proxy, ask it for a destination, then hand the connection to whoever
carries the bytes, with whatever the device sent after its reply delivered first.
:func:`open_tunnel` does it once for all of them; the proxy may still be sniffing the name
while the TCP connect runs (it passes the target as a Deferred).
"""

from twisted.internet import defer

from proxy.upstream import dial

__all__ = ["Tunnel", "open_tunnel"]


class Tunnel:
    """An established tunnel through a device proxy, not yet carrying anyone's bytes."""

    def __init__(self, device, leftover):
        self.device = device
        self._leftover = leftover

    @property
    def transport(self):
        """The device connection's transport (write to it to send through the tunnel)."""
        return self.device.transport

    def attach(self, leg):
        """Give ``leg`` everything the device sent since its reply, then every later event."""
        first, self._leftover = self._leftover, b""
        self.device.attach(leg, first)

    def abort(self):
        """Reset the device connection."""
        self.device.abort()


class _Opening:
    """One :func:`open_tunnel` in progress: the dial, then (once the target is known too) the handshake."""

    def __init__(self, reactor, upstream, target, connect_timeout, handshake_timeout, dial):
        self.result = defer.Deferred(self._cancel)
        self.device = None
        self.target = None if isinstance(target, defer.Deferred) else target
        self.step = dialling = dial(reactor, upstream, connect_timeout, handshake_timeout)
        dialling.addCallbacks(self._dialled, self._failed)  # may fire at once (a scripted dial)
        if self.target is None:
            target.addCallback(self._targeted)

    def _dialled(self, device):
        self.step = None
        if self.result.called:  # cancelled meanwhile
            device.abort()
            return
        self.device = device
        self._ask()

    def _targeted(self, target):
        self.target = target
        self._ask()

    def _ask(self):
        if self.device is None or self.target is None or self.step is not None or self.result.called:
            return
        host, port = self.target
        self.step = self.device.handshake(host, port)
        self.step.addCallbacks(self._established, self._failed)

    def _established(self, leftover):
        self.step = None
        if self.result.called:
            self.device.abort()
            return
        self.result.callback(Tunnel(self.device, leftover))

    def _failed(self, failure):
        self.step = None
        if self.device is not None:
            self.device.abort()  # a failed handshake has reset it already; a tunnel never outlives its failure
        if not self.result.called:
            self.result.errback(failure)
        return None  # after a cancel the step's CancelledError is expected

    def _cancel(self, _):
        step, self.step = self.step, None
        if step is not None:
            step.cancel()
        if self.device is not None:
            self.device.abort()


def open_tunnel(reactor, upstream, target, connect_timeout, handshake_timeout, dial=dial):
    """Open a tunnel through ``upstream`` to ``target``: the one way the proxy, the DNS resolvers
    and :class:`~proxy.tunnelendpoint.TunnelEndpoint` reach a destination from a device.

    :param target: ``(host, port)``, or a Deferred firing it later: the TCP connect to the device
        runs meanwhile (the transparent proxy sniffs the name while it dials).
    :param dial: :func:`proxy.upstream.dial` (tests pass a scripted one).
    :returns: Deferred firing an established :class:`Tunnel`, or failing with an
        :class:`~proxy.upstreamerrors.UpstreamError`. Cancelling it aborts the dial or the handshake.
    """
    return _Opening(reactor, upstream, target, connect_timeout, handshake_timeout, dial).result
