"""phantomd's own answers on the wire, without a connection."""

import httptools
from twisted.internet.task import Clock
from twisted.trial import unittest

from phantomd.http import answers


def parse(data: bytes) -> tuple:
    got: dict = {"headers": [], "body": b""}

    class P:
        def on_header(s, n: bytes, v: bytes) -> None:
            got["headers"].append((n, v))

        def on_body(s, b: bytes) -> None:
            got["body"] += b

        def on_message_complete(s) -> None:
            got["done"] = True
    parser = httptools.HttpResponseParser(P())
    parser.feed_data(data)
    return parser.get_status_code(), got


class OwnAnswerTests(unittest.TestCase):
    def test_error_answer(self) -> None:
        data = answers.own_answer(
            401, [(b"Content-Type", b"application/json")], b"{}", b"D",
            b"rid", [(b"Access-Control-Allow-Origin", b"https://a")],
            close=False, http11=True, head_only=False)
        status, got = parse(data)
        self.assertEqual(status, 401)
        self.assertEqual(got["body"], b"{}")
        self.assertEqual(got["headers"], [
            (b"Content-Type", b"application/json"), (b"Date", b"D"),
            (b"X-Request-Id", b"rid"),
            (b"Access-Control-Allow-Origin", b"https://a"),
            (b"Content-Length", b"2")])

    def test_head_gets_no_body_and_close_is_said(self) -> None:
        data = answers.own_answer(404, [], b"nope", b"D", b"r", None,
                                  close=True, http11=True, head_only=True)
        self.assertTrue(data.endswith(
            b"Content-Length: 4\r\nConnection: close\r\n\r\n"))

    def test_204_has_no_length(self) -> None:
        data = answers.own_answer(204, [], b"", b"D", b"r", None,
                                  close=False, http11=False, head_only=False)
        self.assertNotIn(b"Content-Length", data)
        self.assertIn(b"Connection: keep-alive\r\n", data)

    def test_at_capacity(self) -> None:
        headers = dict(answers.AT_CAPACITY.headers("r"))
        self.assertEqual(answers.AT_CAPACITY.status, 503)
        self.assertEqual(headers[b"Retry-After"], b"1")
        self.assertNotIn(b"WWW-Authenticate", headers)

    def test_dates_once_a_second(self) -> None:
        clock = Clock()
        clock.advance(784111777)
        dates = answers.Dates(clock)
        self.assertEqual(dates(), b"Sun, 06 Nov 1994 08:49:37 GMT")
