"""admission.admit and admission.evidence: what the front does with a
request, decided from its head alone (no connection, no gate)."""

from twisted.trial.unittest import SynchronousTestCase

from phantomd.http.admission import (
    GATE, NOT_FOUND, OPEN, PREFLIGHT, REFUSE, admit, evidence)
from phantomd.http.cors import Policy
from phantomd.http.routes import Route, RouteTable, parse_prefix
from phantomd.http.wire import ParsedRequest

def parse(prefix):
    return parse_prefix(prefix.decode())


TOKEN = (b"Authorization", b"Bearer opaque-1")


def req(method=b"GET", url=b"/", headers=(), version="1.1"):
    r = ParsedRequest()
    r.method, r.url, r.version = method, url, version
    r.headers = [(b"Host", b"api.example")] + list(headers)
    r.complete = True
    return r


def table(**default):
    return RouteTable([
        Route("open", prefixes=(parse(b"/public"),), auth="none"),
        Route("maybe", prefixes=(parse(b"/maybe"),), auth="optional"),
        Route("admin", prefixes=(parse(b"/admin"),),
              required_scopes=("admin",), cors=False),
    ], Route("default", **default))


CORS = Policy(["https://app.example"], ["GET", "POST"], ["Authorization"],
              [], 600, False)
ORIGIN = (b"Origin", b"https://app.example")
PREFLIGHT_ASK = (b"Access-Control-Request-Method", b"POST")


class AdmitTests(SynchronousTestCase):
    def test_a_token_asks_the_gate_with_its_route(self):
        r = req(url=b"/orders?x=1", headers=[TOKEN])
        self.assertEqual(admit(r, table(), None),
                         (GATE, ([b"Bearer opaque-1"], None)))
        self.assertEqual((r.route.name, r.target, r.sent, r.host),
                         ("default", b"/orders?x=1", b"/orders?x=1",
                          b"api.example"))
        self.assertEqual(r.headers, [])  # sorted into r.kept and the rest
        self.assertNotIn(TOKEN, r.kept)  # never forwarded as sent

    def test_no_token_still_asks_the_gate_on_a_required_route(self):
        """Failing closed: the gate answers 401, not the front."""
        self.assertEqual(admit(req(), table(), None), (GATE, ([], None)))

    def test_auth_none_and_optional_without_a_token_go_open(self):
        self.assertEqual(admit(req(url=b"/public/x", headers=[TOKEN]),
                               table(), None), (OPEN, None))
        self.assertEqual(admit(req(url=b"/maybe/x"), table(), None),
                         (OPEN, None))
        kind, _ = admit(req(url=b"/maybe/x", headers=[TOKEN]), table(),
                        None)
        self.assertEqual(kind, GATE)

    def test_refusals_name_the_problem(self):
        cases = [
            (req(url=b"/public/../admin"), 400),  # traversal into a route
            (req(url=b"*"), 400),
            (req(headers=[(b"Host", b"b.example")]), 400),  # two Hosts
            (req(headers=[(b"Transfer-Encoding", b"gzip")]), 501),
            (req(b"CONNECT", b"a.example:443"), 501),
            (req(version="2.0"), 505),
        ]
        for r, status in cases:
            kind, what = admit(r, table(), None)
            self.assertEqual((kind, what[0]), (REFUSE, status), r.url)
            self.assertIsNotNone(r.rid)  # the refusal can name the request

    def test_a_reader_error_is_refused_as_it_is(self):
        r = req()
        r.error = (431, "invalid_request", "header too large")
        self.assertEqual(admit(r, table(), None), (REFUSE, r.error))

    def test_no_route_and_no_default_is_not_found(self):
        t = RouteTable([Route("a", prefixes=(parse(b"/a"),),
                              upstream="http://127.0.0.1:1")], None)
        self.assertEqual(admit(req(url=b"/b", headers=[TOKEN]), t, None),
                         (NOT_FOUND, None))

    def test_a_preflight_is_answered_without_a_token(self):
        r = req(b"OPTIONS", b"/orders", [ORIGIN, PREFLIGHT_ASK])
        kind, headers = admit(r, table(), CORS)
        self.assertEqual(kind, PREFLIGHT)
        self.assertIn((b"Access-Control-Allow-Origin",
                       b"https://app.example"), headers)
        self.assertIsNone(r.cors)  # the preflight headers are the answer

    def test_a_preflight_goes_on_without_cors_or_on_a_cors_off_route(self):
        """No [cors], or [route] cors = no: the API answers its own
        preflights, with no token."""
        r = req(b"OPTIONS", b"/orders", [ORIGIN, PREFLIGHT_ASK])
        self.assertEqual(admit(r, table(), None), (OPEN, None))
        r = req(b"OPTIONS", b"/admin/x", [ORIGIN, PREFLIGHT_ASK])
        self.assertEqual(admit(r, table(), CORS), (OPEN, None))
        self.assertIsNone(r.cors)

    def test_a_preflight_takes_the_route_of_the_method_it_asks_about(self):
        """A route that lists its methods: OPTIONS is not among them, yet
        its preflights are its own (here cors = no: forwarded to its API,
        not answered by phantomd for the default route)."""
        t = RouteTable([
            Route("internal", prefixes=(parse(b"/internal"),),
                  methods=frozenset((b"GET", b"DELETE")), cors=False),
            Route("reports", prefixes=(parse(b"/admin/reports"),),
                  methods=frozenset((b"GET",))),
            Route("admin", prefixes=(parse(b"/admin"),), cors=False),
        ], Route("default"))
        ask = (b"Access-Control-Request-Method", b"DELETE")
        r = req(b"OPTIONS", b"/internal/x", [ORIGIN, ask])
        self.assertEqual(admit(r, t, CORS), (OPEN, None))
        self.assertEqual(r.route.name, "internal")
        # The other way round: a GET route under a cors = no prefix gets
        # its preflight answered, as its GET gets CORS headers.
        ask = (b"Access-Control-Request-Method", b"GET")
        r = req(b"OPTIONS", b"/admin/reports", [ORIGIN, ask])
        self.assertEqual(admit(r, t, CORS)[0], PREFLIGHT)
        self.assertEqual(r.route.name, "reports")
        # Two methods asked, or none: routed as the OPTIONS it is.
        r = req(b"OPTIONS", b"/internal/x", [ORIGIN, ask, ask])
        admit(r, t, CORS)
        self.assertEqual(r.route.name, "default")

    def test_cors_headers_for_an_allowed_origin_only(self):
        r = req(headers=[ORIGIN, TOKEN])
        admit(r, table(), CORS)
        self.assertIn((b"Access-Control-Allow-Origin",
                       b"https://app.example"), r.cors)
        r = req(headers=[(b"Origin", b"https://evil.example"), TOKEN])
        admit(r, table(), CORS)
        self.assertEqual(r.cors, [(b"Vary", b"Origin")])
        r = req(headers=[TOKEN])  # no Origin: the answer still varies by it
        admit(r, table(), CORS)
        self.assertEqual(r.cors, [(b"Vary", b"Origin")])

    def test_proof_lines_go_to_the_gate(self):
        proof = (b"DPoP", b"eyJ.proof.sig")
        kind, (auth, proofs) = admit(
            req(headers=[(b"Authorization", b"DPoP opaque-1"), proof]),
            table(), None)
        self.assertEqual((kind, auth), (GATE, [b"DPoP opaque-1"]))
        self.assertEqual(list(proofs), [proof])

    def test_a_websocket_keeps_its_authorization_for_revocation(self):
        r = req(url=b"/ws", headers=[TOKEN])
        r.upgrade = True
        admit(r, table(), None)
        self.assertEqual(r.auth, [b"Bearer opaque-1"])


