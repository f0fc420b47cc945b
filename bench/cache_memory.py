"""Memory per token-cache entry: 100,000 entries holding ~1 KB JWTs.

Prints resident-set growth (and, separately, Python's own allocation count
from tracemalloc) per entry, minus the size of the JWT string itself: that
is the cache's overhead per entry.  Each answer is built the way the
introspector builds it (a JWT plus its decoded claims dict) and dropped
after the put, so only what the cache keeps is counted.

    python bench/cache_memory.py [entries]
"""

import base64
import gc
import hashlib
import json
import sys
import tracemalloc

from twisted.internet.task import Clock

from phantomd.token.cache import TokenCache
from phantomd.ops.metrics import Metrics
from phantomd.token.outcomes import Active


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def answer(i: int, now: float) -> Active:
    claims = {
        "jti": "%032x" % i, "delegationId": "%032x" % (i * 7),
        "exp": int(now) + 3600, "nbf": int(now), "iat": int(now),
        "iss": "https://login.example.com/oauth/v2/oauth-anonymous",
        "aud": "api.example.com", "sub": "user-%08d" % i,
        "purpose": "access_token", "scope": "openid profile read write",
        "client_id": "www-client", "acr": "urn:se:curity:authentication:"
        "html-form:username-password", "auth_time": int(now),
        "country": "SE", "department": "engineering-platform-team",
    }
    header = b64(b'{"kid":"-1234567890","x5t":"abcdefghijklmnop","alg":'
                 b'"RS256"}')
    jwt = "%s.%s.%s" % (header, b64(json.dumps(claims).encode()),
                        b64(hashlib.sha512(str(i).encode()).digest() * 4))
    return Active(jwt=jwt, claims=claims, lifetime=600.0)


def fill(cache: TokenCache, n: int, now: float) -> int:
    jwt_bytes = 0
    for i in range(n):
        result = answer(i, now)
        jwt_bytes += sys.getsizeof(result.jwt)
        cache.put(hashlib.sha256(b"token-%d" % i).digest(), result)
    return jwt_bytes


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    clock = Clock()
    clock.advance(1_800_000_000)
    metrics = Metrics()

    cache = TokenCache(clock, metrics, n, 3600, 0, 10)
    gc.collect()
    before = rss()
    jwt_bytes = fill(cache, n, clock.seconds())
    gc.collect()
    grown = rss() - before
    assert len(cache) == n
    print("entries: %d, mean JWT length: %d chars (%d bytes as str)"
          % (n, sum(len(cache.get(hashlib.sha256(b"token-%d" % i)
                                  .digest()).jwt) for i in range(100)) / 100,
             jwt_bytes / n))
    print("RSS growth: %.0f bytes/entry, overhead beyond the JWT string: "
          "%.0f bytes/entry" % (grown / n, (grown - jwt_bytes) / n))

    for i in range(n):
        cache.get(hashlib.sha256(b"token-%d" % i).digest())
    gc.collect()
    print("after one hit on every entry: "
          "overhead %.0f bytes/entry" % ((rss() - before - jwt_bytes) / n))

    del cache
    gc.collect()
    cache = TokenCache(clock, metrics, n, 3600, 0, 10)
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    jwt_bytes = fill(cache, n, clock.seconds())
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    print("tracemalloc: %.0f bytes/entry allocated, overhead beyond the JWT "
          "string: %.0f bytes/entry" % (traced / n, (traced - jwt_bytes) / n))


if __name__ == "__main__":
    main()
