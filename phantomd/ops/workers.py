"""``[phantomd] workers = N``: one process per core behind the same ports.

The parent process (``Supervisor``) binds every client listener (or takes
systemd's socket) without ever accepting on it, and starts N worker
processes that inherit the listening descriptors and adopt them
(``reactor.adoptStreamPort``).  ``tcp:`` and ``ssl:`` listeners get one
SO_REUSEPORT socket per worker so the kernel spreads connections evenly
(``Listener``); an ``ssl:`` worker does the TLS itself, with the settings
of the endpoint string the parent passes it.  Each worker is a full
``twistd phantomd`` with its own cache; only the parent talks to systemd,
serves ``/metrics`` and restarts workers that die.

* One instance per address: SO_REUSEPORT lets any process of the same user
  join a port, so a second phantomd would silently take half the traffic
  with its own config.  Before binding its group, the parent binds the
  address once without SO_REUSEPORT (which fails, ``address already in
  use``, while anybody listens there, a reuseport group included), under a
  per-address lock (an abstract unix socket) that two phantomds starting at
  once cannot both hold (``exclusive_group``).

Why each piece is shaped as it is:

* Metrics: prometheus_client's multiprocess mode.  Workers write their
  samples to files in a private directory (``PROMETHEUS_MULTIPROC_DIR``);
  the parent's metrics listener renders them with ``MultiProcessCollector``.
  A dead worker's counters and histograms are folded into one archive file
  (totals never go backwards, files do not pile up) and its gauges are
  dropped (``archive_dead_worker``).
  ``process_*`` come from ``/proc`` of each process, labelled by worker
  slot (``WorkerProcesses``).
* Readiness: each worker slot has its own ``NOTIFY_SOCKET`` (a datagram
  socket in the same private directory), so the parent knows which worker
  is serving; it sends READY=1 to systemd only when every worker is, after
  start and after each reload, so ``NotifyAccess=main`` is enough.
* Signals: SIGHUP is checked by the parent first (a bad file is refused
  once, in one log line, and workers are not disturbed), then forwarded;
  SIGTERM is forwarded and the parent waits for every worker to drain.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, error, fdesc, protocol
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint, SSL4ServerEndpoint, TCP4ServerEndpoint,
    TCP6ServerEndpoint, UNIXServerEndpoint)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from phantomd import config as configmod
from phantomd.http import tls
from phantomd.ops.sdnotify import Notifier
from phantomd.fleet.workerrevoke import WORKER_REVOKE

log = Logger()

# Environment of a worker: "fd:family,fd:family" of its listening sockets.
WORKER_FDS = "PHANTOMD_WORKER_FDS"
# JSON {"fd": "ssl:..."}: the inherited listeners a worker does TLS on.
WORKER_TLS = "PHANTOMD_WORKER_TLS"
WORKER_INDEX = "PHANTOMD_WORKER"
PARENT_PID = "PHANTOMD_PARENT_PID"
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6,
             "UNIX": socket.AF_UNIX}
_FIRST_FD = 3  # a worker's listeners are fds 3, 4, ... as with systemd
_SHAREABLE = (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint,
              UNIXServerEndpoint, AdoptedStreamServerEndpoint)


# -- the worker side ------------------------------------------------------------

def is_worker(environ: Mapping[str, str]) -> bool:
    return WORKER_FDS in environ


def inherited_fds(environ: Mapping[str, str]) -> list[tuple[int, int]]:
    """(descriptor, address family) pairs the parent passed to this worker."""
    out = []
    for item in environ.get(WORKER_FDS, "").split(","):
        if item:
            fd, _, family = item.partition(":")
            out.append((int(fd), _FAMILIES[family]))
    return out


# What a worker's config says for [phantomd] listen.  The worker never binds
# it (it adopts the parent's sockets), but the key must parse, and a
# systemd: endpoint only parses where systemd's descriptors were inherited.
WORKER_LISTEN_PLACEHOLDER = "tcp:0:interface=127.0.0.1"


def worker_config(path: str) -> configmod.Config:
    """The config as a worker sees it: no listener of its own.

    The parent serves every worker's metrics on the one ``[metrics]``
    address, and the client sockets come from the parent (``adopt``), so
    both listen keys are overridden; every other key is the file's.
    """
    return configmod.load(path, overrides={
        "metrics": {"listen": ""},
        # The parent answers [forward_auth] checks (its own cache).
        "forward_auth": {"listen": ""},
        "phantomd": {"listen": WORKER_LISTEN_PLACEHOLDER}})


def adopt(reactor, factory, environ: Mapping[str, str],
          client_ca: Optional[str] = None) -> list:
    """Listening ports for ``factory`` on the inherited descriptors.

    The socket is made non-blocking first: workers sharing one socket are
    all woken for each connection, and a blocking ``accept`` in the ones
    that lose the race would stall their reactor.  ``adoptStreamPort``
    duplicates the descriptor, so the original is closed here; the socket
    stays open in the parent and the other workers.  A descriptor named in
    ``WORKER_TLS`` gets TLS with the settings of its ``ssl:`` endpoint,
    asking clients for certificates ``client_ca`` signed when it is set
    (``[phantomd] tls_client_ca_file``), as a single process does.
    """
    encrypted = json.loads(environ.get(WORKER_TLS) or "{}")
    ports = []
    for fd, family in inherited_fds(environ):
        served = factory
        if str(fd) in encrypted:
            endpoint = tls.server_endpoint(reactor, encrypted[str(fd)])
            if client_ca:
                from phantomd.token import mtls
                mtls.request_client_certificates(endpoint, client_ca)
            served = TLSMemoryBIOFactory(tls.endpoint_tls(endpoint), False,
                                         factory)
        fdesc.setNonBlocking(fd)
        ports.append(reactor.adoptStreamPort(fd, family, served))
        os.close(fd)
    return ports


def die_with_parent(environ: Mapping[str, str]) -> bool:
    """Ask Linux to send this worker SIGTERM when its parent dies.

    A parent killed outright (SIGKILL, OOM) cannot forward signals; without
    this its workers would keep serving on the shared sockets with nobody
    watching them.  Returns False where prctl(2) is unavailable.  The
    parent's pid travels in the environment to close the race where the
    parent died before the request was made.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    parent = environ.get(PARENT_PID, "")
    if parent and parent != str(os.getppid()):
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# -- the pool of worker processes ----------------------------------------------

