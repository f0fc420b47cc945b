"""HTTP/1.1 on the wire: reading an answer (response side).

``ResponseReader`` drives one ``httptools.HttpResponseParser`` per
connection, for every answer phantomd reads: the API's (``upstream``) and
the token service's (``client``).  It decides what both need decided the
same way -- status, headers, framing mode, interim 1xx answers, the head's
size bound, and what makes an answer unusable -- and hands the rest to its
*sink* through plain method calls:

* ``sink.answer_interim(status)``: a 1xx answer other than 101 (which is
  refused: phantomd never asks to switch protocols);
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

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

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
                 "_headers", "_reason")

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

    def feed(self, data: bytes) -> None:
        if not self.head_done:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head + len(data):
                raise BadResponse("a response head larger than %d bytes"
                                  % self.max_head)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            if self.complete:
                self.broken = True
                return
            raise BadResponse("it switched protocols, which phantomd never "
                              "asks for") from None
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
        if status < 200:
            if status == 101:
                raise BadResponse("101 Switching Protocols, which phantomd "
                                  "never asks for")
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
        self._sink.answer_body(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


class ResponseReader(BareResponseReader):
    """``BareResponseReader`` that keeps the reason phrase."""

    __slots__ = ()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
