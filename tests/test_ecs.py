"""The alert records as a SIEM and an analyst get them: ECS fields and roles on real replays of the bundled
captures, every record against docs/alert.schema.json, the rule catalogue and docs/rules.md, the STIX
export through stix2-validator, and ``otwatch alerts`` / ``replay --alerts`` for people."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.export_cmd import bundle
from agent.metrics import KNOWN_RULES
from agent.sinks import AlertLog
from models.alert_manager import AlertManager
from models.alerts import LOG_LEVEL, Alert
from models.findings import Finding
from models.rules import RULES, TECHNIQUES, markdown
from tests.conftest import PROJECT_PCAPS, ROOT, alert_schema_errors, stix_validation_errors

SERVER_PORT = {"modbus": 502, "dnp3": 20000, "iec104": 2404}  # the bundled captures use the standard ports


def otwatch(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env, **kw)


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def mixed_alerts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ecs") / "alerts.jsonl"
    done = otwatch("replay", PROJECT_PCAPS / "mixed.pcap", "--learn", "15m", "--alerts", path)
    assert done.returncode == 0, done.stderr
    recs = records(path)
    assert len(recs) >= 10
    return path, recs


def test_replayed_alerts_follow_the_schema_and_roles(mixed_alerts):
    _, recs = mixed_alerts
    for rec in recs:
        assert not alert_schema_errors(rec), (rec["rule"], alert_schema_errors(rec))
        assert rec["ecs"]["version"].startswith("8.")
        assert rec["log"]["level"] == LOG_LEVEL[rec["otwatch"]["severity"]]
        assert rec["observer"]["product"] == "otwatch" and rec["observer"]["hostname"]
        assert rec["rule"]["name"] in RULES, rec["rule"]["name"]
        for side in ("source", "destination"):
            assert rec.get(side, {"ip": "x"})["ip"], rec  # never an empty address
        if rec["rule"]["name"].startswith("allowlist.") and "port" in rec.get("destination", {}):
            # client -> server, whichever way the PDU that was new went
            assert rec["destination"]["port"] == SERVER_PORT[rec["network"]["protocol"]], rec
            assert rec["source"]["port"] != SERVER_PORT[rec["network"]["protocol"]], rec
        t = rec.get("threat")
        if t:
            tid = t["technique"]["id"]
            assert t["framework"] == "MITRE ATT&CK for ICS" and t["technique"]["name"] == TECHNIQUES[tid][0]
            assert t["tactic"]["id"] == list(TECHNIQUES[tid][1])
            assert tid in RULES[rec["rule"]["name"]].techniques  # the catalogue lists what the rule raises
    # the several-servers case: no destination, every server in related.ip
    multi = [r for r in recs if len(r["otwatch"]["fields"].get("servers", [])) > 1]
    assert all("destination" not in r and set(r["otwatch"]["fields"]["servers"]) <= set(r["related"]["ip"])
               for r in multi)


def test_an_alert_about_several_servers_names_them_all_and_no_empty_destination():
    a = Alert(rule="allowlist.new_talker", detector="allowlist", severity="high", first_ts=0, last_ts=0,
              src="10.0.0.66", dst="", protocol="iec104", entity="10.0.0.66/3", message="scan", technique="T0846",
              sport=50000, dport=2404, fields={"servers": ["10.0.0.26", "10.0.0.27"]})
    rec = a.to_ecs()
    assert "destination" not in rec and rec["source"] == {"ip": "10.0.0.66", "port": 50000}
    assert rec["related"]["ip"] == ["10.0.0.66", "10.0.0.26", "10.0.0.27"] and not alert_schema_errors(rec)


def test_a_rolled_up_flood_has_no_source_address_but_a_valid_record():
    am = AlertManager(rollup=2)
    am.add([Finding("allowlist.new_talker", "allowlist", "high", 0, 0, 0x0B000000 + i, 0x0A000002, 1, f"s{i}",
                    "new talker", technique="T0846", sport=40000 + i, dport=502) for i in range(5)])
    rolled = [a for a in am.alerts if a.src == "many"]
    assert rolled
    rec = rolled[0].to_ecs(site="substation-7")
    assert "source" not in rec and rec["destination"] == {"ip": "10.0.0.2", "port": 502}
    assert rec["labels"] == {"site": "substation-7"} and not alert_schema_errors(rec)


def test_non_finite_scores_never_reach_json():
    a = Alert(rule="ml.river", detector="river", severity="medium", first_ts=0, last_ts=0, src="10.0.0.1",
              dst="10.0.0.2", protocol="modbus", entity="e", message="m", score=float("inf"),
              threshold=float("nan"), fields={"value": float("nan")})
    rec = a.to_ecs()
    json.dumps(rec, allow_nan=False)
    assert "score" not in rec["otwatch"] and rec["otwatch"]["fields"]["value"] is None


def test_rule_catalogue_is_complete_and_docs_are_current():
    assert KNOWN_RULES == tuple(RULES)  # the metrics' rule label set is the catalogue
    assert (ROOT / "docs" / "rules.md").read_text() == markdown(), \
        "docs/rules.md is stale: run `otwatch rules --markdown > docs/rules.md`"
    done = otwatch("rules", "--json")
    assert done.returncode == 0 and {r["rule"] for r in json.loads(done.stdout)} == set(RULES)


def test_stix_export_of_replayed_alerts_passes_the_validator(mixed_alerts, tmp_path):
    path, recs = mixed_alerts
    b = bundle(recs)
    assert not stix_validation_errors(b)
    out = tmp_path / "b.json"
    done = otwatch("export", "--stix", path, "-o", out)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == b
    assert sum(o["type"] == "incident" for o in b["objects"]) == len({r["event"]["id"] for r in recs})


# --- alerts for people -----------------------------------------------------------------------------

def test_alerts_command_filters(mixed_alerts):
    path, recs = mixed_alerts
    done = otwatch("alerts", path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("start (UTC)") and len(lines) == len(recs) + 2
    assert lines[-1].startswith(f"{len(recs)} alert(s)")

    def ids(*args):
        got = otwatch("alerts", path, "--json", *args)
        assert got.returncode == 0, got.stderr
        return {json.loads(x)["event"]["id"] for x in got.stdout.splitlines()}

    want = {r["event"]["id"] for r in recs if r["otwatch"]["severity"] in ("high", "critical")}
    assert want and ids("--severity", "high") == want
    want = {r["event"]["id"] for r in recs if r["rule"]["name"].startswith("cycle.")}
    assert want and ids("--rule", "cycle") == want and ids("--rule", "cycle.*") == want
    host = "10.20.0.66"
    want = {r["event"]["id"] for r in recs if host in r.get("related", {}).get("ip", [])}
    assert want and ids("--host", host) == want and ids("--host", "10.20.0.64/30") == want
    starts = sorted(r["event"]["start"] for r in recs)
    mid = starts[len(starts) // 2]
    want = {r["event"]["id"] for r in recs if r["event"]["end"] >= mid}
    assert ids("--since", mid) == want and 0 < len(want) < len(recs)
    bad = otwatch("alerts", path, "--since", "yesterday-ish")
    assert bad.returncode == 2 and "not a time" in bad.stderr


def test_replay_alerts_overwrite_append_and_stdout(tmp_path):
    path = tmp_path / "a.jsonl"
    cap = PROJECT_PCAPS / "iec104.pcap"
    first = otwatch("replay", cap, "--learn", "5m", "--alerts", path, "--print-alerts")
    assert first.returncode == 0, first.stderr
    once = records(path)
    printed = [x for x in first.stdout.splitlines() if x[:4].isdigit() and "  " in x]
    assert once and len(printed) == len(once)  # one line per alert as it opened
    again = otwatch("replay", cap, "--learn", "5m", "--alerts", path)
    assert again.returncode == 0 and records(path) == once  # overwritten, not doubled
    assert not [x for x in again.stdout.splitlines() if x[:4].isdigit()]  # not a terminal: no alert lines
    out = otwatch("replay", cap, "--learn", "5m", "--alerts", "-")
    assert out.returncode == 0 and not (ROOT / "-").exists()
    assert [json.loads(x) for x in out.stdout.splitlines()] == once and "detection:" in out.stderr
    with AlertLog(path) as log:  # the agent's log (and --append) adds to the file
        log.write(once[0])
    assert len(records(path)) == len(once) + 1


def test_the_agent_journals_each_alert_once_at_its_level(tmp_path, caplog):
    import logging

    from agent import config as config_mod
    from agent.daemon import Agent

    agent = Agent(config_mod.parse_text(""))
    agent.alert_log = AlertLog(tmp_path / "a.jsonl")
    recs = []
    for sev in ("low", "medium", "high", "critical"):
        a = Alert(rule="cycle.burst", detector="cycle", severity=sev, first_ts=0, last_ts=0, src="10.0.0.1",
                  dst="10.0.0.2", protocol="modbus", entity=sev, message=f"{sev} burst")
        recs.append(a.to_ecs())
        a.status = "closed"
        recs.append(a.to_ecs())  # the closing record of the same incident
    with caplog.at_level(logging.INFO, logger="otwatch.daemon"):
        for r in recs:
            agent._write_alert(r)
    got = [(r.levelname, r.getMessage()) for r in caplog.records if "burst" in r.getMessage()]
    assert got == [("INFO", "alert cycle.burst: low burst"), ("WARNING", "alert cycle.burst: medium burst"),
                   ("ERROR", "alert cycle.burst: high burst"), ("CRITICAL", "alert cycle.burst: critical burst")]
    assert len(records(tmp_path / "a.jsonl")) == 8
