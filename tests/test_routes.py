"""Routes (DESIGN section 8): which route a request takes, and the path
shapes that made other gateways match a public rule but reach a protected
resource, refused with 400 before any route is chosen."""

from twisted.trial.unittest import SynchronousTestCase

from phantomd import config

from phantomd.http import routes
from phantomd.http.routes import Route, RouteTable, UnsafePath

from tests.test_config import MINIMAL

ROUTES = """
[route public]
match = /public
auth = none

[route admin]
match = /admin
required_scopes = admin

[route orders]
match = /orders /v2/orders
methods = GET POST
upstream = http://127.0.0.1:3001
strip_prefix = yes
claim_headers = X-User-Id=sub X-Tenant=tenant

[route orders-delete]
match = /orders
methods = DELETE
required_scopes = orders:delete

[route order-items]
match = /orders/items
methods = PUT
"""


def table(extra=ROUTES, base=MINIMAL):
    return routes.from_config(config.parse(base + extra))


class MatchTests(SynchronousTestCase):
    # (method, target, route name or None, target sent upstream)
    CASES = [
        (b"GET", b"/public", "public", b"/public"),
        (b"GET", b"/public/a/b?x=1", "public", b"/public/a/b?x=1"),
        (b"GET", b"/publicx", "default", b"/publicx"),  # segment-wise
        (b"GET", b"/", "default", b"/"),
        (b"GET", b"/admin/users", "admin", b"/admin/users"),
        # Spellings of /admin an upstream reads as /admin take its route.
        (b"GET", b"//admin", "admin", b"//admin"),
        (b"GET", b"/admin;x", "admin", b"/admin;x"),
        (b"GET", b"/%61dmin/x", "admin", b"/%61dmin/x"),
        (b"GET", b"/public/;/x", "public", b"/public/;/x"),
        # Case-sensitive, as paths are: /ADMIN is not /admin (it takes
        # the default route, which still needs a token).
        (b"GET", b"/ADMIN", "default", b"/ADMIN"),
        # %2F is data: one segment, not /public/admin.
        (b"GET", b"/public%2Fadmin", "default", b"/public%2Fadmin"),
        (b"GET", b"/public/a%2Fb", "public", b"/public/a%2Fb"),
        # A query string is not a path.
        (b"GET", b"/public?next=../admin", "public", b"/public?next=../admin"),
        (b"GET", b"/admin?x=/public", "admin", b"/admin?x=/public"),
        # strip_prefix, byte for byte otherwise.
        (b"GET", b"/orders/1", "orders", b"/1"),
        (b"POST", b"/v2/orders/1%2F2?a=b", "orders", b"/1%2F2?a=b"),
        (b"GET", b"/orders", "orders", b"/"),
        (b"GET", b"/orders?x", "orders", b"/?x"),
        (b"GET", b"/orders//1", "orders", b"//1"),
        # Methods: a route lacking the method does not match.
        (b"DELETE", b"/orders/1", "orders-delete", b"/orders/1"),
        (b"PATCH", b"/orders/1", "default", b"/orders/1"),
        # Longest prefix wins; its methods lacking, the next longest does.
        (b"PUT", b"/orders/items/3", "order-items", b"/orders/items/3"),
        (b"GET", b"/orders/items/3", "orders", b"/items/3"),
        (b"OPTIONS", b"*", "default", b"*"),
    ]

    def test_cases(self):
        t = table()
        for method, target, name, sent in self.CASES:
            m = t.match(method, target)
            self.assertEqual((m.route.name, m.target), (name, sent),
                             (method, target))

    # The traversal shapes: each could reach /admin through a public rule.
    UNSAFE = [
        b"/public/../admin",
        b"/public/./../admin",
        b"/public/..",
        b"/public/%2e%2e/admin",
        b"/public/%2E%2E/admin",
        b"/public/.%2e/admin",
        b"/public/%2e./admin",
        b"/public/..;/admin",
        b"/public/..;x=1/admin",
        b"/public%2f..%2fadmin",
        b"/public%2F..%2Fadmin",
        b"/public/..%2fadmin",
        b"/public\\..\\admin",
        b"/public%5c..%5cadmin",
        b"/public/%5cadmin",
        b"/public/%00/admin",
        b"/public/%c0%ae%c0%ae/admin",  # overlong UTF-8 '.'
        b"/public/%e0%80%ae/admin",
        b"/public/%ff",
        # A fragment: an upstream that cuts it off reads another path.
        b"/admin#x", b"/public#/../admin", b"/public?a#b", b"/#",
    ]

    def test_unsafe_paths_refused_before_any_route(self):
        t = table()
        for target in self.UNSAFE:
            self.assertRaises(UnsafePath, t.match, b"GET", target)
        # Even with no route at all.
        empty = RouteTable([], Route("default"))
        for target in self.UNSAFE:
            self.assertRaises(UnsafePath, empty.match, b"GET", target)

    def test_dots_inside_a_segment_are_fine(self):
        t = table()
        for target in (b"/public/a..b", b"/public/...", b"/public/.well",
                       b"/public/x?../..", b"/public/caf%C3%A9",
                       # A stray % is data: no upstream decodes it to a dot.
                       b"/public/%zz", b"/public/%2", b"/public/%._"):
            self.assertEqual(t.match(b"GET", target).route.name, "public")

    def test_no_default_upstream_is_404(self):
        t = RouteTable([Route("a", prefixes=(parse(b"/a"),),
                              upstream="http://127.0.0.1:1")], None)
        self.assertIsNone(t.match(b"GET", b"/b"))
        self.assertEqual(t.match(b"GET", b"/a/1").route.name, "a")

    def test_no_routes_is_the_default(self):
        t = routes.from_config(config.parse(MINIMAL))
        m = t.match(b"GET", b"/x?y")
        self.assertEqual((m.route.name, m.target), ("default", b"/x?y"))
        self.assertIsNone(m.route.required_scopes)

    def test_fifty_routes(self):
        extra = "".join("[route r%d]\nmatch = /svc%d\n" % (i, i)
                        for i in range(50))
        t = table(extra)
        self.assertEqual(t.match(b"GET", b"/svc49/x").route.name, "r49")
        self.assertEqual(t.match(b"GET", b"/svc50/x").route.name, "default")


