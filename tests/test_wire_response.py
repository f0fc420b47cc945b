"""wire.ResponseReader on a fake sink: framing modes, 1xx, bad heads,
the head's size bound -- every row fed whole and byte by byte."""

from __future__ import annotations

from typing import Any, Optional

from twisted.trial import unittest

from phantomd.http.wire import (MODE_CHUNKED, MODE_EOF, MODE_LENGTH,
                                MODE_NONE, BadResponse, BareResponseReader,
                                ResponseReader)


class Sink:
    def __init__(self) -> None:
        self.interim: list = []
        self.heads: list = []
        self.body = bytearray()
        self.fail_body: Optional[Exception] = None

    #: Whether a 101 is taken over (a front that asked for a WebSocket).
    take_switch = False

    def answer_interim(self, status: int) -> None:
        self.interim.append(status)

    def answer_switch(self, headers: list, rest: bytes) -> bool:
        self.switched = (headers, rest)
        return self.take_switch

    def answer_head(self, status: int, reason: bytes, headers: list,
                    mode: int, length: Any, connection: Any) -> None:
        self.heads.append((status, reason, headers, mode, length,
                           connection))

    def answer_body(self, data: bytes) -> None:
        if self.fail_body is not None:
            raise self.fail_body
        self.body += data


def read(wire: bytes, head_method: bool = False, max_head: int = 4096,
         pieces: bool = False) -> tuple[ResponseReader, Sink]:
    sink = Sink()
    reader = ResponseReader(sink, max_head)
    reader.start(head_method)
    if pieces:
        for i in range(len(wire)):
            reader.feed(wire[i:i + 1])
    else:
        reader.feed(wire)
    return reader, sink


OK = b"HTTP/1.1 200 OK\r\n"

# (name, wire, head_method, status, mode, length, body, complete,
#  keep_alive, broken)
FRAMING = [
    ("length", OK + b"Content-Length: 3\r\n\r\nabc", False,
     200, MODE_LENGTH, b"3", b"abc", True, True, False),
    ("chunked with trailers", OK + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", False,
     200, MODE_CHUNKED, None, b"abc", True, True, False),
    ("names in any case", OK + b"X-Padding-1234: 1\r\n"
     b"TRANSFER-encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False,
     200, MODE_CHUNKED, None, b"abc", True, True, False),
    ("length in capitals", OK + b"CONTENT-LENGTH: 3\r\n\r\nabc", False,
     200, MODE_LENGTH, b"3", b"abc", True, True, False),
    ("until close", OK + b"\r\nabc", False,
     200, MODE_EOF, None, b"abc", False, False, False),
    ("204", b"HTTP/1.1 204 No Content\r\n\r\n", False,
     204, MODE_NONE, None, b"", True, True, False),
    ("304 keeps its length", b"HTTP/1.1 304 Not Modified\r\n"
     b"Content-Length: 9\r\n\r\n", False,
     304, MODE_NONE, b"9", b"", True, True, False),
    ("HEAD ends the connection", OK + b"Content-Length: 9\r\n\r\n", True,
     200, MODE_NONE, b"9", b"", True, True, True),
    ("HTTP/1.0 is not kept", b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n"
     b"abc", False, 200, MODE_LENGTH, b"3", b"abc", True, False, False),
    ("Connection: close", OK + b"Connection: close\r\nContent-Length: 3"
     b"\r\n\r\nabc", False,
     200, MODE_LENGTH, b"3", b"abc", True, False, False),
    ("bytes past the answer", OK + b"Content-Length: 3\r\n\r\nabc" + OK +
     b"Content-Length: 1\r\n\r\nX", False,
     200, MODE_LENGTH, b"3", b"abc", True, True, True),
]

