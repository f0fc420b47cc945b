"""The ini file (DESIGN section 3), parsed once into immutable values.

Every key is declared in ``SCHEMA`` with its parser and default; a key that is
not declared, a section that is not declared, a value a parser refuses, or a
cross-key rule that fails raises ``ConfigError`` whose message is one line
naming the file, the section and the key.  Attribute names equal ini keys, so
``config.introspection.max_in_flight`` is ``[introspection] max_in_flight``.
The reader is strict (DESIGN section 7): an indented line is refused rather
than glued to the value above, an unknown key names the closest known one,
a UTF-8 byte order mark is accepted.  Each ``Key`` states whether it decides
what is trusted, which is what ``Gateway.reload`` compares (``identity``).
"""

from __future__ import annotations

import configparser
import difflib
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is the one line to show."""

    def __init__(self, path: str, section: str, key: Optional[str],
                 problem: str) -> None:
        self.path, self.section, self.key, self.problem = (
            path, section, key, problem)
        where = "[%s]" % section if section else ""
        if key:
            where += " %s" % key
        super().__init__("%s: %s: %s" % (path, where, problem)
                         if where else "%s: %s" % (path, problem))


class _Invalid(ValueError):
    """Raised by a value parser; the message says what is wrong."""


REQUIRED = object()


# -- value parsers: str -> value, raising _Invalid ---------------------------

def text(value: str) -> str:
    return value


def optional_text(value: str) -> Optional[str]:
    return value or None


def _number(kind: Callable[[str], Any], low: float, high: float = math.inf):
    def parse(value: str):
        try:
            n = kind(value)
        except ValueError:
            raise _Invalid("%r is not a %s" % (
                value, "whole number" if kind is int else "number"))
        if not math.isfinite(n) or n < low or n > high:
            raise _Invalid("%r is out of range (%s to %s)" % (
                value, low, "unbounded" if high == math.inf else high))
        return n
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 1e-3)
non_negative_float = _number(float, 0)


def boolean(value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise _Invalid("%r is not yes or no" % value)


def one_of(*choices: str):
    def parse(value: str) -> str:
        if value not in choices:
            raise _Invalid("%r is not one of %s" % (value, ", ".join(choices)))
        return value
    return parse


def http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise _Invalid("%r is not a valid URL (%s)" % (value, e))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("%r is not an http:// or https:// URL with a host"
                       % value)
    if parts.fragment or parts.username or parts.password:
        raise _Invalid("%r must not carry a fragment or credentials" % value)
    return value


def optional_http_url(value: str) -> Optional[str]:
    return http_url(value) if value else None


def url_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise _Invalid("%r is not an absolute path starting with /" % value)
    return value


def scopes(value: str) -> tuple[str, ...]:
    out = tuple(value.split())
    for s in out:
        if any(ord(c) < 0x21 or ord(c) > 0x7E or c in '"\\' for c in s):
            raise _Invalid("scope %r has characters RFC 6749 forbids" % s)
    return out


def readable_file(value: str) -> Optional[str]:
    if not value:
        return None
    try:
        with open(value, "rb"):
            pass
    except OSError as e:
        raise _Invalid("cannot read %r: %s" % (value, e.strerror or e))
    return value


def proxy_networks(value: str) -> Any:
    """A whitespace-separated CIDR list, as ``http.proxies.TrustedProxies``."""
    from phantomd.http.proxies import TrustedProxies
    try:
        return TrustedProxies(value.split())
    except ValueError as e:
        raise _Invalid(str(e))


_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_RANGE = re.compile(
    r"%s/%s(?:[ \t]*;[ \t]*%s=(?:%s|\"[^\"\\\x00-\x1f\x7f]*\"))*\Z"
    % (_TCHAR, _TCHAR, _TCHAR, _TCHAR))


def accept_header(value: str) -> Optional[str]:
    """An Accept value (RFC 9110 section 12.5.1), or None: per response."""
    if not value:
        return None
    for part in value.split(","):
        if not _MEDIA_RANGE.match(part.strip()):
            raise _Invalid("%r is not an Accept value (media ranges like "
                           "application/jwt, comma-separated)" % value)
    return value


def json_member(value: str) -> str:
    if not value or any(ord(c) < 0x20 or c.isspace() for c in value):
        raise _Invalid("%r is not a JSON member name (non-empty, no spaces "
                       "or control characters)" % value)
    return value


def one_string(value: str) -> Optional[str]:
    """One value that must not look like a list of several."""
    if not value:
        return None
    if any(c.isspace() or c == "," for c in value):
        raise _Invalid("%r is one value: no spaces or commas" % value)
    return value


INACTIVE_STATUS_REFUSED = {
    200: "200 is the status of an answer",
    401: "401 means the token service refused phantomd's own credentials",
    403: "403 means the token service refused phantomd's own credentials",
    407: "407 means a proxy refused phantomd's credentials",
    408: "408 is a timeout, not an answer",
    429: "429 means the token service is shedding load",
}


def inactive_statuses(value: str) -> frozenset[int]:
    """HTTP statuses that mean "inactive token": 2xx and 4xx only, never
    one that says phantomd or the token service is at fault."""
    out = set()
    for word in value.replace(",", " ").split():
        if not (word.isdigit() and word.isascii() and len(word) == 3):
            raise _Invalid("%r is not an HTTP status" % word)
        status = int(word)
        if status in INACTIVE_STATUS_REFUSED:
            raise _Invalid("%d cannot mean an inactive token: %s" % (
                status, INACTIVE_STATUS_REFUSED[status]))
        if not (200 <= status < 300 or 400 <= status < 500):
            raise _Invalid("%d cannot mean an inactive token: only 2xx and "
                           "4xx statuses can (5xx is a failure, 3xx a "
                           "moved endpoint)" % status)
        out.add(status)
    return frozenset(out)


def dpop_algs(value: str) -> tuple[str, ...]:
    """``[dpop] algs``: asymmetric JWS algorithms only (no none, no HS*)."""
    from phantomd.token.dpop import parse_algs
    try:
        return parse_algs(value)
    except ValueError as e:
        raise _Invalid(str(e))


def read_secret_file(path: Optional[str]) -> Optional[bytes]:
    """A secret file's contents, surrounding whitespace removed; None
    without a path.  ValueError (the message names the file) when it
    cannot be read or holds nothing."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read().strip()
    except OSError as e:
        raise ValueError("cannot read %r: %s" % (path, e.strerror or e))
    if not data:
        raise ValueError("%r is empty" % path)
    return data


def workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return _number(int, 1, 256)(value)


def _check_server_endpoint(description: str) -> None:
    """Parse a Twisted server endpoint string without binding anything."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    try:
        endpoints.serverFromString(MemoryReactor(), description)
    except Exception as e:  # Twisted raises many kinds here
        raise _Invalid("%r is not a valid endpoint: %s" % (description, e))


def endpoints_list(value: str) -> tuple[str, ...]:
    out = tuple(value.split())
    if not out:
        raise _Invalid("at least one endpoint is required")
    for d in out:
        _check_server_endpoint(d)
    return out


def optional_endpoints(value: str) -> tuple[str, ...]:
    return endpoints_list(value) if value.strip() else ()


def redis_url(value: str) -> Optional[str]:
    if not value:
        return None
    from phantomd.fleet.redisconn import parse_url
    try:
        parse_url(value)
    except ValueError as e:
        raise _Invalid(str(e))
    return value


def key_prefix(value: str) -> str:
    if len(value) > 64 or any(ord(c) <= 0x20 or ord(c) >= 0x7F
                              for c in value):
        raise _Invalid("%r: at most 64 visible ASCII characters" % value)
    return value


def cors_origins(value: str) -> tuple:
    from phantomd.http.cors import parse_origins
    try:
        return parse_origins(value)
    except ValueError as e:
        raise _Invalid(str(e))


def tokens(value: str) -> tuple:
    """Method or header names (RFC 9110 tokens), in order."""
    words = tuple(value.replace(",", " ").split())
    for w in words:
        if not re.match(_TCHAR + r"\Z", w):
            raise _Invalid("%r is not a method or header name" % w)
    return words


# -- the schema ---------------------------------------------------------------

class Key(NamedTuple):
    """One ini key: how to parse it, its default, and what a change means.

    ``trust`` has no default on purpose: every key says whether it decides
    what phantomd trusts, i.e. whether a cached introspection answer
    obtained under the old value may be wrong under the new one (which
    token service, which keys, which answer format, which checks).  A
    reload that changes a ``trust=True`` key -- or the contents of a
    ``trust=True`` file -- empties the token cache (``identity``).
    ``restart=True``: a reload cannot apply it; it is reported as needing a
    restart while it differs from what the process started with.
    ``secret=True``: a file holding a secret or private key; startup warns
    when group or others may read it.  A key whose parser is
    ``readable_file`` is a file: reload compares its contents, not just its
    path.
    """

    parse: Callable[[str], Any]
    default: Any
    trust: bool
    restart: bool = False
    secret: bool = False


SCHEMA: dict[str, dict[str, Key]] = {
    "phantomd": {
        "listen": Key(endpoints_list,
                      "tcp:8080:interface=127.0.0.1:backlog=1024",
                      trust=False, restart=True),
        # Required unless [forward_auth] listen is set (_cross_checks).
        "upstream": Key(optional_http_url, "", trust=False),
        "realm": Key(text, "api", trust=False),
        # Checked on every request, cache hits included.
        "required_scopes": Key(scopes, "", trust=False),
        "workers": Key(workers, "1", trust=False, restart=True),
        "header_timeout": Key(positive_float, "10", trust=False),
        "idle_timeout": Key(positive_float, "60", trust=False),
        "drain_timeout": Key(non_negative_float, "30", trust=False),
        # DESIGN section 13: a WebSocket tunnel with no byte either way.
        "tunnel_idle_timeout": Key(positive_float, "300", trust=False),
        "max_connections": Key(positive_int, "10000", trust=False),
        "max_request_line": Key(_number(int, 256, 1 << 20), "8192",
                                trust=False),
        "max_header_bytes": Key(_number(int, 1024, 1 << 24), "65536",
                                trust=False),
        "max_headers": Key(_number(int, 8, 10000), "100", trust=False),
        "upstream_timeout": Key(positive_float, "60", trust=False),
        "upstream_connect_timeout": Key(positive_float, "5", trust=False),
        "upstream_max_idle": Key(non_negative_int, "100", trust=False),
        "upstream_idle_timeout": Key(positive_float, "1.5", trust=False),
        # Which API phantomd trusts with JWTs; the cached answers stay
        # valid (a reload re-reads the files and builds a new pool).
        "upstream_ca_file": Key(readable_file, "", trust=False),
        "upstream_client_cert": Key(readable_file, "", trust=False),
        "upstream_client_key": Key(readable_file, "", trust=False,
                                   secret=True),
        # Whose X-Forwarded-* are believed; applied live on reload.
        "trusted_proxies": Key(proxy_networks, "", trust=False),
        # ssl: listeners ask for client certificates signed by it
        # (certificate-bound tokens, DESIGN section 12); set up at start.
        "tls_client_ca_file": Key(readable_file, "", trust=False,
                                  restart=True),
    },
    "introspection": {
        "url": Key(http_url, REQUIRED, trust=True),
        # The token service may answer per client (audience, claims).
        "client_id": Key(text, REQUIRED, trust=True),
        # How phantomd proves it is client_id: not what it trusts.
        "client_secret": Key(optional_text, "", trust=False),
        "client_secret_file": Key(readable_file, "", trust=False,
                                  secret=True),
        "auth_method": Key(one_of("client_secret_basic", "client_secret_post",
                                  "private_key_jwt", "tls_client_auth"),
                           "client_secret_basic", trust=False),
        "response": Key(one_of("jwt", "phantom_token",
                               "token-introspection+jwt", "json"), "jwt",
                        trust=True),
        "timeout": Key(positive_float, "5", trust=False),
        "max_in_flight": Key(positive_int, "256", trust=False),
        "max_response_bytes": Key(_number(int, 256, 1 << 24), "65536",
                                  trust=False),
        "issuer": Key(optional_text, "", trust=True),
        "jwks_url": Key(optional_http_url, "", trust=True),
        "token_type_hint": Key(optional_text, "", trust=True),
        "verify_jwt": Key(boolean, "no", trust=True),
        # Who may answer as the token service (and serve its keys).
        "ca_file": Key(readable_file, "", trust=True),
        "client_cert": Key(readable_file, "", trust=False),
        "client_key": Key(readable_file, "", trust=False, secret=True),
        "private_key_file": Key(readable_file, "", trust=False,
                                secret=True),
        "private_key_alg": Key(one_of("RS256", "PS256", "ES256", "EdDSA"),
                               "RS256", trust=False),
        # DESIGN section 14.  How phantomd proves who it is: not trust.
        "basic_auth_encoding": Key(one_of("form", "raw"), "form",
                                   trust=False),
        "assertion_audience": Key(one_string, "", trust=False),
        # Where the JWT is read from, which answer is asked for, and which
        # statuses mean "inactive": they decide what an answer means.
        "phantom_token_field": Key(json_member, "phantom_token", trust=True),
        "accept": Key(accept_header, "", trust=True),
        "inactive_statuses": Key(inactive_statuses, "204", trust=True),
    },
    "minting": {
        # Cached minted JWTs are signed with these keys and say these.
        "key_file": Key(readable_file, "", trust=True, secret=True),
        "issuer": Key(optional_text, "", trust=True),
        "jwks_path": Key(url_path, "/.well-known/jwks.json", trust=False,
                         restart=True),
        "audience": Key(optional_text, "", trust=True),
        # The exp of every cached minted JWT: a shorter one must not wait
        # for the old JWTs to run out.
        "lifetime": Key(positive_int, "300", trust=True),
        # The aud of every cached minted JWT.
        "force_audience": Key(boolean, "no", trust=True),
    },
    "cache": {
        "max_entries": Key(positive_int, "100000", trust=False),
        "max_ttl": Key(non_negative_float, "3600", trust=False),
        "default_ttl": Key(non_negative_float, "0", trust=False),
        "negative_ttl": Key(non_negative_float, "10", trust=False),
        # A lower floor drops the cached active answers (cache.reconfigure).
        "min_ttl": Key(non_negative_float, "0", trust=False),
    },
    "metrics": {
        "listen": Key(optional_endpoints, "tcp:8084:interface=127.0.0.1",
                      trust=False, restart=True),
    },
    "log": {
        "format": Key(one_of("text", "json"), "text", trust=False),
        "level": Key(one_of("debug", "info", "warn", "error"), "info",
                     trust=False),
        "access": Key(boolean, "no", trust=False, restart=True),
    },
    # DESIGN section 11: the fleet's Redis tier and revocation.
    "shared_cache": {
        # Which Redis: the client is built once (phantomd.fleet.wiring).
        "url": Key(redis_url, "", trust=False, restart=True),
        "password_file": Key(readable_file, "", trust=False, restart=True,
                             secret=True),
        # Re-read on reload; it keys and seals every shared entry.
        "secret_file": Key(readable_file, "", trust=False, secret=True),
        "key_prefix": Key(key_prefix, "phantomd:", trust=False,
                          restart=True),
        "timeout": Key(positive_float, "0.05", trust=False, restart=True),
        "ca_file": Key(readable_file, "", trust=False, restart=True),
    },
    "revocation": {
        # Re-read on reload: the bearer POST /revoke expects.
        "token_file": Key(readable_file, "", trust=False, secret=True),
    },
    # DESIGN section 12: DPoP proofs are checked on every request, so a
    # reload applies to the next one; cached answers do not depend on them.
    "dpop": {
        "algs": Key(dpop_algs, "ES256 RS256 PS256 EdDSA", trust=False),
        "max_age": Key(_number(float, 1, 3600), "60", trust=False),
        "replay_cache_size": Key(positive_int, "100000", trust=False),
    },
    # DESIGN section 10: the token check for a proxy already in front.
    "forward_auth": {
        "listen": Key(optional_endpoints, "", trust=False, restart=True),
        # Who may turn an opaque token into its JWT; applied live.
        "allow_from": Key(proxy_networks, "127.0.0.1/32 ::1/128",
                          trust=False),
        # Re-read on reload: the X-Phantomd-Secret proxies must send.
        "secret_file": Key(readable_file, "", trust=False, secret=True),
    },
    # DESIGN section 9: what browsers may read; applied live on reload.
    "cors": {
        "allow_origins": Key(cors_origins, "", trust=False),
        "allow_methods": Key(tokens, "GET HEAD POST PUT PATCH DELETE",
                             trust=False),
        "allow_headers": Key(tokens, "Authorization Content-Type",
                             trust=False),
        "expose_headers": Key(tokens, "WWW-Authenticate", trust=False),
        "max_age": Key(_number(int, 0, 86400), "600", trust=False),
        "allow_credentials": Key(boolean, "no", trust=False),
    },
}


def _check_schema(schema: Mapping[str, Mapping[str, Any]]) -> None:
    """Every key is a ``Key`` that states ``trust`` (a bool): a key added
    as a bare tuple, or without deciding, fails at import."""
    for section, keys in schema.items():
        for name, key in keys.items():
            if not isinstance(key, Key) or not all(
                    type(getattr(key, flag)) is bool
                    for flag in ("trust", "restart", "secret")):
                raise TypeError("SCHEMA[%r][%r] must be a Key stating "
                                "trust=True or trust=False" % (section, name))


_check_schema(SCHEMA)


# -- [route NAME] (DESIGN section 8) ------------------------------------------

def route_prefixes(value: str) -> tuple:
    from phantomd.http.routes import parse_prefix
    out = []
    for word in value.split():
        try:
            out.append(parse_prefix(word))
        except ValueError as e:
            raise _Invalid(str(e))
    if not out:
        raise _Invalid("at least one path prefix is required")
    return tuple(out)


_METHOD = re.compile(_TCHAR + r"\Z")


def methods(value: str) -> Optional[frozenset]:
    """Method names, as sent (case-sensitive, RFC 9110); empty: any."""
    words = value.split()
    for w in words:
        if not _METHOD.match(w):
            raise _Invalid("%r is not an HTTP method" % w)
        if w != w.upper():
            raise _Invalid("%r: methods are case-sensitive, write %s"
                           % (w, w.upper()))
    return frozenset(w.encode("ascii") for w in words) or None


def route_scopes(value: str) -> Optional[tuple[str, ...]]:
    """Absent: ``[phantomd] required_scopes``; present, even empty, it
    replaces them for the route."""
    return None if value == "\0inherit" else scopes(value)


def claim_headers(value: str) -> tuple:
    from phantomd.http.headers import REQUEST_DROP
    out = []
    for word in value.split():
        name, eq, claim = word.partition("=")
        if not eq or not claim or not re.match(_TCHAR + r"\Z", name):
            raise _Invalid("%r is not HEADER=claim" % word)
        if name.lower().encode("ascii") in REQUEST_DROP or \
                name.lower() in ("authorization", "content-type"):
            raise _Invalid("%r is a header phantomd itself manages" % name)
        out.append((name.encode("ascii"), claim))
    names = [n.lower() for n, _ in out]
    if len(set(names)) != len(names):
        raise _Invalid("a header is named twice")
    return tuple(out)


#: The keys of every ``[route NAME]`` section.  Route sections have names
#: of the operator's choosing, so they cannot be fixed fields of ``Config``:
#: each is validated against this per-route schema and lands in
#: ``Config.routes`` (name -> Section).  Scopes are checked on every
#: request and the table is rebuilt on reload, so no key decides trust.
ROUTE_SCHEMA: dict[str, Key] = {
    "match": Key(route_prefixes, REQUIRED, trust=False),
    "methods": Key(methods, "", trust=False),
    "upstream": Key(optional_http_url, "", trust=False),
    "auth": Key(one_of("required", "optional", "none"), "required",
                trust=False),
    "required_scopes": Key(route_scopes, "\0inherit", trust=False),
    "claim_headers": Key(claim_headers, "", trust=False),
    "strip_prefix": Key(boolean, "no", trust=False),
    # DESIGN section 9's route override: no: this route is as without
    # [cors] (preflights forwarded with no Authorization, no
    # Access-Control-* added).  Which answers browsers may read, not which
    # token is valid: trust=False.
    "cors": Key(boolean, "yes", trust=False),
}
_check_schema({"route NAME": ROUTE_SCHEMA})
_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
#: Bounds the route label of /metrics too.
MAX_ROUTES = 1000


class Section:
    """An immutable bag of parsed values; attribute names are ini keys."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError("[%s] has no key %r" % (self._name, key))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("configuration is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and (
            self._name, dict(self._values)) == (other._name, dict(other._values))

    def __hash__(self) -> int:
        return hash(self._name)

    def __repr__(self) -> str:
        shown = {k: ("<hidden>" if "secret" in k and v else v)
                 for k, v in self._values.items()}
        return "Section(%r, %r)" % (self._name, shown)


