"""HTTP/1.1 on the wire, without I/O: requests in, answers in.

One module for both directions, so the two readers decide alike what a
head, a framing and a malformed message are.

Requests.  ``RequestReader`` drives httptools' request parser (llhttp) over the bytes a
connection received and hands each request to its consumer (an
``IRequestConsumer``, the front) as it takes shape: head, body pieces,
end.  It enforces the head limits (request line, header bytes and count,
the whole head), the CVE-2024-22019 bound on bytes that carry no body byte
(chunk metadata, trailers, empty lines), and turns what it cannot accept
(HTTP/2's preface, CONNECT, a bodied Upgrade, malformed input) into a
request with an ``error`` for the front to answer.  Input is parsed 4 KiB
at a time, and the consumer says between slices whether to stop: what is
left is returned unparsed, so at most one slice's worth of pipelined
requests is ever parsed ahead.

Answers.  ``ResponseReader`` drives one ``httptools.HttpResponseParser`` per
connection, for every answer phantomd reads: the API's (``upstream``) and
the token service's (``client``).  It decides what both need decided the
same way -- status, headers, framing mode, interim 1xx answers, the head's
size bound, and what makes an answer unusable -- and hands the rest to its
*sink* through plain method calls:

* ``sink.answer_interim(status)``: a 1xx answer other than 101;
* ``sink.answer_switch(headers, rest) -> bool``: a 101 Switching Protocols
  with its headers and the bytes after its head; the sink takes the
  connection over (True: a WebSocket tunnel, DESIGN section 13) or refuses
  it (False: the answer is unusable, ``BadResponse``);
* ``sink.answer_head(status, reason, headers, mode, length, connection)``:
  the head; ``headers`` as received (name, value) pairs, ``length`` the
  Content-Length value (bytes) or None, ``connection`` the Connection
  header's tokens or None;
* ``sink.answer_body(data)``: a piece of the body, unframed.

``mode`` is one of ``MODE_NONE`` (no body follows), ``MODE_LENGTH``
(``length`` bytes), ``MODE_CHUNKED`` or ``MODE_EOF`` (read until close).
"""

from __future__ import annotations

from typing import Any, Optional

from httptools import (
    HttpParserError, HttpParserInvalidMethodError, HttpParserInvalidURLError,
    HttpParserUpgrade, HttpRequestParser, HttpResponseParser)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

log = Logger()

#: Bytes parsed at a time: bounds how many pipelined requests are parsed ahead.
SLICE = 4096
#: Bytes of input that carry no body byte, header or request (chunk-size
#: lines, extensions, trailers, empty lines) accepted in a row.
MAX_GAP = 16 * 1024


class IRequestConsumer(Interface):
    """What a ``RequestReader`` calls as requests take shape."""

    def request_begun():
        """A new request's first byte arrived."""

    def request_head(request):
        """``request``'s head is complete (``head_done``)."""

    def request_body(request, data):
        """A piece of ``request``'s body (de-chunked)."""

    def request_complete(request):
        """``request`` (body included) is complete."""

    def request_refused(request, queued):
        """Reading stopped at ``request``, whose ``error`` is set;
        ``queued``: its head was already given to ``request_head``."""

    def input_ended():
        """No more input will be parsed (a CONNECT or bodied Upgrade
        request, already given to ``request_head``, carries the error; or
        ``request_upgrade`` took the rest)."""

    def request_upgrade(request, rest):
        """``request`` (complete, body-less) asks to switch protocols;
        ``rest``: the bytes after it, unparsed.  True: the consumer takes
        ``rest`` (and what follows) as it is and reading stops here; False:
        parsing goes on, the request being a plain one."""

    def slice_parsed():
        """Between two slices of one read: True to stop parsing there."""


class IRequestLimits(Interface):
    """The head limits in force (read per request: a reload may change
    them)."""

    max_request_line = Attribute("Bytes of request target, at most.")
    max_header_bytes = Attribute("Bytes of header lines, at most.")
    max_headers = Attribute("Header lines, at most.")
    max_head = Attribute("Bytes of the whole head, at most.")


