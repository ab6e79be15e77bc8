"""Metrics: names and conventions, promtool's linter, counters against the pipeline and tshark,
the exposition server (TLS, basic auth), and the deploy files that query the metrics."""

from __future__ import annotations

import base64
import collections
import json
import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import (
    DEFAULT_HOST, DEFAULT_PORT, FUNCTION_CLASSES, KNOWN_RULES, PROTOCOLS, RULE_LABEL_LIMIT, SCORE_BUCKETS, BatchHistogram,
    Metrics, MetricsServer,
)
from agent.pipeline import Pipeline
from agent.replay import replay_files
from models.alerts import Alert
from models.function_classes import CLASS_NAMES, function_class
from parsers.events import PROTO_DNP3, PROTO_MODBUS
from parsers.modbus import DIAGNOSTIC_CONTROL, DIAGNOSTIC_WRITE
from tests.conftest import PROJECT_PCAPS, ROOT, needs_tshark
from tests.tshark import split_multi, tshark_fields

MIXED = PROJECT_PCAPS / "mixed.pcap"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "otwatch.json"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="needs promtool (`make test` installs Debian's prometheus)")
IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


@pytest.fixture(scope="module")
def replayed():
    """mixed.pcap through a pipeline with observe() called per batch, as `otwatch replay` does."""
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline()
    per_batch = []

    def on_events(events):
        metrics.observe(pipeline, events, seconds=0.001)
        per_batch.append(len(events))

    replay_files([MIXED], pipeline, on_events=on_events)
    return metrics, pipeline, per_batch