@dataclass(frozen=True)
class Config:
    path: str
    phantomd: Section
    introspection: Section
    minting: Section
    cache: Section
    metrics: Section
    log: Section
    shared_cache: Section
    revocation: Section
    dpop: Section
    forward_auth: Section
    cors: Section
    client_secret: Optional[str]  # resolved from client_secret or its file
    # [route NAME] sections, in file order: name -> Section (ROUTE_SCHEMA).
    routes: Mapping[str, Section] = field(
        default_factory=lambda: MappingProxyType({}))
    # (section, key) -> SHA-256 hex of the file's contents when loaded.
    files: Mapping[tuple[str, str], str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)


def changed(old: Config, new: Config,
            which: Callable[[Key], bool] = lambda key: True
            ) -> list[tuple[str, str]]:
    """The ``(section, key)`` pairs, among the keys ``which`` selects, whose
    value -- or, for a file, whose contents -- differ between two configs."""
    out = []
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            if which(key) and (
                    getattr(getattr(old, section), name)
                    != getattr(getattr(new, section), name)
                    or old.files.get((section, name))
                    != new.files.get((section, name))):
                out.append((section, name))
    return out


def identity(c: Config) -> tuple:
    """What makes a cached answer mean what it meant: the value of every
    ``trust=True`` key and the contents of every ``trust=True`` file."""
    return tuple((section, name, getattr(getattr(c, section), name),
                  c.files.get((section, name)))
                 for section, keys in SCHEMA.items()
                 for name, key in keys.items() if key.trust)


