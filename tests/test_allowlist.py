"""The allow-list on the bundled captures: the attacker is new, benign traffic of the baseline is not."""

import numpy as np

from agent.pipeline import parse_file
from models.allowlist import AllowList
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
    rules = {f.rule for f in al.findings(mon.select(from_attacker))}
    assert rules == {"allowlist.new_talker"}


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


def test_review_items_roll_up_into_one_incident_per_host():
    """On the bundled mixed capture the master's rarely-seen periodic jobs (counter interrogation, time
    sync, CROBs, double commands on DNP3 and IEC-104) are one low-severity review incident listing
    them, not one alert per item and cool-down; the attacker still gets his own alerts."""
    from agent.eval import evaluate
    _, engine = evaluate(PROJECT_PCAPS / "mixed.pcap", PROJECT_PCAPS / "mixed.labels.csv")
    review = [a for a in engine.alerts if a.provisional or a.rule == "allowlist.new_peer"]
    by_host = {}
    for a in review:
        assert a.severity == "low"
        by_host.setdefault((a.rule, a.entity), []).append(a)
    assert all(len(v) == 1 for v in by_host.values())  # one incident per host and kind
    master = by_host[("allowlist.provisional_function", "10.20.0.10/provisional")][0]
    items = master.fields["items"]
    assert len(items) >= 4 and any("DNP3" in i for i in items) and any("IEC-104" in i for i in items)
    assert any(a.src == "10.20.0.66" and a.severity in ("high", "critical") for a in engine.alerts)