class ParsedRequest:
    """One request as parsed; ``body`` holds chunks read before the request
    could stream upstream (at most one socket read's worth).  The fields
    after ``started_at`` are the front's, filled in when it starts the
    request."""

    __slots__ = ("url", "headers", "method", "version", "keep_alive",
                 "head_done", "complete", "body", "error", "chunked", "length",
                 "raw", "hbytes", "started_at", "target", "host", "kept",
                 "head", "fwd", "rid", "route", "sent", "cors", "upgrade",
                 "auth", "outcome", "status", "bytes_sent", "took",
                 "upstream_duration", "chunk_out", "close_after")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list = []
        self.method = b"-"  # until the request line names one
        self.version = "1.1"
        self.keep_alive = False
        self.head_done = False
        self.complete = False
        self.body: Optional[list] = None
        self.error: Optional[tuple] = None
        self.chunked = False
        self.length: Optional[bytes] = None
        self.raw = 0
        self.hbytes = 0
        self.started_at = 0.0
        self.target = b""
        self.host: Optional[bytes] = None
        self.kept: list = []
        self.head = b""
        self.fwd: Optional[list] = None  # the client's X-Forwarded-* lines
        self.rid: Optional[bytes] = None
        self.route: Any = None  # DESIGN section 8
        self.sent = b""  # the target sent upstream (minus strip_prefix)
        #: DESIGN section 9: None without [cors]; else the headers every
        #: answer gets (empty: the origin is not allowed).
        self.cors: Optional[list] = None
        #: DESIGN section 13: a WebSocket upgrade, forwarded as one.
        self.upgrade = False
        # A WebSocket request's Authorization values (kept for revocation).
        self.auth: Optional[list] = None
        # The answer, as it goes out and for the access log.
        self.outcome: Any = None  # the gate's Forward or Reject
        self.status = 0  # 0 until a status line went out
        self.bytes_sent = 0
        self.took: Optional[float] = None  # head arrived -> answer head
        self.upstream_duration: Optional[float] = None
        self.chunk_out = False  # the answer is re-chunked to the client
        self.close_after = False  # the connection closes after the answer


class _Limit(Exception):
    """Raised inside a parser callback to stop llhttp at a limit."""


def _failure_of(exc: BaseException) -> Failure:
    return Failure(exc, type(exc), exc.__traceback__)


