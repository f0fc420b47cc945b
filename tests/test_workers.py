"""phantomd.ops.workers: the worker pool, the readiness relay, shared listeners.

The pool's logic runs on a fake process reactor; a few tests start real
processes that inherit a real listening socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import twisted.test
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from phantomd import config as configmod
from phantomd.ops import workers

INI = """\
[phantomd]
listen = tcp:0:interface=127.0.0.1
upstream = http://127.0.0.1:1
workers = 2
drain_timeout = 2
[introspection]
url = http://127.0.0.1:1/introspect
client_id = gw
client_secret = s3cret
[metrics]
listen = tcp:0:interface=127.0.0.1
"""


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signum)


class ProcessClock(Clock):
    """A Clock that records spawnProcess calls instead of forking."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self._next_pid = 1000

    def spawnProcess(self, proto, executable, args, env, path, childFDs):
        self._next_pid += 1
        proto.makeConnection(FakeProcess(self._next_pid))
        self.spawned.append((proto, executable, args, env, childFDs))
        return proto.transport


def end(proto, code=1, sig=None):
    reason = (error.ProcessDone(0) if code == 0 and sig is None
              else error.ProcessTerminated(code, sig))
    proto.processEnded(Failure(reason))


class WorkerPoolTests(SynchronousTestCase):
    def pool(self, count=2, **kw):
        self.clock = ProcessClock()
        self.exited = []
        pool = workers.WorkerPool(
            self.clock, count, ["/usr/bin/python3", "-c", "pass"],
            {"KEEP": "1"}, {3: 7},
            on_exit=lambda pid, slot: self.exited.append(pid), **kw)
        pool.start()
        return pool

    def live(self):
        return [p for p, *_ in self.clock.spawned]

    def test_start_spawns_each_worker_with_the_listening_fds(self):
        pool = self.pool(3)
        self.assertEqual(len(pool), 3)
        self.assertEqual(pool.pids(), [1001, 1002, 1003])
        _, exe, args, env, fds = self.clock.spawned[1]
        self.assertEqual((exe, args), ("/usr/bin/python3",
                                       ["/usr/bin/python3", "-c", "pass"]))
        self.assertEqual(env, {"KEEP": "1", workers.WORKER_INDEX: "1"})
        self.assertEqual(fds, {0: 0, 1: 1, 2: 2, 3: 7})

    def test_dead_worker_is_replaced_with_doubling_backoff(self):
        pool = self.pool(1, backoff=0.5, max_backoff=2.0)
        delays = []
        for _ in range(4):
            end(self.live()[-1], sig=signal.SIGKILL)
            self.assertEqual(len(pool), 0)
            before = len(self.clock.spawned)
            delay = self.clock.getDelayedCalls()[0].getTime() - \
                self.clock.seconds()
            delays.append(delay)
            self.clock.advance(delay)
            self.assertEqual(len(self.clock.spawned), before + 1)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0])
        self.assertEqual(self.exited, [1001, 1002, 1003, 1004])
        self.assertEqual(pool.restarts, 4)

    def test_backoff_resets_after_a_stable_run(self):
        self.pool(1, backoff=0.5, stable_after=10)
        end(self.live()[-1])
        self.clock.advance(0.5)
        end(self.live()[-1])
        self.clock.advance(1.0)
        self.clock.advance(60)  # the third worker runs a long time
        end(self.live()[-1])
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 0.5)

    def test_signal_forwarded_to_every_live_worker(self):
        pool = self.pool(2)
        pool.signal_all(signal.SIGHUP)
        self.assertEqual([p.transport.signals for p in self.live()],
                         [[signal.SIGHUP], [signal.SIGHUP]])

    def test_stop_waits_for_every_worker_and_restarts_none(self):
        pool = self.pool(2)
        done = pool.stop(timeout=30)
        self.assertEqual([p.transport.signals for p in self.live()],
                         [[signal.SIGTERM], [signal.SIGTERM]])
        end(self.live()[0], code=0)
        self.assertNoResult(done)
        end(self.live()[1], code=0)
        self.successResultOf(done)
        self.assertEqual(len(self.clock.spawned), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_kills_workers_that_outlive_the_timeout(self):
        pool = self.pool(1)
        done = pool.stop(timeout=5)
        self.clock.advance(5)
        self.assertEqual(self.live()[0].transport.signals,
                         [signal.SIGTERM, signal.SIGKILL])
        end(self.live()[0], sig=signal.SIGKILL)
        self.successResultOf(done)

    def test_stop_cancels_a_pending_restart(self):
        pool = self.pool(1)
        end(self.live()[0])
        self.successResultOf(pool.stop())
        self.clock.advance(100)
        self.assertEqual(len(self.clock.spawned), 1)


class ReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.hups = []
        self.told = []
        self.r = workers.Readiness(3, self.hups.append)

    def tell(self, what="ready"):
        return lambda: self.told.append(what)

    def test_startup_waits_for_every_slot(self):
        self.r.await_all(self.tell())
        self.r.ready(0)
        self.r.ready(1)
        self.r.exited(2)  # died before serving: its replacement is awaited
        self.assertEqual(self.told, [])
        self.r.ready(2)
        self.assertEqual(self.told, ["ready"])
        self.r.ready(1)  # a restarted worker later: nothing more to say
        self.assertEqual(self.told, ["ready"])

    def test_listener_passes_only_ready(self):
        seen = []
        listener = workers.NotifyListener(2, seen.append)
        listener.datagramReceived(b"STATUS=starting\n", None)
        listener.datagramReceived(b"STOPPING=1\n", None)
        listener.datagramReceived(b"READY=1\nSTATUS=serving\n", None)
        self.assertEqual(seen, [2])

    def test_reload_hups_serving_workers_and_waits_for_them(self):
        self.r.await_all(self.tell())
        for slot in range(3):
            self.r.ready(slot)
        self.r.reload(self.tell("reloaded"))
        self.assertEqual(self.hups, [0, 1, 2])
        self.r.ready(0)
        self.r.ready(2)
        self.assertEqual(self.told, ["ready"])
        self.r.ready(1)
        self.assertEqual(self.told, ["ready", "reloaded"])

    def test_reload_does_not_wait_for_a_dying_worker(self):
        self.r.await_all(self.tell())
        for slot in range(3):
            self.r.ready(slot)
        self.r.reload(self.tell("reloaded"))
        self.r.ready(0)
        self.r.ready(1)
        self.r.exited(2)
        self.assertEqual(self.told, ["ready", "reloaded"])

    def test_starting_worker_is_hupped_once_it_serves(self):
        """It may have read the file before the change; HUP it when it
        can handle the signal instead of killing it with one now."""
        self.r.await_all(self.tell())
        self.r.ready(0)
        self.r.ready(1)
        self.r.reload(self.tell("reloaded"))
        self.assertEqual(self.hups, [0, 1])
        self.r.ready(0)
        self.r.ready(1)
        self.assertEqual(self.told, [])  # start-up's READY was replaced
        self.r.ready(2)
        self.assertEqual(self.hups, [0, 1, 2])
        self.r.ready(2)
        self.assertEqual(self.told, ["reloaded"])


class WorkerSideTests(SynchronousTestCase):
    def test_inherited_fds(self):
        table = [
            ({}, []),
            ({workers.WORKER_FDS: ""}, []),
            ({workers.WORKER_FDS: "3:INET"}, [(3, socket.AF_INET)]),
            ({workers.WORKER_FDS: "3:INET6,4:UNIX"},
             [(3, socket.AF_INET6), (4, socket.AF_UNIX)]),
        ]
        for env, expected in table:
            self.assertEqual(workers.inherited_fds(env), expected, env)
            self.assertEqual(workers.is_worker(env), workers.WORKER_FDS in env)

    def test_worker_config_has_no_listeners_of_its_own(self):
        """Even a systemd: listener, whose descriptors only the parent
        inherited, must not stop a worker from loading the file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(INI.replace("listen = tcp:0:interface=127.0.0.1\nup",
                                "listen = systemd:domain=INET:name=web\nup"))
        self.assertRaises(configmod.ConfigError, configmod.load, path)
        cfg = workers.worker_config(path)
        self.assertEqual(cfg.metrics.listen, ())
        self.assertEqual(cfg.phantomd.listen,
                         (workers.WORKER_LISTEN_PLACEHOLDER,))
        self.assertEqual(cfg.phantomd.workers, 2)

    def test_worker_config_errors_name_the_file(self):
        e = self.assertRaises(configmod.ConfigError, workers.worker_config,
                              "/nonexistent/phantomd.ini")
        self.assertIn("/nonexistent/phantomd.ini", str(e))


class BindListenersTests(TestCase):
    def listeners(self, descriptions, count=2):
        out = workers.bind_listeners(reactor, descriptions, count)
        for listener in out:
            self.addCleanup(listener.close)
        return out

    def test_tcp_gets_one_reuseport_socket_per_worker_on_one_port(self):
        """The kernel spreads new connections over the slots' sockets."""
        [listener] = self.listeners(["tcp:0:interface=127.0.0.1"], count=2)
        self.assertEqual(listener.family_name, "INET")
        self.assertEqual(len(set(listener.fds)), 2)
        socks = [socket.socket(fileno=os.dup(fd)) for fd in listener.fds]
        for s in socks:
            self.addCleanup(s.close)
        port = socks[0].getsockname()[1]
        self.assertEqual(socks[1].getsockname()[1], port)
        self.assertEqual(listener.where, "127.0.0.1:%d" % port)
        clients = []
        for _ in range(64):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
            self.addCleanup(c.close)
        accepted = []
        for s in socks:
            n = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            accepted.append(n)
        self.assertEqual(sum(accepted), 64)
        self.assertTrue(all(n > 0 for n in accepted), accepted)
        self.assertEqual(listener.fd_for(1), listener.fds[1])

    def test_unix_is_shared_and_not_accepted_on_in_the_parent(self):
        path = os.path.join(tempfile.mkdtemp(prefix="phantomd-bl-"), "s")
        self.addCleanup(shutil.rmtree, os.path.dirname(path), True)
        [listener] = self.listeners(["unix:" + path], count=3)
        self.assertEqual(listener.family_name, "UNIX")
        self.assertEqual(len(listener.fds), 1)
        self.assertEqual(listener.fd_for(2), listener.fds[0])
        self.assertEqual(listener.where, path)
        self.assertFalse([r for r in reactor.getReaders()
                          if r.fileno() == listener.fds[0]])

    def test_ssl_gets_reuseport_sockets_and_passes_its_endpoint(self):
        """The workers do TLS themselves, with the endpoint's settings."""
        pem = os.path.join(os.path.dirname(twisted.test.__file__),
                           "server.pem")
        description = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
            pem, pem)
        [listener] = self.listeners([description], count=2)
        self.assertEqual(listener.tls, description)
        self.assertEqual(len(set(listener.fds)), 2)
        ports = {socket.socket(fileno=os.dup(fd)).getsockname()[1]
                 for fd in listener.fds}
        self.assertEqual(len(ports), 1)
        [plain] = self.listeners(["tcp:0:interface=127.0.0.1"])
        self.assertIsNone(plain.tls)

    def test_a_second_group_on_a_served_address_is_refused(self):
        """SO_REUSEPORT would let a second phantomd share the port (and
        take half its traffic); it must fail as any bind on it would."""
        [first] = self.listeners(["tcp:0:interface=127.0.0.1"], count=2)
        port = int(first.where.rpartition(":")[2])
        busy = "tcp:%d:interface=127.0.0.1" % port
        for count in (2, 1):
            e = self.assertRaises(configmod.ConfigError,
                                  workers.bind_listeners, reactor, [busy],
                                  count, "gw.ini")
            self.assertEqual(str(e), "gw.ini: [phantomd] listen: cannot "
                             "listen on %s: address already in use" % busy)

    def test_an_address_another_phantomd_is_binding_is_refused(self):
        """The gap between the probe and the group is covered by the
        per-address lock."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        lock = workers._address_lock(socket.AF_INET, "127.0.0.1", port)
        self.addCleanup(lock.close)
        busy = "tcp:%d:interface=127.0.0.1" % port
        e = self.assertRaises(configmod.ConfigError, workers.bind_listeners,
                              reactor, [busy], 2)
        self.assertIn("address already in use (another phantomd", str(e))
        lock.close()
        self.listeners([busy], count=2)

    def test_a_failed_bind_releases_the_others(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = "tcp:%d:interface=127.0.0.1" % taken.getsockname()[1]
        seen = []
        real = workers.Listener.close
        self.patch(workers.Listener, "close",
                   lambda self: (seen.append(self.where), real(self)))
        e = self.assertRaises(configmod.ConfigError, workers.bind_listeners,
                              reactor, ["tcp:0:interface=127.0.0.1", busy], 2,
                              "gw.ini")
        self.assertEqual(str(e), "gw.ini: [phantomd] listen: cannot listen "
                         "on %s: address already in use" % busy)
        self.assertEqual(len(seen), 1)


# A stand-in worker: serves its pid on the inherited socket and talks to the
# parent's notify socket the way a phantomd worker does.
FAKE_WORKER = textwrap.dedent("""\
    import os, select, signal, socket, sys
    fd, family = os.environ["PHANTOMD_WORKER_FDS"].split(",")[0].split(":")
    listener = socket.socket(fileno=int(fd))
    def notify(msg):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(msg, os.environ["NOTIFY_SOCKET"])
        s.close()
    signal.signal(signal.SIGHUP, lambda *a: notify(b"READY=1\\n"))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    with open(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"],
              "gauge_all_%d.db" % os.getpid()), "w"):
        pass
    notify(b"READY=1\\n")
    while True:
        try:
            r, _, _ = select.select([listener], [], [], 5)
        except InterruptedError:
            continue
        if r:
            try:  # the socket is non-blocking and shared: another may win
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.sendall(b"%d\\n" % os.getpid())
            conn.close()
    """)


class FakeGateway:
    def __init__(self, reactor, config, admin_registry=None):
        from phantomd.ops.admin import Readiness
        self.registry = admin_registry
        self.readiness = Readiness(reactor)
        self.readiness.mark_listening()
        self.readiness.token_service_ok()
        self.reloaded = []
        self.stopped = False

    def start(self, front_ports=None):
        assert front_ports == []
        return defer.succeed(self)

    def reload(self, config):
        self.reloaded.append(config)

    def stop(self):
        self.stopped = True
        return defer.succeed(None)


class SupervisorTests(TestCase):
    """A real Supervisor with real child processes on loopback."""

    timeout = 30

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="phantomd-wt-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ini = os.path.join(self.tmp, "phantomd.ini")
        with open(self.ini, "w") as f:
            f.write(INI)
        self.reloads = []
        self.systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.systemd.close)
        self.systemd.bind(os.path.join(self.tmp, "systemd-notify"))
        self.systemd.setblocking(False)
        script = os.path.join(self.tmp, "worker.py")
        with open(script, "w") as f:
            f.write(FAKE_WORKER)
        self.script = script
        self.sup = self._supervisor()
        self.addCleanup(self._stop)

    def _supervisor(self):
        sup = workers.Supervisor(
            reactor, configmod.load(self.ini),
            {"NOTIFY_SOCKET": self.systemd.getsockname(),
             "PATH": os.environ.get("PATH", "")},
            gateway_factory=FakeGateway, argv=[sys.executable, self.script],
            on_reload=self.reloads.append)
        sup.privilegedStartService()
        sup.startService()
        return sup

    def _stop(self):
        if self.sup.running:
            return self.sup.stopService()

    def notifications(self):
        out = []
        while True:
            try:
                out.append(self.systemd.recv(4096).decode())
            except BlockingIOError:
                return out

    @defer.inlineCallbacks
    def until(self, predicate, what):
        for _ in range(200):
            if predicate():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("timed out waiting for " + what)

    def ask(self):
        port = int(self.sup.listeners[0].where.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return int(s.makefile().readline())

    @defer.inlineCallbacks
    def test_ready_after_every_worker_then_serving_and_replacing(self):
        seen = []
        yield self.until(lambda: seen.extend(self.notifications()) or seen,
                         "READY=1")
        self.assertEqual(seen[0].splitlines()[0], "READY=1")
        pids = self.sup.pool.pids()
        self.assertEqual(len(pids), 2)
        answers = yield deferToThreadAsk(self, 8)
        self.assertTrue(set(answers) <= set(pids), (answers, pids))

        victim = pids[0]
        mdir = self.sup._metrics_dir
        os.kill(victim, signal.SIGKILL)
        yield self.until(lambda: len(self.sup.pool) == 2 and
                         victim not in self.sup.pool.pids(), "a new worker")
        self.assertFalse(os.path.exists(
            os.path.join(mdir, "gauge_all_%d.db" % victim)))
        answers = yield deferToThreadAsk(self, 8)
        self.assertNotIn(victim, answers)

    @defer.inlineCallbacks
    def test_a_long_tmpdir_does_not_stop_the_workers(self):
        # The notify sockets' paths must fit in a sockaddr_un (108 bytes).
        yield self.sup.stopService()
        long = os.path.join(self.tmp, "d" * 110)
        os.mkdir(long)
        self.patch(tempfile, "tempdir", long)
        self.notifications()
        self.sup = self._supervisor()
        seen = []
        yield self.until(lambda: seen.extend(self.notifications()) or
                         "READY=1" in "\n".join(seen), "READY=1")
        self.assertEqual(len(self.sup.pool.pids()), 2)

    @defer.inlineCallbacks
    def test_reload_forwards_good_and_refuses_bad(self):
        seen = []
        yield self.until(lambda: seen.extend(self.notifications()) or seen,
                         "READY=1")
        with open(self.ini, "a") as f:
            f.write("[cache]\nmax_entries = 5\n")
        self.sup.reload()
        seen = []
        yield self.until(lambda: seen.extend(self.notifications()) or
                         any(m.startswith("READY=1") for m in seen),
                         "READY=1 after reload")
        self.assertTrue(seen[0].startswith("RELOADING=1\nMONOTONIC_USEC="))
        self.assertEqual(self.sup.config.cache.max_entries, 5)
        self.assertEqual(len(self.sup.gateway.reloaded), 1)
        self.assertEqual(self.reloads, [self.sup.config])

        with open(self.ini, "a") as f:
            f.write("bogus = 1\n")
        pids = self.sup.pool.pids()
        self.sup.reload()
        self.assertEqual(self.sup.config.cache.max_entries, 5)
        msgs = self.notifications()
        self.assertEqual(msgs[0].splitlines()[0], "RELOADING=1")
        self.assertIn("READY=1\nSTATUS=reload refused:", msgs[1])
        self.assertIn("[cache] bogus: unknown key", msgs[1])
        self.assertEqual(self.sup.pool.pids(), pids)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_stop_sends_stopping_and_waits_for_workers(self):
        yield self.until(lambda: len(self.sup.pool) == 2, "workers")
        pids = self.sup.pool.pids()
        tmpdir = self.sup._dir
        yield self.sup.stopService()
        self.assertIn("STOPPING=1", self.notifications()[-1])
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertFalse(os.path.exists(tmpdir))
        self.assertTrue(self.sup.gateway.stopped)


    @defer.inlineCallbacks
    def test_process_metrics_per_worker_and_build_info(self):
        """One process_* series per process, labelled by worker slot; the
        parent's /metrics used to show none at all."""
        from prometheus_client import generate_latest
        yield self.until(lambda: len(self.sup.pool.slots()) == 2, "workers")
        text = generate_latest(self.sup.gateway.registry).decode()
        lines = [line for line in text.splitlines()
                 if line.startswith("process_resident_memory_bytes")]
        self.assertEqual(sorted(line.split(" ")[0] for line in lines), [
            'process_resident_memory_bytes{worker="0"}',
            'process_resident_memory_bytes{worker="1"}',
            'process_resident_memory_bytes{worker="parent"}'])
        for line in lines:
            self.assertGreater(float(line.split(" ")[1]), 0)
        starts = {}
        for line in text.splitlines():
            if line.startswith("process_start_time_seconds{"):
                starts[line.split('"')[1]] = float(line.split(" ")[1])
        self.assertEqual(set(starts), {"0", "1", "parent"})
        names = [line.split(" ")[0] for line in text.splitlines()
                 if line and not line.startswith("#")]
        self.assertEqual(len(names), len(set(names)), "duplicate series")
        self.assertIn('phantomd_build_info{version="%s"} 1.0'
                      % __import__("phantomd").__version__,
                      text.splitlines())

    @defer.inlineCallbacks
    def test_readyz_waits_for_every_worker(self):
        # No reactor turn since setUp spawned them: no READY=1 read yet.
        self.assertEqual(self.sup.gateway.readiness(),
                         (False, "0 of 2 workers serving"))
        yield self.until(lambda: self.sup.gateway.readiness()[0],
                         "ready once both workers serve")
        self.assertEqual(self.sup.readiness.serving, {0, 1})


