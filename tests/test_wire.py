"""The request reader on its own: bytes in, requests out to a recording
consumer; no protocol, no transport."""

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from phantomd.http import wire


@implementer(wire.IRequestLimits)
class Limits:
    max_request_line = 100
    max_header_bytes = 200
    max_headers = 5
    max_head = 300


@implementer(wire.IRequestConsumer)
class Recorder:
    def __init__(self, stop_after_slice: bool = False) -> None:
        self.events: list = []
        self.stop = stop_after_slice
        self.ended = False
        self.take_upgrade = False

    def request_begun(self) -> None:
        self.events.append(("begun",))

    def request_head(self, r) -> None:
        self.events.append(("head", r.method, r.url, r.version))

    def request_body(self, r, data) -> None:
        self.events.append(("body", data))

    def request_complete(self, r) -> None:
        self.events.append(("complete", r.method))

    def request_refused(self, r, queued) -> None:
        self.events.append(("refused", r.error[0], queued))

    def input_ended(self) -> None:
        self.ended = True

    def request_upgrade(self, r, rest) -> bool:
        self.events.append(("upgrade", r.url, rest))
        return self.take_upgrade

    def slice_parsed(self) -> bool:
        self.events.append(("slice",))
        return self.stop


class ReaderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = Recorder()
        self.reader = wire.RequestReader(self.consumer, Limits(), self.clock)

    def kinds(self) -> list:
        return [e for e in self.consumer.events if e[0] != "slice"]

    def refusals(self) -> list:
        return [e[1:] for e in self.consumer.events if e[0] == "refused"]

    def test_interfaces(self) -> None:
        self.assertTrue(verifyClass(wire.IRequestConsumer, Recorder))
        self.assertTrue(verifyObject(wire.IRequestLimits, Limits()))

    def test_pipelined_requests_with_a_chunked_body(self) -> None:
        self.clock.advance(7)
        self.reader.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
                         b"POST /b HTTP/1.0\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(self.kinds(), [
            ("begun",), ("head", b"GET", b"/a", "1.1"), ("complete", b"GET"),
            ("begun",), ("head", b"POST", b"/b", "1.0"), ("body", b"abc"),
            ("complete", b"POST")])

    def test_head_stamped_when_complete(self) -> None:
        heads = []
        self.consumer.request_head = heads.append
        self.reader.feed(b"GET / HTTP/1.1\r\n")
        self.clock.advance(3)
        self.reader.feed(b"Host: h\r\n\r\n")
        self.assertEqual(heads[0].started_at, 3)
        self.assertEqual(heads[0].headers, [(b"Host", b"h")])

    def test_limits(self) -> None:
        rows = [
            (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n", 414),
            (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 6 + b"\r\n", 431),
            (b"GET / HTTP/1.1\r\nA: " + b"b" * 200 + b"\r\n\r\n", 431),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            (b"FOO / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
             b"Upgrade: x\r\nContent-Length: 2\r\n\r\nab", None),
        ]
        for data, status in rows:
            self.setUp()
            self.reader.feed(data)
            if status is None:
                continue
            self.assertEqual(self.refusals(), [(status, False)], data)

    def test_whole_head_limit_across_reads(self) -> None:
        self.reader.feed(b"GET / HTTP/1.1\r\nA: " + b"b" * 150)
        self.assertEqual(self.refusals(), [])
        self.reader.feed(b"b" * 160)
        self.assertEqual(self.refusals(), [(431, False)])

    def test_chunk_metadata_without_progress_is_bounded(self) -> None:
        """CVE-2024-22019: chunk extensions carry no body byte."""
        self.reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n1;")
        for _ in range(wire.MAX_GAP // 1000 + 1):
            self.reader.feed(b"x" * 1000)
        self.assertEqual(self.refusals(), [(400, True)])

    def test_connect_and_bodied_upgrade_end_input(self) -> None:
        heads = []
        self.consumer.request_head = heads.append
        self.reader.feed(b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\nrest")
        self.assertTrue(self.consumer.ended)
        self.assertEqual(heads[0].error[0], 501)
        self.setUp()
        heads = []
        self.consumer.request_head = heads.append
        self.reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nConnection: upgrade"
                         b"\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx")
        self.assertTrue(self.consumer.ended)
        self.assertEqual(heads[0].error[0], 400)

    def test_bodiless_upgrade_goes_on_as_plain_request(self) -> None:
        self.reader.feed(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade"
                         b"\r\nUpgrade: h2c\r\n\r\nGET /2 HTTP/1.1\r\n"
                         b"Host: h\r\n\r\n")
        self.assertFalse(self.consumer.ended)
        self.assertEqual([e[2] for e in self.kinds() if e[0] == "head"],
                         [b"/", b"/2"])
        self.assertIn(("upgrade", b"/", b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
                      self.consumer.events)

    def test_an_upgrade_the_consumer_takes_stops_reading(self) -> None:
        """A WebSocket to be (DESIGN section 13): what follows the request
        goes to the consumer unparsed, never as a request."""
        self.consumer.take_upgrade = True
        self.reader.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade"
                         b"\r\nUpgrade: websocket\r\n\r\nGET /2 HTTP/1.1\r\n"
                         b"Host: h\r\n\r\n")
        self.assertTrue(self.consumer.ended)
        self.assertEqual(self.kinds(), [
            ("begun",), ("head", b"GET", b"/ws", "1.1"), ("complete", b"GET"),
            ("upgrade", b"/ws", b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")])

    def test_slices_and_the_unparsed_rest(self) -> None:
        one = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 80 + b"\r\n\r\n"
        data = one * 100
        self.reader._limits.max_head = 10000
        self.assertEqual(self.reader.feed(data), b"")
        self.assertEqual(len([e for e in self.kinds() if e[0] == "head"]),
                         100)
        self.setUp()
        self.reader._limits.max_head = 10000
        self.consumer.stop = True
        rest = self.reader.feed(data)
        self.assertEqual(len(rest), len(data) - wire.SLICE)
        heads = [e for e in self.kinds() if e[0] == "head"]
        self.assertEqual(len(heads), wire.SLICE // len(one))

    def test_take_partial(self) -> None:
        self.reader.feed(b"GET /x HTTP/1.1\r\nHo")
        r = self.reader.take_partial()
        self.assertEqual((r.method, r.url, r.head_done), (b"GET", b"/x",
                                                          False))
        self.assertIsNone(self.reader.parsing)
        self.assertEqual(self.reader.take_partial().method, b"-")