def parse(prefix):
    return routes.parse_prefix(prefix.decode())


INDEXED = """
[route root]
match = /
methods = GET

[route a]
match = /a

[route ab-put]
match = /a/b
methods = PUT

[route abc]
match = /a/b/c
strip_prefix = yes

[route abx]
match = /a/bx /z/b

[route b-post]
match = /b
methods = POST
"""


def naive(t, method, target):
    """DESIGN section 8 spelled out, no index: every prefix of every route,
    the longest whose route allows the method; ties in config order."""
    path = target.split(b"?", 1)[0]
    matched, _ = routes.segments(path)
    best = None
    for route in t.routes:
        for prefix in route.prefixes:
            if tuple(matched[:len(prefix)]) != prefix:
                continue
            if route.methods is not None and method not in route.methods:
                continue
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), route)
    return best[1].name if best else t.default.name


class IndexTests(SynchronousTestCase):
    """The first-segment index answers as section 8 reads."""

    CASES = [
        (b"GET", b"/a/b/c/d", "abc", b"/d"),
        (b"GET", b"/a/b/cd", "a", b"/a/b/cd"),    # segment-wise
        (b"PUT", b"/a/b/x", "ab-put", b"/a/b/x"),
        (b"GET", b"/a/b/x", "a", b"/a/b/x"),     # methods: shorter prefix
        (b"GET", b"/a/bx/1", "abx", b"/a/bx/1"),
        (b"GET", b"/z/b", "abx", b"/z/b"),       # a second prefix
        (b"GET", b"/z/c", "root", b"/z/c"),      # root catches the rest
        (b"POST", b"/z/c", "default", b"/z/c"),  # root lacks POST
        (b"POST", b"/b/1", "b-post", b"/b/1"),
        (b"GET", b"/b/1", "root", b"/b/1"),      # b-post lacks GET: root
        (b"DELETE", b"/b/1", "default", b"/b/1"),
        (b"GET", b"/", "root", b"/"),
        (b"GET", b"/?q=/a", "root", b"/?q=/a"),
        # Decoded, doubled or ;-spelled forms take the same route as the
        # plain one (the index's two paths agree).
        (b"GET", b"/a/%62/c/d", "abc", b"/d"),
        (b"GET", b"/a//b/c/d", "abc", b"/d"),
        (b"GET", b"/a/b;x/c", "abc", b"/"),
        (b"GET", b"/%61/b/x", "a", b"/%61/b/x"),
        # %2F never splits, on either path.
        (b"GET", b"/a%2Fb/c", "root", b"/a%2Fb/c"),
        (b"PUT", b"/a/b%2Fc", "a", b"/a/b%2Fc"),
    ]

    def test_cases(self):
        t = table(INDEXED)
        for method, target, name, sent in self.CASES:
            m = t.match(method, target)
            self.assertEqual((m.route.name, m.target), (name, sent),
                             (method, target))

    def test_unsafe_paths_refused_whatever_the_routes(self):
        t = table(INDEXED)
        for target in MatchTests.UNSAFE + [b"/a/b/..", b"/z/%2e"]:
            self.assertRaises(UnsafePath, t.match, b"GET", target)

    def test_agrees_with_the_naive_reading(self):
        import itertools
        t = table(INDEXED + ROUTES.replace("[route ", "[route x-"))
        words = [b"a", b"b", b"c", b"bx", b"z", b"%62", b"orders", b"items",
                 b"", b"admin;p", b"a%2Fb"]
        n = 0
        for depth in range(4):
            for parts in itertools.product(words, repeat=depth):
                target = b"/" + b"/".join(parts)
                for method in (b"GET", b"PUT", b"POST", b"DELETE"):
                    self.assertEqual(t.match(method, target).route.name,
                                     naive(t, method, target),
                                     (method, target))
                    n += 1
        self.assertGreater(n, 5000)


