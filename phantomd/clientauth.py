"""How phantomd proves who it is to the token service (RFC 6749 section
2.3, RFC 7523, RFC 8705).

``ClientAuth.credentials()`` gives the form fields and headers one
introspection request carries, for the configured ``auth_method``:

* ``client_secret_basic``: ``Authorization: Basic`` over the
  form-urlencoded id and secret (RFC 6749 section 2.3.1: encode, then
  base64 -- a secret with ``:`` or non-ASCII characters survives);
* ``client_secret_post``: ``client_id`` and ``client_secret`` in the form;
* ``private_key_jwt``: a fresh signed ``client_assertion`` per request
  (RFC 7523), so a captured assertion is useless after 60 seconds;
* ``tls_client_auth``: only ``client_id`` in the form; the proof is the
  client certificate on the TLS connection (phantomd.tls).

Keys are read once, at construction; problems raise ``ValueError`` naming
the file.  Nothing here logs, and ``repr`` never shows the secret.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Optional, Sequence, Union
from urllib.parse import quote_plus

from cryptography.exceptions import UnsupportedAlgorithm
from jwcrypto import jwk as _jwk
from jwcrypto.common import JWException

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt",
           "tls_client_auth")


def _form_encode(value: str) -> str:
    return quote_plus(value, safe="", encoding="utf-8")


def basic_authorization(client_id: str, client_secret: str) -> bytes:
    """The ``Authorization`` value of RFC 6749 section 2.3.1."""
    pair = "%s:%s" % (_form_encode(client_id), _form_encode(client_secret))
    return b"Basic " + base64.b64encode(pair.encode("ascii"))


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

    ``audience`` is what a ``private_key_jwt`` assertion is addressed to:
    the introspection URL, plus the token service's issuer when one is
    configured (RFC 7523 lets the server accept either; a list covers both).
    """

    def __init__(self, clock: Any, method: str, client_id: str,
                 client_secret: Optional[str] = None,
                 audience: Union[str, Sequence[str]] = "",
                 private_key_file: Optional[str] = None,
                 private_key_alg: str = "RS256") -> None:
        if method not in METHODS:
            raise ValueError("unknown auth_method %r (known: %s)"
                             % (method, ", ".join(METHODS)))
        if method in ("client_secret_basic", "client_secret_post") \
                and not client_secret:
            raise ValueError("auth_method %s needs a client secret" % method)
        self._clock = clock
        self.method = method
        self.client_id = client_id
        self._secret = client_secret
        self._audience = (audience if isinstance(audience, str)
                          else list(audience))
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
        audience: Union[str, list[str]] = settings.url
        if settings.issuer and settings.issuer != settings.url:
            audience = [settings.url, settings.issuer]
        return cls(clock, settings.auth_method, settings.client_id,
                   client_secret, audience, settings.private_key_file,
                   settings.private_key_alg)

    def _assertion(self) -> str:
        from phantomd import jose
        assert self._key is not None
        return jose.client_assertion(self._clock, self._key, self.client_id,
                                     self._audience, self._alg)

    @property
    def static(self) -> bool:
        """True when every request carries the same credentials (all but
        ``private_key_jwt``), so they may be encoded once."""
        return self.method != "private_key_jwt"

    def credentials(self) -> tuple[list[tuple[str, str]],
                                   dict[bytes, list[bytes]]]:
        """(form fields, headers) for one request; a fresh assertion each
        time for ``private_key_jwt``."""
        if self.method == "client_secret_basic":
            assert self._secret is not None
            return [], {b"Authorization": [
                basic_authorization(self.client_id, self._secret)]}
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
