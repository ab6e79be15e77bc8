"""The engine: learn then monitor, save/load (HMAC), replay --learn/--alerts/--state."""

import json

import numpy as np
import pytest

from agent.cli import main
from agent.pipeline import parse_file
from models.engine import DetectionEngine
from models.state import StateError
from tests.conftest import PROJECT_PCAPS


@pytest.fixture(scope="module")
def events():
    return parse_file(PROJECT_PCAPS / "iec104.pcap")


def _run(engine, ev, step=2000):
    for i in range(0, len(ev), step):
        engine.process(ev.select(slice(i, i + step)))
    engine.finish()
    return engine.alerts


def test_saved_state_gives_the_same_alerts(events, tmp_path):
    t_learn = int(events.ts[0]) + 990 * 10**9
    learn, mon = events.select(events.ts < t_learn), events.select(events.ts >= t_learn)
    a = DetectionEngine(learn_seconds=None, learn_until_ns=t_learn)
    _run(a, learn)
    a.save(tmp_path / "st")
    b = DetectionEngine.load(tmp_path / "st")
    alerts_a = [(x.rule, x.entity, x.first_ts) for x in _run(a, mon)]
    alerts_b = [(x.rule, x.entity, x.first_ts) for x in _run(b, mon)]
    assert alerts_a and sorted(alerts_a) == sorted(alerts_b)
    h = a.health()
    assert h["mode"] == "monitor" and h["baseline_entries"] > 0 and 0 <= h["pyod_fraction_above"] <= 1
    # a changed state is refused
    p = tmp_path / "st" / "state.json"
    p.write_bytes(p.read_bytes().replace(b'"version": 1', b'"version": 2'))
    with pytest.raises(StateError):
        DetectionEngine.load(tmp_path / "st")


def test_alerts_clear_when_traffic_is_normal(events):
    e = DetectionEngine(learn_seconds=990)
    _run(e, events)
    assert all(a.status == "closed" for a in e.alerts)
    assert np.all([a.count >= 1 for a in e.alerts])


def test_replay_learn_alerts_state(tmp_path, capsys):
    alerts = tmp_path / "a.jsonl"
    rc = main(["replay", str(PROJECT_PCAPS / "dnp3.pcap"), "--learn", "990s", "--alerts", str(alerts),
               "--state", str(tmp_path / "st"), "--json", "--no-progress"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["detection"]["alerts"] > 0
    recs = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert recs and all(r["event"]["kind"] == "alert" and r["rule"]["name"] and r["source"]["ip"] for r in recs)
    assert any(r["source"]["ip"] == "10.20.0.66" for r in recs)
    # one record per incident, written when it closed (final count and last seen)
    ids = [r["event"]["id"] for r in recs]
    assert len(ids) == len(set(ids)) == s["detection"]["alerts"]
    assert all(r["otwatch"]["status"] == "closed" for r in recs)
    rc = main(["baseline", "show", "--state", str(tmp_path / "st"), "--json"])
    assert rc == 0 and capsys.readouterr().out.count("\n") > 10


@pytest.mark.parametrize("capture", ["iec104.pcap", "mixed.pcap"])
def test_learning_survives_a_restart(capture, tmp_path):
    """Stopped halfway through learning and loaded again, the engine goes on learning to the same end
    and raises the same rule-based alerts as one that was never stopped."""
    ev = parse_file(PROJECT_PCAPS / capture)
    t_learn = int(ev.ts[0]) + 990 * 10**9
    t_stop = int(ev.ts[0]) + 500 * 10**9
    whole = DetectionEngine(learn_seconds=None, learn_until_ns=t_learn)
    _run(whole, ev)
    first = DetectionEngine(learn_seconds=None, learn_until_ns=t_learn)
    before = ev.select(ev.ts < t_stop)
    for i in range(0, len(before), 2000):
        first.process(before.select(slice(i, i + 2000)))
    first.save_progress(tmp_path / "st", key=b"k" * 32)
    resumed = DetectionEngine.load(tmp_path / "st", key=b"k" * 32)
    assert resumed.mode == "learn" and resumed.learn_until_ns == t_learn
    assert resumed.allowlist.size() == first.allowlist.size() > 0
    _run(resumed, ev.select(ev.ts >= t_stop))
    assert resumed.mode == "monitor" and resumed.learned_from == whole.learned_from
    # The restart loses the window in progress (the damped statistics re-warm): a few learning
    # windows of several hundred.  The stuck-value test spends a false-alarm budget per learning
    # window, so a borderline "stuck" finding may differ; every other rule-based alert is the same.
    assert abs(resumed.learn_n - whole.learn_n) <= 0.01 * whole.learn_n
    rule_based = ("allowlist.", "process.", "cycle.")

    def keys(engine):
        return sorted((a.rule, a.entity) for a in engine.alerts
                      if a.rule.startswith(rule_based) and a.rule != "process.stuck")

    assert keys(whole) and keys(resumed) == keys(whole)
    # a tampered progress checkpoint is refused like any other state
    p = tmp_path / "st" / "state.json"
    p.write_bytes(p.read_bytes().replace(b'"mode": "learn"', b'"mode": "learm"'))
    with pytest.raises(StateError):
        DetectionEngine.load(tmp_path / "st", key=b"k" * 32)