class RouteConfigTests(SynchronousTestCase):
    def test_parsed(self):
        c = config.parse(MINIMAL + ROUTES)
        self.assertEqual(list(c.routes), ["public", "admin", "orders",
                                          "orders-delete", "order-items"])
        o = c.routes["orders"]
        self.assertEqual(o.match, ((b"orders",), (b"v2", b"orders")))
        self.assertEqual(o.methods, frozenset((b"GET", b"POST")))
        self.assertEqual(o.claim_headers, ((b"X-User-Id", "sub"),
                                           (b"X-Tenant", "tenant")))
        self.assertTrue(o.strip_prefix)
        self.assertIsNone(o.required_scopes)  # absent: [phantomd]'s
        self.assertEqual(c.routes["admin"].required_scopes, ("admin",))
        self.assertEqual(c.routes["public"].auth, "none")
        self.assertEqual(config.parse(MINIMAL).routes, {})

    def test_cors_key(self):
        c = config.parse(MINIMAL + "[route a]\nmatch = /a\n[route b]\n"
                         "match = /b\ncors = no\n")
        t = routes.from_config(c)
        self.assertTrue(t.match(b"GET", b"/a").route.cors)  # default yes
        self.assertFalse(t.match(b"GET", b"/b/1").route.cors)
        self.assertTrue(t.match(b"GET", b"/c").route.cors)  # the default
        e = self.assertRaises(config.ConfigError, config.parse,
                              MINIMAL + "[route b]\nmatch = /b\ncors = maybe\n",
                              "/etc/p.ini")
        self.assertEqual((e.section, e.key), ("route b", "cors"))

    def test_empty_scopes_replace_the_default(self):
        c = config.parse(MINIMAL + "[route r]\nmatch = /r\nrequired_scopes =\n")
        self.assertEqual(c.routes["r"].required_scopes, ())

    MISTAKES = [
        ("[route r]\nmatch = /r\nmethod = GET\n", "route r", "method",
         "did you mean methods?"),
        ("[route r]\nmatch = /r\nupstreams = http://a\n", "route r",
         "upstreams", "did you mean upstream?"),
        ("[route r]\nmethods = GET\n", "route r", "match", "is required"),
        ("[route r]\nmatch =\n", "route r", "match", "is required"),
        ("[route r]\nmatch = orders\n", "route r", "match", "start with /"),
        ("[route r]\nmatch = /a/../b\n", "route r", "match", "dot segment"),
        ("[route r]\nmatch = /a?b\n", "route r", "match", "no ?"),
        ("[route r]\nmatch = /r\nauth = maybe\n", "route r", "auth",
         "not one of"),
        ("[route r]\nmatch = /r\nmethods = get\n", "route r", "methods",
         "case-sensitive"),
        ("[route r]\nmatch = /r\nupstream = ftp://x\n", "route r",
         "upstream", "not an http"),
        ("[route r]\nmatch = /r\nstrip_prefix = maybe\n", "route r",
         "strip_prefix", "yes or no"),
        ("[route r]\nmatch = /r\nclaim_headers = X-User\n", "route r",
         "claim_headers", "HEADER=claim"),
        ("[route r]\nmatch = /r\nclaim_headers = Authorization=sub\n",
         "route r", "claim_headers", "manages"),
        ("[route r]\nmatch = /r\nclaim_headers = X-Forwarded-For=sub\n",
         "route r", "claim_headers", "manages"),
        ("[route r]\nmatch = /r\nclaim_headers = X-A=sub x-a=tenant\n",
         "route r", "claim_headers", "twice"),
        ("[route r]\nmatch = /r\nauth = none\nrequired_scopes = a\n",
         "route r", "required_scopes", "auth = none"),
        ("[route r]\nmatch = /r\nauth = none\nclaim_headers = X-A=sub\n",
         "route r", "claim_headers", "auth = none"),
        ("[route r]\nmatch = /r\n[route s]\nmatch = /x /r\n", "route s",
         "match", "[route r]"),
        ("[route r]\nmatch = /r\nmethods = GET\n[route s]\nmatch = /r\n"
         "methods = POST GET\n", "route s", "match", "same methods"),
        ("[route default]\nmatch = /r\n", "route default", None,
         "unmatched"),
        ("[route a b]\nmatch = /r\n", "route a b", None, "NAME"),
        ("[route]\nmatch = /r\n", "route", None, "NAME"),
    ]

    def test_mistakes(self):
        for extra, section, key, words in self.MISTAKES:
            e = self.assertRaises(config.ConfigError, config.parse,
                                  MINIMAL + extra, "/etc/p.ini")
            self.assertEqual((e.section, e.key), (section, key), extra)
            self.assertIn(words, str(e), extra)
            self.assertNotIn("\n", str(e))
            self.assertTrue(str(e).startswith("/etc/p.ini: [%s]" % section))

    def test_methods_on_disjoint_routes_may_share_a_prefix(self):
        c = config.parse(MINIMAL + "[route r]\nmatch = /r\nmethods = GET\n"
                         "[route s]\nmatch = /r\nmethods = POST\n")
        self.assertEqual(len(c.routes), 2)


class ClaimValueTests(SynchronousTestCase):
    def test_values(self):
        for value, out in [("u1", b"u1"), (["a", "b"], b"a b"), (7, b"7"),
                           (True, b"true"), ([], b""),
                           ("a\r\nX-Evil: 1", None), ("a\x00", None),
                           ("caf\u00e9", None), ({"a": 1}, None),
                           (["a", {"b": 1}], None), (None, None),
                           ("tab\there", None)]:
            self.assertEqual(routes.claim_value(value), out, value)
