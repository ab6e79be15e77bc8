"""Window features on a real capture: counts per channel-second agree with a plain recount of the events."""

import numpy as np
import pytest

from agent.pipeline import parse_file
from models.features import F, NS, DecayedStats, WindowFeatures, channel_of, hash_columns, pair_latency
from tests.conftest import PROJECT_PCAPS


@pytest.fixture(scope="module")
def modbus_events():
    return parse_file(PROJECT_PCAPS / "modbus.pcap")


def test_window_counts_match_a_recount(modbus_events):
    ev = modbus_events
    wf = WindowFeatures()
    parts = [wf.push(ev.select(slice(i, i + 5000))) for i in range(0, len(ev), 5000)] + [wf.flush()]
    X = np.concatenate([p.X for p in parts])
    sec = np.concatenate([p.sec for p in parts])
    client = np.concatenate([p.client for p in parts])
    server = np.concatenate([p.server for p in parts])
    pdus = ev.select(ev.kind == 0)
    c, s = channel_of(pdus)
    # every PDU lands in exactly one window, whatever the batch cuts
    assert X[:, F["requests"]].sum() + X[:, F["responses"]].sum() == len(pdus)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(sec), 25, replace=False):
        m = (pdus.ts // NS == sec[i]) & (c == client[i]) & (s == server[i])
        assert X[i, F["requests"]] == np.count_nonzero(m & (pdus.direction == 0))
        assert X[i, F["bytes"]] == pdus.length[m].sum()
        assert X[i, F["functions"]] == np.unique(pdus.function[m]).shape[0]


def test_latency_pairs_modbus_transactions(modbus_events):
    pdus = modbus_events.select(modbus_events.kind == 0)
    lat = pair_latency(pdus, {})
    resp = pdus.direction == 1
    paired = ~np.isnan(lat)
    assert np.all(resp[paired])
    assert np.count_nonzero(paired) > 0.9 * np.count_nonzero(resp)
    assert 0 < np.nanmedian(lat) < 0.05  # device latencies of a few ms (docs/simulator.md)


def test_decayed_stats_match_the_definition():
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 10, 200))
    x = rng.normal(5, 2, 200)
    s = DecayedStats(lambdas=(0.5, 0.01), capacity=4)
    for a in range(0, 200, 37):  # batches of any size give the same result
        s.update(np.full(min(37, 200 - a), 9), t[a:a + 37], x[a:a + 37])
    w, mean, std = s.get(np.array([9]), now=10.0)
    for j, lam in enumerate((0.5, 0.01)):
        d = 2.0 ** (-lam * (10.0 - t))
        assert w[0, j] == pytest.approx(d.sum())
        m = (d * x).sum() / d.sum()
        assert mean[0, j] == pytest.approx(m)
        assert std[0, j] == pytest.approx(np.sqrt((d * x * x).sum() / d.sum() - m * m))


def test_hash_and_key_table_are_bounded():
    from models.features import KeyTable
    kt = KeyTable(capacity=100)
    keys = hash_columns(np.arange(1000))
    assert np.unique(keys).shape[0] == 1000
    for i in range(0, 1000, 50):
        kt.slots(keys[i:i + 50], now=float(i))
    assert len(kt) <= 100 and kt.evicted >= 900
    assert (kt.lookup(keys[-50:]) >= 0).all()


def test_window_recurrence_equals_update_then_get():
    rng = np.random.default_rng(2)
    n = 3000
    keys, t, x = rng.integers(0, 7, n), np.sort(rng.uniform(100, 112, n)), rng.normal(5, 2, n)
    valid = rng.random(n) > 0.2
    a, b = DecayedStats((5.0, 1.0, 0.1), 16), DecayedStats((5.0, 1.0, 0.1), 16)
    for s in (a, b):  # some state from an earlier batch
        s.update(np.array([1, 2]), np.array([90.0, 95.0]), np.array([1.0, 2.0]))
    sec = np.floor(t).astype(np.int64)
    _, first, inv = np.unique(hash_columns(keys, sec), return_index=True, return_inverse=True)
    end = np.zeros(first.shape[0])
    np.maximum.at(end, inv, t)
    got = a.update_windows(keys[first], end, inv, t, x, valid)
    want = [np.zeros_like(got[0]) for _ in range(3)]
    for s in np.unique(sec):  # the definition: fold each second in, read at each window's end
        r = (sec == s) & valid
        b.update(keys[r], t[r], x[r])
        wm = sec[first] == s
        for j, arr in enumerate(b.get(keys[first][wm], end[wm])):
            want[j][wm] = arr
    for g, w in zip(got, want):
        assert np.allclose(g, w, rtol=1e-9, atol=1e-9)
