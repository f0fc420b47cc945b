"""etc/alerts.yml, etc/grafana-dashboard.json and the /metrics text, checked
with promtool against the metric names phantomd actually exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from phantomd.ops.metrics import Metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "etc", "alerts.yml")
DASHBOARD = os.path.join(ROOT, "etc", "grafana-dashboard.json")
PROMTOOL = shutil.which("promtool")
METRIC_NAME = re.compile(r"\b(?:phantomd|process)_[a-zA-Z0-9_]+")
# Prometheus' own series, which the dashboard and alerts may use too.
PROMETHEUS_OWN = re.compile(r"\bup\{")


def drive(metrics: Metrics) -> None:
    """Some traffic of every kind, so every series has samples."""
    for status in (200, 200, 204, 401, 403, 502, 503):
        metrics.request_answered(status)
    for result in ("hit", "hit", "miss", "negative_hit"):
        metrics.cache_lookups.labels(result=result).inc()
    for outcome in ("active", "inactive", "error", "timeout", "shed"):
        metrics.introspections.labels(outcome=outcome).inc()
    metrics.coalesced.inc(3)
    for h, v in ((metrics.introspection_duration, 0.02),
                 (metrics.upstream_duration, 0.004),
                 (metrics.request_duration, 0.03)):
        h.observe(v)
    metrics.cache_entries.set(42)
    metrics.introspections_in_flight.set(2)


def exported_names() -> set[str]:
    """Every sample name in a scrape of phantomd's metrics."""
    metrics = Metrics()
    drive(metrics)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0]
            for line in text.splitlines() if line and line[0] != "#"}


def dashboard_exprs() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    return [(p["title"], t["expr"]) for p in dash["panels"]
            for t in p.get("targets", [])]


