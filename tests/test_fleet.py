"""A fleet on loopback: four otwatch agents at four sites, a central Prometheus, a site Prometheus in
agent mode pushing with remote_write, Alertmanager, and a webhook receiver in this test.

- north-1, north-2, south-1: `otwatch replay --metrics --site ...` scraped by the central server
  (deploy/fleet/prometheus-central.yml);
- east-1: scraped by Prometheus in agent mode (deploy/fleet/prometheus-site-agent.yml), which pushes
  to the central server (started with --web.enable-remote-write-receiver);
- the central server evaluates deploy/fleet/fleet-rules.yml and sends alerts to Alertmanager
  (deploy/fleet/alertmanager.yml), whose receivers are rewritten to post to this test.

The shipped files are used as they are, except addresses and timers (seconds, not minutes).  Needs
Debian's prometheus and prometheus-alertmanager (`make test` installs them).  Bounded: every wait
has a deadline; the servers are stopped by the fixture's finalizer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from agent.metrics import Metrics
from tests.conftest import PROJECT_PCAPS, ROOT
from tests.test_prometheus_live import Prom, _ready, _wait, free_port, promtool

FLEET = ROOT / "deploy" / "fleet"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
FLEET_DASHBOARD = DASHBOARDS / "otwatch-fleet.json"
SITE_DASHBOARD = DASHBOARDS / "otwatch.json"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
# site -> capture; east-1 is the site behind Prometheus in agent mode.
SITES = {"north-1": "mixed", "north-2": "dnp3", "south-1": "iec104", "east-1": "modbus"}
PUSHED = "east-1"
REPLAY_DEADLINE_S = 240  # the four replays take 20-60 s on a busy two-core machine
# $__rate_interval as Grafana would pick for a zoomed-in view covering the run (a replay is over in seconds
# and the queries may come a minute or two later on a busy machine).
GRAFANA = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}

needs_servers = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool") and ALERTMANAGER and shutil.which("amtool")),
    reason="needs prometheus, promtool and prometheus-alertmanager (`make test` installs them)")


# --- site identity in configuration, records, syslog, STIX and metrics --------------------------------

def test_identity_from_configuration_and_flags(tmp_path):
    from agent.cli import main
    from agent.config import parse_text
    from agent.errors import InputError
    from agent.site import SiteIdentity

    cfg = parse_text('[identity]\nsite = "north-1"\nagent = "sensor-7"\n')
    assert (cfg.identity.site, cfg.identity.agent) == ("north-1", "sensor-7")
    with pytest.raises(InputError, match=r"identity.site: expected 1-63 letters.*\(line 2\)"):
        parse_text('[identity]\nsite = "north 1"\n')
    args = type("Args", (), {"site": "south-2", "agent_name": None})()
    ident = SiteIdentity.from_args(args, cfg)  # the flag wins over the file, the file over the default
    assert (ident.site, ident.agent) == ("south-2", "sensor-7")
    assert SiteIdentity().agent and SiteIdentity().site == "default"
    conf = tmp_path / "otwatch.toml"
    conf.write_text('[capture]\ninterface = "lo"\n')
    assert main(["run", "--config", str(conf), "--site", "bad/site"]) == 2
    assert main(["replay", "--agent-name=.x", str(PROJECT_PCAPS / "dnp3.pcap")]) == 2


def test_alert_records_syslog_and_stix_name_the_agent_and_site(tmp_path):
    from agent.export_cmd import bundle
    from agent.sinks import AlertLog, AlertSinks, rfc5424
    from agent.site import SiteIdentity
    from tests.test_sinks import scenario_alerts

    north, south = SiteIdentity("north-1", "sensor-7", "pi7"), SiteIdentity("south-1", "sensor-9", "pi9")
    sent = []

    class Copy:
        def send(self, rec):
            sent.append(rfc5424(rec, timestamp="2026-01-05T08:00:00.000000Z", procid="1"))

        def close(self):
            pass

    sinks = AlertSinks(AlertLog(tmp_path / "north.jsonl", fsync=False), [Copy()], identity=north)
    alerts = scenario_alerts()
    for a in alerts[:3]:
        sinks.write(a)
    sinks.close()
    with AlertLog(tmp_path / "south.jsonl", fsync=False, identity=south) as log:
        for a in alerts[3:5]:
            log.write(a)
    records = [json.loads(line) for f in ("north", "south") for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
    assert [(r["observer"]["name"], r["observer"]["hostname"], r["labels"]["site"]) for r in records] == \
        [("sensor-7", "pi7", "north-1")] * 3 + [("sensor-9", "pi9", "south-1")] * 2
    for msg in sent:  # HOSTNAME is the agent's host; site and agent in the structured data
        assert msg.split(b" ")[2] == b"pi7" and b'site="north-1"' in msg and b'agent="sensor-7"' in msg
    b = bundle(records)
    systems = {o["id"]: o for o in b["objects"] if o["type"] == "identity" and o["name"] != "otwatch"}
    assert sorted(o["name"] for o in systems.values()) == ["sensor-7 at north-1", "sensor-9 at south-1"]
    sightings = [o for o in b["objects"] if o["type"] == "sighting"]
    assert sightings and all(o["where_sighted_refs"][0] in systems for o in sightings)


def test_metrics_export_one_agent_info_series():
    from prometheus_client import CollectorRegistry, generate_latest

    from agent import __version__
    from agent.site import SiteIdentity

    text = generate_latest(Metrics(CollectorRegistry(), identity=SiteIdentity("east-1", "pi7")).registry).decode()
    info = [line for line in text.splitlines() if line.startswith("otwatch_agent_info")]
    assert info == [f'otwatch_agent_info{{agent="pi7",site="east-1",version="{__version__}"}} 1.0']
    # The site is not a label of any other series (the central Prometheus adds it per target).
    assert [line for line in text.splitlines() if 'site="' in line] == info


# --- the shipped files, checked by the tools that read them -------------------------------------------

@needs_servers
def test_shipped_fleet_files_pass_promtool_and_amtool():
    promtool("check", "config", FLEET / "prometheus-central.yml")
    promtool("check", "config", "--agent", FLEET / "prometheus-site-agent.yml")
    promtool("check", "rules", FLEET / "fleet-rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "fleet-rules_test.yml", cwd=FLEET)
    done = subprocess.run(["amtool", "check-config", str(FLEET / "alertmanager.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # Routing as documented: a north site's critical goes to the region and the SOC pager.
    def route(*labels):
        r = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={FLEET / 'alertmanager.yml'}",
                            *labels], capture_output=True, text=True, timeout=60)
        return r.stdout.strip()
    assert route("site=north-3", "severity=critical") == "region-north,soc-pager"
    assert route("site=south-1", "severity=warning") == "soc-ticket"


def _dash(path):
    return json.loads(path.read_text())


def _targets(dash):
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboards_have_fixed_uids_and_a_site_variable():
    fleet, site = _dash(FLEET_DASHBOARD), _dash(SITE_DASHBOARD)
    assert (fleet["uid"], site["uid"]) == ("otwatch-fleet", "otwatch-overview")
    for dash in (fleet, site):
        var = dash["templating"]["list"][0]
        assert var["name"] == "site" and var["includeAll"] and var["allValue"] == ".*"
        assert var["datasource"]["uid"] == "otwatch-prometheus"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
    for title, expr in _targets(site):
        assert 'site=~"$site", instance=~"$instance"' in expr, title
    # Every fleet panel but the fleet-wide total is split or filtered by site.
    for title, expr in _targets(fleet):
        assert 'site=~"$site"' in expr or expr.startswith("fleet:"), title
    titles = " ".join(p["title"].lower() for p in fleet["panels"])
    for wanted in ("alert state", "baseline age", "drops", "frames/s"):
        assert wanted in titles, wanted
    # Provisioned like the site dashboard: the provider loads every file of the dashboards folder.
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/otwatch.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and FLEET_DASHBOARD.parent == SITE_DASHBOARD.parent


def test_fleet_rules_and_panels_use_only_exported_metrics_and_recorded_series():
    from prometheus_client import CollectorRegistry, generate_latest

    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(Metrics(CollectorRegistry()).registry).decode(),
                              re.M))
    exported |= {n + s for n in exported for s in ("_total", "_info", "_bucket")}
    rules = [r for g in yaml.safe_load((FLEET / "fleet-rules.yml").read_text())["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    used = set()
    for expr in [r["expr"] for r in rules] + [e for _, e in _targets(_dash(FLEET_DASHBOARD))]:
        used |= set(re.findall(r"\b(otwatch_[a-z0-9_]+|[a-z_]+:otwatch_[a-z0-9_:]+)\b", expr))
    assert used - exported - recorded == set()


# --- the fleet, live ----------------------------------------------------------------------------------

class Webhook:
    """Alertmanager's webhook receiver: keeps (receiver path, payload) of every notification."""

    def __init__(self):
        self.received: list = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append((self.path.strip("/"), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, receiver=None, site=None) -> list[dict]:
        return [p for r, p in list(self.received) if receiver in (None, r)
                and site in (None, p["groupLabels"].get("site"))]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _start(procs, cmd, log):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    procs.append(p)
    return p


def _alertmanager_config(hook: Webhook) -> dict:
    """The shipped file, receivers pointed at the test's webhook and timers in seconds."""
    cfg = yaml.safe_load((FLEET / "alertmanager.yml").read_text())
    for r in cfg["receivers"]:
        for w in r["webhook_configs"]:
            w["url"] = f"http://127.0.0.1:{hook.port}/{r['name']}"
    routes = [cfg["route"], *cfg["route"]["routes"]]
    for route in routes:
        for k, v in (("group_wait", "1s"), ("group_interval", "2s"), ("repeat_interval", "1h")):
            if k in route or route is cfg["route"]:
                route[k] = v
    return cfg


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not (shutil.which("prometheus") and ALERTMANAGER):
        pytest.skip("needs prometheus and prometheus-alertmanager (`make test` installs them)")
    tmp = tmp_path_factory.mktemp("fleet")
    ports = {name: free_port() for name in ("central", "site_prom", "am", *SITES)}
    hook = Webhook()
    procs: list = []
    try:
        (tmp / "am.yml").write_text(yaml.safe_dump(_alertmanager_config(hook)))
        _start(procs, [ALERTMANAGER, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp / 'am'}",
                       f"--web.listen-address=127.0.0.1:{ports['am']}", "--cluster.listen-address=",
                       "--log.level=warn"], tmp / "am.log")

        central = yaml.safe_load((FLEET / "prometheus-central.yml").read_text())
        central["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="900ms")
        central["rule_files"] = [str(FLEET / "fleet-rules.yml")]
        central["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{ports['am']}"]
        (job,) = [j for j in central["scrape_configs"] if j["job_name"] == "otwatch"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[s]}"], "labels": {"site": s}}
                                 for s in SITES if s != PUSHED]
        central["scrape_configs"] = [job]
        (tmp / "central.yml").write_text(yaml.safe_dump(central))
        _start(procs, ["prometheus", f"--config.file={tmp / 'central.yml'}", f"--storage.tsdb.path={tmp / 'central'}",
                       f"--web.listen-address=127.0.0.1:{ports['central']}", "--web.enable-remote-write-receiver",
                       "--log.level=warn"], tmp / "central.log")

        site = yaml.safe_load((FLEET / "prometheus-site-agent.yml").read_text())
        site["global"]["scrape_interval"] = "1s"
        site["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{ports[PUSHED]}"],
                                                        "labels": {"site": PUSHED}}]
        site["remote_write"][0]["url"] = f"http://127.0.0.1:{ports['central']}/api/v1/write"
        site["remote_write"][0]["queue_config"]["batch_send_deadline"] = "1s"
        (tmp / "site.yml").write_text(yaml.safe_dump(site))
        _start(procs, ["prometheus", "--enable-feature=agent", f"--config.file={tmp / 'site.yml'}",
                       f"--storage.agent.path={tmp / 'site'}", f"--web.listen-address=127.0.0.1:{ports['site_prom']}",
                       "--log.level=warn"], tmp / "site.log")
        api = Prom(f"http://127.0.0.1:{ports['central']}")
        _wait(lambda: _ready(api.url) and _ready(f"http://127.0.0.1:{ports['am']}"), 30, "central and alertmanager")

        agents = {}
        for s, capture in SITES.items():
            alerts = tmp / f"{s}.jsonl"
            cmd = [sys.executable, "-m", "agent.cli", "replay", "--json", "--no-progress", "--learn", "15m",
                   "--alerts", str(alerts), "--site", s, "--agent-name", f"sensor-{s}",
                   "--metrics", f"127.0.0.1:{ports[s]}", "--wait-scrape", "30", "--linger", "240",
                   str(PROJECT_PCAPS / f"{capture}.pcap")]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp / f"{s}.log", "w"),
                                    text=True)
            procs.append(proc)
            agents[s] = {"proc": proc, "alerts": alerts}
        # A replay that never finishes must not hang the suite: past the deadline the agents are
        # killed, their stdout closes and the readline below returns nothing.
        watchdog = threading.Timer(REPLAY_DEADLINE_S, lambda: [a["proc"].kill() for a in agents.values()])
        watchdog.daemon = True
        watchdog.start()
        for s, a in agents.items():
            line = a["proc"].stdout.readline()  # the summary, printed when the input is done
            assert line, (tmp / f"{s}.log").read_text()[-2000:]
            a["summary"] = json.loads(line)
            a["records"] = [json.loads(x) for x in a["alerts"].read_text().splitlines()]
        watchdog.cancel()
        # Central has every site's final values (east-1 through agent mode and remote_write) ...
        for s, a in agents.items():
            _wait(lambda: api.value(f'sum(otwatch_frames_total{{site="{s}"}})') == a["summary"]["frames"], 60,
                  f"final values of {s} at the central server")
        # ... and has evaluated its rules on them (recording rules, firing alerts) a few times.
        _wait(lambda: {r["metric"].get("site") for r in api.query('ALERTS{alertstate="firing"}')} >= set(SITES),
              30, "fleet alerts firing for every site")
        time.sleep(3)
        yield {"api": api, "agents": agents, "hook": hook, "am": f"http://127.0.0.1:{ports['am']}", "tmp": tmp}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        hook.close()


