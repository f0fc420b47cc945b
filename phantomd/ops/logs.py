"""Where log events go, and in what shape ([log] format, [log] access).

Three observers for ``twisted.logger``, chosen by ``observer_for``:

* text (the default): ``2026-11-22T15:10:00+0000 [namespace#info] message``;
* JSON lines (``format = json``): one object per event with ``time``,
  ``level``, ``namespace``, ``message`` and the event's own fields;
* journald-friendly: when stdout is the journal (``JOURNAL_STREAM`` names
  it) every line starts with a ``<N>`` syslog priority so ``journalctl -p``
  works, and the timestamp is left to journald.

Secrets never reach an observer's output by accident: fields named like
``token``, ``jwt`` or ``client_secret`` are dropped from JSON and shown as
``<redacted>`` if a format string names them, and field values that are not
plain data are written as their type name, because the ``repr`` of an
outcome or a request would carry a JWT or an Authorization header.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import IO, Any, Callable, Mapping, Optional

from twisted.application.service import MultiService
from twisted.logger import (
    ILogObserver, LogLevel, Logger, formatEvent, formatEventAsClassicLogText)
from twisted.python.components import Componentized
from zope.interface import implementer

SENSITIVE = frozenset({
    "token", "jwt", "secret", "authorization", "client_secret",
    "access_token", "refresh_token", "password", "phantom_token",
})
REDACTED = "<redacted>"

# syslog(3) priorities, as journald reads them from a "<N>" line prefix.
PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

_MAX_DEPTH = 4


class Throttle:
    """At most one log line per key per ``interval`` seconds of ``clock``.

    ``admit(key)`` is None when the line should be dropped, else how many
    were dropped for that key since the last one logged.  An outage fails
    every request; one line per request would flood the log.  At most
    ``max_keys`` keys are remembered: at the bound the map is emptied.
    """

    def __init__(self, clock: Any, interval: float,
                 max_keys: int = 64) -> None:
        self._clock = clock
        self.interval = interval
        self._max_keys = max_keys
        self._seen: dict[Any, list] = {}

    def admit(self, key: Any = None) -> Optional[int]:
        now = self._clock.seconds()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return None
        if seen is None and len(self._seen) >= self._max_keys:
            self._seen.clear()
        self._seen[key] = [now, 0]
        return seen[1] if seen is not None else 0


def is_sensitive(name: str) -> bool:
    return name.lower() in SENSITIVE


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` keeping only plain data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= _MAX_DEPTH:
        return "<%s>" % type(value).__name__
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()
                if not is_sensitive(str(k))}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return "%s: %s" % (type(value).__name__, value)
    return "<%s>" % type(value).__name__


def redacted(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``event`` whose sensitive fields read ``<redacted>``."""
    return {k: (REDACTED if is_sensitive(k) else v) for k, v in event.items()}


def _message(event: Mapping[str, Any]) -> str:
    text = formatEvent(redacted(event))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback()
        except Exception:
            text += "\n(unformattable failure)"
    return text


