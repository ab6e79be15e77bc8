"""Alert sinks: the durable JSON-lines log, syslog (RFC 5424) over real sockets, and the STIX 2.1
export, fed with alerts built from the labelled attack scenarios of the bundled captures."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from datetime import datetime

import pytest

from agent.export_cmd import IANA_SERVICE, SCO_NAMESPACE, bundle
from agent.sinks import DEFAULT_SD_ID, SYSLOG_SEVERITY, AlertLog, AlertSinks, SyslogSink, rfc5424
from models.alerts import ATTACK_ICS, Alert
from tests.conftest import PROJECT_PCAPS, ROOT, stix_validation_errors

SCENARIO = {  # scenario -> (rule, detector, severity, ATT&CK for ICS technique)
    "mitm": ("cycle.latency", "cycle", "medium", "T0830"),
    "flood": ("cycle.burst", "cycle", "high", "T0814"),
    "unauthorised_write": ("allowlist.new_talker", "allowlist", "critical", "T0855"),
    "setpoint_manipulation": ("process.fast_change", "process", "high", "T0836"),
}


def scenario_alerts(name: str = "mixed") -> list[Alert]:
    """One alert per labelled attack in pcaps/<name>.labels.csv, as a detector would raise it."""
    out = []
    with open(PROJECT_PCAPS / f"{name}.labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            rule, detector, severity, technique = SCENARIO.get(
                row["scenario"], (f"ml.{row['scenario']}", "river", "low", None))
            out.append(Alert(
                rule=rule, detector=detector, severity=severity, first_ts=int(float(row["start_ts"]) * 1e9),
                last_ts=int(float(row["end_ts"]) * 1e9), src=row["src"], dst=row["dst"],
                protocol=row["protocol"], entity=f"{row['src']}>{row['dst']}/{row['protocol']}",
                message=row["description"], technique=technique, count=3, sport=40000, dport=502,
                fields={"scenario": row["scenario"]}, explanation=["requests per second: 150 (usually about 1)"]))
    assert len(out) >= 7
    return out


# --- the alert log -------------------------------------------------------------------------------------

def test_alert_log_writes_whole_ecs_lines_and_rotates(tmp_path):
    alerts = scenario_alerts()
    path = tmp_path / "alerts.jsonl"
    one = len(json.dumps(alerts[0].to_ecs(), separators=(",", ":"))) + 1
    with AlertLog(path, max_bytes=one * 3, backups=2) as log:
        for _ in range(3):
            for a in alerts:
                log.write(a)
    files = sorted(tmp_path.glob("alerts.jsonl*"))
    assert [f.name for f in files] == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    for f in files:
        lines = f.read_bytes().split(b"\n")
        assert lines[-1] == b""  # every record ends in a newline: no torn records
        for line in lines[:-1]:
            rec = json.loads(line)
            assert rec["event"]["kind"] == "alert" and rec["@timestamp"].endswith("Z")
            assert {"source", "rule", "message", "otwatch", "observer", "ecs"} <= rec.keys()
            dst = rec["otwatch"]["entity"].split(">")[1].split("/")[0]  # "" for a scan of many hosts
            assert rec.get("destination", {}).get("ip", "") == dst  # never an empty ip field
        assert f.stat().st_size <= one * 3 + 200
    assert log.written == 3 * len(alerts)


def test_alert_sinks_write_the_log_before_the_copies(tmp_path):
    order = []

    class Copy:
        name = "syslog"

        def send(self, alert):
            order.append(("copy", (tmp_path / "a.jsonl").read_text().count("\n")))
            return False

        def close(self):
            order.append("closed")

    errors = []
    sinks = AlertSinks(AlertLog(tmp_path / "a.jsonl"), [Copy()], on_error=errors.append)
    for a in scenario_alerts()[:3]:
        sinks.write(a)
    sinks.close()
    assert order == [("copy", 1), ("copy", 2), ("copy", 3), "closed"]
    assert errors == ["syslog"] * 3 and sinks.written == 3


# --- syslog --------------------------------------------------------------------------------------------

# RFC 5424 §6 ABNF as a regular expression (PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID,
# MSGID, STRUCTURED-DATA, MSG with BOM).
SYSLOG_RE = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    rb"(?P<sd>-|(?:\[[^ =\]\"]{1,32}(?: [^ =\]\"]{1,32}=\"(?:[^\"\\\]]|\\[\"\\\]])*\")*\])+)"
    rb"(?: \xef\xbb\xbf(?P<msg>.*))?$", re.S)


def parse_syslog(data: bytes) -> dict:
    m = SYSLOG_RE.match(data)
    assert m, data[:200]
    sd = m.group("sd").decode()
    sd_id = sd[1:].split(" ", 1)[0].rstrip("]")
    params = {k: re.sub(r"\\([\"\\\]])", r"\1", v)
              for k, v in re.findall(r' ([^ =\]"]+)="((?:[^"\\\]]|\\["\\\]])*)"', sd)}
    datetime.fromisoformat(m.group("ts").decode().replace("Z", "+00:00"))
    pri = int(m.group("pri"))
    return {"facility": pri // 8, "severity": pri % 8, "host": m.group("host").decode(),
            "app": m.group("app").decode(), "msgid": m.group("msgid").decode(), "sd_id": sd_id,
            "params": params, "msg": m.group("msg").decode("utf-8")}


def check_message(got: dict, alert: Alert, facility: int = 16) -> None:
    rec = alert.to_ecs()
    assert got["facility"] == facility and got["severity"] == SYSLOG_SEVERITY[alert.severity]
    assert got["app"] == "otwatch" and got["msgid"] == alert.rule[:32] and got["sd_id"] == DEFAULT_SD_ID
    p = got["params"]
    assert p["src"] == alert.src and p.get("dst", "") == alert.dst and p["protocol"] == alert.protocol
    assert p["id"] == rec["event"]["id"] and p["rule"] == alert.rule and p["start"] == rec["event"]["start"]
    assert p.get("technique") == alert.technique


@pytest.mark.alert_schema_exempt  # a protocol name full of quotes and brackets, to test the escaping
def test_rfc5424_escapes_structured_data_and_truncates_header_fields():
    a = scenario_alerts()[0]
    a.rule = 'x.' + "r" * 40
    a.protocol = 'mod"bus]\\'
    a.message = "café ] \" \\ 100 %"
    got = parse_syslog(rfc5424(a, hostname="sensor one", facility=4))
    assert got["host"] == "sensor_one" and got["msgid"] == a.rule[:32] and got["facility"] == 4
    assert got["params"]["protocol"] == a.protocol and got["msg"] == a.message
    assert json.loads(parse_syslog(rfc5424(a, payload="json"))["msg"]) == json.loads(
        json.dumps(a.to_ecs()))


def test_syslog_over_udp_one_message_per_datagram():
    alerts = scenario_alerts()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        sink = SyslogSink(server.getsockname(), "udp", hostname="sensor1")
        for a in alerts:
            assert sink.send(a)
        for a in alerts:
            got = parse_syslog(server.recv(65535))
            check_message(got, a)
            assert got["host"] == "sensor1" and got["msg"] == a.message
        sink.close()
    assert sink.sent == len(alerts) and sink.errors == 0


class TcpCollector:
    """A TCP syslog receiver that splits RFC 6587 octet-counted frames."""

    def __init__(self, port: int = 0):
        self.server = socket.create_server(("127.0.0.1", port))
        self.address = self.server.getsockname()
        self.frames: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        buf = b""
        with conn:
            while chunk := conn.recv(65536):
                buf += chunk
                while b" " in buf:
                    length, rest = buf.split(b" ", 1)
                    n = int(length)
                    if len(rest) < n:
                        break
                    self.frames.append(rest[:n])
                    buf = rest[n:]

    def close(self):
        self.server.close()
        self.thread.join(5)


def test_syslog_over_tcp_octet_counting_and_reconnect():
    alerts = scenario_alerts()
    rx = TcpCollector()
    sink = SyslogSink(rx.address, "tcp", facility="local3")
    for a in alerts[:4]:
        assert sink.send(a)
    sink.close()
    rx.thread.join(5)
    assert len(rx.frames) == 4
    for frame, a in zip(rx.frames, alerts):
        check_message(parse_syslog(frame), a, facility=19)
    # The receiver goes away: sends fail, are counted, never raise.
    rx.close()
    port = rx.address[1]
    assert sink.send(alerts[4]) is False and sink.errors == 1
    # It comes back on the same port: the sink reconnects.
    rx2 = TcpCollector(port)
    for a in alerts[4:]:
        assert sink.send(a)
    sink.close()
    rx2.thread.join(5)
    rx2.close()
    assert [parse_syslog(f)["params"]["id"] for f in rx2.frames] == [a.to_ecs()["event"]["id"] for a in alerts[4:]]


def test_syslog_over_a_unix_datagram_socket(tmp_path):
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        sink = SyslogSink(path, "unix")
        a = scenario_alerts()[2]
        assert sink.send(a)
        check_message(parse_syslog(server.recv(65535)), a)
        sink.close()


def test_syslog_rejects_bad_settings():
    with pytest.raises(ValueError, match="facility"):
        SyslogSink(facility="local9")
    with pytest.raises(ValueError, match="transport"):
        SyslogSink(transport="carrier-pigeon")


# --- STIX 2.1 export -----------------------------------------------------------------------------------

STIX_ID = re.compile(r"^([a-z0-9-]+)--[0-9a-f]{8}-[0-9a-f]{4}-[45][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
STIX_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
REQUIRED = {  # STIX 2.1 required properties per type (beyond type/id)
    "identity": {"spec_version", "created", "modified", "name"},
    "attack-pattern": {"spec_version", "created", "modified", "name"},
    "incident": {"spec_version", "created", "modified", "name"},
    "observed-data": {"spec_version", "created", "modified", "first_observed", "last_observed",
                      "number_observed", "object_refs"},
    "sighting": {"spec_version", "created", "modified", "sighting_of_ref"},
    "relationship": {"spec_version", "created", "modified", "relationship_type", "source_ref", "target_ref"},
    "ipv4-addr": {"value"}, "ipv6-addr": {"value"}, "network-traffic": {"protocols"},
    "extension-definition": {"spec_version", "created", "modified", "name", "created_by_ref", "schema", "version",
                             "extension_types"},
}


def stix_dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def refs_of(obj: dict) -> list[str]:
    out = []
    for k, v in obj.items():
        if k.endswith("_ref"):
            out.append(v)
        elif k.endswith("_refs"):
            out.extend(v)
    return out


def test_export_cli_writes_a_valid_deterministic_stix_bundle(tmp_path):
    alerts = scenario_alerts()
    log_path = tmp_path / "alerts.jsonl"
    with AlertLog(log_path) as log:
        for a in alerts:
            log.write(a)
    out = tmp_path / "bundle.json"
    cmd = [sys.executable, "-m", "agent.cli", "export", "--stix", str(log_path), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    b = json.loads(out.read_text())
    assert not stix_validation_errors(b)
    assert b["type"] == "bundle" and STIX_ID.match(b["id"]) and "spec_version" not in b
    objs = {o["id"]: o for o in b["objects"]}
    assert len(objs) == len(b["objects"])
    for o in b["objects"]:
        m = STIX_ID.match(o["id"])
        assert m and m.group(1) == o["type"], o["id"]
        assert REQUIRED[o["type"]] <= o.keys(), (o["type"], REQUIRED[o["type"]] - o.keys())
        assert o.get("spec_version", "2.1") == "2.1"
        for k in ("created", "modified", "first_observed", "last_observed", "first_seen", "last_seen", "start"):
            if k in o:
                assert STIX_TIME.match(o[k]), (o["type"], k, o[k])
        for ref in refs_of(o):
            assert ref in objs, (o["type"], ref)  # every reference resolves inside the bundle
        for k in o:
            assert re.fullmatch(r"[a-z0-9_]{3,250}", k) or k == "id", k
    # SCO ids follow §2.9 (UUIDv5 over the ID-contributing properties).
    for o in b["objects"]:
        if o["type"] in ("ipv4-addr", "ipv6-addr"):
            want = uuid.uuid5(SCO_NAMESPACE, json.dumps({"value": o["value"]}, separators=(",", ":")))
            assert o["id"] == f"{o['type']}--{want}"
    incidents = [o for o in b["objects"] if o["type"] == "incident"]
    assert len(incidents) == len(alerts)
    (ext_def,) = [o for o in b["objects"] if o["type"] == "extension-definition"]
    assert ext_def["extension_types"] == ["property-extension"]
    # otwatch's own properties only inside the declared extension, never as loose x_ properties
    assert not [k for o in b["objects"] for k in o if k.startswith("x_")]
    by_alert = {i["extensions"][ext_def["id"]]["alert_id"]: i for i in incidents}
    for a in alerts:
        rec = a.to_ecs()
        inc = by_alert[rec["event"]["id"]]
        ext = inc["extensions"][ext_def["id"]]
        assert inc["name"] == a.rule and inc["description"] == a.message and ext["severity"] == a.severity
        assert ext["extension_type"] == "property-extension" and ext["count"] == a.count
        rel = [o for o in b["objects"] if o["type"] == "relationship" and o["source_ref"] == inc["id"]]
        observed = [objs[r["target_ref"]] for r in rel if r["target_ref"].startswith("observed-data--")]
        assert len(observed) == 1
        od = observed[0]
        assert stix_dt(od["first_observed"]) == stix_dt(rec["event"]["start"]) and od["number_observed"] == a.count
        values = {objs[r].get("value") for r in od["object_refs"]}
        assert values == {a.src, a.dst} - {""} | ({None} if a.dst else set())
        traffic = [objs[r] for r in od["object_refs"] if r.startswith("network-traffic--")]
        if a.dst:  # a scan of many hosts (recon) has no single destination and no traffic object
            (nt,) = traffic
            assert objs[nt["src_ref"]]["value"] == a.src and objs[nt["dst_ref"]]["value"] == a.dst
            assert nt["protocols"] == ["ipv4", "tcp", IANA_SERVICE[a.protocol]] and nt["dst_port"] == 502
        else:
            assert not traffic
        if a.technique:
            ap = next(objs[r["target_ref"]] for r in rel if r["target_ref"].startswith("attack-pattern--"))
            assert ap["name"] == ATTACK_ICS[a.technique]
            assert ap["external_references"][0] == {"source_name": "mitre-ics-attack", "external_id": a.technique,
                                                    "url": f"https://attack.mitre.org/techniques/{a.technique}/"}
            (s,) = [o for o in b["objects"] if o["type"] == "sighting" and o["sighting_of_ref"] == ap["id"]
                    and od["id"] in o["observed_data_refs"]]
            assert s["count"] == a.count
    # Same records, same bundle (re-imports update instead of duplicating).
    again = subprocess.run(cmd[:-2], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(again.stdout) == b
    assert bundle([a.to_ecs() for a in alerts]) == b


def test_export_input_errors(tmp_path):
    good = json.dumps(scenario_alerts()[0].to_ecs())
    torn = tmp_path / "torn.jsonl"
    torn.write_text(good + "\n" + good[:40])
    done = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--stix", str(torn)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "incomplete last record" in done.stderr
    assert sum(o["type"] == "incident" for o in json.loads(done.stdout)["objects"]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n" + good + "\n")
    for path, message in ((bad, "bad.jsonl:1"), (tmp_path / "missing.jsonl", "no such file")):
        done = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--stix", str(path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1
    assert os.path.exists(torn)
