#!/usr/bin/env bash
# The real programs the tests drive, on Debian 12 as root; README's test
# command runs this first.  Everything --no-install-recommends:
#   python3-venv    Debian's system pip refuses to install (PEP 668)
#   systemd         systemd-analyze verify/security, systemd-socket-activate
#   openssl, curl   real TLS clients against ssl: listeners (ALPN)
#   redis-server    the [shared_cache] tier and its Sentinel (redis-server --sentinel)
#   nginx, caddy    forward-auth behind real proxies
#   chromium        a real browser enforcing CORS against [cors] and routes
#   promtool        alone, unpacked from Debian's prometheus package: its
#                   dependencies are a Prometheus server's web UI, over 300 MB
# and, where npm exists, node oidc-provider for the second real-token-service
# interop test (pinned by its package-lock.json; skipped with a reason
# without Node.js).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    python3-venv systemd openssl curl redis-server nginx caddy \
    chromium
if ! command -v promtool >/dev/null; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download prometheus \
        && dpkg-deb --fsys-tarfile prometheus_*.deb \
           | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool)
    rm -rf "$tmp"
    chmod 755 /usr/local/bin/promtool
fi
if command -v npm >/dev/null; then
    npm ci --prefix tests/interop/oidc_provider --no-audit --no-fund
fi