def _utc(when: Any) -> str:
    """ISO 8601 in UTC whatever the host's time zone (twisted's formatTime
    uses local time)."""
    if not isinstance(when, (int, float)):
        return "-"
    return datetime.fromtimestamp(when, timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _level(event: Mapping[str, Any]) -> LogLevel:
    level = event.get("log_level")
    return level if level in PRIORITY else LogLevel.info


@implementer(ILogObserver)
class JSONLinesObserver:
    """One JSON object per event, one event per line.

    ``time`` is ISO 8601 UTC; ``message`` is the formatted text (with the
    traceback for failures); other fields are the event's own, minus
    twisted's ``log_*`` bookkeeping and anything sensitive.
    """

    def __init__(self, stream: IO[str], prefix: bool = False) -> None:
        self._stream = stream
        self._prefix = prefix

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = _level(event)
        record: dict[str, Any] = {
            "time": _utc(event.get("log_time")),
            "level": level.name,
            "namespace": event.get("log_namespace", "-"),
            "message": _message(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record or is_sensitive(key):
                continue
            record[key] = _plain(value)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        if self._prefix:
            line = "<%d>%s" % (PRIORITY[level], line)
        self._stream.write(line + "\n")
        self._stream.flush()


@implementer(ILogObserver)
class TextObserver:
    """Classic twisted text lines; with ``journal=True`` each line gets a
    ``<N>`` priority prefix and no timestamp (journald stamps its own)."""

    def __init__(self, stream: IO[str], journal: bool = False) -> None:
        self._stream = stream
        self._journal = journal

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self._journal:
            text = "[%s] %s" % (event.get("log_namespace", "-"),
                                _message(event))
            prefix = "<%d>" % PRIORITY[_level(event)]
            out = "".join(prefix + line + "\n" for line in text.splitlines())
        else:
            safe = redacted(event)
            safe["log_format"] = "{_phantomd_message}"
            safe["_phantomd_message"] = _message(event)
            safe.pop("log_failure", None)
            out = formatEventAsClassicLogText(safe)
            if out is None:
                return
        self._stream.write(out)
        self._stream.flush()


def journal_stream_matches(environ: Mapping[str, str], stream: IO[str]
                           ) -> bool:
    """True when ``stream`` is the journal's stream socket.

    systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` for a service whose output
    goes to the journal; a process whose output was redirected elsewhere
    still inherits the variable, so the stream's own identity is checked.
    """
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


#: ``[log] level`` names, least to most severe.
LEVELS = ("debug", "info", "warn", "error")
_RANK = {getattr(LogLevel, name): rank for rank, name in enumerate(LEVELS)}
_RANK[LogLevel.critical] = len(LEVELS)

ACCESS_NAMESPACE = "phantomd.access"


@implementer(ILogObserver)
class LevelFilter:
    """Passes events of ``level`` or more severe.  Access-log lines always
    pass: ``[log] access = yes`` asks for them whatever the level."""

    def __init__(self, observer: ILogObserver, level: str) -> None:
        self.observer = observer
        self.rank = LEVELS.index(level)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if _RANK.get(_level(event), 1) >= self.rank or \
                event.get("log_namespace") == ACCESS_NAMESPACE:
            self.observer(event)


def observer_for(log_settings, stream: IO[str],
                 environ: Mapping[str, str]) -> ILogObserver:
    """The observer ``[log] format`` and ``[log] level`` ask for, on
    ``stream``."""
    journal = journal_stream_matches(environ, stream)
    if log_settings.format == "json":
        out: ILogObserver = JSONLinesObserver(stream, prefix=journal)
    else:
        out = TextObserver(stream, journal=journal)
    level = getattr(log_settings, "level", "info")
    return out if level == "debug" else LevelFilter(out, level)


@implementer(ILogObserver)
class SwitchableObserver:
    """Forwards events to one observer that a reload may replace."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: Mapping[str, Any]) -> None:
        self.observer(event)


# -- the access log -----------------------------------------------------------

ACCESS_FIELDS = ("client", "method", "path", "status", "duration",
                 "upstream_duration", "cache", "token_id", "bytes_sent",
                 "request_id", "end")

_QUERY_SECRETS = ("access_token", "token", "code", "client_secret",
                  "refresh_token", "id_token")


def _printable(text: Any) -> str:
    """``text`` with every byte that is not visible ASCII %-escaped, so a
    field can neither break the line nor forge another field."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return "".join(c if 0x20 < ord(c) < 0x7F else "%%%02X" % (ord(c) & 0xFF)
                   for c in str(text))


def _clean_path(path: Any) -> str:
    """The request path as printable text, with credentials that RFC 6750
    section 2.3 lets clients put in the query replaced by ``<redacted>``."""
    path = _printable(path)
    base, sep, query = path.partition("?")
    if not sep:
        return base
    parts = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and name.lower() in _QUERY_SECRETS:
            pair = name + "=" + REDACTED
        parts.append(pair)
    return base + "?" + "&".join(parts)


def _ms(seconds: Any) -> Optional[float]:
    if isinstance(seconds, (int, float)):
        return round(seconds * 1000, 3)
    return None


_ACCESS_FORMAT = (
    "{client} {method} {path} {status} {bytes_sent}B {duration_ms}ms"
    " upstream={upstream} cache={cache} token_id={token_id}"
    " request_id={request_id} end={end}")
# No status line went out (the request was cut first): JSON says null.
_ACCESS_FORMAT_NO_STATUS = _ACCESS_FORMAT.replace("{status}", "-")


class AccessLog:
    """Turns the front's per-request dict into one ``phantomd.access`` event.

    Only the fields in ``ACCESS_FIELDS`` are kept, so whatever else the front
    puts in the dict (headers, the outcome) cannot leak into the log.
    Durations arrive in seconds and are logged as ``duration_ms`` and
    ``upstream_ms``.  A field the request never got (no method read, no
    status sent, no token) reads ``-``; ``end`` says how the request ended
    (``ok``, ``aborted``, ``client_closed``, ``drain``).  Holds nothing
    between requests.
    """

    def __init__(self, logger: Optional[Logger] = None) -> None:
        self._log = logger or Logger(namespace=ACCESS_NAMESPACE)

    def __call__(self, record: Mapping[str, Any]) -> None:
        method = record.get("method", "-")
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        upstream_ms = _ms(record.get("upstream_duration"))
        status = record.get("status")
        self._log.info(
            _ACCESS_FORMAT if status is not None else _ACCESS_FORMAT_NO_STATUS,
            client=_printable(record.get("client") or "-"),
            method=_printable(method or "-"),
            path=_clean_path(record.get("path") or "-"),
            status=status,
            bytes_sent=record.get("bytes_sent", 0),
            duration_ms=_ms(record.get("duration")),
            upstream_ms=upstream_ms,
            upstream="-" if upstream_ms is None else "%sms" % upstream_ms,
            cache=record.get("cache") or "-",
            token_id=record.get("token_id") or "-",
            request_id=_printable(record.get("request_id") or "-"),
            end=record.get("end") or "ok",
        )


def access_logger(log_settings) -> Optional[Callable[[Mapping[str, Any]],
                                                      None]]:
    """An ``AccessLog`` when ``[log] access = yes``, else None."""
    return AccessLog() if log_settings.access else None


class ObservedService(MultiService):
    """A top-level service that chooses twistd's log observer.

    twistd creates the application, attaches the plugin's service to it,
    then starts logging with the application's ``ILogObserver`` component
    if it has one, else with plain text on stdout.  Registering ours while
    being attached is the one moment a plugin can choose it, so every event
    (twistd's own included) goes through it and no other.  ``reconfigure``
    applies a reloaded ``[log]`` section.
    """

    def __init__(self, log_settings, stream: IO[str],
                 environ: Mapping[str, str]) -> None:
        super().__init__()
        self._stream = stream
        self._environ = environ
        self.observer = SwitchableObserver(
            observer_for(log_settings, stream, environ))

    def reconfigure(self, log_settings) -> None:
        self.observer.observer = observer_for(log_settings, self._stream,
                                              self._environ)

    def setServiceParent(self, parent) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