class SupervisorReadinessTests(SynchronousTestCase):
    def test_every_worker_once_then_one_at_least(self):
        with tempfile.NamedTemporaryFile("w", suffix=".ini") as f:
            f.write(INI)
            f.flush()
            sup = workers.Supervisor(Clock(), configmod.load(f.name), {},
                                     gateway_factory=FakeGateway)
        check = sup._workers_ready
        sup.readiness.await_all(sup._all_serving)
        self.assertEqual(check(), "0 of 2 workers serving")
        sup.readiness.ready(0)
        self.assertEqual(check(), "1 of 2 workers serving")
        sup.readiness.ready(1)
        self.assertIsNone(check())
        sup.readiness.exited(0)
        self.assertIsNone(check(), "a restarting worker pulls no one")
        sup.readiness.exited(1)
        self.assertEqual(check(), "no worker serving")


def deferToThreadAsk(case, n):
    from twisted.internet.threads import deferToThread
    return deferToThread(lambda: [case.ask() for _ in range(n)])


class DieWithParentTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_orphaned_worker_gets_sigterm(self):
        """A middle process starts a 'worker' that asks for SIGTERM on its
        parent's death, then the middle process is SIGKILLed."""
        tmp = tempfile.mkdtemp(prefix="phantomd-pd-")
        self.addCleanup(shutil.rmtree, tmp, True)
        flag = os.path.join(tmp, "terminated")
        child = textwrap.dedent("""\
            import os, signal, sys, time
            sys.path.insert(0, %r)
            from phantomd.ops.workers import die_with_parent
            def done(*a):
                open(%r, "w").close()
                os._exit(0)
            signal.signal(signal.SIGTERM, done)
            assert die_with_parent({"PHANTOMD_PARENT_PID": str(os.getppid())})
            print(os.getpid(), flush=True)
            time.sleep(20)
            """ % (os.path.dirname(os.path.dirname(os.path.dirname(workers.__file__))), flag))
        middle = ("import subprocess, sys, time\n"
                  "p = subprocess.Popen([sys.executable, '-c', %r])\n"
                  "time.sleep(20)\n" % child)
        proc = subprocess.Popen([sys.executable, "-c", middle],
                                stdout=subprocess.PIPE)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.stdout.close)
        from twisted.internet.threads import deferToThread
        worker = int((yield deferToThread(proc.stdout.readline)))
        proc.kill()
        for _ in range(100):
            if os.path.exists(flag):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(os.path.exists(flag), "worker %d not told" % worker)


