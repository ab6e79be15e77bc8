"""A real Prometheus server scrapes `otwatch replay --metrics` on the bundled capture with attacks;
every dashboard panel and alert rule expression is then run through Prometheus' HTTP API.

Needs Debian's ``prometheus`` and ``promtool`` (``make test`` installs them).  Everything binds to
127.0.0.1 on free ports; the servers are stopped by the fixtures' finalizers.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.conftest import PROJECT_PCAPS, ROOT

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "otwatch.json"
MIXED = PROJECT_PCAPS / "mixed.pcap"
# What Grafana substitutes in panel queries, as it would for a 1-hour dashboard at this scrape rate.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*", "$site": ".*"}

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="needs prometheus and promtool (`make test` installs Debian's prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promtool(*args, cwd=None) -> str:
    done = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def replay_supports_alerts() -> bool:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "replay", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60).stdout
    return "--alerts" in out


class Prom:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params):
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        data = self.get("/api/v1/query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prometheus scraping every second, and a replay of mixed.pcap it scraped from start to end."""
    tmp = tmp_path_factory.mktemp("prom")
    metrics_port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "otwatch", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    procs = []
    try:
        prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
        procs.append(prom)
        api = Prom(f"http://127.0.0.1:{prom_port}")
        _wait(lambda: _ready(api.url), 20, "prometheus ready")

        alerts = tmp / "alerts.jsonl"
        cmd = [sys.executable, "-m", "agent.cli", "replay", "--json", "--no-progress",
               "--metrics", f"127.0.0.1:{metrics_port}", "--wait-scrape", "20", "--linger", "30", str(MIXED)]
        with_alerts = replay_supports_alerts()
        if with_alerts:
            cmd += ["--alerts", str(alerts)]
        replay = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(replay)
        summary = json.loads(replay.stdout.readline())  # printed when the input is done, before lingering
        # Wait until Prometheus has scraped the final values, then two rule evaluations more.
        _wait(lambda: api.value("sum(otwatch_frames_total)") == summary["frames"], 15, "final scrape")
        time.sleep(2.5)
        yield {"api": api, "summary": summary, "replay": replay, "alerts": alerts if with_alerts else None,
               "config": cfg, "prom": prom}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def substitute(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def rule_list() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def operands(expr: str) -> list[str]:
    """The measured parts of a rule expression: each side of ``and``/``or``/``unless`` without its
    threshold comparison (``... > 0``), i.e. what must return series for the rule to be able to fire.

    >>> operands('sum(rate(a[5m])) == 0 and on (instance) up{job="x"} == 1')
    ['sum(rate(a[5m]))', 'up{job="x"}']
    """
    parts = re.split(r"\s(?:and|or|unless)(?:\s+on\s*\([^)]*\))?\s", expr)
    out = []
    for part in parts:
        m = re.match(r"(?s)^(.*?)\s*(==|!=|>=|<=|>|<)\s*[0-9.e-]+\s*$", part.strip())
        out.append(m.group(1) if m else part.strip())
    return out


def test_promtool_checks_pass(tmp_path):
    promtool("check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    promtool("check", "rules", RULES)
    out = promtool("test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out


def test_prometheus_scraped_every_counter_of_the_run(stack):
    api, summary = stack["api"], stack["summary"]
    assert api.value('up{job="otwatch"}') == 1
    assert api.value("sum(otwatch_bytes_total)") == summary["bytes"]
    for name, v in summary["by_protocol"].items():
        assert api.value(f'sum(otwatch_frames_total{{protocol="{name}"}})') == v["frames"], name
        assert api.value(f'sum(otwatch_pdus_total{{protocol="{name}"}})') == v["pdus"], name
    # The first scrape saw the counters at 0 (--wait-scrape), so increase() covers the whole run.
    assert api.value("min_over_time(sum(otwatch_frames_total)[1m:1s])") == 0
    assert api.value("sum(increase(otwatch_frames_total[1m]))") > 0.9 * summary["frames"]


def test_every_dashboard_panel_expression_returns_data(stack):
    api = stack["api"]
    names = set(api.get("/api/v1/label/__name__/values"))
    empty = []
    for title, expr in dashboard_targets():
        used = set(re.findall(r"\botwatch_[a-z0-9_]+\b", expr))
        if not (used and used <= names):  # a panel on a metric nobody exports
            empty.append((title, sorted(used - names)))
            continue
        result = api.query(substitute(expr))
        # Data means a number: a quantile over empty histogram buckets is NaN, which is no data.
        if not any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result):
            empty.append((title, expr))
    assert not empty, empty


def test_every_alert_rule_expression_returns_data(stack):
    """Each rule's expression (its left side, for rules whose condition is not met by this run)
    returns series, and the rules met by this run fire."""
    api = stack["api"]
    for rule in rule_list():
        for part in operands(rule["expr"]):
            assert api.query(part), (rule["alert"], part)
    alerts_raised = api.value("sum(otwatch_alerts_total)")
    firing = {a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"}
    if alerts_raised:
        assert firing & {"OtwatchAlertRaised", "OtwatchCriticalAlertRaised"}, firing
    assert "OtwatchAgentDown" not in firing and "OtwatchCaptureDrops" not in firing


def test_alert_counter_equals_alert_records_written(stack):
    if stack["alerts"] is None:
        pytest.skip("otwatch replay has no --alerts yet (detection not wired)")
    api = stack["api"]
    records = [json.loads(line) for line in stack["alerts"].read_text().splitlines()]
    assert records, "mixed.pcap holds seven attack scenarios: expected alerts"
    # An incident is written when it opens and again (same event.id, final count) when it closes;
    # the counter counts incidents raised.
    alerts = {r["event"]["id"]: r for r in records}
    assert len(records) <= 2 * len(alerts)
    assert api.value("sum(otwatch_alerts_total)") == len(alerts) == stack["summary"]["detection"]["alerts"]
    by_sev, by_rule = {}, {}
    for r in alerts.values():
        by_sev[r["otwatch"]["severity"]] = by_sev.get(r["otwatch"]["severity"], 0) + 1
        by_rule[r["rule"]["name"]] = by_rule.get(r["rule"]["name"], 0) + 1
    for rule, n in by_rule.items():
        assert api.value(f'sum(otwatch_alert_rule_alerts_total{{rule="{rule}"}})') == n, rule
    for sev, n in by_sev.items():
        assert api.value(f'sum(otwatch_alerts_total{{severity="{sev}"}})') == n, sev


def test_replay_exits_cleanly_after_lingering(stack):
    replay = stack["replay"]
    replay.terminate()  # SIGTERM while lingering: the server goes away with the process
    replay.wait(10)
    api = stack["api"]
    _wait(lambda: api.value('up{job="otwatch"}') == 0, 10, "target down after the replay ended")
