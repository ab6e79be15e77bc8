"""Detectors on their own: process model, cycle model, thresholds, ML wrappers."""

import numpy as np

from agent.pipeline import parse_file
from models.cycle import CycleModel
from models.pyod_detector import PyODDetector
from models.thresholds import calibrate
from tests.conftest import PROJECT_PCAPS


def test_cycle_model_learns_the_polls():
    ev = parse_file(PROJECT_PCAPS / "modbus.pcap")
    learn = ev.select(ev.ts < int(1767601000 * 1e9))
    cm = CycleModel()
    cm.learn(learn)
    cm.finish_learning()
    periods = sorted(round(p[0], 1) for p in cm.period.values())
    assert 2.0 in periods and 10.0 in periods  # FC 4/1 every 2 s, FC 3 every 10 s (docs/simulator.md)
    assert cm.findings(learn.select(slice(0, 0)), None, int(learn.ts.max())) == []


def test_threshold_budget_holds_out_of_sample():
    rng = np.random.default_rng(3)
    learn, later = rng.gamma(2.0, 1.0, 5000), rng.gamma(2.0, 1.0, 200000)
    t = calibrate(learn, 1e-3)
    assert np.mean(later > t) < 3e-3


def test_pyod_scores_outliers_higher():
    rng = np.random.default_rng(4)
    d = PyODDetector()
    d.fit(rng.normal(0, 1, (2000, 4)))
    s = d.score(np.vstack([rng.normal(0, 1, (100, 4)), np.full((5, 4), 8.0)]))
    assert s[100:].min() > np.quantile(s[:100], 0.99)


def test_iforest_flat_arrays_score_like_pyod():
    rng = np.random.default_rng(5)
    X = rng.normal(0, 1, (3000, 6))
    X[:, 2] = np.round(X[:, 2])  # ties, as counts give
    d = PyODDetector(method="iforest")
    d.fit(X)
    Y = np.vstack([rng.normal(0, 1, (300, 6)), np.full((3, 6), 9.0), X[:50]])
    assert np.allclose(d.score(Y), d.model.decision_function(Y), rtol=0, atol=1e-12)


def test_process_model_state_carries_across_batches():
    """The same findings (rule, incident, first seen) whether a capture comes in one batch or many."""
    from models.process import ProcessModel, STATS
    ev = parse_file(PROJECT_PCAPS / "dnp3.pcap")
    t_learn = int(ev.ts.min()) + 990 * 10**9
    learn, mon = ev.select(ev.ts < t_learn), ev.select(ev.ts >= t_learn)

    def run(step):
        pm = ProcessModel()
        for i in range(0, len(learn), step):
            pm.learn(learn.select(slice(i, i + step)))
        pm.finish_learning(1e-4)
        first = {}
        for i in range(0, len(mon), step):
            for f in pm.findings(mon.select(slice(i, i + step))):
                first[(f.rule, f.entity)] = min(first.get((f.rule, f.entity), f.first_ts), f.first_ts)
        return pm, first

    whole, f_whole = run(len(ev))
    sliced, f_sliced = run(333)
    keys = whole.points.table.keys
    for k in STATS:
        a = whole.points.s[k][whole.points.table.lookup(keys)]
        b = sliced.points.s[k][sliced.points.table.lookup(keys)]
        assert np.allclose(a, b), k
    assert f_whole and f_whole == f_sliced


def _points(values, t0=0, dt=30, proto_obj=13):
    from parsers.events import DIR_RESPONSE, PROTO_IEC104, EventBuilder, StreamContext
    b = EventBuilder()
    for i, v in enumerate(values):
        ctx = StreamContext(ts=(t0 + i * dt) * 10**9, src=2, dst=1, direction=DIR_RESPONSE)
        b.points(ctx, PROTO_IEC104, i, function=proto_obj, addresses=np.array([1001]), values=np.array([v]),
                 obj=proto_obj)
    return b.build()


def test_stuck_needs_evidence_against_the_learned_repeat_chance():
    from models.process import ProcessModel
    rng = np.random.default_rng(6)
    # a float measurement never repeats: two equal reports 30 s apart are a frozen value
    pm = ProcessModel()
    pm.learn(_points(11.0 + np.cumsum(rng.normal(0, 0.01, 200))))
    pm.finish_learning(1e-4)
    frozen = _points([11.3, 11.3, 11.3], t0=200 * 30)
    assert [f.rule for f in pm.findings(frozen)] == ["process.stuck"]
    # an integer measurement that repeated now and then while learning: one repeat is no evidence
    pm = ProcessModel()
    ints = np.round(100 + np.cumsum(rng.normal(0, 3, 200)))
    assert (np.diff(ints) == 0).sum() > 3
    pm.learn(_points(ints))
    pm.finish_learning(1e-4)
    assert pm.findings(_points([ints[-1] + 1, ints[-1] + 1], t0=200 * 30)) == []


def test_river_batch_scores_equal_rivers_score_one_on_real_windows():
    """The NumPy scoring of River's trees gives River's own score_one, before and after window swaps,
    on the feature vectors of a bundled capture (and on the same vectors far outside their range)."""
    from models.engine import transform
    from models.features import WindowFeatures
    from models.river_detector import RiverDetector
    ev = parse_file(PROJECT_PCAPS / "mixed.pcap")
    wf = WindowFeatures()
    fb = wf.push(ev)
    X = transform(fb.X)
    assert X.shape[0] > 2000
    d = RiverDetector(window_size=100)
    d.learn(X[:600])
    for k in range(4):  # learning 137 rows between checks moves River across its window swaps
        Y = np.vstack([X[600 + 300 * k: 900 + 300 * k], X[:20] * 3.0])
        batch, ref = d.score(Y), d.score_one_by_one(Y)
        assert np.array_equal(batch, ref)
        assert batch.std() > 0
        d.learn(Y[:137])