class ArchiveTests(SynchronousTestCase):
    """Dead workers' metric files are folded, not lost and not piled up."""

    def test_a_file_still_being_created_does_not_fail_the_scrape(self):
        # prometheus_client creates a starting worker's file, then sizes
        # it: a scrape in between met an empty file and raised
        # struct.error (seen in a clean-clone CI run).
        mdir = tempfile.mkdtemp(prefix="phantomd-settle-")
        self.addCleanup(shutil.rmtree, mdir, True)
        script = textwrap.dedent("""\
            import sys
            sys.path.insert(0, %r)
            from phantomd.ops.metrics import Metrics
            Metrics().request_answered(200)
            """ % os.path.dirname(os.path.dirname(os.path.dirname(
                workers.__file__))))
        subprocess.run([sys.executable, "-c", script], check=True,
                       timeout=60, env=dict(os.environ,
                                            PROMETHEUS_MULTIPROC_DIR=mdir))
        open(os.path.join(mdir, "counter_999999.db"), "wb").close()
        from prometheus_client.multiprocess import MultiProcessCollector
        import struct
        with self.assertRaises(struct.error):  # what the scrape met
            list(MultiProcessCollector(None, path=mdir).collect())
        samples = {(x.name, x.labels.get("code")): x.value
                   for family in workers.merged_workers(mdir)
                   for x in family.samples}
        self.assertEqual(samples[("phantomd_requests_total", "2xx")], 1.0)
        self.assertEqual(len(workers.settled_files(mdir)),
                         len(os.listdir(mdir)) - 1)

    def test_totals_survive_and_files_do_not_pile_up(self):
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        mdir = tempfile.mkdtemp(prefix="phantomd-arch-")
        self.addCleanup(shutil.rmtree, mdir, True)
        script = textwrap.dedent("""\
            import os, sys
            sys.path.insert(0, %r)
            from phantomd.ops.metrics import Metrics
            m = Metrics()
            m.request_answered(200)
            m.request_answered(502)
            m.introspection_duration.observe(0.02)
            m.cache_entries.set(5)
            print(os.getpid())
            """ % os.path.dirname(os.path.dirname(os.path.dirname(workers.__file__))))
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mdir)
        pids = [int(subprocess.run(
            [sys.executable, "-c", script], env=env, check=True, timeout=60,
            capture_output=True).stdout) for _ in range(3)]

        def scrape():
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=mdir)
            return generate_latest(registry).decode()

        before = scrape()
        self.assertIn('phantomd_requests_total{code="2xx"} 3.0', before)
        for pid in pids[:2]:
            workers.archive_dead_worker(mdir, pid)
        workers.archive_dead_worker(mdir, pids[0])  # twice: harmless
        after = scrape()
        self.assertIn('phantomd_requests_total{code="2xx"} 3.0', after)
        self.assertIn('phantomd_requests_total{code="5xx"} 3.0', after)
        self.assertIn("phantomd_introspection_duration_seconds_count 3.0",
                      after)
        # Gauges are summed over live workers (livesum): the dead ones'
        # entries are gone, the live one's remain, with no pid label.
        self.assertEqual(
            [line for line in after.splitlines()
             if line.split(" ")[0].split("{")[0] == "phantomd_cache_entries"],
            ["phantomd_cache_entries 5.0"])
        self.assertEqual(sorted(f for f in os.listdir(mdir)
                                if str(pids[2]) not in f),
                         ["counter_archive.db", "histogram_archive.db"])


