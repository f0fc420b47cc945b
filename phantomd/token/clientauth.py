"""How phantomd proves who it is to the token service (RFC 6749 section
2.3, RFC 7523, RFC 8705).

``ClientAuth.credentials()`` gives the form fields and headers one
introspection request carries, for the configured ``auth_method``:

* ``client_secret_basic``: ``Authorization: Basic`` over the
  form-urlencoded id and secret (RFC 6749 section 2.3.1: encode, then
  base64 -- a secret with ``:`` or non-ASCII characters survives), or with
  ``basic_auth_encoding = raw`` over the id and secret as written (UTF-8):
  some token services compare the decoded strings without form-decoding
  them, so a secret like ``Secr3t!`` only works raw there;
* ``client_secret_post``: ``client_id`` and ``client_secret`` in the form;
* ``private_key_jwt``: a fresh signed ``client_assertion`` per request
  (RFC 7523), so a captured assertion is useless after 60 seconds;
* ``tls_client_auth``: only ``client_id`` in the form; the proof is the
  client certificate on the TLS connection (phantomd.http.tls).

Keys are read once, at construction; problems raise ``ValueError`` naming
the file.  Nothing here logs, and ``repr`` never shows the secret.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Optional
from urllib.parse import quote_plus

from cryptography.exceptions import UnsupportedAlgorithm
from jwcrypto import jwk as _jwk
from jwcrypto.common import JWException

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt",
           "tls_client_auth")
BASIC_ENCODINGS = ("form", "raw")

_FORM_SAFE = re.compile(r"[A-Za-z0-9._~-]*\Z").match


def form_safe(value: str) -> bool:
    """True when form encoding leaves ``value`` as it is, so ``form`` and
    ``raw`` Basic credentials are the same bytes."""
    return _FORM_SAFE(value) is not None


def _form_encode(value: str) -> str:
    return quote_plus(value, safe="", encoding="utf-8")


def basic_authorization(client_id: str, client_secret: str,
                        encoding: str = "form") -> bytes:
    """The ``Authorization`` value: RFC 6749 section 2.3.1 (``form``), or
    RFC 7617 over the UTF-8 id and secret as written (``raw``; an id with
    ``:`` cannot be told from its secret then, so it raises ValueError)."""
    if encoding == "form":
        pair = "%s:%s" % (_form_encode(client_id), _form_encode(client_secret))
    elif encoding == "raw":
        if ":" in client_id:
            raise ValueError("a client_id with ':' cannot be sent with "
                             "basic_auth_encoding = raw (the token service "
                             "would split it at the ':')")
        pair = "%s:%s" % (client_id, client_secret)
    else:
        raise ValueError("unknown basic_auth_encoding %r (known: %s)"
                         % (encoding, ", ".join(BASIC_ENCODINGS)))
    return b"Basic " + base64.b64encode(pair.encode("utf-8"))


def load_signing_key(path: str) -> _jwk.JWK:
    """The private key in ``path``: a JWK, a JWK set (its first private
    key), or a PEM private key.  Raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError("cannot read private_key_file %r: %s"
                         % (path, e.strerror or e))
    try:
        if data.lstrip().startswith(b"{"):
            doc = json.loads(data)
            if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
                keys = [_jwk.JWK(**k) for k in doc["keys"]
                        if isinstance(k, dict)]
                keys = [k for k in keys if k.has_private]
                if not keys:
                    raise ValueError("the JWK set has no private key")
                key = keys[0]
            elif isinstance(doc, dict):
                key = _jwk.JWK(**doc)
            else:
                raise ValueError("not a JSON object")
        else:
            key = _jwk.JWK.from_pem(data, password=None)
    except TypeError:
        raise ValueError("private_key_file %r: encrypted PEM keys are not "
                         "supported" % path)
    except (ValueError, JWException, UnicodeDecodeError,
            UnsupportedAlgorithm) as e:
        raise ValueError("private_key_file %r is not a private JWK, JWK set "
                         "or PEM key: %s" % (path, e))
    if not key.has_private:
        raise ValueError("private_key_file %r holds a public key only" % path)
    return key


