"""How long an introspection answer stays fresh (RFC 9111, shared cache).

``freshness_lifetime`` is a pure function of the response headers and the
clock value: it never raises, never returns a negative number, and a
malformed or contradictory header never earns a longer lifetime than the
well-formed equivalent would.  The choices, all conservative:

* ``no-store``, ``no-cache`` and ``private`` (bare or with a field list)
  mean 0: not stored.
* ``s-maxage`` wins over ``max-age``; ``Expires`` − ``Date`` is used only
  when neither is present.  ``Date`` missing: ``now`` stands in for it.
* ``Age`` is subtracted from whichever lifetime applies (RFC 9111 section
  4.2: fresh while lifetime > current age).
* A directive or header that is malformed (``max-age=abc``, ``max-age=-1``,
  ``max-age=1.5``, an unparsable ``Cache-Control`` list, a bad date) makes
  the answer stale, 0 -- RFC 9111 section 4.2.1 encourages exactly that,
  and section 5.3 says an invalid ``Expires`` means "already expired".
* The same directive or header given twice with different values (across
  lines or within one) also means stale, 0 (the second option RFC 9111
  section 4.2.1 allows); identical repeats are harmless.
* ``None`` only when there is no freshness information at all, so the
  caller can apply its own default.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["freshness_lifetime", "floor_applies", "parse_http_date"]

# RFC 9111 section 1.2.2: delta-seconds too large to represent are 2**31.
_DELTA_MAX = 2 ** 31

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_DIRECTIVE = re.compile(
    r"[ \t]*(%s)(?:=(%s|%s))?[ \t]*(?:,|$)" % (_TOKEN, _TOKEN, _QUOTED),
    re.ASCII)
_EMPTY_ELEMENT = re.compile(r"[ \t]*,", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


HeaderValues = Sequence[Union[str, bytes]]


class _Stale(Exception):
    """Internal: the headers make the answer stale (malformed/conflicting)."""


def freshness_lifetime(headers: Mapping[str, HeaderValues],
                       now: float) -> Optional[float]:
    """Seconds the answer may be reused from now, 0 for "do not store",
    None for "the headers say nothing about freshness".

    ``headers`` maps lower-case names to every value received for them.
    """
    try:
        return _lifetime(headers, now)
    except _Stale:
        return 0.0


def floor_applies(headers: Mapping[str, HeaderValues], now: float) -> bool:
    """True when the answer is marked ``no-store`` or ``no-cache``, or says
    nothing about freshness: the answers ``[cache] min_ttl`` may keep.

    An explicit lifetime (``max-age=0`` included), ``private`` alone, and a
    malformed or contradictory header are the token service's word and
    stay as ``freshness_lifetime`` reads them.
    """
    try:
        directives = _cache_control(_values(headers, "cache-control"))
    except _Stale:
        return False
    if "no-store" in directives or "no-cache" in directives:
        return True
    return freshness_lifetime(headers, now) is None


def freshness(headers: Mapping[str, HeaderValues], now: float
              ) -> tuple[Optional[float], bool]:
    """``(freshness_lifetime(headers, now), floor_applies(headers, now))``
    from one reading of the headers (the introspector wants both for every
    answer)."""
    try:
        directives = _cache_control(_values(headers, "cache-control"))
        if "no-store" in directives or "no-cache" in directives:
            return 0.0, True
        lifetime = _lifetime_from(directives, headers, now)
    except _Stale:
        return 0.0, False
    return lifetime, lifetime is None


def _lifetime(headers: Mapping[str, HeaderValues],
              now: float) -> Optional[float]:
    return _lifetime_from(_cache_control(_values(headers, "cache-control")),
                          headers, now)


def _lifetime_from(directives: Mapping[str, Any],
                   headers: Mapping[str, HeaderValues],
                   now: float) -> Optional[float]:
    if "no-store" in directives or "no-cache" in directives \
            or "private" in directives:
        return 0.0

    lifetime: Optional[float]
    if "s-maxage" in directives:
        lifetime = _delta_seconds(directives["s-maxage"])
    elif "max-age" in directives:
        lifetime = _delta_seconds(directives["max-age"])
    else:
        expires = _single(_values(headers, "expires"))
        if expires is None:
            return None
        expires_at = parse_http_date(expires, now)
        if expires_at is None:
            raise _Stale()
        date = _single(_values(headers, "date"))
        if date is None:
            date_at = now
        else:
            parsed = parse_http_date(date, now)
            if parsed is None:
                raise _Stale()
            date_at = parsed
        lifetime = expires_at - date_at

    if headers.get("age"):  # seldom sent by a token service
        age = _single(_values(headers, "age"))
        if age is not None:
            lifetime -= _delta_seconds(age)
    return max(0.0, float(lifetime))


def _values(headers: Mapping[str, HeaderValues], name: str) -> list[str]:
    raw = headers.get(name) or ()
    if type(raw) is list and len(raw) == 1 and type(raw[0]) is str:
        return raw  # as the HTTP client gives one line: nothing to decode
    if isinstance(raw, (str, bytes)):
        raw = (raw,)
    return [v.decode("latin-1") if isinstance(v, bytes) else str(v)
            for v in raw]


def _single(values: list[str]) -> Optional[str]:
    """The one value of a singleton header; differing repeats are stale."""
    distinct = {v.strip() for v in values}
    if not distinct:
        return None
    if len(distinct) > 1:
        raise _Stale()
    return distinct.pop()


_PARSED: dict[tuple[str, ...], Optional[dict[str, Optional[str]]]] = {}
"""Cache-Control values already parsed (None: stale): a token service sends
the same one or two on every answer.  Only values of up to
``_MAX_PARSED_CHARS`` in all are kept; emptied at ``_MAX_PARSED``."""

_MAX_PARSED = 64
_MAX_PARSED_CHARS = 256


def _cache_control(values: list[str]) -> dict[str, Optional[str]]:
    """Directive name (lower-case) -> argument (unquoted) or None; the
    dict is shared, never to be changed.

    A syntax error anywhere, or a directive repeated with a different
    argument, makes the answer stale.
    """
    key = tuple(values)
    try:
        out = _PARSED[key]
    except KeyError:
        try:
            out = _parse_cache_control(values)
        except _Stale:
            out = None
        if sum(map(len, key)) <= _MAX_PARSED_CHARS:
            if len(_PARSED) >= _MAX_PARSED:
                _PARSED.clear()
            _PARSED[key] = out
    if out is None:
        raise _Stale()
    return out


def _parse_cache_control(values: list[str]) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for line in values:
        pos, end = 0, len(line)
        while pos < end:
            empty = _EMPTY_ELEMENT.match(line, pos)
            if empty:
                pos = empty.end()
                continue
            if not line[pos:].strip(" \t"):
                break
            m = _DIRECTIVE.match(line, pos)
            if m is None or m.end() == pos:
                raise _Stale()
            pos = m.end()
            name, arg = m.group(1).lower(), m.group(2)
            if arg is not None and arg.startswith('"'):
                arg = re.sub(r"\\(.)", r"\1", arg[1:-1])
            if name in out and out[name] != arg:
                raise _Stale()
            out[name] = arg
    return out


def _delta_seconds(arg: Optional[str]) -> int:
    if arg is None or not _DIGITS.fullmatch(arg):
        raise _Stale()
    return min(int(arg), _DELTA_MAX)


# -- HTTP-date (RFC 9110 section 5.6.7) ---------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF = re.compile(r"%s, ([0-9]{2}) %s ([0-9]{4}) %s GMT" % (_DAY, _MON, _TIME),
                  re.ASCII)
_RFC850 = re.compile(r"%s, ([0-9]{2})-%s-([0-9]{2}) %s GMT"
                     % (_LONG_DAY, _MON, _TIME), re.ASCII)
_ASCTIME = re.compile(r"%s %s ([0-9 ][0-9]) %s ([0-9]{4})"
                      % (_DAY, _MON, _TIME), re.ASCII)


def parse_http_date(value: str, now: float) -> Optional[float]:
    """POSIX seconds for an HTTP-date in any of its three forms, else None.

    ``now`` resolves the two-digit years of the obsolete RFC 850 form: a
    date more than 50 years in the future is taken from the past century.
    """
    m = _IMF.fullmatch(value)
    if m:
        day, mon, year, hh, mm, ss = m.groups()
    else:
        m = _RFC850.fullmatch(value)
        if m:
            day, mon, yy, hh, mm, ss = m.groups()
            year = str(_full_year(int(yy), now))
        else:
            m = _ASCTIME.fullmatch(value)
            if not m:
                return None
            mon, day, hh, mm, ss, year = m.groups()
    fields = (int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    if not _valid(*fields):
        return None
    return float(calendar.timegm(fields + (0, 0, 0)))


def _full_year(yy: int, now: float) -> int:
    try:
        this_year = time.gmtime(now).tm_year
    except (OverflowError, ValueError, OSError):
        this_year = 1970
    year = this_year - this_year % 100 + yy
    if year > this_year + 50:
        year -= 100
    return year


def _valid(year: int, month: int, day: int, hh: int, mm: int,
           ss: int) -> bool:
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return False
    return hh < 24 and mm < 60 and ss < 61