class AdoptTests(TestCase):
    timeout = 20

    def listening(self):
        """A bound, listening loopback socket as a parent would hand it
        over: the socket, and a duplicate of its descriptor to adopt."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        return listener, os.dup(listener.fileno())

    @defer.inlineCallbacks
    def test_adopted_socket_is_non_blocking_and_serves(self):
        """systemd hands over a blocking socket; a worker must not block in
        accept when another worker took the connection."""
        from twisted.internet.protocol import Factory, Protocol
        listener, fd = self.listening()

        class Hello(Protocol):
            def connectionMade(self):
                self.transport.write(b"hi")
                self.transport.loseConnection()

        [port] = workers.adopt(reactor, Factory.forProtocol(Hello),
                               {workers.WORKER_FDS: "%d:INET" % fd})
        self.addCleanup(port.stopListening)
        self.assertFalse(os.get_blocking(listener.fileno()))
        self.assertRaises(OSError, os.fstat, fd)  # the original is closed
        from twisted.internet.threads import deferToThread

        def fetch():
            with socket.create_connection(listener.getsockname(), 5) as c:
                return c.recv(10)
        self.assertEqual((yield deferToThread(fetch)), b"hi")

    @defer.inlineCallbacks
    def test_adopted_ssl_socket_speaks_tls_and_selects_http11(self):
        import ssl
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.threads import deferToThread
        pem = os.path.join(os.path.dirname(twisted.test.__file__),
                           "server.pem")
        listener, fd = self.listening()

        class Hello(Protocol):
            def connectionMade(self):
                self.transport.write(b"hi")
                self.transport.loseConnection()

        environ = {workers.WORKER_FDS: "%d:INET" % fd,
                   workers.WORKER_TLS: json.dumps({str(fd): (
                       "ssl:0:privateKey=%s:certKey=%s" % (pem, pem))})}
        [port] = workers.adopt(reactor, Factory.forProtocol(Hello), environ)
        self.addCleanup(port.stopListening)

        def fetch():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(listener.getsockname(), 5) as c:
                with context.wrap_socket(c) as t:
                    return t.selected_alpn_protocol(), t.recv(10)
        self.assertEqual((yield deferToThread(fetch)), ("http/1.1", b"hi"))

    @defer.inlineCallbacks
    def test_adopted_ssl_socket_asks_for_client_certificates(self):
        """``[phantomd] tls_client_ca_file`` with workers: each worker's
        TLS asks for the client's certificate as one process does, so a
        certificate-bound token can pass there too."""
        import ssl
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.threads import deferToThread
        pem = os.path.join(os.path.dirname(twisted.test.__file__),
                           "server.pem")

        class Peer(Protocol):
            def dataReceived(self, data):
                cert = self.transport.getPeerCertificate()
                self.transport.write(b"cert" if cert is not None else b"none")
                self.transport.loseConnection()

        def serve(client_ca):
            listener, fd = self.listening()
            environ = {workers.WORKER_FDS: "%d:INET" % fd,
                       workers.WORKER_TLS: json.dumps({str(fd): (
                           "ssl:0:privateKey=%s:certKey=%s" % (pem, pem))})}
            [port] = workers.adopt(reactor, Factory.forProtocol(Peer),
                                   environ, client_ca=client_ca)
            self.addCleanup(port.stopListening)
            return listener.getsockname()

        def fetch(address):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.load_cert_chain(pem)
            with socket.create_connection(address, 5) as c:
                with context.wrap_socket(c) as t:
                    t.sendall(b"?")
                    return t.recv(10)
        self.assertEqual((yield deferToThread(fetch, serve(None))), b"none")
        self.assertEqual((yield deferToThread(fetch, serve(pem))), b"cert")