class PromtoolCase(SynchronousTestCase):
    def setUp(self):
        if PROMTOOL is None:
            raise self.skipTest("promtool is not installed")
        self.dir = tempfile.mkdtemp(prefix="phantomd-promtool-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def promtool(self, *args, stdin=None):
        result = subprocess.run([PROMTOOL, *args], input=stdin,
                                capture_output=True, timeout=60)
        return result.returncode, (result.stdout + result.stderr).decode()

    def check_metrics(self, text: bytes):
        code, out = self.promtool("check", "metrics", stdin=text)
        self.assertEqual(code, 0, out)
        self.assertEqual(out.strip(), "")


class RulesTests(PromtoolCase):
    def test_check_rules(self):
        code, out = self.promtool("check", "rules", ALERTS)
        self.assertEqual(code, 0, out)
        self.assertIn("SUCCESS: 8 rules found", out)

    def test_rules_reference_only_exported_metrics(self):
        with open(ALERTS) as f:
            used = set(METRIC_NAME.findall(f.read()))
        self.assertTrue(used)
        self.assertEqual(used - exported_names(), set())

    def test_each_alert_fires_on_trouble_and_not_on_health(self):
        """promtool's rule unit tests on synthetic series (annotations are
        stripped: they are prose, the expressions are what must work)."""
        try:
            import yaml
        except ImportError:
            raise self.skipTest("PyYAML is not installed")
        with open(ALERTS) as f:
            rules = yaml.safe_load(f)
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        bare = os.path.join(self.dir, "alerts.yml")
        with open(bare, "w") as f:
            yaml.safe_dump(rules, f)

        def case(alert, severity, at, bad, good):
            def series(table):
                return [{"series": s, "values": v} for s, v in table]
            expect = {"exp_labels": {"instance": "a", "severity": severity}}
            return [
                {"interval": "1m", "input_series": series(bad),
                 "alert_rule_test": [{"eval_time": at, "alertname": alert,
                                      "exp_alerts": [expect]}]},
                {"interval": "1m", "input_series": series(good),
                 "alert_rule_test": [{"eval_time": at, "alertname": alert,
                                      "exp_alerts": []}]},
            ]

        intro = 'phantomd_introspections_total{instance="a",outcome="%s"}'
        lookups = 'phantomd_cache_lookups_total{instance="a",result="%s"}'
        bucket = ('phantomd_introspection_duration_seconds_bucket'
                  '{instance="a",le="%s"}')
        reqs = 'phantomd_requests_total{instance="a",code="%s"}'
        shared = 'phantomd_shared_cache_errors_total{instance="a",kind="%s"}'
        dpop = 'phantomd_dpop_failures_total{instance="a",reason="%s"}'
        tests = (
            case("PhantomdTokenServiceErrors", "critical", "20m",
                 [(intro % "error", "0+60x30"), (intro % "active", "0+60x30")],
                 [(intro % "error", "0+1x30"), (intro % "active", "0+60x30")])
            + case("PhantomdIntrospectionShedding", "warning", "20m",
                   [(intro % "shed", "0+60x30")],
                   [(intro % "shed", "0+0x30"), (intro % "active", "0+60x30")])
            + case("PhantomdCacheHitRatioCollapse", "warning", "40m",
                   [(lookups % "hit", "0+30x45"), (lookups % "miss", "0+90x45")],
                   [(lookups % "hit", "0+110x45"),
                    (lookups % "miss", "0+10x45")])
            + case("PhantomdIntrospectionLatencyHigh", "warning", "25m",
                   [(bucket % "0.5", "0+0x30"), (bucket % "1.0", "0+0x30"),
                    (bucket % "2.5", "0+60x30"), (bucket % "+Inf", "0+60x30")],
                   [(bucket % "0.5", "0+60x30"), (bucket % "1.0", "0+60x30"),
                    (bucket % "2.5", "0+60x30"), (bucket % "+Inf", "0+60x30")])
            + case("PhantomdHigh5xxRatio", "critical", "20m",
                   [(reqs % "5xx", "0+30x30"), (reqs % "2xx", "0+60x30")],
                   [(reqs % "5xx", "0+1x30"), (reqs % "2xx", "0+600x30")])
            + case("PhantomdSharedCacheDegraded", "warning", "25m",
                   [(shared % "timeout", "0+60x30")],
                   [(shared % "timeout", "0+1x30")])
            + case("PhantomdDPoPReplayCheckFailing", "warning", "20m",
                   [(dpop % "full", "0+60x30")],
                   [(dpop % "full", "0+1x30"), (dpop % "replay", "0+600x30")])
        )
        spec = os.path.join(self.dir, "alerts_test.yml")
        with open(spec, "w") as f:
            yaml.safe_dump({"rule_files": [bare], "evaluation_interval": "1m",
                            "tests": tests}, f)
        code, out = self.promtool("test", "rules", spec)
        self.assertEqual(code, 0, out)

    def test_target_down_fires_after_two_minutes_of_failed_scrapes(self):
        try:
            import yaml
        except ImportError:
            raise self.skipTest("PyYAML is not installed")
        with open(ALERTS) as f:
            rule, = [r for g in yaml.safe_load(f)["groups"]
                     for r in g["rules"]
                     if r["alert"] == "PhantomdTargetDown"]
        summary = rule["annotations"]["summary"].replace(
            "{{ $labels.instance }}", "a")
        description = rule["annotations"]["description"].replace(
            "{{ $labels.instance }}", "a")
        up = 'up{job="phantomd",instance="a"}'
        other = 'up{job="node",instance="b"}'
        down = {"alertname": "PhantomdTargetDown", "exp_alerts": [
            {"exp_labels": {"job": "phantomd", "instance": "a",
                            "severity": "critical"},
             "exp_annotations": {"summary": summary,
                                 "description": description}}]}
        quiet = {"alertname": "PhantomdTargetDown", "exp_alerts": []}
        tests = [
            # Up for 5 minutes, then scrapes fail.
            {"interval": "1m",
             "input_series": [{"series": up, "values": "1x4 0x5"},
                              {"series": other, "values": "0x10"}],
             "alert_rule_test": [dict(quiet, eval_time="4m"),
                                 dict(quiet, eval_time="6m"),
                                 dict(down, eval_time="8m")]},
            {"interval": "1m",
             "input_series": [{"series": up, "values": "1x10"}],
             "alert_rule_test": [dict(quiet, eval_time="10m")]},
        ]
        spec = os.path.join(self.dir, "target_down_test.yml")
        with open(spec, "w") as f:
            json.dump({"rule_files": [ALERTS], "evaluation_interval": "1m",
                       "tests": tests}, f)
        code, out = self.promtool("test", "rules", spec)
        self.assertEqual(code, 0, out)


class MetricsTextTests(PromtoolCase):
    def test_scrape_passes_promtool_lint(self):
        metrics = Metrics()
        drive(metrics)
        self.check_metrics(generate_latest(metrics.registry))

    def test_multiprocess_scrape_passes_promtool_lint(self):
        """What the workers' parent serves: two processes' files merged."""
        mdir = os.path.join(self.dir, "metrics")
        os.mkdir(mdir)
        script = textwrap.dedent("""\
            import sys
            sys.path.insert(0, %r)
            sys.path.insert(0, %r)
            from phantomd.ops.metrics import Metrics
            from test_promtool import drive
            drive(Metrics())
            """ % (ROOT, os.path.join(ROOT, "tests")))
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mdir)
        for _ in range(2):
            subprocess.run([sys.executable, "-c", script], env=env,
                           check=True, timeout=60)
        from prometheus_client.multiprocess import MultiProcessCollector

        from phantomd.ops.metrics import BuildInfo
        from phantomd.ops.workers import WorkerProcesses
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=mdir)
        registry.register(BuildInfo())
        registry.register(WorkerProcesses(
            lambda: {0: os.getpid(), 1: os.getpid()}))
        text = generate_latest(registry)
        self.check_metrics(text)
        self.assertIn(b'phantomd_requests_total{code="2xx"} 6.0', text)
        self.assertIn(b'process_open_fds{worker="1"}', text)