class RequestReader:
    """The request side of one connection's wire: bytes in, requests out
    to ``consumer``.  ``limits`` is read per request; ``clock`` stamps a
    request's ``started_at`` when its head is complete."""

    def __init__(self, consumer: Any, limits: Any, clock: Any) -> None:
        self._consumer = consumer
        self._limits = limits
        self._clock = clock
        self._parser = HttpRequestParser(self)
        #: The request being parsed (its head may be incomplete), or None.
        self.parsing: Optional[ParsedRequest] = None
        self._last: Optional[ParsedRequest] = None
        self._progress = False
        self._gap = 0
        self._limit: Optional[tuple] = None

    def feed(self, data: bytes) -> bytes:
        """Parse ``data`` a slice at a time; return what was left unparsed
        when the consumer asked to stop between slices."""
        n = len(data)
        if n <= SLICE:
            self._parse(data)
            return b""
        i = 0
        while i < n:
            piece = data[i:i + SLICE]
            i += len(piece)
            self._parse(piece)
            if i < n and self._consumer.slice_parsed():
                return data[i:]
        return b""

    def take_partial(self) -> ParsedRequest:
        """The request being parsed (or a new one), for a 408: parsing
        stops there."""
        r = self.parsing or ParsedRequest()
        self.parsing = None
        return r

    def _parse(self, data: bytes) -> None:
        while True:
            try:
                self._parser.feed_data(data)
            except HttpParserUpgrade as e:
                data = self._upgraded(data, e.args[0])
                if data:
                    continue
            except HttpParserError as e:
                self._failed(e)
            else:
                r = self.parsing
                if r is not None and not r.head_done:
                    r.raw += len(data)
                    if r.raw > self._limits.max_head:
                        self._limit = (431, "request_header_fields_too_large",
                                       "the request head is too large")
                        self._failed(None)
                elif self._progress:
                    self._progress = False
                    self._gap = 0
                else:
                    # Chunk-size lines, chunk extensions, trailers and empty
                    # lines between requests: llhttp keeps none of them but
                    # would read them forever (CVE-2024-22019).
                    self._gap += len(data)
                    if self._gap > MAX_GAP:
                        self._limit = (400, "invalid_request",
                                       "chunk metadata, trailers or empty "
                                       "lines too long")
                        self._failed(None)
            return

    def _upgraded(self, data: bytes, offset: int) -> bytes:
        """llhttp stopped after a request asking to switch protocols.

        A body-less request is offered to the consumer with the bytes
        after it (``request_upgrade``): taken (a WebSocket tunnel to be),
        reading stops; else it goes on as a plain one (Upgrade is dropped
        as hop-by-hop by ``forwarding.sort_headers``) and parsing resumes
        after it.  CONNECT, or an Upgrade request with a body llhttp
        skipped, is refused and reading stops."""
        r = self._last
        if r is None:
            self._limit = (400, "invalid_request", "malformed request")
            self._failed(None)
            return b""
        if r.method == b"CONNECT":
            r.error = (501, "not_implemented", "CONNECT is not supported")
        else:
            for name, value in r.headers:
                n = name.lower()
                if (n == b"content-length" and value.strip() != b"0") or \
                        n == b"transfer-encoding":
                    r.error = (400, "invalid_request",
                               "a request body with Upgrade is not supported")
                    break
            else:
                rest = data[offset:]
                if not self._consumer.request_upgrade(r, rest):
                    return rest
        self._consumer.input_ended()
        return b""

    def _failed(self, exc: Optional[Exception]) -> None:
        limit, self._limit = self._limit, None
        r = self.parsing
        if limit is not None:
            status, err, desc = limit
        elif isinstance(exc, HttpParserInvalidMethodError):
            status, err, desc = 400, "invalid_request", "unknown method"
        elif isinstance(exc, HttpParserInvalidURLError):
            status, err, desc = 400, "invalid_request", "malformed request target"
            if r is not None and r.method == b"-":
                r.method = self._parser.get_method()
        elif r is not None and r.method == b"PRI" and not r.head_done:
            # The HTTP/2 connection preface (prior knowledge, RFC 9113
            # section 3.3): llhttp pauses on it.
            status, err = 505, "invalid_request"
            desc = "HTTP/2 is not supported: use HTTP/1.1"
        else:
            status, err = 400, "invalid_request"
            desc = "malformed request: %s" % (exc,)
            if exc is not None and exc.__context__ is not None:
                log.failure("request parser callback failed",
                            _failure_of(exc.__context__))
        self.parsing = None
        queued = r is not None and r.head_done
        if r is None:
            r = ParsedRequest()
        if not queued:
            r.started_at = self._clock.seconds()
        r.error = (status, err, desc)
        r.complete = False
        self._consumer.request_refused(r, queued)

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._progress = True
        self.parsing = ParsedRequest()
        self._consumer.request_begun()

    def on_url(self, url: bytes) -> None:
        r = self.parsing
        if not r.url:
            r.method = self._parser.get_method()
        r.url += url
        if len(r.url) > self._limits.max_request_line:
            self._limit = (414, "uri_too_long", "the request line is too long")
            raise _Limit()

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.parsing
        if r.head_done:
            return  # a trailer field: not forwarded
        r.headers.append((name, value))
        r.hbytes += len(name) + len(value) + 4
        limits = self._limits
        if r.hbytes > limits.max_header_bytes or \
                len(r.headers) > limits.max_headers:
            self._limit = (431, "request_header_fields_too_large",
                           "the request header section is too large")
            raise _Limit()

    def on_headers_complete(self) -> None:
        self._progress = True
        r = self.parsing
        p = self._parser
        r.version = p.get_http_version()
        r.keep_alive = p.should_keep_alive()
        r.head_done = True
        r.started_at = self._clock.seconds()
        self._last = r
        self._consumer.request_head(r)

    def on_body(self, data: bytes) -> None:
        self._progress = True
        self._consumer.request_body(self.parsing, data)

    def on_message_complete(self) -> None:
        self._progress = True
        r = self.parsing
        self.parsing = None
        r.complete = True
        self._consumer.request_complete(r)


# -- answers ------------------------------------------------------------------

MODE_NONE, MODE_LENGTH, MODE_CHUNKED, MODE_EOF = range(4)

# The lengths of the names that decide the framing (connection,
# content-length, transfer-encoding): only those are lower-cased here.
_FRAMING_LENGTHS = frozenset((10, 14, 17))


class BadResponse(Exception):
    """The answer is not HTTP/1.1 as phantomd reads it (the message says
    how); the connection must be dropped."""