def samples(registry) -> dict:
    """{(sample name, frozenset(labels)): value} of everything the registry exposes."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(registry, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples(registry).items()
               if n == name and all((k, v2) in lab for k, v2 in labels.items()))


# --- conventions -------------------------------------------------------------------------------------

def test_names_units_and_bounded_labels(replayed):
    metrics, _, _ = replayed
    fams = [f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            if f.name.startswith("otwatch_")]
    assert len(fams) >= 25
    for fam in fams:
        assert re.fullmatch(r"otwatch_[a-z][a-z0-9_]*", fam.name), fam.name
        assert fam.documentation, fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        else:
            assert not fam.name.endswith("_total"), fam.name
        # Base units: seconds and bytes, never milli/micro or minutes.
        assert not re.search(r"_(milli|micro|nano)?(seconds_ms|ms|us|minutes|hours|kilobytes|kb)\b", fam.name)
        for s in fam.samples:
            for key, value in s.labels.items():
                assert key not in ("ip", "src", "dst", "address", "register", "host", "unit"), (fam.name, key)
                assert not IPV4.match(value), (fam.name, key, value)
                assert not value.isdigit() or key == "le", (fam.name, key, value)
        series = {frozenset((k, v) for k, v in s.labels.items() if k != "le") for s in fam.samples}
        assert len(series) <= 80, (fam.name, len(series))


def test_every_child_exists_at_zero_before_any_traffic():
    m = Metrics(CollectorRegistry(), process_metrics=False)
    got = samples(m.registry)
    for p in PROTOCOLS:
        for c in FUNCTION_CLASSES:
            assert got[("otwatch_pdus_total", frozenset({("protocol", p), ("function_class", c)}))] == 0
        assert got[("otwatch_parse_errors_total", frozenset({("protocol", p), ("reason", "truncated")}))] == 0
    for kind in ("allowlist", "cycle", "process", "river", "pyod", "parser", "other"):
        for sev in ("low", "medium", "high", "critical"):
            assert got[("otwatch_alerts_total", frozenset({("kind", kind), ("severity", sev)}))] == 0
    for src in ("kernel", "internal"):
        assert got[("otwatch_capture_drops_total", frozenset({("source", src)}))] == 0
    assert got[("otwatch_mode", frozenset({("mode", "monitor")}))] == 1
    assert got[("otwatch_mode", frozenset({("mode", "learn")}))] == 0
    assert set(FUNCTION_CLASSES) == set(CLASS_NAMES.values())


@needs_promtool
def test_promtool_check_metrics_is_clean(replayed):
    metrics, _, _ = replayed
    text = generate_latest(metrics.registry)
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == b"" and done.stderr.strip() == b"", done.stdout + done.stderr


# --- counters against the pipeline and tshark ----------------------------------------------------------

def test_counters_match_the_pipeline(replayed):
    metrics, pipeline, per_batch = replayed
    st = pipeline.stats
    r = metrics.registry
    assert len(per_batch) >= 2
    assert total(r, "otwatch_frames_total") == st.frames
    assert total(r, "otwatch_bytes_total") == st.bytes
    for p in PROTOCOLS:
        assert total(r, "otwatch_frames_total", protocol=p) == st.frames_by_protocol.get(p, 0)
        assert total(r, "otwatch_pdus_total", protocol=p) == st.pdus_by_protocol.get(p, 0)
        assert total(r, "otwatch_points_total", protocol=p) == st.points_by_protocol.get(p, 0)
    errors = pipeline.error_summary()
    for key, n in st.parse_errors.items():
        p, _, reason = key.partition("/")
        assert total(r, "otwatch_parse_errors_total", protocol=p, reason=reason) == n
    assert total(r, "otwatch_reassembly_gaps_total") == errors.get("tcp/gap", 0)
    rs = pipeline.reassembler.stats
    assert total(r, "otwatch_flows_opened_total") == rs.flows_opened > 0
    assert total(r, "otwatch_flows_ended_total", reason="closed") == rs.flows_closed
    assert total(r, "otwatch_batch_duration_seconds_count") == len(per_batch) == st.batches + 1  # + finish()
    assert r.get_sample_value("otwatch_last_frame_timestamp_seconds") == st.last_ts / 1e9


def test_observe_adds_growth_only_once(replayed):
    """Calling observe again with no new traffic adds nothing (differences, not totals)."""
    metrics, pipeline, _ = replayed
    before = samples(metrics.registry)
    metrics.observe(pipeline)
    after = samples(metrics.registry)
    for key, v in before.items():
        if key[0].startswith("otwatch_") and key[0].endswith("_total"):
            assert after[key] == v, key


@needs_tshark
def test_frames_bytes_and_pdu_classes_agree_with_tshark(replayed):
    """Frames and bytes against tshark's frame list; Modbus and DNP3 PDUs per function class against
    tshark's function codes classified with the same table (FC 8 by tshark's diagnostic code)."""
    metrics, _, _ = replayed
    r = metrics.registry
    frames = tshark_fields(MIXED, ["frame.len"])
    assert total(r, "otwatch_frames_total") == len(frames)
    assert total(r, "otwatch_bytes_total") == sum(int(f["frame.len"]) for f in frames)

    rows = tshark_fields(MIXED, ["modbus.func_code", "modbus.diagnostic_code"], "modbus")
    fcs, subs = [], []
    for row in rows:
        codes = [int(c) & 0x7F for c in split_multi(row["modbus.func_code"])]
        diag = [int(c) for c in split_multi(row["modbus.diagnostic_code"])]
        for fc in codes:
            fcs.append(fc)
            subs.append(diag.pop(0) if fc == 8 and diag else -1)
    fcs, subs = np.array(fcs), np.array(subs)
    is_control = (fcs == 8) & np.isin(subs, list(DIAGNOSTIC_CONTROL))
    is_write = (fcs == 8) & np.isin(subs, list(DIAGNOSTIC_WRITE))
    want = collections.Counter(CLASS_NAMES[c] for c in function_class(
        np.full(len(fcs), PROTO_MODBUS), fcs, is_write, is_control).tolist())
    assert sum(want.values()) > 9000
    for cls in FUNCTION_CLASSES:
        assert total(r, "otwatch_pdus_total", protocol="modbus", function_class=cls) == want.get(cls, 0), cls

    rows = tshark_fields(MIXED, ["dnp3.al.func"], "dnp3")
    funcs = np.array([int(c) for row in rows for c in split_multi(row["dnp3.al.func"])])
    want = collections.Counter(CLASS_NAMES[c] for c in function_class(np.full(len(funcs), PROTO_DNP3),
                                                                      funcs).tolist())
    assert want["read"] > 100 and want["control"] > 0
    # "other" also holds link-layer-only frames, which have no application function in tshark.
    for cls in ("read", "write", "control", "diagnostic", "file"):
        assert total(r, "otwatch_pdus_total", protocol="dnp3", function_class=cls) == want.get(cls, 0), cls


# --- detection metrics ---------------------------------------------------------------------------------

def _alert(rule="allowlist.new_talker", detector="allowlist", severity="high"):
    return Alert(rule=rule, detector=detector, severity=severity, first_ts=0, last_ts=0, src="10.0.0.66",
                 dst="10.0.0.20", protocol="modbus", entity="e", message="m")


def test_alerts_counted_by_kind_severity_and_capped_rule():
    m = Metrics(CollectorRegistry(), process_metrics=False)
    alerts = [_alert(), _alert(), _alert(severity="low"), _alert(detector="new-thing", rule="x.y")]
    m.observe(alerts=alerts)
    m.count_alerts([_alert().to_ecs()])  # ECS records count the same
    assert _alert().to_ecs()["rule"]["category"] == "allowlist"
    r = m.registry
    assert r.get_sample_value("otwatch_alerts_total", {"kind": "allowlist", "severity": "high"}) == 3
    assert r.get_sample_value("otwatch_alerts_total", {"kind": "other", "severity": "high"}) == 1
    assert r.get_sample_value("otwatch_alert_rule_alerts_total", {"rule": "allowlist.new_talker"}) == 4
    assert r.get_sample_value("otwatch_alert_rule_alerts_total", {"rule": "cycle.burst"}) == 0  # declared
    # A flood of distinct (or data-derived) rule names cannot grow the label set past the cap.
    m.count_alerts([_alert(rule=f"r.n{i}") for i in range(RULE_LABEL_LIMIT * 2)] + [_alert(rule="10.0.0.1")])
    rules = {lab for (n, lab) in samples(r) if n == "otwatch_alert_rule_alerts_total"}
    assert len({dict(lab)["rule"] for lab in rules}) <= RULE_LABEL_LIMIT + 1
    named = len(KNOWN_RULES) + 1  # declared up front, plus "x.y"
    assert r.get_sample_value("otwatch_alert_rule_alerts_total", {"rule": "other"}) == \
        RULE_LABEL_LIMIT * 2 + 1 - (RULE_LABEL_LIMIT - named)


def test_batch_histogram_equals_prometheus_client_histogram():
    """The array histogram exposes exactly what prometheus_client's one-value-at-a-time one does."""
    rng = np.random.default_rng(7)
    scores = np.concatenate([rng.gamma(2.0, 0.3, 5000), SCORE_BUCKETS, [np.inf, np.nan]])
    ours = BatchHistogram("otwatch_t_score", "t", "detector", ("river",), SCORE_BUCKETS)
    for chunk in np.array_split(scores, 7):
        ours.observe("river", chunk)
    reg = CollectorRegistry()
    reg.register(ours)
    ref = CollectorRegistry()
    h = Histogram("otwatch_t_score", "t", ["detector"], buckets=SCORE_BUCKETS, registry=ref)
    for v in scores[np.isfinite(scores)]:
        h.labels("river").observe(float(v))
    a = {k: v for k, v in samples(reg).items()}
    b = {k: v for k, v in samples(ref).items() if not k[0].endswith("_created")}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12), k


