"""otwatch eval: the bundled captures, a held-out seed generated here, the scoring rule, --ablation."""

import json

import pytest

from agent.cli import main
from agent.eval import evaluate
from models.alerts import Alert
from models.scoring import Label, score_alerts
from tests.conftest import PROJECT_PCAPS

NAMES = ("modbus", "dnp3", "iec104", "mixed")
# Every bundled scenario is detected.  DNP3 reports the frozen voltage only in 60 s integrity polls; it is
# caught when power and current have moved on from it (models/relations.py), which needs the true voltage to
# drift beyond the registers' rounding during the freeze: on a held-out seed it may not (dnp3_555 moved 3 V).
KNOWN_MISSES: dict = {}
HELD_OUT_MAY_MISS = {"dnp3": {"measurement_spoofing"}}


@pytest.fixture(scope="session")
def results():
    return {n: evaluate(PROJECT_PCAPS / f"{n}.pcap", PROJECT_PCAPS / f"{n}.labels.csv") for n in NAMES}


@pytest.fixture(scope="session")
def held_out(tmp_path_factory):
    """3 h captures at a seed used nowhere else (2024): learning = the 99 min before the first attack."""
    d = tmp_path_factory.mktemp("heldout")
    out = {}
    for proto in ("dnp3", "iec104"):
        cap = d / f"{proto}.pcap"
        assert main(["simulate", "-o", str(cap), "--protocols", proto, "--duration", "3h", "--seed", "2024"]) == 0
        out[proto] = evaluate(cap, d / f"{proto}.labels.csv")[0]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_bundled_scenarios_detected_fast(results, name):
    r, engine = results[name]
    missed = {s["scenario"] for s in r["scenarios"] if not s["detected"]}
    assert missed == KNOWN_MISSES.get(name, set())
    assert r["median_time_to_detect_s"] <= 1.0
    assert r["recall"] > 0.9 and r["precision"] > 0.5
    for a in engine.alerts:  # every alert names its hosts and says what happened
        assert a.src and a.message and a.rule.split(".")[0] in ("allowlist", "process", "cycle", "parser", "ml",
                                                                "sessions", "sequence", "state")
        assert a.first_ts <= a.last_ts


@pytest.mark.parametrize("name", NAMES)
def test_bundled_false_alerts_are_low_severity_baseline_items(results, name):
    """16 min of learning cannot see the 7-20 min cycles (workstation visits, counter interrogation,
    time sync, CROBs) often enough: those stay provisional or new and alert at low severity; nothing
    else is false on the bundled captures."""
    r, _ = results[name]
    for a in r["false_alert_list"]:
        assert a["severity"] == "low" and a["rule"] in ("allowlist.new_peer", "allowlist.provisional_function")


@pytest.mark.parametrize("proto", ("dnp3", "iec104"))
def test_held_out_seed_meets_the_targets(held_out, proto):
    r = held_out[proto]
    missed = {s["scenario"] for s in r["scenarios"] if not s["detected"]}
    assert missed <= HELD_OUT_MAY_MISS.get(proto, set())
    assert r["median_time_to_detect_s"] <= 1.0
    assert r["benign_hours"] > 1.0 and r["false_alerts_per_hour"] <= 1.0


def _alert(src, dst, t0, t1=None, rule="r"):
    return Alert(rule, "process", "high", int(t0 * 1e9), int((t1 or t0) * 1e9), src, dst, "modbus", "e", "m")


def test_scoring_insider_needs_the_exact_pair():
    lab = Label(100.0, 120.0, "setpoint_manipulation", "10.0.0.10", "10.0.0.22", insider=True)
    right = _alert("10.0.0.10", "10.0.0.22", 101.0)
    master_elsewhere = _alert("10.0.0.10", "10.0.0.21", 101.0)  # the master talks to everyone
    reversed_pair = _alert("10.0.0.22", "10.0.0.10", 105.0)
    r = score_alerts([master_elsewhere, right, reversed_pair], [lab], 0.0, 3600.0)
    assert r["scenarios"][0]["alerts"] == 2 and r["false_alerts"] == 1
    assert r["scenarios"][0]["time_to_detect_s"] == 1.0


def test_scoring_outsider_window_and_effects():
    lab = Label(100.0, 101.0, "unauthorised_write", "10.0.0.66", "10.0.0.22", insider=False)
    opened_before = _alert("10.0.0.66", "10.0.0.22", 50.0, 100.5)  # an older incident the attack merged into
    attacker = _alert("10.0.0.66", "10.0.0.22", 100.0 - 1e-7)  # float rounding of the label start
    effect = _alert("10.0.0.22", "10.0.0.10", 140.0)  # the breaker it tripped, seen in the next poll
    late = _alert("10.0.0.22", "10.0.0.10", 200.0)
    r = score_alerts([opened_before, attacker, effect, late], [lab], 0.0, 3600.0, grace_s=60.0)
    assert r["scenarios"][0]["detected"] and r["scenarios"][0]["alerts"] == 1
    assert r["effect_alerts"] == 1 and r["false_alerts"] == 2


def test_json_shape_and_ablation(capsys):
    rc = main(["eval", str(PROJECT_PCAPS / "iec104.pcap"), "--labels", str(PROJECT_PCAPS / "iec104.labels.csv"),
               "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert {"scenarios", "false_alerts_per_hour", "precision", "recall", "f1"} <= set(r)
    assert {"scenario", "start_ts", "end_ts", "detected", "time_to_detect_s", "alerts"} <= set(r["scenarios"][0])
    rc = main(["eval", str(PROJECT_PCAPS / "iec104.pcap"), "--labels", str(PROJECT_PCAPS / "iec104.labels.csv"),
               "--ablation", "--json"])
    assert rc == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["detectors"] for r in runs[:-1]] == [[d] for d in runs[-1]["detectors"]]
    together = {s["scenario"] for s in runs[-1]["scenarios"] if s["detected"]}
    alone = {s["scenario"] for r in runs[:-1] for s in r["scenarios"] if s["detected"]}
    assert alone == together == {s["scenario"] for s in r["scenarios"]}  # all seven, none lost by combining


def test_bad_input_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pcap"), "--labels", "x.csv"]) == 2
