"""Prometheus metrics (DESIGN section 5), built on a registry passed in.

Every component takes a ``Metrics`` instance; tests build one on a fresh
``CollectorRegistry`` and read values back with ``sample``.  Label values come
only from the fixed sets below, never from requests.
"""

from __future__ import annotations

import atexit
import weakref
from bisect import bisect_left
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


class PendingCount:
    """A counter child's increments, kept in a plain int until ``flush``.

    prometheus_client takes a lock per increment and, with workers, writes
    a memory-mapped file: per request that was the largest single cost of
    a cache hit.  Here an increment is an addition (and, for the first
    since the last hand-over, a note in ``dirty``).  ``Metrics.flush``
    hands the sums over before every collection (so a scrape, ``sample``
    and ``generate_latest`` see every count), in a worker shortly after a
    request was answered (``Metrics.use_clock``; ``app.WORKER_FLUSH_DELAY``:
    one hand-over serves every request answered meanwhile, and the files
    its parent reads are never further behind), once a second from
    ``Gateway``, and when the interpreter exits.  A worker killed with
    SIGKILL loses at most the counts of that delay.  Bounded: one int per
    child, and ``dirty`` holds each child at most once."""

    __slots__ = ("child", "n", "dirty")

    def __init__(self, child, dirty: list) -> None:
        self.child = child
        self.n = 0
        self.dirty = dirty

    def inc(self, amount: float = 1) -> None:
        if amount <= 0:
            if amount < 0:  # as prometheus_client, at once, not at flush
                raise ValueError("counters can only be incremented by "
                                 "non-negative amounts")
            return
        if not self.n:
            self.dirty.append(self)
        self.n += amount

    def flush(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.child.inc(n)


class PendingHistogram:
    """A histogram child's observations as bucket counts and a sum, handed
    over by ``flush`` like ``PendingCount`` (one ``bisect`` per
    observation instead of a Python loop over the buckets, a lock and a
    file write each for the bucket and the sum).

    It writes to the child's bucket and sum values directly, which are
    prometheus_client internals: a client whose histogram does not have
    them gets every observation passed straight through instead."""

    __slots__ = ("child", "bounds", "counts", "seen", "total", "observe",
                 "dirty")

    def __init__(self, child, dirty: list) -> None:
        self.child = child
        self.dirty = dirty
        self.bounds = tuple(getattr(child, "_upper_bounds", ()))
        buckets = getattr(child, "_buckets", None)
        self.counts = [0] * len(self.bounds)
        self.seen = 0
        self.total = 0.0
        if (not self.bounds or buckets is None
                or getattr(child, "_sum", None) is None
                or len(buckets) != len(self.bounds)
                or self.bounds[-1] != float("inf")):
            self.observe = child.observe  # not batched, never lost
        else:
            self.observe = self._observe

    def _observe(self, amount: float) -> None:
        if not self.seen:
            self.dirty.append(self)
        self.seen += 1
        # bounds ends with +Inf, so the index is always a bucket; a NaN
        # lands there too, as prometheus_client's loop would put it.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        if not self.seen:
            return
        counts = self.counts
        self.counts = [0] * len(counts)
        total, self.total, self.seen = self.total, 0.0, 0
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self.child._sum.inc(total)


class PendingGauge:
    """A gauge's latest ``set``, handed over by ``flush`` like
    ``PendingCount``: the cache and the coalescer set theirs on every miss
    (three prometheus_client sets, each a lock and, with workers, a file
    write), the hand-over sets each once.  A worker's file is at most a
    second behind (``Gateway`` flushes every second); a scrape of the
    process itself always flushes first."""

    __slots__ = ("child", "value", "pending", "dirty")

    def __init__(self, child, dirty: list) -> None:
        self.child = child
        self.value = 0.0
        self.pending = False
        self.dirty = dirty

    def set(self, value: float) -> None:
        self.value = value
        if not self.pending:
            self.pending = True
            self.dirty.append(self)

    def flush(self) -> None:
        if self.pending:
            self.pending = False
            self.child.set(self.value)


def files_backed() -> bool:
    """Whether prometheus_client keeps its values in files (multiprocess
    mode, a worker's): every value write is then a lock, a ``getpid``
    system call and a write to a memory-mapped file, and the parent reads
    the files, so the counts must reach them soon.  In one process a
    scrape hands them over itself."""
    from prometheus_client import values
    mutex = getattr(values, "MutexValue", None)
    return mutex is None or getattr(values, "ValueClass", mutex) is not mutex


#: Every Metrics alive, so counts still pending at exit are written.
_LIVE: "weakref.WeakSet[Metrics]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for metrics in list(_LIVE):
        metrics.flush()


class _FlushFirst:
    """Registered before phantomd's own metrics: collecting the registry
    first hands the pending counts over (it yields no metric itself)."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def collect(self):
        self._metrics.flush()
        return iter(())


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
        # What was counted since the last flush(), each child once.
        self._dirty: list = []
        self._clock = None
        self._delay = 0.0
        self._due = False
        r.register(_FlushFirst(self))
        _LIVE.add(self)
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
        self.introspection_duration = self._pend(Histogram(
            "phantomd_introspection_duration_seconds",
            "Time the token service took to answer an introspection.",
            buckets=_LATENCY_BUCKETS, registry=r))
        self.upstream_duration = self._pend(Histogram(
            "phantomd_upstream_duration_seconds",
            "Time from sending a request upstream to its response head.",
            buckets=_LATENCY_BUCKETS, registry=r))
        self.request_duration = self._pend(Histogram(
            "phantomd_request_duration_seconds",
            "Time from a request's head arriving to its response head sent.",
            buckets=_LATENCY_BUCKETS, registry=r))
        self.cache_entries = PendingGauge(Gauge(
            "phantomd_cache_entries", "Entries in the token cache.",
            multiprocess_mode="livesum", registry=r), self._dirty)
        self.introspections_in_flight = PendingGauge(Gauge(
            "phantomd_introspections_in_flight",
            "Introspections waiting for the token service.",
            multiprocess_mode="livesum", registry=r), self._dirty)
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
        self._by_class = {c: self._pend(self.requests.labels(code=c))
                          for c in CODE_CLASSES}
        self.lookup = {c: self._pend(self.cache_lookups.labels(result=c))
                       for c in CACHE_RESULTS}
        self.outcome = {c: self._pend(self.introspections.labels(outcome=c))
                        for c in INTROSPECTION_OUTCOMES}
        self.rejected = {c: self.connections_rejected.labels(reason=c)
                         for c in REJECT_REASONS}

        self._shared_cache(r)
        self._sender_constrained(r)
        self._forward_auth(r)
        self._routes(r)

    def _pend(self, child):
        """``child`` (a label child or a metric without labels) behind a
        ``PendingCount``/``PendingHistogram`` that ``flush`` empties."""
        return (PendingHistogram(child, self._dirty)
                if isinstance(child, Histogram)
                else PendingCount(child, self._dirty))

    def _unpend(self, pending) -> None:
        while pending in self._dirty:
            self._dirty.remove(pending)

    def flush(self) -> None:
        """Hand every pending count to prometheus_client."""
        dirty = self._dirty
        for pending in dirty:
            pending.flush()
        dirty.clear()

    def use_clock(self, clock, delay: float = 0.0) -> None:
        """From now on, an answered request's counts are handed over
        ``delay`` seconds after it (0: at the end of the reactor turn), one
        hand-over for every request answered meanwhile."""
        self._clock = clock
        self._delay = delay

    def _soon(self) -> None:
        self._due = True
        self._clock.callLater(self._delay, self._hand_over)

    def _hand_over(self) -> None:
        self._due = False
        self.flush()

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
                codes, duration = self._route_children.pop(name)
                for pending in (*codes.values(), duration):
                    self._unpend(pending)
                for c in CODE_CLASSES:
                    self.route_requests.remove(name, c)
                self.route_duration.remove(name)
        for name in keep:
            if name not in self._route_children:
                self._route_children[name] = (
                    {c: self._pend(self.route_requests.labels(route=name,
                                                              code=c))
                     for c in CODE_CLASSES},
                    self._pend(self.route_duration.labels(route=name)))

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
        self._checks_by_class = {c: self._pend(checks.labels(code=c))
                                 for c in CODE_CLASSES}
        self.forward_auth_refused = {c: refused.labels(reason=c)
                                     for c in FORWARD_AUTH_REFUSALS}

    def forward_auth_answered(self, status: int) -> None:
        self._checks_by_class[_CLASS_OF.get(status // 100, "5xx")].inc()
        if not self._due and self._clock is not None:
            self._soon()

    def request_answered(self, status: int) -> None:
        self._by_class[_CLASS_OF.get(status // 100, "5xx")].inc()
        if not self._due and self._clock is not None:
            self._soon()

    def sample(self, name: str, labels: Optional[dict] = None) -> float:
        """The current value of one sample, 0.0 if absent (for tests)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value
