"""The twistd plugin: ``twistd -n phantomd --config FILE`` (or ``--demo``).

The only module that touches the global reactor; everything it builds takes
the reactor as a parameter.

A mistake in the ini, or a listener that cannot be bound, ends twistd with
one line (file, section, key and what is wrong) and exit status 1.  twistd
prints its whole usage text before a ``UsageError`` and a traceback after
any other exception, which buries that line, so these two cases leave
through ``StartupError`` (a ``SystemExit``) instead; ``UsageError`` stays
for mistakes on the command line itself.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from phantomd import config as configmod
from phantomd.ops import heap, logs, workers
from phantomd.ops.sdnotify import Notifier, NotifyService, where

log = Logger()


class StartupError(SystemExit):
    """Ends twistd with exit status 1; its message, if any, is the one line
    Python prints to stderr on the way out."""

    def __init__(self, message: Optional[str] = None) -> None:
        super().__init__(1 if message is None else message)


class Options(usage.Options):
    synopsis = "[--config FILE | --demo]"
    longdesc = (
        "Run the phantomd phantom-token gateway: clients send opaque bearer "
        "tokens, the API receives JWTs.  --config names the ini file (see "
        "etc/phantomd.ini); --demo runs against a built-in demo token "
        "service and echo API on loopback and prints curl commands to try.")
    optParameters = [
        ["config", "c", None, "Path to the phantomd ini file."],
    ]
    optFlags = [
        ["demo", None, "Run a self-contained demo on loopback."],
    ]

    def postOptions(self) -> None:
        if self["demo"]:
            if self["config"]:
                raise usage.UsageError("--demo and --config exclude each "
                                       "other")
            return
        if not self["config"]:
            raise usage.UsageError("--config FILE is required (or --demo)")
        from phantomd import app
        load = (workers.worker_config if workers.is_worker(os.environ)
                else configmod.load)
        try:
            self["parsed"] = load(self["config"])
            app.check(self["parsed"])
        except configmod.ConfigError as e:
            raise StartupError("phantomd: %s" % e)


class GatewayService(service.Service):
    """Runs one ``Gateway``; binds in ``privilegedStartService`` so that a
    listener that cannot bind stops twistd instead of being logged."""

    def __init__(self, reactor, config, gateway_factory=None,
                 notifier=None, logging=None, load=configmod.load,
                 adopt=None, before_start=None) -> None:
        self.reactor = reactor
        self.config = config
        self.gateway = None
        self._factory = gateway_factory
        # systemd notifications; a no-op without NOTIFY_SOCKET.
        self.notifier = notifier if notifier is not None else Notifier(
            reactor, {})
        # The log observer ([log] format) to switch on reload.
        self.logging = logging
        # How to read the ini, and in a worker how to adopt the listening
        # sockets the parent passed (see phantomd.ops.workers).
        self._load = load
        self._adopt = adopt
        # In a worker: opens the parent's revocation channel before serving.
        self._before_start = before_start

    def privilegedStartService(self) -> None:
        from phantomd.app import Gateway
        make = self._factory or Gateway
        access = logs.access_logger(self.config.log)
        self.gateway = (make(self.reactor, self.config) if access is None
                        else make(self.reactor, self.config,
                                  access_log=access))
        if self._before_start is not None:
            self._before_start(self.gateway)
        failures = []
        started = (self.gateway.start() if self._adopt is None else
                   self.gateway.start(
                       front_ports=self._adopt(self.gateway.front)))
        started.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        # Once bound and started: what startup built lives as long as the
        # process, and full collections need not walk it (ops/heap.py).
        self.reactor.addSystemEventTrigger("after", "startup", heap.settle)
        if hasattr(signal, "SIGHUP"):
            self.reactor.addSystemEventTrigger(
                "after", "startup", self._install_sighup)

    def _install_sighup(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(
            self.reload))

    def reload(self) -> None:
        """Tell systemd RELOADING=1, reload, then READY=1 whatever happened
        (systemd waits for READY after RELOADING)."""
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready(self.describe())

    def describe(self) -> str:
        """STATUS= text for systemctl status."""
        if self.gateway is None:
            return "starting"
        return "serving on %s" % where(self.gateway.front_ports)

    def _reload(self) -> None:
        """Re-read the ini; on any mistake keep running on the old one."""
        path = self.config.path
        try:
            new = self._load(path)
            self.gateway.reload(new)
        except configmod.ConfigError as e:
            log.error("reload refused, still running on the previous "
                      "configuration: {error}", error=str(e))
            return
        self.config = new
        if self.logging is not None:
            self.logging.reconfigure(new.log)
        heap.settle()  # the old configuration's cycles go now

    def stopService(self):
        super().stopService()
        if self.gateway is not None:
            return self.gateway.stop()


class TopService(logs.ObservedService):
    """The service twistd starts: a listener that cannot be bound (a
    ``ConfigError`` from binding) is logged as one critical line, in the
    configured log format, and ends twistd with status 1."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except configmod.ConfigError as e:
            log.critical("{error}", error=str(e))
            raise StartupError()


def makeService(options) -> service.IService:
    from twisted.internet import reactor
    from phantomd.http.fastio import lean_polling

    lean_polling(reactor)

    if options["demo"]:
        from phantomd.ops.demo import DemoService
        return DemoService(reactor)
    config = options["parsed"]
    # Registers phantomd's observer ([log] format, journald) with twistd.
    top = TopService(config.log, sys.stdout, os.environ)
    if not workers.is_worker(os.environ):  # once, not once per worker
        from phantomd.app import warn_exposed_secrets
        warn_exposed_secrets(config)
    if workers.is_worker(os.environ):
        workers.die_with_parent(os.environ)

        def adopt(factory):
            return workers.adopt(
                reactor, factory, os.environ,
                client_ca=config.phantomd.tls_client_ca_file)
        load = workers.worker_config

        def before_start(gateway):
            from phantomd.fleet import workerrevoke
            workerrevoke.listen(reactor, os.environ, gateway)
    elif config.phantomd.workers > 1:
        # The parent: binds, runs and watches the workers, serves /metrics.
        workers.Supervisor(reactor, config, os.environ,
                           on_reload=lambda new: top.reconfigure(new.log)
                           ).setServiceParent(top)
        return top
    else:
        adopt, load, before_start = None, configmod.load, None
    notifier = Notifier(reactor, os.environ)
    gateway = GatewayService(reactor, config, notifier=notifier,
                             logging=top, load=load, adopt=adopt,
                             before_start=before_start)
    gateway.setServiceParent(top)
    # After the gateway: READY once it has bound, STOPPING before it drains.
    NotifyService(notifier, gateway.describe, reactor).setServiceParent(top)
    return top