class ClientAuth:
    """The credentials of the configured ``auth_method``.

    ``audience`` is what a ``private_key_jwt`` assertion is addressed to,
    always one string (``[introspection] assertion_audience``, else the
    introspection URL): RFC 7523 allows a list, but servers that compare
    ``aud`` with one string refuse one.  ``basic_encoding`` is ``form`` or
    ``raw`` (``client_secret_basic`` only).
    """

    def __init__(self, clock: Any, method: str, client_id: str,
                 client_secret: Optional[str] = None,
                 audience: str = "",
                 private_key_file: Optional[str] = None,
                 private_key_alg: str = "RS256",
                 basic_encoding: str = "form") -> None:
        if method not in METHODS:
            raise ValueError("unknown auth_method %r (known: %s)"
                             % (method, ", ".join(METHODS)))
        if method in ("client_secret_basic", "client_secret_post") \
                and not client_secret:
            raise ValueError("auth_method %s needs a client secret" % method)
        if not isinstance(audience, str):
            raise ValueError("the client assertion audience is one string, "
                             "not %r" % (audience,))
        self._clock = clock
        self.method = method
        self.client_id = client_id
        self._secret = client_secret
        self._audience = audience
        self.basic_encoding = basic_encoding
        self._basic: Optional[bytes] = None
        if method == "client_secret_basic":
            assert client_secret is not None
            self._basic = basic_authorization(client_id, client_secret,
                                              basic_encoding)
        self._key: Optional[_jwk.JWK] = None
        self._alg = private_key_alg
        if method == "private_key_jwt":
            if not private_key_file:
                raise ValueError("auth_method private_key_jwt needs "
                                 "private_key_file")
            self._key = load_signing_key(private_key_file)
            try:
                self._assertion()
            except ValueError as e:
                raise ValueError("private_key_file %r: %s"
                                 % (private_key_file, e))

    @classmethod
    def from_settings(cls, clock: Any, settings: Any,
                      client_secret: Optional[str]) -> "ClientAuth":
        """From ``config.introspection`` and ``config.client_secret``."""
        return cls(clock, settings.auth_method, settings.client_id,
                   client_secret,
                   settings.assertion_audience or settings.url,
                   settings.private_key_file, settings.private_key_alg,
                   settings.basic_auth_encoding)

    def _assertion(self) -> str:
        from phantomd.token import jose
        assert self._key is not None
        return jose.client_assertion(self._clock, self._key, self.client_id,
                                     self._audience, self._alg)

    @property
    def static(self) -> bool:
        """True when every request carries the same credentials (all but
        ``private_key_jwt``), so they may be encoded once."""
        return self.method != "private_key_jwt"

    def encoding_hint(self) -> Optional[str]:
        """What to try when the token service refuses these credentials:
        for Basic credentials that form encoding changes, the other
        ``basic_auth_encoding``; None when the encoding cannot matter."""
        if self.method != "client_secret_basic":
            return None
        assert self._secret is not None
        if form_safe(self.client_id) and form_safe(self._secret):
            return None
        other = "raw" if self.basic_encoding == "form" else "form"
        return ("the client_id or secret has characters that form encoding "
                "changes and the token service may %s them: try "
                "[introspection] basic_auth_encoding = %s" % (
                    "not decode" if other == "raw" else "decode", other))

    def credentials(self) -> tuple[list[tuple[str, str]],
                                   dict[bytes, list[bytes]]]:
        """(form fields, headers) for one request; a fresh assertion each
        time for ``private_key_jwt``."""
        if self.method == "client_secret_basic":
            assert self._basic is not None
            return [], {b"Authorization": [self._basic]}
        if self.method == "client_secret_post":
            assert self._secret is not None
            return [("client_id", self.client_id),
                    ("client_secret", self._secret)], {}
        if self.method == "private_key_jwt":
            return [("client_id", self.client_id),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", self._assertion())], {}
        return [("client_id", self.client_id)], {}

    def __repr__(self) -> str:
        return "ClientAuth(%r, client_id=%r)" % (self.method, self.client_id)
