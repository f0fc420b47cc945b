"""phantomd.ops.logs: text, JSON lines and journald output; the access log."""

from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from phantomd.ops.logs import (
    AccessLog, JSONLinesObserver, ObservedService, SwitchableObserver,
    TextObserver, Throttle,
    access_logger, journal_stream_matches, observer_for)
from phantomd.token.outcomes import Forward

TOKEN = "opaque-token-3f9a1c0e"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
SECRET = "Secr3t!"


def emit(observer, level="info", fmt="{what} happened", **fields):
    log = Logger(namespace="phantomd.test", observer=observer)
    getattr(log, level)(fmt, **fields)


class JSONLinesTests(SynchronousTestCase):
    def lines(self, **kw):
        out = io.StringIO()
        emit(JSONLinesObserver(out), **kw)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_one_object_per_event_with_fields(self):
        [rec] = self.lines(level="warn", what="reload", token_id="ab12cd34ef56",
                           count=3)
        self.assertEqual(rec["level"], "warn")
        self.assertEqual(rec["namespace"], "phantomd.test")
        self.assertEqual(rec["message"], "reload happened")
        self.assertEqual(rec["token_id"], "ab12cd34ef56")
        self.assertEqual(rec["count"], 3)
        self.assertRegex(rec["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
        self.assertFalse([k for k in rec if k.startswith("log_")])

    def test_time_is_utc_whatever_the_zone(self):
        out = io.StringIO()
        JSONLinesObserver(out)({"log_time": 0.25, "log_format": "x",
                                "log_namespace": "t"})
        self.assertEqual(json.loads(out.getvalue())["time"],
                         "1970-01-01T00:00:00.250000Z")

    def test_sensitive_fields_are_dropped(self):
        [rec] = self.lines(what="x", token=TOKEN, jwt=JWT, Client_Secret=SECRET,
                           Authorization="Bearer " + TOKEN,
                           headers={"authorization": "Bearer " + TOKEN,
                                    "accept": "*/*"})
        text = json.dumps(rec)
        for secret in (TOKEN, JWT, SECRET):
            self.assertNotIn(secret, text)
        self.assertEqual(rec["headers"], {"accept": "*/*"})

    def test_format_string_naming_a_secret_shows_redacted(self):
        [rec] = self.lines(fmt="introspecting {token}", token=TOKEN)
        self.assertEqual(rec["message"], "introspecting <redacted>")

    def test_objects_are_written_as_their_type(self):
        """An outcome's repr carries the JWT; only its type name is logged."""
        [rec] = self.lines(what="x", outcome=Forward(jwt=JWT),
                           error=ValueError("bad port"))
        self.assertEqual(rec["outcome"], "<Forward>")
        self.assertEqual(rec["error"], "ValueError: bad port")

    def test_failure_traceback_in_message(self):
        out = io.StringIO()
        log = Logger(namespace="phantomd.test", observer=JSONLinesObserver(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("reload failed", Failure())
        rec = json.loads(out.getvalue())
        self.assertEqual(rec["level"], "critical")
        self.assertIn("reload failed\nTraceback", rec["message"])
        self.assertIn("ZeroDivisionError", rec["message"])

    def test_journal_prefix(self):
        out = io.StringIO()
        emit(JSONLinesObserver(out, prefix=True), level="error", what="x")
        self.assertTrue(out.getvalue().startswith("<3>{"))


class TextTests(SynchronousTestCase):
    def test_classic_line(self):
        out = io.StringIO()
        emit(TextObserver(out), fmt="bound {port} for {token}", port=8080,
             token=TOKEN)
        line = out.getvalue()
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} "
                               r"\[phantomd\.test#info\] bound 8080 for "
                               r"<redacted>\n$")

    def test_journal_priority_per_level_and_per_line(self):
        table = [("debug", "<7>"), ("info", "<6>"), ("warn", "<4>"),
                 ("error", "<3>"), ("critical", "<2>")]
        for level, prefix in table:
            out = io.StringIO()
            emit(TextObserver(out, journal=True), level=level,
                 fmt="first\nsecond")
            self.assertEqual(out.getvalue(), "%s[phantomd.test] first\n"
                             "%ssecond\n" % (prefix, prefix), level)

    def test_switchable(self):
        a, b = io.StringIO(), io.StringIO()
        switch = SwitchableObserver(TextObserver(a))
        emit(switch, what="one")
        switch.observer = JSONLinesObserver(b)
        emit(switch, what="two")
        self.assertIn("one happened", a.getvalue())
        self.assertNotIn("two", a.getvalue())
        self.assertEqual(json.loads(b.getvalue())["message"], "two happened")


class ChoiceTests(SynchronousTestCase):
    def test_journal_stream_identity(self):
        path = self.mktemp()
        with open(path, "w") as f:
            st = os.fstat(f.fileno())
            mine = "%d:%d" % (st.st_dev, st.st_ino)
            table = [
                ({}, False),
                ({"JOURNAL_STREAM": mine}, True),
                ({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino + 1)},
                 False),
                ({"JOURNAL_STREAM": "garbage"}, False),
            ]
            for env, expected in table:
                self.assertEqual(journal_stream_matches(env, f), expected, env)
            self.assertFalse(journal_stream_matches({"JOURNAL_STREAM": mine},
                                                    io.StringIO()))

    def test_observer_for(self):
        out = io.StringIO()
        text = observer_for(SimpleNamespace(format="text", level="debug"),
                            out, {})
        js = observer_for(SimpleNamespace(format="json", level="debug"),
                          out, {})
        self.assertIsInstance(text, TextObserver)
        self.assertIsInstance(js, JSONLinesObserver)

    def test_level_drops_less_severe_lines_but_never_access_lines(self):
        """``[log] level = warn``: debug and info lines are not written,
        warnings and errors are, and so is the access log (asked for by
        ``[log] access = yes``, whatever the level)."""
        out = io.StringIO()
        observer = observer_for(SimpleNamespace(format="text", level="warn"),
                                out, {})
        log = Logger(namespace="phantomd.test", observer=observer)
        log.debug("a debug line")
        log.info("an info line")
        log.warn("a warning line")
        log.error("an error line")
        AccessLog(Logger(namespace="phantomd.access", observer=observer))(
            dict(method=b"GET", path=b"/x", status=200))
        text = out.getvalue()
        self.assertNotIn("debug line", text)
        self.assertNotIn("info line", text)
        self.assertIn("a warning line", text)
        self.assertIn("an error line", text)
        self.assertIn("GET /x 200", text)
        out.truncate(0)
        observer = observer_for(SimpleNamespace(format="json", level="info"),
                                out, {})
        Logger(namespace="phantomd.test", observer=observer).debug("dbg")
        Logger(namespace="phantomd.test", observer=observer).info("inf")
        self.assertNotIn("dbg", out.getvalue())
        self.assertIn("inf", out.getvalue())

    def test_access_logger_only_when_asked(self):
        self.assertIsNone(access_logger(SimpleNamespace(access=False)))
        self.assertIsInstance(access_logger(SimpleNamespace(access=True)),
                              AccessLog)


class AccessLogTests(SynchronousTestCase):
    def record(self, **overrides):
        events = []
        log = Logger(namespace="phantomd.access", observer=events.append)
        rec = dict(client="203.0.113.7", method=b"GET",
                   path=b"/orders/7?page=2", status=200,
                   duration=0.0123, upstream_duration=0.01, cache="hit",
                   token_id="ab12cd34ef56", bytes_sent=512,
                   request_id="req-1", end="ok")
        rec.update(overrides)
        AccessLog(log)(rec)
        self.assertEqual(len(events), 1)
        return events[0]

    def test_one_event_with_the_fields(self):
        event = self.record()
        self.assertEqual(event["path"], "/orders/7?page=2")
        self.assertEqual(event["status"], 200)
        self.assertEqual(event["duration_ms"], 12.3)
        self.assertEqual(event["upstream_ms"], 10.0)
        self.assertEqual(
            formatEvent(event),
            "203.0.113.7 GET /orders/7?page=2 200 512B 12.3ms"
            " upstream=10.0ms cache=hit token_id=ab12cd34ef56"
            " request_id=req-1 end=ok")
        self.assertEqual((event["client"], event["request_id"],
                          event["end"]), ("203.0.113.7", "req-1", "ok"))

    def test_a_request_cut_before_any_answer(self):
        """No status line went out: the text says -, JSON says null."""
        event = self.record(method="-", path="", status=None,
                            upstream_duration=None, cache=None,
                            token_id=None, bytes_sent=0, end="drain")
        self.assertEqual(
            formatEvent(event),
            "203.0.113.7 - - - 0B 12.3ms upstream=- cache=- token_id=-"
            " request_id=req-1 end=drain")
        out = io.StringIO()
        JSONLinesObserver(out)(event)
        record = json.loads(out.getvalue())
        self.assertIsNone(record["status"])
        self.assertEqual(record["end"], "drain")

    def test_fields_cannot_forge_the_line(self):
        event = self.record(request_id="a\nfake b", client="x y",
                            method="G\rET")
        self.assertEqual(formatEvent(event).split(" ")[:2],
                         ["x%20y", "G%0DET"])
        self.assertIn(" request_id=a%0Afake%20b ", formatEvent(event))

    def test_missing_upstream(self):
        event = self.record(upstream_duration=None, cache="", token_id="",
                            status=401)
        self.assertIsNone(event["upstream_ms"])
        self.assertIn(" upstream=- ", formatEvent(event))
        self.assertEqual(event["cache"], "-")
        self.assertEqual(event["token_id"], "-")

    def test_query_credentials_redacted(self):
        table = [
            (b"/a?access_token=" + TOKEN.encode(), "/a?access_token=<redacted>"),
            (b"/a?x=1&TOKEN=" + TOKEN.encode() + b"&y=2",
             "/a?x=1&TOKEN=<redacted>&y=2"),
            (b"/a?tokenish=1", "/a?tokenish=1"),
            (b"/a\r\nfake: line", "/a%0D%0Afake:%20line"),
            ("/caf\xe9", "/caf%E9"),
        ]
        for raw, expected in table:
            self.assertEqual(self.record(path=raw)["path"], expected, raw)

    def test_unknown_fields_never_logged(self):
        event = self.record(authorization="Bearer " + TOKEN, jwt=JWT)
        self.assertNotIn("authorization", event)
        self.assertNotIn("jwt", event)


class ObservedServiceTests(SynchronousTestCase):
    def test_twistd_uses_our_observer(self):
        """twistd's AppLogger asks the application for ILogObserver after
        makeService; attaching the service must have registered ours."""
        from twisted.application.service import Application, IService
        from twisted.logger import ILogObserver
        out = io.StringIO()
        top = ObservedService(SimpleNamespace(format="json"), out, {})
        app = Application("phantomd")
        top.setServiceParent(app)
        observer = app.getComponent(ILogObserver)
        self.assertIs(observer, top.observer)
        self.assertIn(top, list(IService(app)))
        emit(observer, what="x")
        self.assertEqual(json.loads(out.getvalue())["message"], "x happened")

    def test_reconfigure_switches_format(self):
        out = io.StringIO()
        top = ObservedService(SimpleNamespace(format="json"), out, {})
        top.reconfigure(SimpleNamespace(format="text"))
        emit(top.observer, what="y")
        self.assertRegex(out.getvalue(), r"\[phantomd\.test#info\] y happened")

    def test_plain_parent_is_fine(self):
        from twisted.application.service import MultiService
        parent = MultiService()
        ObservedService(SimpleNamespace(format="text"), io.StringIO(),
                        {}).setServiceParent(parent)
        self.assertEqual(len(list(parent)), 1)


class ThrottleTests(SynchronousTestCase):
    def test_one_line_per_key_per_interval_with_the_count_dropped(self):
        clock = Clock()
        throttle = Throttle(clock, 10.0, max_keys=2)
        self.assertEqual(throttle.admit("a"), 0)
        self.assertEqual([throttle.admit("a") for _ in range(3)],
                         [None] * 3)
        self.assertEqual(throttle.admit("b"), 0)  # keys are independent
        clock.advance(9.9)
        self.assertIsNone(throttle.admit("a"))
        clock.advance(0.1)
        self.assertEqual(throttle.admit("a"), 4)
        self.assertIsNone(throttle.admit("a"))
        # a third key empties the map: every key starts afresh
        self.assertEqual(throttle.admit("c"), 0)
        self.assertEqual(throttle.admit("a"), 0)