def test_health_dict_sets_model_gauges():
    m = Metrics(CollectorRegistry(), process_metrics=False)
    m.observe(health={"mode": "learn", "baseline_age_s": 90.0, "baseline_size": 41, "provisional": 3,
                      "score_drift": {"river": 0.4, "pyod": 0.1}, "above_threshold": {"river": 0.02}})
    r = m.registry
    assert r.get_sample_value("otwatch_mode", {"mode": "learn"}) == 1
    assert r.get_sample_value("otwatch_mode", {"mode": "monitor"}) == 0
    assert r.get_sample_value("otwatch_baseline_age_seconds") == 90
    assert r.get_sample_value("otwatch_baseline_entries") == 41
    assert r.get_sample_value("otwatch_baseline_provisional_entries") == 3
    assert r.get_sample_value("otwatch_model_score_drift", {"detector": "pyod"}) == 0.1
    assert r.get_sample_value("otwatch_model_above_threshold_ratio", {"detector": "river"}) == 0.02


# --- the HTTP server -----------------------------------------------------------------------------------

def test_default_listen_address_is_loopback_and_outside_the_allocated_range():
    assert DEFAULT_HOST == "127.0.0.1"
    assert not 9100 <= DEFAULT_PORT <= 9999 and DEFAULT_PORT not in (9090, 9091, 9093, 9094, 3000)


def _get(url, context=None, auth=None):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        return resp.status, resp.read().decode()