def test_river_learns_a_sample_only_when_windows_are_many():
    from models.river_detector import RiverDetector
    rng = np.random.default_rng(6)
    d = RiverDetector(learn_per_s=8)
    d.learn_sample(rng.normal(0, 1, (40, 3)), seconds=5.0)  # 8/s over 5 s: every window
    assert d.learned == 40
    d.learn_sample(rng.normal(0, 1, (4000, 3)), seconds=5.0)  # far more: about 40 of them
    assert 15 <= d.learned - 40 <= 70


def test_iforest_compiled_descent_equals_numpy_descent():
    rng = np.random.default_rng(8)
    X = rng.normal(0, 1, (6000, 5))
    d = PyODDetector(method="iforest")
    d.fit(X)
    assert d.model.detector_.n_features_in_ == 5
    Y = np.vstack([rng.normal(0, 1, (500, 5)), np.full((3, 5), 9.0), np.full((2, 5), np.nan)])
    assert np.allclose(d.forest.decision_function(Y), d.forest.decision_function_numpy(Y), rtol=0, atol=1e-12)


def test_relations_catch_the_frozen_dnp3_voltage_and_nothing_else():
    """Each outstation's power = voltage x current is found while learning (g30 points 0, 1, 2, the only
    relation); the voltage frozen for 61 s breaks it at the next integrity poll, and no benign poll does."""
    from agent.eval import evaluate
    from models.scoring import read_labels
    labels = read_labels(PROJECT_PCAPS / "dnp3.labels.csv")
    spoof = next(x for x in labels if x.scenario == "measurement_spoofing")
    r, engine = evaluate(PROJECT_PCAPS / "dnp3.pcap", PROJECT_PCAPS / "dnp3.labels.csv")
    rel = engine.process_model.relations
    assert sorted(map(tuple, rel.addr.tolist())) == [(0, 1, 2)] * 3
    inc = [a for a in engine.alerts if a.rule == "process.inconsistent"]
    assert inc and all(spoof.start_ts <= a.first_ts / 1e9 <= spoof.end_ts and a.src == spoof.src for a in inc)
    assert next(s for s in r["scenarios"] if s["scenario"] == "measurement_spoofing")["detected"]


def test_relations_with_nothing_learned_find_nothing():
    from models.relations import Relations
    r = Relations()
    r.finish_learning(1e-4)
    assert len(r) == 0 and r.findings(parse_file(PROJECT_PCAPS / "dnp3.pcap")) == []


def test_relations_take_batches_without_reported_values():
    """Written values only (requests), then relations learned, then again written values only."""
    from models.relations import Relations
    from parsers.events import DIR_REQUEST
    ev = parse_file(PROJECT_PCAPS / "dnp3.pcap")
    writes = ev.select((ev.kind == 1) & (ev.direction == DIR_REQUEST))
    assert len(writes) > 0
    r = Relations()
    r.learn(writes)
    r.learn(ev.select(ev.ts < int(ev.ts.min()) + 990 * 10**9))
    r.finish_learning(1e-4)
    assert len(r) == 3 and r.findings(writes) == []


def test_relations_state_round_trip():
    from models.process import ProcessModel
    ev = parse_file(PROJECT_PCAPS / "dnp3.pcap")
    pm = ProcessModel()
    pm.learn(ev.select(ev.ts < int(ev.ts.min()) + 990 * 10**9))
    arrays, meta = pm.to_state()  # still learning: the collected samples travel with the state
    again = ProcessModel.from_state(arrays, meta)
    pm.finish_learning(1e-4)
    again.finish_learning(1e-4)
    assert len(pm.relations) == 3 and np.array_equal(pm.relations.addr, again.relations.addr)
    assert np.allclose(pm.relations.thr, again.relations.thr)
    a2, m2 = pm.to_state()
    done = ProcessModel.from_state(a2, m2)
    assert np.array_equal(done.relations.dev, pm.relations.dev) and np.allclose(done.relations.mean, pm.relations.mean)


def test_cycle_model_with_nothing_learned_monitors_without_failing():
    """A learning window without a single PDU (a public capture's first half), then traffic."""
    from models.features import WindowFeatures
    ev = parse_file(PROJECT_PCAPS / "dnp3.pcap")
    cm = CycleModel()
    cm.finish_learning()
    fb = WindowFeatures().push(ev)
    assert cm.findings(ev, fb, int(ev.ts.max())) == []


def test_river_stays_silent_when_learning_is_shorter_than_its_window():
    """Fewer learning windows than HalfSpaceTrees' window: it scores 0 on all of them, so no threshold can be
    calibrated; it must not alert on everything once it starts scoring (public captures of seconds)."""
    from models.engine import DetectionEngine
    ev = parse_file(PROJECT_PCAPS / "dnp3.pcap")
    t0 = int(ev.ts.min())
    e = DetectionEngine(learn_seconds=None, learn_until_ns=t0 + 60 * 10**9, detectors=("river",))
    e.process(ev)
    e.finish()
    assert e.river is not None and e.river.learned >= e.river.hst.window_size  # it did learn on in monitoring
    assert e.thresholds["river"] == np.inf and not [a for a in e.alerts if a.rule == "ml.river"]
