"""Where the parts of the data path meet.

The front (a client connection) asks the gate about a request, then hands
it to an upstream pool; the pool's connection calls the front back as the
exchange goes on.  These interfaces are those two contracts, so each side
can be built and tested against a fake of the other (``verifyObject`` in
the tests checks the real ones keep to them).
"""

from zope.interface import Attribute, Interface


class IGate(Interface):
    """The token side as the data path sees it (``phantomd.token.gate``)."""

    realm = Attribute("The realm of the WWW-Authenticate challenges.")

    def authorize(authorization):
        """``Deferred[Forward | Reject]`` for a request's Authorization
        values (never errbacks; cancelling it detaches the caller).
        Keywords: ``required_scopes``, and the sender-constraint
        evidence of DESIGN section 12 (``dpop``, ``method``, ``url``,
        ``client_cert``)."""

    def authorize_to(done, authorization):
        """``authorize`` without a Deferred (``phantomd.direct``), the
        front's way: ``done(Forward | Reject)`` once, at once for a cache
        hit; returns None once ``done`` has it, else a handle whose
        ``cancel()`` detaches the caller.  The same keywords."""


class IUpstreamPool(Interface):
    """Persistent connections to one upstream URL."""

    authority = Attribute("The Host value for requests sent there (bytes).")
    base_path = Attribute("The URL's path, prefixed to every target (bytes).")

    def connect(exchange):
        """Attach ``exchange`` (an ``IExchange``) to a connection: with an
        idle one, ``exchange.upstream_ready`` is called before this returns
        None; otherwise the pending attempt's Deferred is returned, which
        the caller cancels if it no longer wants it."""

    def close():
        """Close every connection; ``Deferred`` fired when they are gone."""


class IUpstreamConnection(Interface):
    """One request at a time to the upstream, as the front drives it."""

    def send(exchange, head, head_method, retryable):
        """Write a request head; ``exchange`` gets the answer."""

    def write(data):
        """Write request body bytes (already framed)."""

    def write_sequence(parts):
        """Write several pieces of request body at once."""

    def request_sent(with_head=False):
        """The request (with its body) is complete; ``with_head``: all of
        it went in the same turn as its head (the response's time limit,
        which ``send`` started, needs no restart)."""

    def pause_reading():
        """The client cannot take more: stop reading the answer."""

    def resume_reading():
        """The client can take more again."""

    def abort():
        """Drop the connection (never handed back to the pool)."""


class IExchange(Interface):
    """What an upstream connection calls on the party whose request it
    carries (the front)."""

    def upstream_connecting(deferred):
        """A connection attempt is pending (cancellable)."""

    def upstream_ready(connection):
        """``connection`` (an ``IUpstreamConnection``) is this request's."""

    def upstream_retry():
        """A reused connection closed before answering a retryable
        request: a fresh one is on its way."""

    def upstream_failed(status, error, description):
        """No answer came before the head: phantomd answers ``status``."""

    def upstream_switched(upstream, headers, rest):
        """The upstream answered ``101 Switching Protocols`` to
        ``websocket`` on transport ``upstream`` (``headers``: the 101's,
        hop-by-hop ones gone; ``rest``: bytes read after it).  Returns the
        ``tunnel.Tunnel`` that now owns both transports (its
        ``from_upstream``/``upstream_lost`` get the connection's reads and
        loss), or None when the request asked for no WebSocket (then 502).
        DESIGN section 13."""

    def upstream_write_blocked(blocked):
        """The upstream's send buffer filled (True) or drained (False)."""

    def response_continue():
        """The upstream sent ``100 Continue``."""

    def response_head(status, reason, headers, mode, length, duration):
        """The answer's head: framing ``mode`` (MODE_LENGTH with ``length``,
        MODE_CHUNKED, MODE_EOF, MODE_NONE) and the seconds it took."""

    def response_body(data):
        """A piece of the answer's body (unframed)."""

    def flush_output():
        """Everything one upstream read produced has been given."""

    def response_end():
        """The answer is complete."""

    def response_aborted():
        """The upstream broke off after the head: the client must see a
        broken answer, not a short one."""