def exposed_secret_files(c: Config) -> list[tuple[str, str, str, int]]:
    """``(section, key, path, mode)`` of every secret or private key file
    (``secret=True`` keys, and the ``privateKey`` of ``ssl:`` listeners)
    that group or others may read."""
    found = []
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            value = getattr(getattr(c, section), name)
            if key.secret and value:
                found.append((section, name, value))
            elif key.parse in (endpoints_list, optional_endpoints):
                for d in value:
                    files = dict(endpoint_files([d]))
                    # Twisted reads the key from certKey without privateKey.
                    private = files.get("privateKey") or files.get("certKey")
                    if private:
                        found.append((section, name, private))
    out = []
    for section, name, file in found:
        try:
            mode = os.stat(file).st_mode
        except OSError:
            continue
        if mode & 0o077:
            out.append((section, name, file, mode & 0o777))
    return out


def names(pairs) -> str:
    """``[introspection] verify_jwt, [minting] key_file`` for a log line."""
    return ", ".join("[%s] %s" % pair for pair in pairs)


def load(path: str,
         overrides: Optional[Mapping[str, Mapping[str, str]]] = None
         ) -> Config:
    """Read and validate ``path``; raise ConfigError on the first mistake.
    ``overrides`` as for ``parse``.  A UTF-8 byte order mark (which some
    Windows editors write) is accepted."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(path, "", None, "cannot read: %s" % (
            e.strerror or e))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", None, "not UTF-8 text: %s" % e)
    return parse(source, path, overrides)


_COMMENT = ("#", ";")


def _refuse_indented_lines(source: str, path: str) -> None:
    """configparser reads an indented line as the continuation of the
    value above it, so ``realm = api`` followed by ``  required_scopes =
    read`` would make the realm two lines and the scope check silently
    absent.  phantomd has no multi-line values: any indented line that is
    not blank or a comment is refused, naming its line."""
    section, key = "", None
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(_COMMENT):
            continue
        if line[0].isspace():
            after = (" (it would continue the value of %s)" % key
                     if key else "")
            raise ConfigError(path, section, None,
                              "line %d is indented%s: remove the leading "
                              "whitespace" % (number, after))
        if stripped.startswith("["):
            section, key = stripped.strip("[]").strip(), None
        else:
            key = stripped.split("=", 1)[0].strip()


def _did_you_mean(word: str, known, hint: str = "") -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if close:
        return "did you mean %s?" % close[0]
    return hint


def _refuse_unknown(cp: configparser.ConfigParser, path: str) -> None:
    for section in cp.sections():
        if section.startswith("route ") or section == "route":
            _refuse_unknown_route(cp, path, section)
            continue
        if section not in SCHEMA:
            raise ConfigError(path, section, None, "unknown section; %s" % (
                _did_you_mean(section, SCHEMA, "known sections: %s"
                              % ", ".join(SCHEMA))))
        for key in cp[section]:
            if key in SCHEMA[section]:
                continue
            elsewhere = [s for s in SCHEMA if key in SCHEMA[s]]
            hint = _did_you_mean(key, SCHEMA[section])
            if not hint and elsewhere:
                hint = "it is a key of [%s]" % elsewhere[0]
            raise ConfigError(path, section, key, "unknown key" + (
                "; " + hint if hint else ""))


def _refuse_unknown_route(cp: configparser.ConfigParser, path: str,
                          section: str) -> None:
    name = section[len("route"):].strip()
    if not _ROUTE_NAME.match(name):
        raise ConfigError(path, section, None,
                          "a route section is [route NAME], NAME being 1 to "
                          "64 letters, digits, '.', '_' or '-'")
    for key in cp[section]:
        if key not in ROUTE_SCHEMA:
            hint = _did_you_mean(key, ROUTE_SCHEMA, "route keys: %s"
                                 % ", ".join(ROUTE_SCHEMA))
            raise ConfigError(path, section, key, "unknown key; " + hint)


def _value(path: str, section: str, key: str, spec: Key,
           raw: Optional[str]) -> Any:
    """One key's parsed value: ``raw`` as written (None: absent), else its
    default; a required key left out or empty is an error."""
    if raw is None or (raw == "" and spec.default is REQUIRED):
        if spec.default is REQUIRED:
            raise ConfigError(path, section, key, "is required")
        raw = spec.default
    try:
        return spec.parse(raw)
    except _Invalid as e:
        raise ConfigError(path, section, key, str(e))


def _parse_routes(cp: configparser.ConfigParser, path: str,
                  phantomd: Section) -> Mapping[str, Section]:
    out: dict[str, Section] = {}
    seen: dict = {}
    for section in cp.sections():
        if not section.startswith("route "):
            continue
        name = section[len("route"):].strip()
        if name in out or name == "default":
            raise ConfigError(path, section, None, "route name %r is %s" % (
                name, "taken by the unmatched requests' label"
                if name == "default" else "used twice"))
        values = {key: _value(path, section, key, spec, cp.get(
            section, key).strip() if cp.has_option(section, key) else None)
            for key, spec in ROUTE_SCHEMA.items()}
        r = Section(section, values)
        if r.auth == "none" and r.required_scopes:
            raise ConfigError(path, section, "required_scopes",
                              "cannot apply with auth = none (no token is "
                              "checked)")
        if r.auth == "none" and r.claim_headers:
            raise ConfigError(path, section, "claim_headers",
                              "cannot apply with auth = none (no token, so "
                              "no claims)")
        for prefix in r.match:
            for other, other_methods in seen.get(prefix, ()):
                if r.methods is None or other_methods is None or \
                        r.methods & other_methods:
                    raise ConfigError(
                        path, section, "match", "/%s is also matched by "
                        "[route %s] for the same methods: which wins would "
                        "be a guess" % (b"/".join(prefix).decode(), other))
            seen.setdefault(prefix, []).append((name, r.methods))
        out[name] = r
        if len(out) > MAX_ROUTES:
            raise ConfigError(path, section, None,
                              "more than %d routes" % MAX_ROUTES)
    return MappingProxyType(out)


#: Parameters of a Twisted ``ssl:`` server endpoint that name files.
_SSL_FILE_PARAMETERS = ("privateKey", "certKey", "extraCertChain",
                        "dhParameters")


def endpoint_files(descriptions) -> list[tuple[str, str]]:
    """``(parameter, path)`` for every file the ``ssl:`` endpoints among
    ``descriptions`` name (the listener's certificate and key)."""
    out = []
    for d in descriptions:
        if not d.startswith("ssl:"):
            continue
        for part in re.split(r"(?<!\\):", d):
            name, eq, value = part.partition("=")
            if eq and name in _SSL_FILE_PARAMETERS and value:
                out.append((name, value.replace("\\:", ":")))
    return out


def _file_digests(path: str, sections: Mapping[str, Section]
                  ) -> Mapping[tuple[str, str], str]:
    """SHA-256 of every file the config names, as read now: a reload
    compares contents, so a key rotated in place is seen.  For a listen
    key, one digest covers the files its ``ssl:`` endpoints name."""
    out: dict[tuple[str, str], str] = {}
    for name, keys in SCHEMA.items():
        for key, spec in keys.items():
            value = getattr(sections[name], key)
            if spec.parse in (endpoints_list, optional_endpoints):
                digest = hashlib.sha256()
                for _, file in endpoint_files(value):
                    try:
                        with open(file, "rb") as f:
                            digest.update(hashlib.sha256(f.read()).digest())
                    except OSError:
                        digest.update(b"unreadable")
                out[(name, key)] = digest.hexdigest()
                continue
            if spec.parse is not readable_file or not value:
                continue
            try:
                with open(value, "rb") as f:
                    out[(name, key)] = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                raise ConfigError(path, name, key, "cannot read %r: %s" % (
                    value, e.strerror or e))
    return MappingProxyType(out)


def parse(source: str, path: str = "<string>",
          overrides: Optional[Mapping[str, Mapping[str, str]]] = None
          ) -> Config:
    """Parse ini text.  ``overrides`` (section -> key -> raw value) wins
    over the file; the demo uses it to point at its own loopback ports."""
    source = source.removeprefix("\ufeff")
    _refuse_indented_lines(source, path)
    cp = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        inline_comment_prefixes=_COMMENT, comment_prefixes=_COMMENT,
        default_section="\0none")
    cp.optionxform = str  # keys are case-sensitive, as documented
    try:
        cp.read_string(source, source=path)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option,
                          "appears twice (line %s)" % e.lineno)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None,
                          "section appears twice (line %s)" % e.lineno)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, "", None,
                          "line %s: a key before any [section]" % e.lineno)
    except configparser.Error as e:
        raise ConfigError(path, "", None, str(e).replace("\n", " "))

    _refuse_unknown(cp, path)

    sections: dict[str, Section] = {}
    for name, keys in SCHEMA.items():
        values: dict[str, Any] = {}
        for key, spec in keys.items():
            raw = None
            if overrides and key in overrides.get(name, {}):
                raw = overrides[name][key]
            elif cp.has_option(name, key):
                raw = cp.get(name, key).strip()
            values[key] = _value(path, name, key, spec, raw)
        sections[name] = Section(name, values)

    config = _cross_checks(path, sections)
    routes = _parse_routes(cp, path, sections["phantomd"])
    if routes:
        # Without [phantomd] upstream ([forward_auth] only) the routes
        # still decide each check's scopes and auth.
        from dataclasses import replace
        config = replace(config, routes=routes)
    return config


