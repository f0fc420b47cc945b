"""Tell systemd what the service is doing (sd_notify(3)), without libsystemd.

systemd hands a ``Type=notify`` service the path of a datagram socket in
``NOTIFY_SOCKET``; each datagram is a few ``KEY=value`` lines.  When the
variable is unset (run by hand, in tests, under another supervisor) every
method here does nothing, so callers never need to ask.

Sending is a single non-blocking ``sendto`` of a few dozen bytes; a full or
vanished socket loses that one message (logged), it never blocks the reactor
and never raises into the caller.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping, Optional

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def _address(value: str) -> Optional[str]:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None.

    ``@name`` is a Linux abstract socket (leading NUL); ``/path`` a file.
    Anything else (systemd also knows ``vsock:``) is not supported here.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    """STATUS= is one line; a newline would start a new assignment."""
    return " ".join(text.split())


class Notifier:
    """Sends READY/RELOADING/STOPPING/STATUS/WATCHDOG to systemd.

    ``environ`` is read once, here; ``pid`` (default ``os.getpid()``) is
    compared with ``WATCHDOG_PID`` so a child that inherited the variables
    does not ping on its parent's behalf.  ``monotonic`` returns
    CLOCK_MONOTONIC in seconds: RELOADING=1 must carry ``MONOTONIC_USEC`` on
    that clock (systemd >= 253, ``Type=notify-reload``), which is not the
    reactor's wall clock.
    """

    def __init__(self, reactor, environ: Mapping[str, str],
                 pid: Optional[int] = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._reactor = reactor
        self._monotonic = monotonic
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warn("NOTIFY_SOCKET={value} is not a path or @abstract name;"
                     " systemd notifications are off", value=raw)
        self._socket: Optional[socket.socket] = None
        self._watchdog: Optional[LoopingCall] = None
        self.watchdog_interval = self._watchdog_interval(
            environ, os.getpid() if pid is None else pid)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str], pid: int
                           ) -> Optional[float]:
        """Half of WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3)
        advises, or None when no watchdog is asked of this process."""
        usec = environ.get("WATCHDOG_USEC", "")
        owner = environ.get("WATCHDOG_PID", "")
        if not usec:
            return None
        if owner and owner != str(pid):
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warn("WATCHDOG_USEC={value} is not a number; no watchdog",
                     value=usec)
            return None
        return value / 2e6 if value > 0 else None

    def send(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if it went out."""
        if self._address is None:
            return False
        payload = "".join("%s=%s\n" % (k, v) for k, v in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(payload.encode("utf-8"), self._address)
        except OSError as e:
            log.warn("systemd notification {fields} not sent: {error}",
                     fields=",".join(fields), error=e.strerror or str(e))
            return False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        """Startup (or a reload) is complete; also starts the watchdog."""
        fields: dict[str, object] = {"READY": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        sent = self.send(**fields)
        self.start_watchdog()
        return sent

    def reloading(self, status: Optional[str] = None) -> bool:
        """A reload began; follow with ``ready()`` once it is done."""
        fields: dict[str, object] = {
            "RELOADING": 1,
            "MONOTONIC_USEC": int(self._monotonic() * 1e6),
        }
        if status:
            fields["STATUS"] = _one_line(status)
        return self.send(**fields)

    def stopping(self, status: Optional[str] = None) -> bool:
        """Shutdown began; the watchdog stops too (draining may be slow)."""
        self.stop_watchdog()
        fields: dict[str, object] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=_one_line(text))

    def start_watchdog(self) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2 on the reactor, so a wedged
        reactor stops the pings and systemd restarts the service."""
        if (self._watchdog is not None or self.watchdog_interval is None
                or self._address is None):
            return
        self._watchdog = LoopingCall(self.send, WATCHDOG=1)
        self._watchdog.clock = self._reactor
        self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            if self._watchdog.running:
                self._watchdog.stop()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def where(ports) -> str:
    """``host:port`` of each listening port, for STATUS= lines."""
    out = []
    for p in ports:
        try:
            h = p.getHost()
        except Exception:
            continue
        if hasattr(h, "port"):
            out.append("%s:%s" % (h.host, h.port))
        else:
            name = getattr(h, "name", None) or h
            out.append(name.decode("utf-8", "replace")
                       if isinstance(name, bytes) else str(name))
    return " ".join(out) or "-"


class NotifyService(service.Service):
    """READY=1 when started, STOPPING=1 when stopping.

    Add it to the top service after the services that bind listeners:
    ``MultiService`` starts children in order and stops them in reverse,
    so systemd hears READY only once every port is bound, and STOPPING
    before the gateway begins to drain.  ``describe()`` gives the STATUS=
    text (for ``systemctl status``).  With a ``reactor``, READY waits until
    the reactor runs, after the signal handlers that services install at
    start-up: a supervisor may send SIGHUP as soon as it hears READY.
    """

    def __init__(self, notifier: Notifier,
                 describe: Callable[[], str] = lambda: "",
                 reactor=None) -> None:
        self.notifier = notifier
        self._describe = describe
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        if self._reactor is None:
            self._ready()
        else:
            self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self.notifier.ready(self._describe() or None)

    def stopService(self):
        super().stopService()
        self.notifier.stopping("draining")