class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: Optional[int] = None  # the transport forgets it at exit

    def processEnded(self, reason) -> None:
        self.pool._ended(self, reason)


class WorkerPool:
    """Keeps ``count`` worker processes running.

    A worker that exits while the pool runs is started again after a delay
    that doubles (``backoff`` up to ``max_backoff`` seconds) each time a
    worker in that slot dies within ``stable_after`` seconds of starting, so
    a worker that cannot start does not spin the CPU; the delay resets once
    a worker has lived ``stable_after`` seconds.  At most one process and one
    pending restart exist per slot, so the pool holds at most ``count`` of
    each.  ``on_exit(pid, slot)`` runs for every worker that ended;
    ``slot_env(slot)`` and ``slot_fds(slot)`` add to the environment and
    the inherited descriptors of the slot's workers.
    """

    def __init__(self, reactor, count: int, argv: Sequence[str],
                 env: Mapping[str, str], child_fds: Mapping[int, int],
                 backoff: float = 0.5, max_backoff: float = 30.0,
                 stable_after: float = 10.0,
                 on_exit: Callable[[int, int], None] = lambda pid, slot: None,
                 slot_env: Callable[[int], Mapping[str, str]] = lambda s: {},
                 slot_fds: Callable[[int], Mapping[int, int]] = lambda s: {},
                 path: Optional[str] = None) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = list(argv)
        self.env = dict(env)
        self.child_fds = {0: 0, 1: 1, 2: 2, **child_fds}
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.on_exit = on_exit
        self.slot_env = slot_env
        self.slot_fds = slot_fds
        self.path = path
        self.running = False
        self.restarts = 0
        self._procs: dict[int, tuple[_WorkerProtocol, float]] = {}
        self._failures = [0] * count
        self._pending: dict[int, object] = {}
        self._waiters: list[defer.Deferred] = []
        self._kill_timer = None

    def pids(self) -> list[int]:
        return sorted(p.pid for p, _ in self._procs.values() if p.pid)

    def slots(self) -> dict[int, int]:
        """Live workers: slot -> pid."""
        return {slot: p.pid for slot, (p, _) in self._procs.items() if p.pid}

    def __len__(self) -> int:
        return len(self._procs)

    def start(self) -> None:
        self.running = True
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if not self.running:
            return
        proto = _WorkerProtocol(self, slot)
        env = dict(self.env)
        env.update(self.slot_env(slot))
        env[WORKER_INDEX] = str(slot)
        self.reactor.spawnProcess(
            proto, self.argv[0], self.argv, env=env, path=self.path,
            childFDs={**self.child_fds, **self.slot_fds(slot)})
        proto.pid = proto.transport.pid
        self._procs[slot] = (proto, self.reactor.seconds())
        log.info("worker {slot} started (pid {pid})", slot=slot,
                 pid=proto.pid)

    def _ended(self, proto: _WorkerProtocol, reason) -> None:
        slot = proto.slot
        current = self._procs.get(slot)
        pid = proto.pid
        if current is None or current[0] is not proto:
            return
        del self._procs[slot]
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if pid:
            self.on_exit(pid, slot)
        if not self.running:
            if not self._procs:
                self._all_stopped()
            return
        lived = self.reactor.seconds() - current[1]
        if lived >= self.stable_after:
            self._failures[slot] = 0
        self._failures[slot] += 1
        delay = min(self.max_backoff,
                    self.backoff * 2 ** (self._failures[slot] - 1))
        log.error("worker {slot} (pid {pid}) exited (code {code}, signal "
                  "{signal}); starting a new one in {delay:.1f}s",
                  slot=slot, pid=pid, code=code, signal=sig, delay=delay)
        self.restarts += 1
        self._pending[slot] = self.reactor.callLater(delay, self._spawn, slot)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every live worker (a gone one is skipped)."""
        for slot in list(self._procs):
            self.signal_slot(slot, signum)

    def signal_slot(self, slot: int, signum: int) -> None:
        entry = self._procs.get(slot)
        if entry is None:
            return
        try:
            entry[0].transport.signalProcess(signum)
        except Exception:  # ProcessExitedAlready, OSError
            pass

    def stop(self, signum: int = signal.SIGTERM,
             timeout: float = 30.0) -> defer.Deferred:
        """Send ``signum`` to every worker; fire when all have exited.

        Workers still alive after ``timeout`` seconds are killed (SIGKILL).
        No worker is restarted from here on.
        """
        first = self.running or self._pending
        self.running = False
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        if not self._procs:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        if first:
            self.signal_all(signum)
            self._kill_timer = self.reactor.callLater(
                timeout, self._kill_remaining, timeout)
        return d

    def _kill_remaining(self, timeout: float) -> None:
        self._kill_timer = None
        log.warn("{n} worker(s) still running {timeout}s after the stop "
                 "signal; killing them", n=len(self._procs), timeout=timeout)
        self.signal_all(signal.SIGKILL)

    def _all_stopped(self) -> None:
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


# -- readiness of the workers ---------------------------------------------------

class Readiness:
    """Which worker slots are serving; when to tell systemd; whom to HUP.

    Each slot has its own notify socket (``NotifyListener``), so a READY=1
    names its worker.  ``await_all(then)`` runs ``then()`` once every slot
    has reported READY=1 (start-up: a slot whose worker died is awaited
    through its replacement).  ``reload(then)`` HUPs every serving worker
    and runs ``then()`` once each has reported again (a worker that dies
    meanwhile is not waited for); a worker still starting is HUPed as soon
    as it reports, since it may have read the file before it changed.  A
    reload before start-up finished still waits for every slot.  Holds sets of slot numbers, so it is bounded by the worker count.
    """

    def __init__(self, count: int, hup: Callable[[int], None]) -> None:
        self.count = count
        self._hup = hup
        self.serving: set[int] = set()
        self._awaiting: set[int] = set()
        self._hup_when_ready: set[int] = set()
        self._then: Optional[Callable[[], None]] = None
        self._reloading = False

    def await_all(self, then: Callable[[], None]) -> None:
        self._reloading = False
        self._awaiting = set(range(self.count)) - self.serving
        self._then = then
        self._check()

    def reload(self, then: Callable[[], None]) -> None:
        starting = self._awaiting if self._then is not None else set()
        self._reloading = True
        self._awaiting = set(self.serving) | starting
        self._hup_when_ready = set(range(self.count)) - self.serving
        self._then = then
        for slot in sorted(self.serving):
            self._hup(slot)
        self._check()

    def ready(self, slot: int) -> None:
        if slot in self._hup_when_ready:
            self._hup_when_ready.discard(slot)
            self._awaiting.add(slot)
            self._hup(slot)
            return
        self.serving.add(slot)
        self._awaiting.discard(slot)
        self._check()

    def exited(self, slot: int) -> None:
        self.serving.discard(slot)
        self._hup_when_ready.discard(slot)
        if self._reloading:
            self._awaiting.discard(slot)
            self._check()

    def _check(self) -> None:
        if not self._awaiting and self._then is not None:
            then, self._then = self._then, None
            then()


class NotifyListener(protocol.DatagramProtocol):
    """One worker slot's NOTIFY_SOCKET in the parent: READY=1 → ``ready``.
    Keeps nothing from what arrives."""

    def __init__(self, slot: int, ready: Callable[[int], None]) -> None:
        self.slot = slot
        self._ready = ready

    def datagramReceived(self, data: bytes, addr) -> None:
        if b"READY=1" in data.split(b"\n"):
            self._ready(self.slot)


# -- metrics of workers that are gone -------------------------------------------

def archive_dead_worker(directory: str, pid: int) -> None:
    """Fold a dead worker's metric files into one archive per type.

    prometheus_client keeps one file per process and type; left alone, a
    worker that keeps crashing would add files (and tmpfs memory) forever.
    Its counters and histogram buckets are added into
    ``<type>_archive.db`` (so totals never go backwards and the directory
    holds at most one archive plus one file per live worker and type), and
    its gauges are dropped: a dead worker has no cache and nothing in
    flight.  Runs on the reactor, like the scrape that reads these files,
    so the two never interleave.
    """
    from prometheus_client.mmap_dict import MmapedDict
    for typ in ("counter", "histogram", "summary"):
        path = os.path.join(directory, "%s_%d.db" % (typ, pid))
        if not os.path.exists(path):
            continue
        archive = MmapedDict(os.path.join(directory, "%s_archive.db" % typ))
        try:
            for key, value, timestamp, _ in \
                    MmapedDict.read_all_values_from_file(path):
                total, _ = archive.read_value(key)
                archive.write_value(key, total + value, timestamp)
        finally:
            archive.close()
        os.remove(path)
    for path in glob.glob(os.path.join(directory, "gauge_*_%d.db" % pid)):
        os.remove(path)


class WithParent:
    """The workers' samples (``workers``, a ``_WorkerFiles``) with
    the parent's own added in: the parent answers ``[forward_auth]`` checks
    with its own gate, and its ``Metrics`` live in its memory, not in the
    workers' files.

    Only families the workers' files have are merged (the parent's
    ``process_*`` come from ``WorkerProcesses``): counters, histograms and
    gauges (all ``livesum``) are summed per sample, a sample only the
    parent has is added.  ``parent()`` is the parent's registry, or None
    before it exists.  Holds nothing between scrapes.
    """

    _SUMMED = ("counter", "histogram", "gauge")

    def __init__(self, workers: Any, parent: Callable[[], Any]) -> None:
        self._workers = workers
        self._parent = parent

    def collect(self):
        families = list(self._workers.collect())
        registry = self._parent()
        if registry is None:
            return families
        by_name = {f.name: f for f in families}
        for own in registry.collect():
            merged = by_name.get(own.name)
            if merged is None or own.type not in self._SUMMED or \
                    merged.type != own.type:
                continue
            samples = merged.samples
            at = {(x.name, tuple(sorted(x.labels.items()))): i
                  for i, x in enumerate(samples)}
            for x in own.samples:
                if x.name.endswith("_created"):
                    continue
                key = (x.name, tuple(sorted(x.labels.items())))
                i = at.get(key)
                if i is None:
                    at[key] = len(samples)
                    samples.append(x)
                else:
                    samples[i] = samples[i]._replace(
                        value=samples[i].value + x.value)
        return families


def settled_files(path: str) -> list:
    """The workers' metric files in ``path`` that can be read now.

    prometheus_client creates a process's file and only then sizes it, so
    a scrape that lands while a worker starts can meet an empty file, and
    reading one raises ``struct.error`` (the whole scrape a 500).  Such a
    file holds no counts yet: it is left for the next scrape.  A file
    archived away (``archive_dead_worker``) between listing and reading is
    left out the same way."""
    out = []
    for name in glob.glob(os.path.join(path, "*.db")):
        try:
            if os.path.getsize(name) >= 8:  # the used-bytes header
                out.append(name)
        except OSError:
            pass
    return out


def merged_workers(path: str):
    """``MultiProcessCollector.collect`` over ``settled_files(path)``; a
    file that vanished or changed under the read is retried once."""
    from prometheus_client.multiprocess import MultiProcessCollector
    import struct
    try:
        return MultiProcessCollector.merge(settled_files(path),
                                           accumulate=True)
    except (OSError, struct.error, ValueError):
        return MultiProcessCollector.merge(settled_files(path),
                                           accumulate=True)


class _WorkerFiles:
    """The collector over the workers' metric files (``merged_workers``)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self):
        return merged_workers(self._path)