class BareResponseReader:
    """One connection's answers, one at a time: ``start(head_method)``
    before each request, then ``feed(data)`` with every read.

    After ``feed`` returns, ``complete`` says the answer is whole and
    ``keep_alive`` whether the server allows reuse; ``broken`` says bytes
    came past an answer (or a HEAD answer ended the framing), so the
    connection must never be reused.  ``feed`` raises ``BadResponse``, or
    the exception a sink method raised.  Bytes of head (1xx answers
    included) are bounded by ``max_head``: llhttp alone would keep an
    endless header line.  Nothing reaches the sink after ``complete``.

    This one keeps no reason phrase (``reason`` is always ``b""``):
    httptools calls no ``on_status`` it is not given, a call per answer
    saved for a sink that never shows the phrase (``ResponseReader`` keeps
    it).
    """

    __slots__ = ("_sink", "_parser", "max_head", "head_method", "head_done",
                 "complete", "broken", "keep_alive", "mode", "_head_bytes",
                 "_headers", "_reason", "_switch")

    def __init__(self, sink: Any, max_head: int) -> None:
        self._sink = sink
        self._parser = HttpResponseParser(self)
        self.max_head = max_head
        self.broken = False
        self.start(False)

    def start(self, head_method: bool) -> None:
        """A new request was sent (``head_method``: it was a HEAD)."""
        self.head_method = head_method
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.mode = MODE_NONE
        self._head_bytes = 0
        self._headers: list = []
        self._reason = b""
        self._switch: Optional[list] = None

    def feed(self, data: bytes) -> None:
        if not self.head_done:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head + len(data):
                raise BadResponse("a response head larger than %d bytes"
                                  % self.max_head)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            if self.complete:
                self.broken = True
                return
            switch, self._switch = self._switch, None
            if switch is not None and self._sink.answer_switch(
                    switch, data[e.args[0]:]):
                return
            raise BadResponse("it switched protocols, which phantomd "
                              "did not ask for") from None
        except HttpParserError as e:
            cause = e.__context__
            if cause is not None and not isinstance(cause, HttpParserError):
                raise cause from None  # ours or the sink's, from a callback
            if self.complete:
                self.broken = True
                return
            raise BadResponse("a malformed response: %s" % e) from None

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.broken = True  # a second answer to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # not the trailers
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            self.broken = True
            return
        parser = self._parser
        status = parser.get_status_code()
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        if status < 100 or status > 599:
            # RFC 9110 section 15: llhttp reads any three digits.
            raise BadResponse("status %03d, outside 100-599" % status)
        if status < 200:
            if status == 101:
                self._switch = headers  # llhttp stops after it
                return
            self._sink.answer_interim(status)
            return
        self.keep_alive = parser.should_keep_alive()
        length: Optional[bytes] = None
        chunked = False
        connection: Optional[list] = None
        for name, value in headers:
            if len(name) not in _FRAMING_LENGTHS:
                continue
            lower = name.lower()
            if lower == b"content-length":
                length = value
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # gzip and friends would reach the reader undeclared.
                    raise BadResponse("a transfer coding other than chunked")
                chunked = True
            elif lower == b"connection":
                connection = (connection or []) + value.split(b",")
        if self.head_method or status == 204 or status == 304:
            mode = MODE_NONE
        elif chunked:
            mode = MODE_CHUNKED
        elif length is not None:
            mode = MODE_LENGTH
        else:
            mode = MODE_EOF
        self.mode = mode
        self.head_done = True
        if self.head_method:
            # llhttp cannot be told that a HEAD answer has no body: the
            # answer ends here, and so does the connection.
            self.complete = True
            self.broken = True
        self._sink.answer_head(status, reason, headers, mode, length,
                               connection)

    def on_body(self, data: bytes) -> None:
        if self.complete:
            self.broken = True
            return
        if not self.head_done:
            # llhttp reads a body after a 1xx it does not know (only 100,
            # 102 and 103 are bodiless to it): no 1xx has one (RFC 9112
            # section 6.3), and handed on it would reach the client before
            # the real answer's head -- a second answer smuggled in.
            raise BadResponse("a body on an interim (1xx) answer")
        self._sink.answer_body(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


class ResponseReader(BareResponseReader):
    """``BareResponseReader`` that keeps the reason phrase."""

    __slots__ = ()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
