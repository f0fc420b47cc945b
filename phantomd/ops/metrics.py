"""Prometheus metrics (DESIGN section 5), built on a registry passed in.

Every component takes a ``Metrics`` instance; tests build one on a fresh
``CollectorRegistry`` and read values back with ``sample``.  Label values come
only from the fixed sets below, never from requests.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector)
from prometheus_client.core import GaugeMetricFamily

from phantomd import __version__

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)

CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CLASS_OF = {int(c[0]): c for c in CODE_CLASSES}
CACHE_RESULTS = ("hit", "miss", "negative_hit")
INTROSPECTION_OUTCOMES = ("active", "inactive", "error", "timeout", "shed")
SHARED_LOOKUPS = ("hit", "miss", "refused")
SHARED_ERRORS = ("unavailable", "timeout", "error", "refused")
SHARED_LEASES = ("acquired", "waited", "expired")
REVOCATIONS = ("token", "sub")
FORWARD_AUTH_REFUSALS = ("peer", "secret")


class BuildInfo:
    """``phantomd_build_info{version} 1``: which release runs where
    (``count by (version) (phantomd_build_info)`` during an upgrade)."""

    def collect(self):
        family = GaugeMetricFamily(
            "phantomd_build_info", "The phantomd release running; always 1.",
            labels=["version"])
        family.add_metric([__version__], 1)
        yield family
# Why phantomd refused a client connection (answered it with an error and
# closed it, or dropped it): connection_cap (503 at max_connections),
# header_timeout (408, or no TLS handshake, within header_timeout),
# body_timeout (408, body slower than the minimum rate), head_too_large
# (414, 431), bad_request (400: malformed request or framing), unsupported
# (501, 505: CONNECT, other transfer codings, HTTP/2 prior knowledge).
REJECT_REASONS = ("connection_cap", "header_timeout", "body_timeout",
                  "head_too_large", "bad_request", "unsupported")


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "phantomd_requests", "Requests answered, by status class.",
            ["code"], registry=r)
        self.cache_lookups = Counter(
            "phantomd_cache_lookups", "Token cache lookups, by result.",
            ["result"], registry=r)
        self.introspections = Counter(
            "phantomd_introspections", "Introspections, by outcome.",
            ["outcome"], registry=r)
        self.coalesced = Counter(
            "phantomd_coalesced_requests",
            "Requests that joined an introspection already in flight.",
            registry=r)
        self.introspection_duration = Histogram(
            "phantomd_introspection_duration_seconds",
            "Time the token service took to answer an introspection.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "phantomd_upstream_duration_seconds",
            "Time from sending a request upstream to its response head.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram(
            "phantomd_request_duration_seconds",
            "Time from a request's head arriving to its response head sent.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_entries = Gauge(
            "phantomd_cache_entries", "Entries in the token cache.",
            multiprocess_mode="livesum", registry=r)
        self.introspections_in_flight = Gauge(
            "phantomd_introspections_in_flight",
            "Introspections waiting for the token service.",
            multiprocess_mode="livesum", registry=r)
        self.connections = Gauge(
            "phantomd_client_connections", "Open client connections.",
            multiprocess_mode="livesum", registry=r)
        # DESIGN section 13; summed over workers like the other gauges.
        self.tunnels = Gauge(
            "phantomd_tunnels_open", "Open WebSocket tunnels.",
            multiprocess_mode="livesum", registry=r)
        r.register(BuildInfo())
        try:
            # process_* (CPU, memory, fds) of this process, from /proc.
            ProcessCollector(registry=r)
        except ValueError:  # a registry that has them already
            pass
        self.connections_rejected = Counter(
            "phantomd_connections_rejected",
            "Client connections refused and closed by phantomd, by reason.",
            ["reason"], registry=r)
        # Pre-create every label value so dashboards see zeros, not gaps.
        # Label children looked up once: labels() is a measurable share of
        # a cache hit's CPU.
        self._by_class = {c: self.requests.labels(code=c)
                          for c in CODE_CLASSES}
        self.lookup = {c: self.cache_lookups.labels(result=c)
                       for c in CACHE_RESULTS}
        self.outcome = {c: self.introspections.labels(outcome=c)
                        for c in INTROSPECTION_OUTCOMES}
        self.rejected = {c: self.connections_rejected.labels(reason=c)
                         for c in REJECT_REASONS}

        self._shared_cache(r)
        self._sender_constrained(r)
        self._forward_auth(r)
        self._routes(r)

    def _routes(self, r: CollectorRegistry) -> None:
        """Per route (DESIGN section 8): new metrics rather than a label on
        ``phantomd_requests_total``, whose shape dashboards and alerts
        already use (``sum by (code)`` would keep working, a plain
        ``phantomd_requests_total{code="5xx"}`` selector would not).  The
        ``route`` label is a configured route name or ``default``, never
        the path: bounded by the config's routes (``config.MAX_ROUTES``);
        ``set_routes`` forgets the names a reload removed."""
        self.route_requests = Counter(
            "phantomd_route_requests",
            "Requests answered, by route and status class.",
            ["route", "code"], registry=r)
        self.route_duration = Histogram(
            "phantomd_route_request_duration_seconds",
            "Time from a request's head arriving to its response head "
            "sent, by route.", ["route"], buckets=_LATENCY_BUCKETS,
            registry=r)
        self._route_children: dict = {}
        self.set_routes(())

    def set_routes(self, names) -> None:
        """The route names now configured (``default`` is always there)."""
        keep = set(names) | {"default"}
        for name in list(self._route_children):
            if name not in keep:
                del self._route_children[name]
                for c in CODE_CLASSES:
                    self.route_requests.remove(name, c)
                self.route_duration.remove(name)
        for name in keep:
            if name not in self._route_children:
                self._route_children[name] = (
                    {c: self.route_requests.labels(route=name, code=c)
                     for c in CODE_CLASSES},
                    self.route_duration.labels(route=name))

    def route_answered(self, route: str, status: int,
                       duration: Optional[float]) -> None:
        children = self._route_children.get(route)
        if children is None:
            return  # a route a reload removed while its request ran
        children[0][_CLASS_OF.get(status // 100, "5xx")].inc()
        if duration is not None:
            children[1].observe(duration)

    def _sender_constrained(self, r: CollectorRegistry) -> None:
        """DPoP and certificate-bound tokens (DESIGN section 12)."""
        from phantomd.token.dpop import REASONS
        failures = Counter(
            "phantomd_dpop_failures",
            "Requests refused for their DPoP proof or token binding, by "
            "reason.", ["reason"], registry=r)
        self.dpop_failures = {c: failures.labels(reason=c) for c in REASONS}
        self.cert_binding_failures = Counter(
            "phantomd_cert_binding_failures",
            "Requests refused because a certificate-bound token came "
            "without its client certificate.", registry=r)

    def _shared_cache(self, r: CollectorRegistry) -> None:
        """``[shared_cache]`` and ``[revocation]`` (DESIGN section 11)."""
        lookups = Counter(
            "phantomd_shared_cache_lookups",
            "Shared (Redis) cache lookups after a local miss: hit, miss, "
            "refused (an entry that failed authentication or was revoked).",
            ["result"], registry=r)
        errors = Counter(
            "phantomd_shared_cache_errors",
            "Redis calls that failed (counted as misses), by kind.",
            ["kind"], registry=r)
        leases = Counter(
            "phantomd_shared_cache_leases",
            "Fleet coalescing: leases acquired, waits for another "
            "process's lease, waits that ran out (holder gone).",
            ["result"], registry=r)
        revocations = Counter(
            "phantomd_shared_cache_revocations",
            "Revocations applied to this process's cache, by kind.",
            ["kind"], registry=r)
        self.shared_connected = Gauge(
            "phantomd_shared_cache_connected",
            "1 while this process has a usable Redis connection.",
            multiprocess_mode="livesum", registry=r)
        self.shared_lookup = {c: lookups.labels(result=c)
                              for c in SHARED_LOOKUPS}
        self.shared_errors = {c: errors.labels(kind=c) for c in SHARED_ERRORS}
        self.shared_lease = {c: leases.labels(result=c) for c in SHARED_LEASES}
        self.revocations = {c: revocations.labels(kind=c)
                            for c in REVOCATIONS}

    def _forward_auth(self, r: CollectorRegistry) -> None:
        """``[forward_auth]`` (DESIGN section 10): its own counters, so
        ``phantomd_requests_total`` keeps counting proxied requests only.
        The gate's counters (cache lookups, introspections) count both."""
        checks = Counter(
            "phantomd_forward_auth_checks",
            "Forward-auth checks answered, by status class.",
            ["code"], registry=r)
        refused = Counter(
            "phantomd_forward_auth_refused",
            "Forward-auth checks refused before the gate: peer (not in "
            "allow_from), secret (missing or wrong X-Phantomd-Secret).",
            ["reason"], registry=r)
        self._checks_by_class = {c: checks.labels(code=c)
                                 for c in CODE_CLASSES}
        self.forward_auth_refused = {c: refused.labels(reason=c)
                                     for c in FORWARD_AUTH_REFUSALS}

    def forward_auth_answered(self, status: int) -> None:
        self._checks_by_class[_CLASS_OF.get(status // 100, "5xx")].inc()

    def request_answered(self, status: int) -> None:
        child = self._by_class.get(_CLASS_OF.get(status // 100, "5xx"))
        child.inc()

    def sample(self, name: str, labels: Optional[dict] = None) -> float:
        """The current value of one sample, 0.0 if absent (for tests)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value