def _substitute(expr: str, site: str = ".*") -> str:
    for k, v in {**GRAFANA, "$site": site}.items():
        expr = expr.replace(k, v)
    return expr


def _has_number(result) -> bool:
    return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result)


@needs_servers
def test_every_fleet_panel_returns_data_for_every_site(fleet):
    api = fleet["api"]
    missing = []
    for title, expr in _targets(_dash(FLEET_DASHBOARD)):
        result = api.query(_substitute(expr))
        if "site" in expr.split("{")[0] or "by (site" in expr:
            sites = {r["metric"].get("site") for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")}
            if sites != set(SITES):
                missing.append((title, expr, sorted(set(SITES) - sites)))
        elif not _has_number(result):
            missing.append((title, expr, "no data"))
    assert not missing, missing


@needs_servers
def test_site_dashboard_returns_data_for_each_site(fleet):
    """The single-site dashboard, with its site variable set to each site in turn."""
    api = fleet["api"]
    empty = [(s, title) for s in SITES for title, expr in _targets(_dash(SITE_DASHBOARD))
             if not _has_number(api.query(_substitute(expr, s)))]
    assert not empty, empty


@needs_servers
def test_per_site_alert_counts_equal_the_alert_records(fleet):
    api = fleet["api"]
    for s, a in fleet["agents"].items():
        records = a["records"]
        incidents = {r["event"]["id"] for r in records}
        assert incidents, f"{SITES[s]}.pcap holds attacks: expected alerts at {s}"
        assert {(r["labels"]["site"], r["observer"]["name"]) for r in records} == {(s, f"sensor-{s}")}
        assert api.value(f'sum(otwatch_alerts_total{{site="{s}"}})') == len(incidents) == \
            a["summary"]["detection"]["alerts"], s
        # The agent names itself; the central server's site label (target label) agrees with it.
        (info,) = api.query(f'otwatch_agent_info{{site="{s}"}}')
        assert info["metric"]["agent"] == f"sensor-{s}" and info["metric"]["exported_site"] == s


@needs_servers
def test_alertmanager_groups_each_sites_campaign_into_one_notification(fleet):
    """Every site with high/critical alert records is paged, with its site label, in notifications
    grouped by site that end up carrying every detector kind of the site's campaign; the north
    region's receiver gets its own sites only."""
    hook, agents = fleet["hook"], fleet["agents"]
    expected = {}
    for s, a in agents.items():
        kinds = {Metrics._detector(None, r["otwatch"]["detector"]) for r in a["records"]
                 if r["otwatch"]["severity"] in ("high", "critical")}
        if kinds:
            expected[s] = kinds
    assert len(expected) >= 3

    def paged_kinds(site):
        notes = hook.notifications("soc-pager", site)
        firing = [a for a in notes[-1]["alerts"] if a["status"] == "firing"] if notes else []
        return {a["labels"]["kind"] for a in firing if a["labels"]["alertname"] == "OtwatchSiteCriticalAlert"}

    _wait(lambda: all(paged_kinds(s) == k for s, k in expected.items()), 30, "every site's campaign paged")
    for path, note in list(hook.received):
        site = note["groupLabels"]["site"]
        assert note["groupLabels"] == {"site": site} and note["commonLabels"]["site"] == site
        assert {a["labels"]["site"] for a in note["alerts"]} == {site}
        if path == "region-north":
            assert site.startswith("north-")
    assert {n["groupLabels"]["site"] for n in hook.notifications("region-north")} == {"north-1", "north-2"}
    assert any(len(k) > 1 for k in expected.values())  # a campaign spanning detectors, in one notification


@needs_servers
def test_alertmanager_holds_back_a_sites_warnings_during_its_critical(fleet):
    """Inhibition, on alerts posted straight to the same Alertmanager: west-9 has a critical and a
    warning, west-8 only a warning; west-8's warning is delivered, west-9's is not."""
    hook = fleet["hook"]

    def alert(site, name, severity):
        return {"labels": {"alertname": name, "site": site, "severity": severity, "kind": "allowlist"},
                "annotations": {"summary": f"{site} {name}"}}

    body = json.dumps([alert("west-9", "OtwatchSiteCriticalAlert", "critical"),
                       alert("west-9", "OtwatchSiteAlert", "warning"),
                       alert("west-8", "OtwatchSiteAlert", "warning")]).encode()
    req = urllib.request.Request(f"{fleet['am']}/api/v2/alerts", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    _wait(lambda: hook.notifications("soc-pager", "west-9") and hook.notifications("soc-ticket", "west-8"), 20,
          "notifications for west-8 and west-9")
    time.sleep(4)  # two more group intervals: nothing else may come for west-9's warning
    assert not hook.notifications("soc-ticket", "west-9")
    (page,) = {json.dumps([a["labels"]["alertname"] for a in n["alerts"]]) for n in hook.notifications("soc-pager",
                                                                                                      "west-9")}
    assert json.loads(page) == ["OtwatchSiteCriticalAlert"]