class WorkerProcesses:
    """``process_*`` (CPU, memory, fds, start time) of the parent and of
    every live worker, labelled ``worker="parent"``, ``worker="0"``...

    The multiprocess files carry counters, gauges and histograms, not
    process metrics, and each process's own ``ProcessCollector`` would
    export unlabelled series that collide once merged.  So the parent reads
    every worker's ``/proc/<pid>`` at scrape time (same user, so readable
    even under ``ProtectProc=invisible``).  A worker replaced in its slot
    keeps the slot's label (its ``process_start_time_seconds`` tells the
    restart).  One series per process and metric: bounded by the worker
    count.
    """

    def __init__(self, slots: Callable[[], Mapping[int, int]],
                 proc: str = "/proc") -> None:
        self._slots = slots
        self._proc = proc

    def collect(self):
        from prometheus_client import ProcessCollector
        from prometheus_client.metrics_core import Metric
        merged: dict[str, Metric] = {}
        who = [("parent", os.getpid())] + [
            (str(slot), pid) for slot, pid in sorted(self._slots().items())]
        for label, pid in who:
            collector = ProcessCollector(pid=lambda pid=pid: pid,
                                         proc=self._proc, registry=None)
            for family in collector.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(sample.name,
                                   dict(sample.labels, worker=label),
                                   sample.value)
        return list(merged.values())


