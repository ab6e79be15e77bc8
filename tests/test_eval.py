"""otwatch eval on the bundled captures (each evaluated once per session)."""

import json

import pytest

from agent.cli import main
from agent.eval import evaluate
from tests.conftest import PROJECT_PCAPS

NAMES = ("modbus", "dnp3", "iec104", "mixed")


@pytest.fixture(scope="session")
def results():
    return {n: evaluate(PROJECT_PCAPS / f"{n}.pcap", PROJECT_PCAPS / f"{n}.labels.csv") for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_scenarios_detected_fast(results, name):
    r, engine = results[name]
    missed = [s["scenario"] for s in r["scenarios"] if not s["detected"]]
    # known miss: DNP3 frozen voltage reported only by 60 s integrity polls (docs/detection.md)
    assert set(missed) <= ({"measurement_spoofing"} if name == "dnp3" else set())
    assert r["median_time_to_detect_s"] <= 1.0
    assert r["recall"] > 0.8 and r["precision"] > 0.5
    for a in engine.alerts:  # every alert names its hosts and says what happened
        assert a.src and a.message and a.rule.split(".")[0] in ("allowlist", "process", "cycle", "parser", "ml")
        assert a.first_ts <= a.last_ts


def test_json_shape(capsys):
    rc = main(["eval", str(PROJECT_PCAPS / "iec104.pcap"), "--labels", str(PROJECT_PCAPS / "iec104.labels.csv"),
               "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert {"scenarios", "false_alerts_per_hour", "precision", "recall", "f1"} <= set(r)
    assert {"scenario", "start_ts", "end_ts", "detected", "time_to_detect_s", "alerts"} <= set(r["scenarios"][0])


def test_bad_input_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pcap"), "--labels", "x.csv"]) == 2
