"""Cache-hit CPU per request with a DPoP proof vs a plain Bearer token.

The same in-process loop as ``bench/missloop.py`` (a whole Gateway on a
``MemoryReactorClock``, no sockets): one cached token, sent either as
``Authorization: Bearer`` or as ``Authorization: DPoP`` with a fresh
proof per request (ES256 by default; the proofs are made before the clock
starts, as a client would, so only phantomd's checking is measured: parsing,
one signature verification, the thumbprint, the replay cache).  Process
CPU time, best of 5 rounds.

    python bench/dpoploop.py            # 5000 requests per round, ES256
    python bench/dpoploop.py 2000 EdDSA # or RS256, PS256
"""

from __future__ import annotations

import base64
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jwcrypto import jwk, jws  # noqa: E402

import missloop  # noqa: E402
from phantomd.token.dpop import access_token_hash  # noqa: E402

TOKEN = b"hit-token"
KEYS = {"ES256": dict(kty="EC", crv="P-256"),
        "EdDSA": dict(kty="OKP", crv="Ed25519"),
        "RS256": dict(kty="RSA", size=2048),
        "PS256": dict(kty="RSA", size=2048)}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bound_answer(jkt: str) -> bytes:
    """The token service's answer: the bench JWT with ``cnf.jkt``."""
    jwt = missloop.JWT.decode()
    head, payload, sig = jwt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "==="))
    claims["cnf"] = {"jkt": jkt}
    jwt = ".".join((head, b64u(json.dumps(claims).encode()), sig)).encode()
    return missloop.TOKEN_ANSWER.split(b"\r\n\r\n")[0].replace(
        b"Content-Length: %d" % len(missloop.JWT),
        b"Content-Length: %d" % len(jwt)) + b"\r\n\r\n" + jwt


class Loop(missloop.Loop):
    def __init__(self, token_answer: bytes) -> None:
        super().__init__()
        self.token_answer = token_answer

    def send(self, request: bytes) -> None:
        self.front.dataReceived(request)
        self._pump()
        self._pump()
        answer = self.client.value()
        self.client.clear()
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise SystemExit("phantomd answered %r" % answer[:300])


def proof(key, alg: str, now: float, i: int) -> bytes:
    s = jws.JWS(json.dumps({
        "jti": "bench-%d" % i, "htm": "GET", "htu": "http://localhost/",
        "iat": int(now), "ath": access_token_hash(TOKEN.decode())}).encode())
    s.add_signature(key, alg=alg, protected=json.dumps({
        "typ": "dpop+jwt", "alg": alg,
        "jwk": key.export_public(as_dict=True)}))
    return s.serialize(compact=True).encode()


def rounds(loop: Loop, requests) -> float:
    best = None
    for batch in requests:
        gc.collect()
        t0 = time.process_time()
        for request in batch:
            loop.send(request)
        spent = time.process_time() - t0
        best = spent if best is None else min(best, spent)
    return best / len(batch) * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    alg = sys.argv[2] if len(sys.argv) > 2 else "ES256"
    if alg not in KEYS:
        raise SystemExit(__doc__)
    key = jwk.JWK.generate(**KEYS[alg])

    bearer = b"GET / HTTP/1.1\r\nHost: localhost\r\n" \
             b"Authorization: Bearer %s\r\n\r\n" % TOKEN
    plain = Loop(missloop.TOKEN_ANSWER)
    plain.send(bearer)
    bearer_us = rounds(plain, [[bearer] * n] * 5)

    loop = Loop(bound_answer(key.thumbprint()))
    now = loop.reactor.seconds()
    batches = [[b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                b"Authorization: DPoP %s\r\nDPoP: %s\r\n\r\n"
                % (TOKEN, proof(key, alg, now, r * n + i))
                for i in range(n)] for r in range(6)]
    loop.send(batches.pop()[0])  # the miss that caches the token
    dpop_us = rounds(loop, batches)
    print("cache hit, Bearer:      %.1f us of CPU per request" % bearer_us)
    print("cache hit, DPoP %-6s  %.1f us of CPU per request (+%.1f us)"
          % (alg + ":", dpop_us, dpop_us - bearer_us))
    print("(best of 5 rounds of %d requests)" % n)


if __name__ == "__main__":
    main()
