"""The learned models for what rules cannot see (models/sequence.py, models/process_state.py), on the
simulator's rule-blind family (``--attacks rule-blind``): every request allowed, every value in range."""

import pytest

from agent.cli import main
from agent.eval import evaluate, load_batches
from models.engine import DetectionEngine

RULES = ("allowlist", "process", "cycle", "parser")
LEARNED = ("sequence", "state")


@pytest.fixture(scope="module")
def rule_blind(tmp_path_factory):
    """Two DNP3 hours with an OPERATE sent without its SELECT and 300 s of replayed analog inputs."""
    d = tmp_path_factory.mktemp("ruleblind")
    cap = d / "dnp3.pcap"
    assert main(["simulate", "-o", str(cap), "--protocols", "dnp3", "--duration", "2h", "--seed", "73",
                 "--attacks", "rule-blind"]) == 0
    batches = load_batches(cap)
    labels = d / "dnp3.labels.csv"
    return {name: evaluate(cap, labels, detectors=dets, batches=batches)
            for name, dets in (("rules", RULES), ("learned", LEARNED))}


def test_rules_cannot_see_the_rule_blind_family(rule_blind):
    r, _ = rule_blind["rules"]
    assert [s["detected"] for s in r["scenarios"]] == [False, False]


def test_learned_models_find_each_attack_and_say_why(rule_blind):
    r, engine = rule_blind["learned"]
    found = {s["scenario"]: s for s in r["scenarios"]}
    assert found["operate_out_of_order"]["detected"] and found["replayed_state"]["detected"]
    assert r["false_alerts"] == 0
    by_rule = {a.rule: a for a in engine.alerts}
    order = by_rule["sequence.unusual_order"]
    assert "OPERATE g12" in order.message and "SELECT g12" in order.message  # what came, what always came before
    replay = by_rule["state.replayed"]
    assert replay.src != order.src and "earlier" in replay.message  # the outstation reports, the master commands


def test_scenarios_stay_out_of_all(tmp_path):
    """The default set (and so every existing seed's bytes) does not include the opt-in family."""
    from agent.simulator.common import RULE_BLIND, SCENARIOS

    assert not set(RULE_BLIND) & set(SCENARIOS)
    assert main(["simulate", "-o", str(tmp_path / "x.pcap"), "--protocols", "modbus", "--duration", "20m",
                 "--attacks", "replayed_state", "--seed", "3"]) == 0
    assert "replayed_state" in (tmp_path / "x.labels.csv").read_text()


def test_baseline_round_trip_keeps_the_learned_order(rule_blind, tmp_path):
    _, engine = rule_blind["learned"]
    engine.save(tmp_path / "b")
    back = DetectionEngine.load(tmp_path / "b")
    assert back.sequence.size() == engine.sequence.size() > 0
    assert back.sequence.threshold == engine.sequence.threshold
    assert back.state.run_needed == engine.state.run_needed
