"""Forward-auth behind real proxies: nginx (``auth_request``) and Caddy
(``forward_auth``) on loopback in front of a fake API, phantomd answering
their checks, with the README's configuration.  Skipped, saying why, where
the proxy is not installed (CI: ``apt-get install nginx caddy``).

Traefik and Envoy are not packaged in Debian: their README snippets are
checked with a stand-in that sends exactly the check request each one
documents (``StandIns``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from tests.robustness.fakes import async_test, get, new_token, sleep
from tests.test_forward_auth import build_fa
from tests.test_gateway_e2e import GatewayCase

NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
CADDY = shutil.which("caddy")


def without_sub() -> str:
    """A JWT as the fake token service makes them, without ``sub``."""
    import base64
    import json
    from tests.robustness.fakes import b64url, make_jwt
    head, payload, sig = make_jwt().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    del claims["sub"]
    return ".".join((head, b64url(json.dumps(claims).encode()), sig))


def free_port() -> int:
    """A loopback port nothing listens on now (for a proxy's own config:
    nginx and Caddy cannot report a port 0 back)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ProxyProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


async def run_proxy(testcase, argv, port: int, env=None,
                    log_file=None) -> ProxyProcess:
    """Start ``argv`` (a proxy in the foreground), wait until ``port``
    accepts connections; the test's cleanup stops it (SIGTERM, then
    SIGKILL)."""
    p = ProxyProcess()
    reactor.spawnProcess(p, argv[0], argv, env=env or dict(os.environ))

    async def stop():
        if p.ended.called:
            return
        p.transport.signalProcess("TERM")
        timer = reactor.callLater(
            5, lambda: p.ended.called or p.transport.signalProcess("KILL"))
        await p.ended
        if timer.active():
            timer.cancel()
    testcase.addCleanup(lambda: defer.ensureDeferred(stop()))
    for _ in range(100):
        if p.ended.called:
            break
        try:
            ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
            conn = await ep.connect(protocol.Factory.forProtocol(
                protocol.Protocol))
            conn.transport.loseConnection()
            return p
        except Exception:
            await sleep(reactor, 0.05)
    log = b""
    if log_file and os.path.exists(log_file):
        with open(log_file, "rb") as f:
            log = f.read()[-3000:]
    raise AssertionError("%s did not start: %r %r" % (
        argv[0], p.output[-3000:], log))


def readme_block(opening: str) -> str:
    """The literal block after the README line starting with ``opening``
    (a paragraph ending in ``::``), dedented: the tests run exactly what
    the README tells a user to paste."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "README.rst"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(opening))
    while not lines[i].rstrip().endswith("::"):
        i += 1
    block = []
    for line in lines[i + 1:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line[4:])
    return "\n".join(block).strip("\n") + "\n"


def fill_ports(text: str, port: int, api: int, fa: int) -> str:
    """The README's ports (80 for the proxy, 3000 for the API, 8181 for
    phantomd's checks) replaced by the test's."""
    return (text.replace("127.0.0.1:8181", "127.0.0.1:%d" % fa)
            .replace("127.0.0.1:3000", "127.0.0.1:%d" % api)
            .replace("listen 80;", "listen 127.0.0.1:%d;" % port))


# nginx's process settings for a private prefix, around the README's
# http-level snippet.
NGINX_CONF = """\
{user}
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{snippet}
}}
"""

# Caddy without its admin endpoint and certificates, then the README's
# site block on a loopback port.
CADDY_GLOBAL = """\
{
    admin off
    auto_https off
}

