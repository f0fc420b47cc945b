"""What the front's listener holds for all its connections: the parts a
request is served with (gate, routes, pools, CORS: swapped whole by
``reconfigure``), the connection cap, the open WebSocket tunnels a
revocation must close, and the drain at shutdown.  Each connection is a
``front.FrontProtocol``; one past ``max_connections`` is an
``AtCapacity``."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from zope.interface import implementer

from phantomd.http.answers import AT_CAPACITY, Dates
from phantomd.http.front import FrontProtocol
from phantomd.http.routes import Route, RouteTable
from phantomd.http.wire import IRequestLimits, ParsedRequest
from phantomd.token.tokens import parse_credentials, token_key


def _peer_host(transport: Any) -> str:
    return getattr(transport.getPeer(), "host", None) or "-"


class AtCapacity(FrontProtocol):
    """A connection accepted beyond ``max_connections``: answered 503 at
    once and closed, nothing read, never one of ``connections``."""

    def connectionMade(self) -> None:
        f = self.factory
        transport = self.transport
        self._peer = _peer_host(transport)
        self._tls = ISSLTransport.providedBy(transport)
        self._write = transport.write
        self._end_input()
        f.metrics.rejected["connection_cap"].inc()
        r = ParsedRequest()
        r.started_at = self.reactor.seconds()
        self._req = r
        self._answer(r, 503, AT_CAPACITY.headers(f.realm),
                     AT_CAPACITY.body(self._rid(r).decode("ascii")),
                     close=True)

    def connectionLost(self, reason: Any = None) -> None:
        self._deadline.cancel()


_KEEP = object()


@implementer(IRequestLimits)
class FrontFactory(Factory):
    """Builds ``FrontProtocol`` for every accepted client connection.

    ``connections`` is bounded by ``max_connections``: a connection accepted
    beyond it is answered 503 and closed at once.
    """

    noisy = False

    def __init__(self, reactor: Any, gate: Any, upstream: Any, settings: Any,
                 metrics: Any, access_log: Optional[Callable] = None,
                 routes: Optional[RouteTable] = None,
                 pools: Optional[dict] = None, cors: Any = None) -> None:
        self.reactor = reactor
        self.gate = gate
        self.upstream = upstream
        #: DESIGN section 8: asked once per request; ``pools`` holds one
        #: upstream pool per distinct route upstream URL.
        self.routes = routes if routes is not None else RouteTable(
            [], Route("default"))
        self.pools = pools if pools is not None else {}
        self.cors = cors  # a cors.Policy, or None without [cors]
        self.metrics = metrics
        self.access_log = access_log
        self.connections: set = set()
        #: Open WebSocket tunnels -> (token cache key, ``sub``), for
        #: ``revoked``; at most one per connection (``max_connections``).
        self.tunnels: dict = {}
        self.date = Dates(reactor)
        self._drain_waiters: list = []
        #: Shutting down (``drain``): every connection closes after its
        #: current answer and starts no other request.
        self.draining = False
        self._apply(settings)

    def _apply(self, settings: Any) -> None:
        self.settings = settings
        self.realm = settings.realm
        self.header_timeout = settings.header_timeout
        self.idle_timeout = settings.idle_timeout
        self.max_connections = settings.max_connections
        self.max_request_line = settings.max_request_line
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.max_head = settings.max_request_line + settings.max_header_bytes
        self.proxies = settings.trusted_proxies
        self.tunnel_idle_timeout = settings.tunnel_idle_timeout

    def buildProtocol(self, addr: Any) -> FrontProtocol:
        if len(self.connections) >= self.max_connections:
            return AtCapacity(self)
        return FrontProtocol(self)

    def reconfigure(self, gate: Any = None, upstream: Any = None,
                    settings: Any = None, routes: Optional[RouteTable] = None,
                    pools: Optional[dict] = None, cors: Any = _KEEP) -> None:
        """Use new parts for requests that start from now on; open
        connections stay open (limits apply to their next request).
        ``cors``: a ``cors.Policy``, or None to turn CORS off."""
        if cors is not _KEEP:
            self.cors = cors
        if routes is not None:
            self.routes = routes
        if pools is not None:
            self.pools = pools
        if gate is not None:
            self.gate = gate
        if upstream is not None:
            self.upstream = upstream
        if settings is not None:
            self._apply(settings)

    def tunnel_opened(self, tunnel: Any, auth: Optional[list],
                      claims: Optional[dict]) -> None:
        """Remember what opened ``tunnel``: its token's cache key (None
        without a token: ``auth = none`` or ``optional``) and ``sub``."""
        key = None
        parsed = parse_credentials(auth or ())
        if type(parsed) is tuple:
            key = token_key(parsed[1])
        sub = (claims or {}).get("sub")
        self.tunnels[tunnel] = (key, sub if type(sub) is str else None)

    def revoked(self, key: Optional[bytes] = None,
                subject: Optional[Callable[[str], bool]] = None) -> int:
        """A token (its cache ``key``) or a subject (``subject(sub)`` says
        whether ``sub`` is the revoked one) was revoked: close the open
        tunnels it opened, as its ``exp`` would (DESIGN section 13).
        Returns how many."""
        cut = [t for t, (k, sub) in self.tunnels.items()
               if (key is not None and k == key)
               or (subject is not None and sub is not None and subject(sub))]
        for tunnel in cut:
            tunnel.close("revoked")
        return len(cut)

    def drain(self) -> defer.Deferred:
        """For shutdown, once the listeners have stopped: close idle
        connections now, let busy ones finish their current response (sent
        with ``Connection: close``) and fire when none is left."""
        self.draining = True
        d: defer.Deferred = defer.Deferred()
        if not self.connections:
            d.callback(None)
            return d
        self._drain_waiters.append(d)
        for p in list(self.connections):
            p.drain()
        return d

    def abort(self) -> None:
        """Drop every connection at once (when ``drain`` took too long)."""
        for p in list(self.connections):
            p.abort()

    def _gone(self, protocol: FrontProtocol) -> None:
        if self.draining and not self.connections and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                if not d.called:  # a caller's timeout may have cancelled it
                    d.callback(None)
