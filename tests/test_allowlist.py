"""The allow-list on the bundled captures: the attacker is new, benign traffic of the baseline is not."""

import numpy as np

from agent.pipeline import parse_file
from models.allowlist import AllowList
from models.function_classes import is_mechanics
from models.scoring import read_labels
from tests.conftest import PROJECT_PCAPS


def _split(name):
    ev = parse_file(PROJECT_PCAPS / f"{name}.pcap")
    labels = read_labels(PROJECT_PCAPS / f"{name}.labels.csv")
    t0 = int((labels[0].start_ts - 1) * 1e9)
    return ev.select(ev.ts < t0), ev.select(ev.ts >= t0)


def test_attacker_is_new_and_learning_data_is_known():
    learn, mon = _split("dnp3")
    al = AllowList()
    al.learn(learn)
    al.finish_learning()
    assert (al.score(learn.select(learn.kind == 0)) < 1).all()  # nothing learned is "new"
    attacker = int(np.uint32((10 << 24) | (20 << 16) | 66))
    from_attacker = (mon.src == attacker) & (mon.kind == 0)
    assert from_attacker.any()
    assert (al.score(mon.select(from_attacker)) == 1.0).all()
    found = al.findings(mon.select(from_attacker))
    # the new pair once per target, and what the attacker did, function by function (escalation)
    talker = [f for f in found if f.rule == "allowlist.new_talker"]
    functions = [f for f in found if f.rule == "allowlist.new_function"]
    assert {f.rule for f in found} == {"allowlist.new_talker", "allowlist.new_function"}
    sub = mon.select(from_attacker & (mon.direction == 0))
    pairs = {(int(a), int(b)) for a, b in zip(sub.src, sub.dst)}
    assert len(talker) == len(pairs)
    assert {f.fields["function"] for f in functions} == {f for f in sub.function.tolist() if 0 < f < 1000}
    assert len({f.entity for f in found}) == len(found)
    assert is_mechanics(sub.protocol, sub.function).any()  # link frames and confirms: no function finding


def test_rare_items_stay_provisional_until_approved():
    learn, mon = _split("modbus")
    al = AllowList()
    al.learn(learn)
    al.finish_learning()
    prov = [e for e in al.entries() if e["status"] == "provisional"]
    assert prov and all(e["count"] < 3 or e["last_ts"] - e["first_ts"] < 60e9 for e in prov)
    assert al.set_status(prov[0]["id"], 2)
    assert al.provisional_count() == len(prov) - 1
    arrays, meta = al.to_state()
    al2 = AllowList.from_state(arrays, meta)
    ev = mon.select(mon.kind == 0)
    assert np.array_equal(al2.classify(ev), al.classify(ev))


def test_review_items_are_reported_once_per_host_and_item():
    """The engineering workstation visits a PLC it never visited while learning twice (bundled modbus): one
    low-severity new-peer alert, not one per visit; on the mixed capture the master's rarely-seen periodic
    jobs (counter interrogation, time sync, CROBs, double commands) alert once each, in incidents per host
    across protocols, while the attacker still gets his own high-severity alerts."""
    from agent.eval import evaluate
    _, engine = evaluate(PROJECT_PCAPS / "modbus.pcap", PROJECT_PCAPS / "modbus.labels.csv")
    peer = [a for a in engine.alerts if a.rule == "allowlist.new_peer"]
    assert [(a.src, a.severity) for a in peer] == [("10.20.0.12", "low")]
    _, engine = evaluate(PROJECT_PCAPS / "mixed.pcap", PROJECT_PCAPS / "mixed.labels.csv")
    review = [a for a in engine.alerts if a.provisional or a.rule == "allowlist.new_peer"]
    items = [i for a in review for i in a.fields["items"]]
    assert all(a.severity == "low" for a in review) and len(items) == len(set(items)) >= 4
    master = [a for a in review if a.entity == "10.20.0.10/provisional"]
    assert any("DNP3" in i for a in master for i in a.fields["items"])
    assert any("IEC-104" in i for a in master for i in a.fields["items"])
    assert any(a.src == "10.20.0.66" and a.severity in ("high", "critical") for a in engine.alerts)
