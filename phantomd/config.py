"""The ini file (DESIGN section 3), parsed once into immutable values.

Every key is declared in ``SCHEMA`` with its parser and default; a key that is
not declared, a section that is not declared, a value a parser refuses, or a
cross-key rule that fails raises ``ConfigError`` whose message is one line
naming the file, the section and the key.  Attribute names equal ini keys, so
``config.introspection.max_in_flight`` is ``[introspection] max_in_flight``.
"""

from __future__ import annotations

import configparser
import math
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional
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


# -- the schema ---------------------------------------------------------------

SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], Any]]] = {
    "phantomd": {
        "listen": (endpoints_list, "tcp:8080:interface=127.0.0.1:backlog=1024"),
        "upstream": (http_url, REQUIRED),
        "realm": (text, "api"),
        "required_scopes": (scopes, ""),
        "workers": (workers, "1"),
        "header_timeout": (positive_float, "10"),
        "idle_timeout": (positive_float, "60"),
        "drain_timeout": (non_negative_float, "30"),
        "max_connections": (positive_int, "10000"),
        "max_request_line": (_number(int, 256, 1 << 20), "8192"),
        "max_header_bytes": (_number(int, 1024, 1 << 24), "65536"),
        "max_headers": (_number(int, 8, 10000), "100"),
        "upstream_timeout": (positive_float, "60"),
        "upstream_connect_timeout": (positive_float, "5"),
        "upstream_max_idle": (non_negative_int, "100"),
        "upstream_idle_timeout": (positive_float, "1.5"),
        "upstream_ca_file": (readable_file, ""),
        "upstream_client_cert": (readable_file, ""),
        "upstream_client_key": (readable_file, ""),
    },
    "introspection": {
        "url": (http_url, REQUIRED),
        "client_id": (text, REQUIRED),
        "client_secret": (optional_text, ""),
        "client_secret_file": (readable_file, ""),
        "auth_method": (one_of("client_secret_basic", "client_secret_post",
                               "private_key_jwt", "tls_client_auth"),
                        "client_secret_basic"),
        "response": (one_of("jwt", "phantom_token", "token-introspection+jwt",
                            "json"), "jwt"),
        "timeout": (positive_float, "5"),
        "max_in_flight": (positive_int, "256"),
        "max_response_bytes": (_number(int, 256, 1 << 24), "65536"),
        "issuer": (optional_text, ""),
        "jwks_url": (optional_http_url, ""),
        "token_type_hint": (optional_text, ""),
        "verify_jwt": (boolean, "no"),
        "ca_file": (readable_file, ""),
        "client_cert": (readable_file, ""),
        "client_key": (readable_file, ""),
        "private_key_file": (readable_file, ""),
        "private_key_alg": (one_of("RS256", "PS256", "ES256", "EdDSA"),
                            "RS256"),
        "basic_auth_encoding": (one_of("form", "raw"), "form"),
        "assertion_audience": (one_string, ""),
        "phantom_token_field": (json_member, "phantom_token"),
        "accept": (accept_header, ""),
        "inactive_statuses": (inactive_statuses, "204"),
    },
    "minting": {
        "key_file": (readable_file, ""),
        "issuer": (optional_text, ""),
        "jwks_path": (url_path, "/.well-known/jwks.json"),
        "audience": (optional_text, ""),
        "lifetime": (positive_int, "300"),
        "force_audience": (boolean, "no"),
    },
    "cache": {
        "max_entries": (positive_int, "100000"),
        "max_ttl": (non_negative_float, "3600"),
        "default_ttl": (non_negative_float, "0"),
        "negative_ttl": (non_negative_float, "10"),
        "min_ttl": (non_negative_float, "0"),
    },
    "metrics": {
        "listen": (optional_endpoints, "tcp:9100:interface=127.0.0.1"),
    },
    "log": {
        "format": (one_of("text", "json"), "text"),
        "access": (boolean, "no"),
    },
}


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
    client_secret: Optional[str]  # resolved from client_secret or its file


def load(path: str,
         overrides: Optional[Mapping[str, Mapping[str, str]]] = None
         ) -> Config:
    """Read and validate ``path``; raise ConfigError on the first mistake.
    ``overrides`` as for ``parse``."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(path, "", None, "cannot read: %s" % (
            e.strerror or e))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", None, "not UTF-8 text: %s" % e)
    return parse(source, path, overrides)


def parse(source: str, path: str = "<string>",
          overrides: Optional[Mapping[str, Mapping[str, str]]] = None
          ) -> Config:
    """Parse ini text.  ``overrides`` (section -> key -> raw value) wins
    over the file; the demo uses it to point at its own loopback ports."""
    cp = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        inline_comment_prefixes=(";", "#"), default_section="\0none")
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

    for section in cp.sections():
        if section not in SCHEMA:
            raise ConfigError(path, section, None, "unknown section (known: %s)"
                              % ", ".join(SCHEMA))
        for key in cp[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(path, section, key, "unknown key")

    sections: dict[str, Section] = {}
    for name, keys in SCHEMA.items():
        values: dict[str, Any] = {}
        for key, (parser, default) in keys.items():
            raw = None
            if overrides and key in overrides.get(name, {}):
                raw = overrides[name][key]
            elif cp.has_option(name, key):
                raw = cp.get(name, key).strip()
            if raw is None or (raw == "" and default is REQUIRED):
                if default is REQUIRED:
                    raise ConfigError(path, name, key, "is required")
                raw = default
            try:
                values[key] = parser(raw)
            except _Invalid as e:
                raise ConfigError(path, name, key, str(e))
        sections[name] = Section(name, values)

    return _cross_checks(path, sections)


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
    _token_service_checks(path, s)
    return Config(path=path, client_secret=secret, **s)


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
