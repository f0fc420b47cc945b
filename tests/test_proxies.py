"""Trusted proxies: which peers may speak for a client (table-driven)."""

from __future__ import annotations

from twisted.trial import unittest

from phantomd import config
from phantomd.http.proxies import TrustedProxies, forwarded_by_proxy


class TrustsTests(unittest.SynchronousTestCase):

    ROWS = [
        # (networks, peer, trusted)
        ([], "10.0.0.1", False),
        (["10.0.0.0/8"], "10.200.3.4", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:10.0.0.7", True),   # dual-stack listener
        (["10.0.0.0/8"], "::ffff:11.0.0.7", False),
        (["10.0.0.0/8"], "::a00:7", False),           # IPv4-compatible: not v4
        (["::ffff:10.0.0.0/104"], "10.1.1.1", True),
        (["::ffff:10.0.0.0/104"], "::ffff:10.1.1.1", True),
        (["192.0.2.7"], "192.0.2.7", True),           # a single address
        (["192.0.2.7"], "192.0.2.8", False),
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["2001:db8::/32"], "10.0.0.1", False),
        (["10.0.0.0/8"], "2001:db8::1", False),
        (["fe80::/10"], "fe80::1%eth0", True),        # link-local, scoped
        (["10.0.0.0/8"], None, False),                # a UNIX socket
        (["10.0.0.0/8"], "", False),
        (["10.0.0.0/8"], "localhost", False),
        (["10.0.0.0/8"], "10.0.0.1 ", False),
        (["127.0.0.1/32", "::1/128"], "::1", True),
    ]

    def test_rows(self) -> None:
        for networks, peer, trusted in self.ROWS:
            self.assertIs(TrustedProxies(networks).trusts(peer), trusted,
                          (networks, peer))

    def test_refused_networks(self) -> None:
        for text, why in (("10.0.0.1/8", "host bits set"),
                          ("10.0.0.0/33", "not a network"),
                          ("10.0.0.0/8,", "not a network"),
                          ("example.com", "not a network"),
                          ("0.0.0.0/0", "trusts every peer"),
                          ("::/0", "trusts every peer"),
                          ("::ffff:0.0.0.0/96", "trusts every peer")):
            e = self.assertRaises(ValueError, TrustedProxies, [text])
            self.assertIn(why, str(e), text)

    def test_equality_for_reload(self) -> None:
        self.assertEqual(TrustedProxies(["10.0.0.0/8"]),
                         TrustedProxies(["10.0.0.0/8"]))
        self.assertNotEqual(TrustedProxies(["10.0.0.0/8"]), TrustedProxies())
        self.assertFalse(TrustedProxies())


class ConfigTests(unittest.SynchronousTestCase):

    def parse(self, value: str):
        return config.parse(
            "[phantomd]\nupstream = http://127.0.0.1:1\n"
            "trusted_proxies = %s\n[introspection]\nurl = http://127.0.0.1:2"
            "\nclient_id = c\nclient_secret = s\n" % value, "gw.ini")

    def test_default_trusts_no_one(self) -> None:
        c = config.parse("[phantomd]\nupstream = http://127.0.0.1:1\n"
                         "[introspection]\nurl = http://127.0.0.1:2\n"
                         "client_id = c\nclient_secret = s\n")
        self.assertFalse(c.phantomd.trusted_proxies)

    def test_whitespace_separated(self) -> None:
        proxies = self.parse("10.0.0.0/8   192.0.2.1\t2001:db8::/32"
                             ).phantomd.trusted_proxies
        self.assertTrue(proxies.trusts("192.0.2.1"))
        self.assertTrue(proxies.trusts("2001:db8::9"))
        self.assertFalse(proxies.trusts("192.0.2.2"))

    def test_invalid_cidr_is_one_line_naming_the_key(self) -> None:
        e = self.assertRaises(config.ConfigError, self.parse,
                              "10.0.0.0/8 10.1.0.0/33")
        self.assertTrue(str(e).startswith(
            "gw.ini: [phantomd] trusted_proxies: '10.1.0.0/33' is not"), e)
        self.assertNotIn("\n", str(e))


class ForwardedByProxyTests(unittest.SynchronousTestCase):

    ROWS = [
        ("one hop",
         [(b"X-Forwarded-For", b"203.0.113.9")], None,
         b"X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
         b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: api.example\r\n"),
        ("copies joined in order, OWS and empty items dropped",
         [(b"x-forwarded-for", b" 198.51.100.1 ,, 203.0.113.9"),
          (b"X-FORWARDED-FOR", b"192.0.2.5")], None,
         b"X-Forwarded-For: 198.51.100.1, 203.0.113.9, 192.0.2.5, 10.0.0.2"
         b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: api.example\r\n"),
        ("the proxy's proto and host, the last it sent",
         [(b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Proto", b"https"),
          (b"X-Forwarded-Host", b"evil.example, shop.example")], None,
         b"X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n"
         b"X-Forwarded-Host: shop.example\r\n"),
        ("empty values fall back to phantomd's own",
         [(b"X-Forwarded-Proto", b""), (b"X-Forwarded-Host", b" , ")],
         None,
         b"X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: http\r\n"
         b"X-Forwarded-Host: api.example\r\n"),
        ("no Host anywhere (HTTP/1.0)",
         [(b"X-Forwarded-For", b"203.0.113.9")], b"",
         b"X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
         b"X-Forwarded-Proto: http\r\n"),
    ]

    def test_rows(self) -> None:
        for what, received, host, expected in self.ROWS:
            host = b"api.example" if host is None else (host or None)
            self.assertEqual(forwarded_by_proxy(received, b"10.0.0.2",
                                                b"http", host),
                             expected, what)