def _cross_checks(path: str, s: dict[str, Section]) -> Config:
    intro = s["introspection"]
    secret = intro.client_secret
    if intro.client_secret and intro.client_secret_file:
        raise ConfigError(path, "introspection", "client_secret_file",
                          "give client_secret or client_secret_file, not both")
    if intro.client_secret_file:
        try:
            with open(intro.client_secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(path, "introspection", "client_secret_file",
                              "cannot read %r: %s" % (
                                  intro.client_secret_file, e))
        if not secret:
            raise ConfigError(path, "introspection", "client_secret_file",
                              "%r is empty" % intro.client_secret_file)
    if intro.auth_method in ("client_secret_basic", "client_secret_post") \
            and not secret:
        raise ConfigError(path, "introspection", "client_secret",
                          "is required for auth_method = %s (or set "
                          "client_secret_file)" % intro.auth_method)
    if intro.auth_method == "private_key_jwt" and not intro.private_key_file:
        raise ConfigError(path, "introspection", "private_key_file",
                          "is required for auth_method = private_key_jwt")
    if intro.auth_method == "tls_client_auth" and not (
            intro.client_cert and intro.client_key):
        raise ConfigError(path, "introspection", "client_cert",
                          "client_cert and client_key are required for "
                          "auth_method = tls_client_auth")
    for sec, cert, key in (("introspection", "client_cert", "client_key"),
                           ("phantomd", "upstream_client_cert",
                            "upstream_client_key")):
        if bool(getattr(s[sec], cert)) != bool(getattr(s[sec], key)):
            raise ConfigError(path, sec, key,
                              "%s and %s go together" % (cert, key))
    if intro.response in ("json", "token-introspection+jwt") \
            and not s["minting"].key_file:
        raise ConfigError(path, "minting", "key_file",
                          "is required for [introspection] response = %s "
                          "(phantomd signs the JWT the API receives)"
                          % intro.response)
    if intro.response in ("json", "token-introspection+jwt") \
            and not s["minting"].issuer:
        raise ConfigError(path, "minting", "issuer",
                          "is required for [introspection] response = %s "
                          "(the iss of the JWTs phantomd signs)"
                          % intro.response)
    if intro.verify_jwt and not (intro.jwks_url or intro.issuer):
        raise ConfigError(path, "introspection", "jwks_url",
                          "is required for verify_jwt = yes (or set issuer "
                          "to discover it)")
    if intro.response == "token-introspection+jwt" and not intro.issuer:
        raise ConfigError(path, "introspection", "issuer",
                          "is required for response = token-introspection+jwt")
    if intro.jwks_url and intro.issuer and \
            urlsplit(intro.issuer).scheme == "https" and \
            urlsplit(intro.jwks_url).scheme != "https":
        # As discovery refuses an http jwks_uri from an https issuer: keys
        # fetched in clear let anyone on the path have forged JWTs trusted.
        raise ConfigError(path, "introspection", "jwks_url",
                          "%r is not https although issuer %r is: the keys "
                          "that verify its JWTs must come over TLS too"
                          % (intro.jwks_url, intro.issuer))
    fa = s["forward_auth"]
    if not s["phantomd"].upstream and not fa.listen:
        raise ConfigError(path, "phantomd", "upstream",
                          "is required (unless [forward_auth] listen is "
                          "set: phantomd then only answers checks)")
    if not s["phantomd"].upstream and s["phantomd"].workers > 1:
        raise ConfigError(path, "phantomd", "workers",
                          "> 1 needs [phantomd] upstream (forward-auth "
                          "checks are answered by the parent process)")
    if fa.listen and not fa.allow_from:
        raise ConfigError(path, "forward_auth", "allow_from",
                          "is empty, so no proxy could ask; list the "
                          "proxies' networks")
    if fa.secret_file:
        from phantomd.http.forward_auth import read_secret
        try:
            read_secret(fa.secret_file)
        except ValueError as e:
            raise ConfigError(path, "forward_auth", "secret_file", str(e))
    _token_service_checks(path, s)
    _cors_checks(path, s["cors"])
    shared = s["shared_cache"]
    if shared.url and not shared.secret_file:
        raise ConfigError(path, "shared_cache", "secret_file",
                          "is required with url (the same file on every "
                          "host of the fleet)")
    return Config(path=path, client_secret=secret,
                  files=_file_digests(path, s), **s)


def _cors_checks(path: str, cors: Section) -> None:
    if not cors.allow_origins:
        for key, spec in SCHEMA["cors"].items():
            if getattr(cors, key) != spec.parse(spec.default):
                raise ConfigError(path, "cors", key,
                                  "has no effect without allow_origins "
                                  "(CORS is off)")
        return
    if cors.allow_credentials and cors.allow_origins == ("*",):
        raise ConfigError(path, "cors", "allow_credentials",
                          "yes cannot go with allow_origins = * (browsers "
                          "refuse it, and it would let every site act as "
                          "the user): list the origins")


def _token_service_checks(path: str, s: dict[str, Section]) -> None:
    """DESIGN section 14: a key that cannot apply to the rest of the file
    is a mistake the operator should hear about, not a silent no-op."""
    intro, minting, cache = s["introspection"], s["minting"], s["cache"]
    if intro.basic_auth_encoding == "raw":
        if intro.auth_method != "client_secret_basic":
            raise ConfigError(path, "introspection", "basic_auth_encoding",
                              "raw applies to auth_method = "
                              "client_secret_basic only (auth_method is %s)"
                              % intro.auth_method)
        if ":" in intro.client_id:
            raise ConfigError(path, "introspection", "client_id",
                              "contains ':', which basic_auth_encoding = raw "
                              "cannot send (the token service would split "
                              "the id there); use form")
    if intro.assertion_audience and intro.auth_method != "private_key_jwt":
        raise ConfigError(path, "introspection", "assertion_audience",
                          "applies to auth_method = private_key_jwt only "
                          "(auth_method is %s)" % intro.auth_method)
    if intro.phantom_token_field != "phantom_token" \
            and intro.response != "phantom_token":
        raise ConfigError(path, "introspection", "phantom_token_field",
                          "applies to response = phantom_token only "
                          "(response is %s)" % intro.response)
    minted = intro.response in ("json", "token-introspection+jwt")
    if intro.verify_jwt and minted:
        raise ConfigError(path, "introspection", "verify_jwt",
                          "applies to response = jwt or phantom_token (the "
                          "token service's JWT); with response = %s "
                          "phantomd signs the JWT itself" % intro.response)
    if minting.force_audience:
        if not minted:
            raise ConfigError(path, "minting", "force_audience",
                              "applies only when phantomd mints the JWT "
                              "(response = json or token-introspection+jwt; "
                              "response is %s)" % intro.response)
        if not minting.audience:
            raise ConfigError(path, "minting", "audience",
                              "is required for force_audience = yes")
    if cache.min_ttl > cache.max_ttl:
        raise ConfigError(path, "cache", "min_ttl",
                          "%g is above max_ttl (%g): the floor cannot be "
                          "higher than the ceiling" % (
                              cache.min_ttl, cache.max_ttl))
