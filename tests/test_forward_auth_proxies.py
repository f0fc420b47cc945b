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


# The README's nginx snippet, with the ports and a private prefix filled in.
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

    # 403 from phantomd: nginx copies WWW-Authenticate only for 401.
    map $status $phantomd_403_challenge {{
        403     $phantomd_challenge;
        default "";
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            auth_request /_phantomd;
            auth_request_set $phantomd_jwt $upstream_http_authorization;
            auth_request_set $phantomd_challenge $upstream_http_www_authenticate;
            add_header WWW-Authenticate $phantomd_403_challenge always;
            proxy_set_header Authorization $phantomd_jwt;
            proxy_pass http://127.0.0.1:{api};
        }}

        location = /_phantomd {{
            internal;
            proxy_pass http://127.0.0.1:{fa};
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            # A client's own copies would make phantomd refuse (400).
            proxy_set_header X-Forwarded-Method "";
            proxy_set_header X-Forwarded-Uri "";
        }}
    }}
}}
"""

# The README's Caddy snippet, with the ports filled in.
CADDYFILE = """\
{{
    admin off
    auto_https off
}}

http://:{port} {{
    bind 127.0.0.1
    forward_auth 127.0.0.1:{fa} {{
        uri /check
        copy_headers Authorization
        # Caddy sets X-Forwarded-Method/-Uri; a client's X-Original-*
        # would make phantomd refuse (400).
        header_up -X-Original-Method
        header_up -X-Original-URI
    }}
    reverse_proxy 127.0.0.1:{api}
}}
"""


class ThroughProxy:
    """The same end-to-end cases for each proxy (mixin)."""

    async def start_proxy(self, scene) -> int:
        raise NotImplementedError

    async def scene(self, **sections):
        scene = await build_fa(self, **sections)
        scene.proxy = await self.start_proxy(scene)
        return scene

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
                user="user root;" if os.geteuid() == 0 else "",
                dir=d, port=port, api=scene.api.portnum, fa=scene.fa))
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
    if CADDY is None:
        skip = ("caddy is not installed (apt-get install -y "
                "--no-install-recommends caddy; Debian 12 has 2.6.2)")

    async def start_proxy(self, scene) -> int:
        d = tempfile.mkdtemp(prefix="phantomd-caddy-")
        self.addCleanup(shutil.rmtree, d, True)
        port = free_port()
        path = os.path.join(d, "Caddyfile")
        with open(path, "w") as f:
            f.write(CADDYFILE.format(port=port, api=scene.api.portnum,
                                     fa=scene.fa))
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
        # Traefik: GET to `address`, the client's headers, plus
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
                               ("X-Forwarded-For", "203.0.113.9"),
                               ("User-Agent", "curl/8")])
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