class EvidenceTests(SynchronousTestCase):
    def setUp(self):
        self.r = req(url=b"/orders?x=1")
        admit(self.r, table(), None)
        self.peer_asked = 0

    def peer(self, thumbprint=None):
        def ask():
            self.peer_asked += 1
            return thumbprint
        return ask

    def test_nothing_bound_is_no_evidence(self):
        self.assertEqual(evidence((), self.r, False, False, self.peer()), {})

    def test_dpop_names_this_url(self):
        more = evidence([(b"DPoP", b"p")], self.r, True, False, self.peer())
        self.assertEqual(more["dpop"], [b"p"])
        self.assertEqual(more["url"], "https://api.example/orders")
        self.assertEqual(more["method"], b"GET")

    def test_forwarded_origin_only_from_a_trusted_proxy(self):
        """A spoofed X-Forwarded-Host must not change the URL a proof is
        held to."""
        r = req(url=b"/orders", headers=[
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"public.example")])
        admit(r, table(), None)
        spoofed = evidence([(b"DPoP", b"p")], r, False, False, self.peer())
        self.assertEqual(spoofed["url"], "http://api.example/orders")
        trusted = evidence([(b"DPoP", b"p")], r, False, True, self.peer())
        self.assertEqual(trusted["url"], "https://public.example/orders")

    def test_client_cert_header_only_from_a_trusted_proxy(self):
        pem_less = [(b"Client-Cert", b":bm90IGEgY2VydA==:")]
        untrusted = evidence(pem_less, self.r, True, False,
                             self.peer(b"peer-x5t"))
        self.assertEqual(untrusted["client_cert"], b"peer-x5t")
        self.assertEqual(self.peer_asked, 1)
        trusted = evidence(pem_less, self.r, True, True, self.peer(b"p"))
        self.assertNotEqual(trusted.get("client_cert"), b"p")
        self.assertEqual(self.peer_asked, 1)  # the connection is not asked