BAD = [
    ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 4096),
    ("101", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
     b"Connection: upgrade\r\n\r\n", 4096),
    ("gzip transfer coding", OK + b"Transfer-Encoding: gzip\r\n\r\n", 4096),
    ("gzip, chunked", OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
     4096),
    ("gzip in capitals", OK + b"TRANSFER-ENCODING: GZIP\r\n\r\n", 4096),
    ("two lengths", OK + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n",
     4096),
    # No 1xx has a body (RFC 9112 section 6.3); llhttp reads one after a
    # 1xx it does not know, which would reach the client before the real
    # answer's head: a whole second answer, smuggled in.
    ("a 1xx with a length", b"HTTP/1.1 150 X\r\nContent-Length: 5\r\n\r\n"
     b"HELLO" + OK + b"Content-Length: 2\r\n\r\nok", 4096),
    ("a 1xx with an answer inside",
     b"HTTP/1.1 199 X\r\nContent-Length: 38\r\n\r\n" + OK +
     b"Content-Length: 4\r\n\r\nFAKE" + OK + b"Content-Length: 0\r\n\r\n",
     4096),
    ("a chunked 1xx", b"HTTP/1.1 150 X\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nRAW\r\n0\r\n\r\n" + OK + b"Content-Length: 0\r\n\r\n", 4096),
    ("a gzip 1xx", b"HTTP/1.1 150 X\r\nTransfer-Encoding: gzip\r\n\r\nRAW",
     4096),
    # RFC 9110 section 15: status codes are 100-599.
    ("status 099", b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n", 4096),
    ("status 000", b"HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n", 4096),
    ("status 600", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n", 4096),
]

# Past the bound: counted read by read (the read that crosses it is parsed,
# since it may carry body bytes too), so these come in several reads.
TOO_LARGE = [
    ("endless header", [OK, b"X-Long: " + b"a" * 300, b"a"]),
    ("endless 1xx", [b"HTTP/1.1 100 Continue\r\n\r\n"] * 20),
]


class ResponseReaderTests(unittest.TestCase):
    def test_framing_modes(self) -> None:
        for (name, wire, head_method, status, mode, length, body, complete,
             keep_alive, broken) in FRAMING:
            for pieces in (False, True):
                reader, sink = read(wire, head_method, pieces=pieces)
                where = (name, pieces)
                [head] = sink.heads
                self.assertEqual(head[0], status, where)
                self.assertEqual(head[3], mode, where)
                self.assertEqual(reader.mode, mode, where)
                self.assertEqual(head[4], length, where)
                self.assertEqual(bytes(sink.body), body, where)
                self.assertEqual(reader.complete, complete, where)
                if complete:
                    self.assertEqual(reader.keep_alive, keep_alive, where)
                self.assertEqual(reader.broken, broken, where)

    def test_head_as_received(self) -> None:
        for pieces in (False, True):
            _, sink = read(b"HTTP/1.1 200 Fine Thanks\r\nX-A: 1\r\n"
                           b"Connection: keep-alive, X-A\r\n"
                           b"Content-Length: 0\r\n\r\n", pieces=pieces)
            [(_, reason, headers, _, _, connection)] = sink.heads
            self.assertEqual(reason, b"Fine Thanks")
            self.assertEqual(headers, [(b"X-A", b"1"),
                                       (b"Connection", b"keep-alive, X-A"),
                                       (b"Content-Length", b"0")])
            self.assertEqual(connection, [b"keep-alive", b" X-A"])

    def test_bare_reader_keeps_no_reason(self) -> None:
        sink = Sink()
        reader = BareResponseReader(sink, 4096)
        reader.feed(b"HTTP/1.1 404 Not Here\r\nContent-Length: 1\r\n\r\nx")
        [(status, reason, headers, mode, length, _)] = sink.heads
        self.assertEqual((status, reason, mode, length),
                         (404, b"", MODE_LENGTH, b"1"))
        self.assertEqual(bytes(sink.body), b"x")
        self.assertTrue(reader.complete)

    def test_interim_answers_then_the_real_one(self) -> None:
        wire = (b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" +
                OK + b"Content-Length: 2\r\n\r\nok")
        for pieces in (False, True):
            reader, sink = read(wire, pieces=pieces)
            self.assertEqual(sink.interim, [100, 103])
            [head] = sink.heads
            self.assertEqual(head[2], [(b"Content-Length", b"2")])
            self.assertEqual(bytes(sink.body), b"ok")
            self.assertTrue(reader.complete)

    def test_bad_answers(self) -> None:
        for name, wire, max_head in BAD:
            for pieces in (False, True):
                sink = Sink()
                reader = ResponseReader(sink, max_head)
                reader.start(False)
                with self.assertRaises(BadResponse, msg=name):
                    for piece in ([wire[i:i + 1] for i in range(len(wire))]
                                  if pieces else [wire]):
                        reader.feed(piece)
                # Nothing of it reached the sink as an answer's.
                self.assertEqual((sink.heads, bytes(sink.body)), ([], b""),
                                 (name, pieces))

    def test_an_empty_1xx_body_is_no_body(self) -> None:
        wire = (b"HTTP/1.1 150 X\r\nContent-Length: 0\r\n\r\n" + OK +
                b"Content-Length: 2\r\n\r\nok")
        for pieces in (False, True):
            reader, sink = read(wire, pieces=pieces)
            self.assertEqual(sink.interim, [150])
            self.assertEqual(bytes(sink.body), b"ok")
            self.assertTrue(reader.complete)

    def test_a_101_taken_over_hands_its_headers_and_the_rest(self) -> None:
        sink = Sink()
        sink.take_switch = True
        reader = ResponseReader(sink, 4096)
        reader.start(False)
        reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
                    b"\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
        self.assertEqual(sink.switched, (
            [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
            b"\x81\x02hi"))
        self.assertEqual(sink.heads, [])
        self.assertEqual(sink.interim, [])

    def test_head_too_large(self) -> None:
        for name, reads in TOO_LARGE:
            sink = Sink()
            reader = ResponseReader(sink, 64)
            with self.assertRaises(BadResponse, msg=name):
                for data in reads:
                    reader.feed(data)
            self.assertEqual(sink.heads, [], name)

    def test_head_bound_counts_only_the_head(self) -> None:
        body = b"b" * 500
        reader, sink = read(OK + b"Content-Length: 500\r\n\r\n" + body,
                            max_head=64, pieces=True)
        self.assertEqual(bytes(sink.body), body)
        self.assertTrue(reader.complete)

    def test_sink_exception_comes_out_of_feed(self) -> None:
        sink = Sink()
        sink.fail_body = KeyError("stop")
        reader = ResponseReader(sink, 4096)
        with self.assertRaises(KeyError):
            reader.feed(OK + b"Content-Length: 3\r\n\r\nabc")

    def test_next_exchange_on_the_same_connection(self) -> None:
        reader, sink = read(OK + b"Content-Length: 1\r\n\r\na")
        reader.start(False)
        self.assertFalse(reader.complete)
        reader.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nb")
        self.assertEqual([h[0] for h in sink.heads], [200, 404])
        self.assertEqual(bytes(sink.body), b"ab")
        self.assertTrue(reader.complete)
        self.assertFalse(reader.broken)