"""


class ThroughProxy:
    """The same end-to-end cases for each proxy (mixin)."""

    async def start_proxy(self, scene) -> int:
        raise NotImplementedError

    secret = None

    async def scene(self, secret=None, **sections):
        if secret is not None:
            path = os.path.join(tempfile.mkdtemp(), "fa-secret")
            self.addCleanup(shutil.rmtree, os.path.dirname(path), True)
            with open(path, "w") as f:
                f.write(secret + "\n")
            sections["forward_auth"] = {"secret_file": path}
        self.secret = secret
        # The README snippets copy X-User-Id: the route that sends it.
        sections.setdefault("route api", {"match": "/",
                                          "claim_headers": "X-User-Id=sub"})
        scene = await build_fa(self, **sections)
        scene.proxy = await self.start_proxy(scene)
        return scene

    def with_secret(self, text: str) -> str:
        """The README's commented-out secret line, switched on."""
        if self.secret is None:
            return text
        marker = '"<secret_file contents>"'
        self.assertIn(marker, text)
        lines = []
        for line in text.splitlines():
            if marker in line:
                line = line.replace("#", "", 1).replace(
                    marker, '"%s"' % self.secret)
            lines.append(line)
        return "\n".join(lines) + "\n"

    @async_test
    async def test_shared_secret_as_the_readme_sends_it(self):
        scene = await self.scene(secret="b5e1c0ffee-0123456789abcdef")
        token, jwt = scene.good_token()
        r = await get(reactor, scene.proxy, token)
        self.assertEqual(r.status, 200, r.body)
        [api_request] = scene.api.requests
        self.assertEqual(api_request.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertNotIn(b"b5e1c0ffee", api_request.raw())
        self.assertEqual(scene.gw.metrics.sample(
            "phantomd_forward_auth_refused_total", {"reason": "secret"}), 0)

    @async_test
    async def test_jwt_reaches_the_api_and_the_opaque_token_never(self):
        scene = await self.scene()
        token, jwt = scene.good_token(sub="alice")
        r = await get(reactor, scene.proxy, token, target="/orders/1?x=2")
        self.assertEqual(r.status, 200, r.body)
        [api_request] = scene.api.requests
        self.assertEqual(api_request.target, b"/orders/1?x=2")
        self.assertEqual(api_request.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertNotIn(token.encode(), api_request.raw())
        # A second request is answered from phantomd's cache.
        r = await get(reactor, scene.proxy, token)
        self.assertEqual(r.status, 200)
        self.assertEqual(scene.ts.calls_for(token), 1)

    @async_test
    async def test_missing_and_inactive_tokens_get_401_with_challenge(self):
        scene = await self.scene()
        r = await get(reactor, scene.proxy, None)
        self.assertEqual(r.status, 401)
        self.assertEqual(r.header(b"www-authenticate"),
                         [b'Bearer realm="api"'])
        bad = new_token()
        r = await get(reactor, scene.proxy, bad)
        self.assertEqual(r.status, 401)
        [challenge] = r.header(b"www-authenticate")
        self.assertIn(b'error="invalid_token"', challenge)
        self.assertNotIn(bad.encode(), r.body)
        self.assertEqual(scene.api.requests, [])

    @async_test
    async def test_missing_scope_gets_403_with_challenge(self):
        scene = await self.scene(phantomd={"required_scopes": "orders:read"})
        token, _ = scene.good_token(scope="profile")
        r = await get(reactor, scene.proxy, token)
        self.assertEqual(r.status, 403)
        [challenge] = r.header(b"www-authenticate")
        self.assertIn(b'error="insufficient_scope"', challenge)
        self.assertIn(b'scope="orders:read"', challenge)
        self.assertEqual(scene.api.requests, [])

    @async_test
    async def test_client_copies_of_forwarding_headers_do_not_confuse(self):
        """The proxy overwrites (Caddy) or blanks (the nginx snippet) a
        client's own X-Forwarded-Uri/-Method; without that phantomd would
        see two disagreeing original URIs and refuse (400), which nginx
        would turn into a 500."""
        scene = await self.scene()
        token, jwt = scene.good_token()
        r = await get(reactor, scene.proxy, token, target="/admin",
                      headers=[("X-Forwarded-Uri", "/public"),
                               ("X-Original-URI", "/public"),
                               ("X-Forwarded-Method", "HEAD")])
        self.assertEqual(r.status, 200, r.body)
        [api_request] = scene.api.requests
        self.assertEqual(api_request.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])


    #: What the API gets for a claim the token lacks: nginx sends no
    #: header for an empty value, Caddy an empty one.
    missing_claim: list = []

    @async_test
    async def test_forged_claim_header_never_reaches_the_api(self):
        scene = await self.scene()
        forged = [("X-User-Id", "root"), ("x-user-id", "root2")]
        token, _ = scene.good_token(sub="alice")
        r = await get(reactor, scene.proxy, token, headers=forged)
        self.assertEqual(r.status, 200, r.body)
        token = new_token()
        scene.ts.activate(token, jwt=without_sub())
        r = await get(reactor, scene.proxy, token, headers=forged)
        self.assertEqual(r.status, 200, r.body)
        with_sub, without = scene.api.requests
        self.assertEqual(with_sub.header(b"x-user-id"), [b"alice"])
        self.assertEqual(without.header(b"x-user-id"), self.missing_claim)
        self.assertNotIn(b"root", with_sub.raw() + without.raw())
        self.assertNotIn(b"{http.", without.raw())

    @async_test
    async def test_public_route_passes_neither_client_token_nor_claims(self):
        scene = await self.scene(**{"route public": {
            "match": "/public", "auth": "optional",
            "claim_headers": "X-User-Id=sub"}})
        r = await get(reactor, scene.proxy, None, target="/public/x",
                      headers=[("X-User-Id", "root")])
        self.assertEqual(r.status, 200, r.body)
        [api_request] = scene.api.requests
        self.assertEqual(api_request.header(b"x-user-id"), self.missing_claim)
        self.assertIn(api_request.header(b"authorization"),
                      ([], [b""]))

    @async_test
    async def test_dpop_bound_token_through_the_proxy(self):
        from tests.test_dpop_e2e import KEY, proof
        scene = await self.scene()
        token, jwt = scene.good_token(cnf={"jkt": KEY.thumbprint()})
        # The client's Host (request_bytes'), as the proxy reports it.
        url = "http://api.example.test/orders/1"
        r = await get(reactor, scene.proxy, None, target="/orders/1?x=1",
                      headers=[("Authorization", "DPoP " + token),
                               ("DPoP", proof(token, htu=url)),
                               ("X-Forwarded-Host", "evil.example.test")])
        self.assertEqual(r.status, 200, r.body)
        [api_request] = scene.api.requests
        self.assertEqual(api_request.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        # A proof made for another URL.
        r = await get(reactor, scene.proxy, None, headers=[
            ("Authorization", "DPoP " + token),
            ("DPoP", proof(token, htu="http://elsewhere.test/orders/1"))])
        self.assertEqual(r.status, 401, r.body)
        self.assertEqual(len(scene.api.requests), 1)


class Nginx(ThroughProxy, GatewayCase):
    timeout = 30
    if NGINX is None:
        skip = ("nginx is not installed (apt-get install -y "
                "--no-install-recommends nginx)")

    async def start_proxy(self, scene) -> int:
        d = tempfile.mkdtemp(prefix="phantomd-nginx-")
        self.addCleanup(shutil.rmtree, d, True)
        port = free_port()
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            # As root, nginx's workers would switch to "nobody", who
            # cannot use the private prefix.
            f.write(NGINX_CONF.format(
                user="user root;" if os.geteuid() == 0 else "", dir=d,
                snippet=self.with_secret(fill_ports(
                    readme_block("nginx (in ``http {}``"), port,
                    scene.api.portnum, scene.fa))))
        await run_proxy(self, [NGINX, "-p", d, "-e",
                               os.path.join(d, "error.log"), "-c", conf],
                        port, log_file=os.path.join(d, "error.log"))
        return port

    @async_test
    async def test_phantomd_5xx_becomes_500(self):
        """Documented: nginx answers 500 for any auth_request status other
        than 2xx, 401 and 403."""
        from tests.robustness.fakes import Reply
        scene = await self.scene()
        scene.ts.behaviour = Reply(500, (), b"down")
        r = await get(reactor, scene.proxy, new_token())
        self.assertEqual(r.status, 500)
        self.assertEqual(scene.api.requests, [])


class Caddy(ThroughProxy, GatewayCase):
    timeout = 30
    missing_claim = [b""]
    if CADDY is None:
        skip = ("caddy is not installed (apt-get install -y "
                "--no-install-recommends caddy; Debian 12 has 2.6.2)")

    async def start_proxy(self, scene) -> int:
        d = tempfile.mkdtemp(prefix="phantomd-caddy-")
        self.addCleanup(shutil.rmtree, d, True)
        port = free_port()
        path = os.path.join(d, "Caddyfile")
        with open(path, "w") as f:
            site = readme_block("Caddy (2.6 or later").replace(
                "api.example.com {",
                "http://:%d {\n    bind 127.0.0.1" % port, 1)
            f.write(CADDY_GLOBAL + self.with_secret(fill_ports(
                site, port, scene.api.portnum, scene.fa)))
        env = dict(os.environ, HOME=d, XDG_DATA_HOME=d, XDG_CONFIG_HOME=d)
        await run_proxy(self, [CADDY, "run", "--config", path, "--adapter",
                               "caddyfile"], port, env=env)
        return port

    @async_test
    async def test_phantomd_5xx_reaches_the_client(self):
        """Documented: Caddy relays a non-2xx check answer as it is."""
        from tests.robustness.fakes import Reply
        scene = await self.scene()
        scene.ts.behaviour = Reply(500, (), b"down")
        r = await get(reactor, scene.proxy, new_token())
        self.assertEqual(r.status, 502)
        self.assertEqual(r.json()["error"], "bad_gateway")
        self.assertEqual(scene.api.requests, [])


class StandIns(GatewayCase):
    """Traefik and Envoy are not packaged here: a stand-in sends exactly
    the check request each documents for the README's snippet, and the
    answer is read the way each documents it reads it."""

    @async_test
    async def test_traefik_forwardauth(self):
        # Traefik: GET to `address`, the client's authRequestHeaders, plus
        # X-Forwarded-Method/-Proto/-Host/-Uri/-For (overwritten unless
        # trustForwardHeader); 2xx: authResponseHeaders copied onto the
        # forwarded request, replacing the client's; else the answer is
        # returned to the client as it is.
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        r = await get(reactor, scene.fa, token, target="/phantomd/auth",
                      headers=[("X-Forwarded-Method", "DELETE"),
                               ("X-Forwarded-Proto", "https"),
                               ("X-Forwarded-Host", "api.example.com"),
                               ("X-Forwarded-Uri", "/orders/7?force=1"),
                               ("X-Forwarded-For", "203.0.113.9")])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        r = await get(reactor, scene.fa, None, target="/phantomd/auth",
                      headers=[("X-Forwarded-Method", "GET"),
                               ("X-Forwarded-Uri", "/orders")])
        self.assertEqual(r.status, 401)
        self.assertEqual(r.header(b"www-authenticate"),
                         [b'Bearer realm="api"'])

    @async_test
    async def test_envoy_ext_authz_http_service(self):
        # Envoy: the client's method and path (no path_prefix in the
        # README's snippet), Host, Authorization and the allowed headers,
        # Content-Length: 0; 200: allowed_upstream_headers (Authorization)
        # copied upstream; else status, headers and body go to the client.
        scene = await build_fa(self)
        token, jwt = scene.good_token()
        r = await get(reactor, scene.fa, token, method="PUT",
                      target="/orders/7?x=1",
                      headers=[("Content-Length", "0"),
                               ("x-envoy-expected-rq-timeout-ms", "1000"),
                               ("x-forwarded-proto", "https"),
                               ("x-request-id", "0e6c2cd4-8e4c-4c8e")])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertEqual(r.header(b"x-request-id"), [b"0e6c2cd4-8e4c-4c8e"])
        r = await get(reactor, scene.fa, new_token(), method="POST",
                      target="/orders", headers=[("Content-Length", "0")])
        self.assertEqual(r.status, 401)
        self.assertEqual(r.json()["error"], "invalid_token")


class Snippets(unittest.TestCase):
    """The README's Traefik and Envoy configurations say what the
    stand-ins assume (PyYAML comes with the test tools)."""

    def load(self, opening: str):
        try:
            import yaml
        except ImportError:
            raise unittest.SkipTest("PyYAML is not installed")
        return yaml.safe_load(readme_block(opening))

    def test_traefik(self):
        doc = self.load("Traefik (dynamic configuration")
        fa = doc["http"]["middlewares"]["phantomd"]["forwardAuth"]
        self.assertEqual(fa["address"], "http://127.0.0.1:8181/check")
        self.assertIs(fa["trustForwardHeader"], False)
        # Else Traefik copies all the client's headers, a forged
        # Client-Cert among them, to the check.
        self.assertEqual(fa["authRequestHeaders"],
                         ["Authorization", "DPoP", "Origin",
                          "Access-Control-Request-Method"])
        self.assertEqual(fa["authResponseHeaders"],
                         ["Authorization", "X-User-Id"])
        self.assertEqual(doc["http"]["routers"]["api"]["middlewares"],
                         ["phantomd"])

    def test_envoy(self):
        doc = self.load("Envoy (the ``ext_authz`` HTTP filter")
        [f] = doc["http_filters"]
        config = f["typed_config"]
        self.assertIs(config["failure_mode_allow"], False)
        http = config["http_service"]
        # No prefix: the check's path is the client's.
        self.assertNotIn("path_prefix", http)
        self.assertEqual(http["server_uri"]["uri"], "http://127.0.0.1:8181")
        request = http["authorization_request"]
        allowed = [p["exact"] for p in request["allowed_headers"]["patterns"]]
        self.assertIn("authorization", allowed)
        # What the DPoP stand-in (test_forward_auth.SenderConstrained)
        # sends; never a header a client could forge the origin with.
        self.assertIn("dpop", allowed)
        self.assertIn("x-forwarded-proto", allowed)
        self.assertNotIn("x-forwarded-host", allowed)
        self.assertNotIn("client-cert", allowed)
        # A preflight's two, so that its check needs no token.
        self.assertIn("origin", allowed)
        self.assertIn("access-control-request-method", allowed)
        response = http["authorization_response"]
        self.assertEqual([p["exact"] for p in
                          response["allowed_upstream_headers"]["patterns"]],
                         ["authorization", "x-user-id"])
        client = response["allowed_client_headers"]["patterns"]
        self.assertIn("www-authenticate", [p["exact"] for p in client])