# -- the parent -----------------------------------------------------------------

class UnshareableListener(Exception):
    """A listener kind that workers cannot share."""


class Listener:
    """One ``[phantomd] listen`` endpoint as the workers get it.

    ``tcp:``/``tcp6:``/``ssl:`` get one SO_REUSEPORT socket per worker slot,
    bound to the same address, so the kernel spreads new connections over
    the workers: with one shared socket the first worker to wake accepts the
    whole backlog, and keep-alive clients then stay on it.  ``systemd:``
    (one inherited socket) and ``unix:`` are shared by every worker.  The
    parent holds every socket open, never accepting on them, until
    ``close()``: a restarted worker takes over its slot's socket, and
    connections queued on it meanwhile wait instead of being reset.
    ``tls`` is the ``ssl:`` endpoint string the workers take their TLS
    settings from (None: plain).
    """

    def __init__(self, family: int, fds: Sequence[int], where: str,
                 close: Callable[[], None],
                 tls: Optional[str] = None) -> None:
        self.family = family
        self.fds = list(fds)
        self.where = where
        self.tls = tls
        self._close = close

    @property
    def family_name(self) -> str:
        for name, value in _FAMILIES.items():
            if value == self.family:
                return name
        raise UnshareableListener("unknown address family %r" % (self.family,))

    def fd_for(self, slot: int) -> int:
        return self.fds[slot] if len(self.fds) > 1 else self.fds[0]

    def close(self):
        """Close the sockets; may return a Deferred (unix: unlinks later)."""
        return self._close()


