"""A real browser against [cors] and routes (DESIGN sections 8 and 9).

Headless Chromium loads a page from one origin (a static server on a
loopback port) whose script calls the API through phantomd -- another
origin -- with ``fetch()`` and an ``Authorization`` header, so the browser
itself sends the preflight and enforces CORS on every answer: the real
request (200, the API got the JWT), a 401 and a 403 whose
``WWW-Authenticate`` the page can read, a route with ``cors = no`` the page
cannot call, and, from a frame on an origin ``[cors]`` does not allow, a
fetch the browser refuses (TypeError).  The pages POST what they saw back
to the static server as JSON.

Skipped when ``chromium`` is not installed (tests/install-tools.sh
installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from unittest import SkipTest

from twisted.internet import defer, protocol, reactor
from twisted.web import resource, server

from tests.robustness.fakes import LOOPBACK, async_test
from tests.test_gateway_e2e import GatewayCase, build

CHROMIUM = shutil.which("chromium")

SCRIPT = """
const API = "http://127.0.0.1:%(api)d";
async function call(path, token) {
  try {
    const r = await fetch(API + path, {
      headers: {"Authorization": "Bearer " + token}});
    return {status: r.status, www: r.headers.get("WWW-Authenticate"),
            body: await r.text()};
  } catch (e) {
    return {error: e.name};
  }
}
"""

PAGE = """<!doctype html><html><body><script>%(script)s
(async () => {
  const out = {};
  out.ok = await call("/resource?q=1", "%(good)s");
  out.bad = await call("/resource", "not-an-active-token");
  out.scope = await call("/resource", "%(noscope)s");
  out.internal = await call("/internal/x", "%(good)s");
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script>
<iframe src="http://127.0.0.1:%(other)d/denied.html"></iframe>
</body></html>
"""

DENIED = """<!doctype html><html><body><script>%(script)s
(async () => {
  const out = {denied: await call("/resource", "%(good)s")};
  await fetch("/denied-result", {method: "POST",
                                 body: JSON.stringify(out)});
})();
</script></body></html>
"""


class Static(resource.Resource):
    """The app's origin: serves the pages, collects what they report."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict = {}
        self.results = {b"/result": defer.Deferred(),
                        b"/denied-result": defer.Deferred()}

    def render_GET(self, request):
        page = self.pages.get(request.path)
        if page is None:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode()

    def render_POST(self, request):
        d = self.results.get(request.path)
        if d is not None and not d.called:
            d.callback(json.loads(request.content.read()))
        return b""


class Browser(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended = defer.Deferred()
        self.err = b""

    def errReceived(self, data):
        self.err = (self.err + data)[-4000:]

    def processEnded(self, reason):
        self.ended.callback(None)


class BrowserCors(GatewayCase):
    timeout = 60

    def setUp(self):
        if CHROMIUM is None:
            raise SkipTest(
                "chromium is not installed (tests/install-tools.sh installs "
                "it: apt-get install --no-install-recommends chromium)")

    def browse(self, url: str) -> Browser:
        """Headless Chromium on ``url``, in its own process group (its
        renderers and helpers go with it at cleanup)."""
        profile = tempfile.mkdtemp(prefix="phantomd-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        b = Browser()
        args = ["setsid", CHROMIUM, "--headless", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                "--disable-component-update", "--user-data-dir=" + profile,
                url]
        proc = reactor.spawnProcess(b, shutil.which("setsid"), args,
                                    env=dict(os.environ, HOME=profile))

        async def stop():
            if not b.ended.called:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await b.ended
        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return b

    @async_test
    async def test_browser_enforces_cors_through_phantomd(self):
        static = Static()
        site = server.Site(static)
        app = reactor.listenTCP(0, site, interface=LOOPBACK)
        self.addCleanup(app.stopListening)
        other = reactor.listenTCP(0, site, interface=LOOPBACK)
        self.addCleanup(other.stopListening)
        origin = "http://127.0.0.1:%d" % app.getHost().port
        s = await build(
            self, phantomd={"required_scopes": "read"},
            cors={"allow_origins": origin},
            **{"route internal": {"match": "/internal",
                                  "required_scopes": "read", "cors": "no"}})
        good, jwt = s.good_token(sub="alice", scope="read")
        noscope, _ = s.good_token(sub="bob", scope="other")
        values = {"script": SCRIPT % {"api": s.front}, "good": good,
                  "noscope": noscope, "other": other.getHost().port}
        static.pages[b"/index.html"] = PAGE % values
        static.pages[b"/denied.html"] = DENIED % values
        browser = self.browse(origin + "/index.html")
        timeout = reactor.callLater(
            40, lambda: [d.cancel() for d in static.results.values()
                         if not d.called])
        try:
            seen = await static.results[b"/result"]
            denied = await static.results[b"/denied-result"]
        except defer.CancelledError:
            self.fail("the pages reported nothing; chromium said: %r"
                      % browser.err[-2000:])
        finally:
            if timeout.active():
                timeout.cancel()

        # The real request: 200 to the page, and the API got the JWT (the
        # preflight before it answered by phantomd, never forwarded).
        self.assertEqual(seen["ok"].get("status"), 200, seen)
        self.assertEqual(json.loads(seen["ok"]["body"])["target"],
                         "/resource?q=1")
        [got] = [r for r in s.api.requests if r.target == b"/resource?q=1"]
        self.assertEqual(got.method, b"GET")
        self.assertEqual(got.header(b"authorization"),
                         [b"Bearer " + jwt.encode()])
        self.assertEqual(got.header(b"origin"), [origin.encode()])
        self.assertNotIn(b"OPTIONS", [r.method for r in s.api.requests
                                      if r.target.startswith(b"/resource")])
        # 401 and 403: the page reads the status and the challenge.
        self.assertEqual(seen["bad"].get("status"), 401, seen)
        self.assertIn('error="invalid_token"', seen["bad"]["www"] or "")
        self.assertEqual(seen["scope"].get("status"), 403, seen)
        self.assertIn('error="insufficient_scope"', seen["scope"]["www"]
                      or "")
        # cors = no: phantomd forwarded the preflight with no token, the
        # API's answer allowed nothing, so the browser refused the call.
        self.assertEqual(seen["internal"], {"error": "TypeError"})
        internal = [r for r in s.api.requests
                    if r.target.startswith(b"/internal")]
        self.assertEqual([r.method for r in internal], [b"OPTIONS"])
        self.assertEqual(internal[0].header(b"authorization"), [])
        # An origin [cors] does not allow: the browser refuses the fetch.
        self.assertEqual(denied, {"denied": {"error": "TypeError"}})
        self.assertEqual(
            [r for r in s.api.requests if r.header(b"origin") != [
                origin.encode()]], [])