class DashboardTests(PromtoolCase):
    def test_panels_cover_what_operators_ask_for(self):
        titles = [t for t, _ in dashboard_exprs()]
        for wanted in ("Requests by status class", "Cache hit ratio",
                       "Introspection latency", "Upstream latency",
                       "Coalesced requests", "Introspections in flight"):
            self.assertIn(wanted, titles)
        exprs = " ".join(e for _, e in dashboard_exprs())
        self.assertIn("histogram_quantile(0.5,", exprs)
        self.assertIn("histogram_quantile(0.99,", exprs)

    def test_every_expression_uses_exported_metrics(self):
        exported = exported_names()
        for title, expr in dashboard_exprs():
            used = set(METRIC_NAME.findall(expr))
            self.assertTrue(used or PROMETHEUS_OWN.search(expr), title)
            self.assertEqual(used - exported, set(), title)

    def test_panels_for_connections_processes_and_targets(self):
        exprs = {title: " ".join(e for t, e in dashboard_exprs()
                                 if t == title)
                 for title, _ in dashboard_exprs()}
        for title, name in (
                ("Client connections", "phantomd_client_connections"),
                ("Connections rejected",
                 "phantomd_connections_rejected_total"),
                ("Targets up", 'up{job="phantomd"}'),
                ("Resident memory per process",
                 "process_resident_memory_bytes"),
                ("CPU per process", "process_cpu_seconds_total"),
                ("Versions running", "phantomd_build_info")):
            self.assertIn(name, exprs.get(title, ""), title)

    def test_every_expression_is_valid_promql(self):
        """Each expression, with Grafana's variables filled in, as a
        recording rule that promtool parses."""
        rules = []
        for i, (title, expr) in enumerate(dashboard_exprs()):
            expr = expr.replace("$__rate_interval", "5m").replace(
                "$instance", ".*")
            rules.append("      - record: dashboard:panel_%d\n"
                         "        expr: %s\n" % (i, json.dumps(expr)))
        path = os.path.join(self.dir, "dashboard.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n" +
                    "".join(rules))
        code, out = self.promtool("check", "rules", path)
        self.assertEqual(code, 0, out)

    def test_panels_have_unique_ids_and_do_not_overlap(self):
        with open(DASHBOARD) as f:
            panels = json.load(f)["panels"]
        self.assertEqual(len({p["id"] for p in panels}), len(panels))
        cells = set()
        for p in panels:
            g = p["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    self.assertNotIn((x, y), cells, p["title"])
                    cells.add((x, y))
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
