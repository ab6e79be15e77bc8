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