#: sun_path holds 108 bytes, the terminating NUL included.
_MAX_UNIX_PATH = 107


def _address_lock(family: int, host: str, port: int) -> socket.socket:
    """Hold the per-address lock of ``exclusive_group``: an abstract unix
    socket named after the address, which only one process can bind and
    which the kernel releases when that process closes it or dies."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind("\0phantomd-listen:%d:%s:%d" % (family, host, port))
    except OSError:
        lock.close()
        raise OSError(errno.EADDRINUSE, "address already in use (another "
                      "phantomd is binding it right now)")
    return lock


def exclusive_group(family: int, host: str, port: int, backlog: int,
                    count: int) -> list[socket.socket]:
    """``count`` listening SO_REUSEPORT sockets on one address, which no
    other phantomd shares; raises OSError (EADDRINUSE) if anyone listens
    there already.

    The probe (same address, SO_REUSEADDR as Twisted's own listeners, no
    SO_REUSEPORT) fails while any socket listens there; it has to be closed
    before the group can bind, and the lock, held from before the probe
    until the group listens, keeps another phantomd out of that gap.  With
    port 0 the probe picks the port, and is held until the lock is.
    """
    lock = _address_lock(family, host, port) if port else None
    socks: list[socket.socket] = []
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
            if lock is None:
                lock = _address_lock(family, host, port)
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.listen(backlog)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    finally:
        if lock is not None:
            lock.close()
    return socks


def _reuseport_sockets(ep, count: int, description: str) -> Listener:
    interface = ep._interface
    family = (socket.AF_INET6 if isinstance(ep, TCP6ServerEndpoint) or
              isIPv6Address(interface) else socket.AF_INET)
    interface = interface or ("::" if family == socket.AF_INET6 else "")
    try:
        socks = exclusive_group(family, interface, ep._port, ep._backlog,
                                count)
    except OSError as e:
        raise error.CannotListenError(interface, ep._port, e)
    host, port = socks[0].getsockname()[:2]
    where = ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % (
        host, port)
    return Listener(family, [s.fileno() for s in socks], where,
                    lambda: [s.close() for s in socks] and None,
                    tls=(description if isinstance(ep, SSL4ServerEndpoint)
                         else None))


def bind_listeners(reactor, descriptions: Sequence[str], count: int,
                   path: str = "<config>") -> list[Listener]:
    """Bind (or take over) every listener for ``count`` workers.

    Raises ``ConfigError`` (``[phantomd] listen`` in ``path``) for the
    first listener that cannot bind (closing the others first) or that
    workers cannot share (before binding anything).
    """
    from phantomd.app import listen_error
    endpoints = []
    for d in descriptions:
        ep = tls.server_endpoint(reactor, d)
        if not isinstance(ep, _SHAREABLE):
            raise configmod.ConfigError(
                path, "phantomd", "listen",
                "%s cannot be shared by workers (workers > 1 supports tcp:, "
                "tcp6:, ssl:, unix: and systemd: listeners; use workers = 1)"
                % d)
        endpoints.append((d, ep))
    out: list[Listener] = []
    try:
        for d, ep in endpoints:
            try:
                if isinstance(ep, (TCP4ServerEndpoint, TCP6ServerEndpoint,
                                   SSL4ServerEndpoint)):
                    out.append(_reuseport_sockets(ep, count, d))
                elif isinstance(ep, AdoptedStreamServerEndpoint):
                    out.append(Listener(ep.addressFamily, [ep.fileno],
                                        "fd %d" % ep.fileno, lambda: None))
                else:
                    out.append(_bind_unix(ep))
            except Exception as e:
                raise listen_error(path, "phantomd", d, e)
    except BaseException:
        for listener in out:
            listener.close()
        raise
    return out


def _bind_unix(ep) -> Listener:
    """Twisted binds it (stale socket files, lock files), then stops
    accepting on it in the parent."""
    placeholder = protocol.Factory()
    placeholder.noisy = False
    failures: list = []
    ports: list = []
    ep.listen(placeholder).addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    port = ports[0]
    port.stopReading()
    name = port.getHost().name
    return Listener(socket.AF_UNIX, [port.fileno()],
                    name.decode() if isinstance(name, bytes) else str(name),
                    port.stopListening)


def worker_argv(config_path: str) -> list[str]:
    """twistd in the foreground, as the parent was, on the same ini."""
    return [sys.executable, "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "phantomd", "--config",
            os.path.abspath(config_path)]


class Supervisor(service.Service):
    """The parent process when ``[phantomd] workers`` is more than 1.

    ``gateway_factory(reactor, config, admin_registry=...)`` builds the
    parent's ``Gateway``, used only for its metrics listener: started with no
    front ports, it serves ``/metrics`` from every worker's files.
    ``on_reload(config)`` runs after a good reload (e.g. to switch the log
    format).
    """

    def __init__(self, reactor, config: configmod.Config,
                 environ: Mapping[str, str], gateway_factory=None,
                 argv: Optional[Sequence[str]] = None,
                 load: Callable[[str], configmod.Config] = configmod.load,
                 on_reload: Callable[[configmod.Config], None] = lambda c: None
                 ) -> None:
        self.reactor = reactor
        self.config = config
        self.environ = dict(environ)
        self.notifier = Notifier(reactor, environ)
        self._gateway_factory = gateway_factory
        self._argv = list(argv) if argv else worker_argv(config.path)
        self._load = load
        self._on_reload = on_reload
        self.listeners: list[Listener] = []
        self.pool: Optional[WorkerPool] = None
        self.gateway = None
        self.readiness = Readiness(
            config.phantomd.workers,
            lambda slot: self.pool.signal_slot(slot, signal.SIGHUP))
        self._notify_ports: list = []
        self._dir: Optional[str] = None
        self._all_started = False

    def privilegedStartService(self) -> None:
        self.listeners = bind_listeners(
            self.reactor, self.config.phantomd.listen,
            self.config.phantomd.workers, self.config.path)
        try:
            self._start_admin()
        except BaseException:
            self._release()  # twistd exits: leave no temporary directory
            raise
        super().privilegedStartService()

    def _start_admin(self) -> None:
        failures: list = []
        self._dir = tempfile.mkdtemp(prefix="phantomd-")
        if len(self._notify_path(self.readiness.count).encode()) > \
                _MAX_UNIX_PATH:
            # A long TMPDIR: the notify sockets' paths would not fit in a
            # sockaddr_un.  /tmp always does (the directory is 0700 either
            # way, so only this user can signal readiness).
            os.rmdir(self._dir)
            self._dir = tempfile.mkdtemp(prefix="phantomd-", dir="/tmp")
        metrics_dir = os.path.join(self._dir, "metrics")
        os.mkdir(metrics_dir)
        self._metrics_dir = metrics_dir
        for slot in range(self.readiness.count):
            self._notify_ports.append(self.reactor.listenUNIXDatagram(
                self._notify_path(slot),
                NotifyListener(slot, self.readiness.ready)))
        from prometheus_client import CollectorRegistry
        from phantomd.ops.metrics import BuildInfo
        registry = CollectorRegistry()
        workers = _WorkerFiles(metrics_dir)
        registry.register(BuildInfo())
        registry.register(WorkerProcesses(
            lambda: self.pool.slots() if self.pool is not None else {}))
        make = self._gateway_factory
        if make is None:
            from phantomd.app import Gateway as make
        self.gateway = make(self.reactor, self.config, admin_registry=registry)
        # The parent counts too: it answers the [forward_auth] checks.
        registry.register(WithParent(workers, lambda: getattr(
            getattr(self.gateway, "metrics", None), "registry", None)))
        fleet = getattr(self.gateway, "fleet", None)
        if fleet is not None and fleet.shared is None:
            # No Redis: the parent tells its workers of each revocation.
            from phantomd.fleet.workerrevoke import WorkerRevocations
            fleet.revoker.peers = WorkerRevocations(
                self.reactor, lambda: [self._revoke_path(slot) for slot in
                                       (self.pool.slots() if self.pool
                                        else {})]).send
        readiness = getattr(self.gateway, "readiness", None)
        if readiness is not None:
            readiness.add_check(self._workers_ready)
        self.gateway.start(front_ports=[]).addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def _release(self) -> list:
        """Close the sockets and remove the private directory; returns the
        Deferreds of what closes later."""
        closing = [defer.maybeDeferred(listener.close)
                   for listener in self.listeners]
        self.listeners = []
        closing += [defer.maybeDeferred(p.stopListening)
                    for p in self._notify_ports]
        self._notify_ports = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return closing

    def _worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                            "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        here = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(
            [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                      if p])
        env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        env[PARENT_PID] = str(os.getpid())
        env[WORKER_FDS] = ",".join(
            "%d:%s" % (_FIRST_FD + i, listener.family_name)
            for i, listener in enumerate(self.listeners))
        encrypted = {str(_FIRST_FD + i): listener.tls
                     for i, listener in enumerate(self.listeners)
                     if listener.tls}
        if encrypted:
            env[WORKER_TLS] = json.dumps(encrypted)
        return env

    def _slot_fds(self, slot: int) -> dict[int, int]:
        """Slot's view of each listener at fd 3, 4, ... in the worker."""
        return {_FIRST_FD + i: listener.fd_for(slot)
                for i, listener in enumerate(self.listeners)}

    def where(self) -> str:
        return " ".join(listener.where for listener in self.listeners)

    def _notify_path(self, slot: int) -> str:
        return os.path.join(self._dir, "notify-%d" % slot)

    def _revoke_path(self, slot: int) -> str:
        return os.path.join(self._dir, "revoke-%d" % slot)

    def startService(self) -> None:
        super().startService()
        self.pool = WorkerPool(
            self.reactor, self.readiness.count, self._argv,
            self._worker_env(), {},
            on_exit=self._worker_exited,
            slot_env=lambda slot: {"NOTIFY_SOCKET": self._notify_path(slot),
                                   WORKER_REVOKE: self._revoke_path(slot)},
            slot_fds=self._slot_fds)
        self.readiness.await_all(self._all_serving)
        self.pool.start()
        if hasattr(signal, "SIGHUP"):
            self.reactor.addSystemEventTrigger(
                "after", "startup", signal.signal, signal.SIGHUP,
                lambda *_: self.reactor.callFromThread(self.reload))

    def _all_serving(self) -> None:
        self._all_started = True
        self.notifier.ready("%d workers serving on %s" % (
            self.readiness.count, self.where()))

    def _workers_ready(self) -> Optional[str]:
        """/readyz's part: every worker reported READY=1 once, and one at
        least still serves (a restarting worker does not pull the rest)."""
        serving = len(self.readiness.serving)
        if not self._all_started:
            return "%d of %d workers serving" % (serving,
                                                 self.readiness.count)
        if not serving:
            return "no worker serving"
        return None

    def _worker_exited(self, pid: int, slot: int) -> None:
        self.readiness.exited(slot)
        archive_dead_worker(self._metrics_dir, pid)

    def reload(self) -> None:
        """Check the ini here; forward SIGHUP to workers only if it is good."""
        self.notifier.reloading()
        try:
            new = self._load(self.config.path)
            if self.gateway is not None:
                self.gateway.reload(new)
        except configmod.ConfigError as e:
            log.error("reload refused, still running on the previous "
                      "configuration: {error}", error=str(e))
            self.notifier.ready("reload refused: %s" % e)
            return
        self.config = new
        self._on_reload(new)
        self.readiness.reload(lambda: self.notifier.ready(
            "%d workers serving on %s (reloaded)" % (
                len(self.readiness.serving), self.where())))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.notifier.stopping("draining %d workers" % len(self.pool or ()))
        timeout = self.config.phantomd.drain_timeout + 10
        d = (self.pool.stop(signal.SIGTERM, timeout) if self.pool
             else defer.succeed(None))

        def cleanup(_):
            closing = self._release()
            if self.gateway is not None:
                closing.append(defer.maybeDeferred(self.gateway.stop))
            self.notifier.close()
            return defer.DeferredList(closing)
        return d.addCallback(cleanup)