def test_server_serves_the_registry_and_counts_scrapes(replayed):
    metrics, pipeline, _ = replayed
    with MetricsServer(metrics.registry, port=0) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        status, body = _get(server.url)
        assert status == 200
        assert f'otwatch_frames_total{{protocol="modbus"}} {float(pipeline.stats.frames_by_protocol["modbus"])}' \
            in body
        assert server.wait_for_scrapes(1, timeout=1)
        assert not server.wait_for_scrapes(5, timeout=0.2)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", d / "key.pem",
                    "-out", d / "cert.pem"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_server_with_tls_and_basic_auth(tls_cert):
    cert, key = tls_cert
    m = Metrics(CollectorRegistry(), process_metrics=False)
    with MetricsServer(m.registry, port=0, certfile=str(cert), keyfile=str(key),
                       users={"prometheus": "correct horse"}) as server:
        assert server.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        status, body = _get(server.url, ctx, auth="prometheus:correct horse")
        assert status == 200 and "otwatch_frames_total" in body
        for auth in (None, "prometheus:wrong", "nobody:correct horse"):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(server.url, ctx, auth=auth)
            assert err.value.code == 401 and err.value.headers["WWW-Authenticate"].startswith("Basic")
        with pytest.raises(OSError):  # plain HTTP client against the TLS port (reset or URLError)
            _get(server.url.replace("https", "http"))
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the certificate
            _get(server.url, ssl.create_default_context(), auth="prometheus:correct horse")
        assert server.scrapes == 1


def test_replay_command_line_errors_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "agent.cli", "replay", "--no-progress", str(MIXED)]
    for extra, message in ((["--metrics", "127.0.0.1:99999"], "out of range"),
                           (["--metrics", "127.0.0.1:0", "--metrics-tls-cert", "x.pem"], "go together"),
                           (["--metrics", ":0", "--metrics-auth-file", str(tmp_path / "none")], "auth-file")):
        done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and done.stderr.count("\n") == 1


# --- files that query the metrics ----------------------------------------------------------------------

def exported_names() -> set:
    """Every sample name a Metrics registry exposes (histograms with their _bucket/_sum/_count)."""
    m = Metrics(CollectorRegistry())
    m.observe(alerts=[_alert()], scores={"river": np.array([0.5])})
    return {name for name, _ in samples(m.registry)}


def metric_names_in(expr: str) -> set:
    return set(re.findall(r"\botwatch_[a-z0-9_]+\b", expr))


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_exported_metrics():
    names = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used and used <= names, used - names
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    rule_used = set().union(*(metric_names_in(r["expr"]) for g in rules["groups"] for r in g["rules"]))
    assert rule_used <= names, rule_used - names


def test_dashboard_and_provisioning_fit_together():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/otwatch.yml").read_text())
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/otwatch.yml").read_text())
    (source,) = ds["datasources"]
    assert dash["uid"] == "otwatch-overview" and source["uid"] == "otwatch-prometheus"
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        assert p["description"] and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == source["uid"]
            assert 'instance=~"$instance"' in t["expr"], p["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("traffic by protocol", "top alerts", "alert timeline", "anomaly scores", "parse errors",
                   "capture drops", "batch processing latency", "pipeline lag"):
        assert wanted in titles, wanted
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./")]
    assert prov["providers"][0]["options"]["path"] in mounts


def test_docker_compose_structure():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"agent", "prometheus", "grafana"}
    agent = services["agent"]
    assert (DEPLOY / agent["build"]["dockerfile"].removeprefix("deploy/")).is_file()
    assert (DEPLOY / agent["build"]["context"]).resolve() == ROOT
    cmd = agent["command"]
    assert cmd[0] == "replay" and cmd[cmd.index("--metrics") + 1] == f"0.0.0.0:{DEFAULT_PORT}"
    assert (ROOT / cmd[-1].removeprefix("/opt/otwatch/")).is_file()  # the capture is in the image
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom_cfg["scrape_configs"] if job["job_name"] == "otwatch"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"agent:{DEFAULT_PORT}"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # published on loopback only
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), (name, vol)
            else:
                assert src in compose["volumes"], (name, vol)
        for dep in svc.get("depends_on", []):
            assert dep in services
    assert "rules.yml" in prom_cfg["rule_files"]


def test_known_rules_cover_what_the_engine_raises(replayed):
    """Every rule a real engine run on mixed.pcap raises has its by-rule series from the start."""
    from models.engine import DetectionEngine

    engine = DetectionEngine()
    pipeline = Pipeline()
    rules = set()
    replay_files([MIXED], pipeline, on_events=lambda ev: rules.update(a.rule for a in engine.process(ev)))
    rules.update(a.rule for a in engine.finish())
    assert len(rules) >= 5
    assert rules <= set(KNOWN_RULES), rules - set(KNOWN_RULES)
