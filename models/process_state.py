"""Process-state vectors: a device's measurements reported together, and old states reported again.

Per report (one response PDU of one device), the *measurements* it carries -- points that change at
most samples and are not counters (voltage, current, power, frequency, temperature; not breakers,
setpoints, energy counters or clocks) -- form one state vector.  Measurement noise makes a vector of
several such values practically unique: the plant never reports the very same combination twice,
minutes apart.  A recording replayed to the master does.  Each value of a replayed state is in its
range, moves at its usual rate and keeps the physical relations between points (it *was* real), so
no per-point rule can see it; only the memory of whole states can.

Learning measures, per point, how often it changes (``min_change`` of its samples) and whether it only
rises (a counter or a clock, left out: a careful attacker keeps them live, and a replayed counter is
the process model's business); then, over the learning window, how often a report equals one first
reported at least ``min_age_s`` earlier (``p_first``: with hundreds of past states kept, a few coarse
values coincide now and then -- the birthday problem) and how often the *next* report of that device
then equals the *next* old one at the same lag (``p_next``: an old recording, played in order).  Both
are counts with half a sighting added.  In monitoring a run of ``k`` reports of one device that repeat
old reports at one lag (within ``lag_tolerance_s``) alerts when ``p_first * p_next ** (k - 1)`` falls
below the engine's false-alarm budget per report (at least three in a row: a learning window
with no chance run in it bounds ``p_next`` only loosely).

Memory is a fixed direct-mapped table of ``2 ** table_bits`` vector hashes with the time each was
first reported (16 bytes per slot: 4 MB by default, about 1.2 h of history for 60 devices reporting every
2 s, 12 h for 6; replays of older states are not recognised).

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS, DIR_RESPONSE
>>> b = EventBuilder(); rng = np.random.default_rng(0)
>>> def report(t, v):
...     ctx = StreamContext(ts=int(t * 1e9), src=2, dst=1, direction=DIR_RESPONSE)
...     pid = b.pdu(ctx, PROTO_MODBUS, function=4, unit=1, count=3)
...     for a, x in enumerate(v): b.point(ctx, PROTO_MODBUS, pdu_id=pid, function=4, unit=1, address=a, obj=4, value=x)
>>> hist = [np.round(rng.normal(100, 5, 3), 1) for _ in range(3000)]
>>> for i, v in enumerate(hist): report(2 * i, v)
>>> m = ProcessStateModel(); m.learn(b.build()); m.finish_learning(0.5)
>>> for i in range(3): report(6000 + 2 * i, hist[100 + i])  # an old recording, replayed
>>> [f.rule for f in m.findings(b.build())]
['state.replayed']
"""

from __future__ import annotations

import numpy as np

from parsers.events import KIND_POINT, EventBatch

from .features import hash_columns
from .findings import Finding, ip_text, protocol_text

NS = 1_000_000_000


class ProcessStateModel:
    def __init__(self, min_points: int = 3, min_age_s: float = 300.0, min_change: float = 0.5,
                 table_bits: int = 18, warmup: int = 20, lag_tolerance_s: float = 1.0):
        self.min_points, self.min_age_s, self.min_change, self.warmup = min_points, min_age_s, min_change, warmup
        self.mask = (1 << table_bits) - 1
        self.lag_tol = int(lag_tolerance_s * NS)
        self.slot_key = np.zeros(1 << table_bits, np.int64)
        self.slot_ts = np.zeros(1 << table_bits, np.int64)  # when the vector was first reported (ns)
        # per point: samples, changes, decreases, last value (a dict: points are few); a point's class is
        # decided once, after ``warmup`` samples, so learning and monitoring build the same vectors
        self.points: dict[int, list] = {}
        self.decided: dict[int, bool] = {}
        self.measurement: np.ndarray = np.empty(0, np.int64)  # sorted point keys, frozen after learning
        self.learning = True
        self.vectors = 0
        self.firsts = 0  # vectors equal to an old one (any: coincidences grow with the history kept)
        self.follows = 0  # ... right after one that did, at the same lag (an old recording, in order)
        self.p_first = self.p_next = 1.0
        self.run_needed = 10 ** 9
        self.runs: dict[int, list] = {}  # device+client -> [run length, lag ns, first ts, last vector]
        self.budget = 0.0

    # -- per batch ----------------------------------------------------------------------------
    def _point_stats(self, key, value) -> None:
        order = np.argsort(key, kind="stable")
        k, v = key[order], value[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], k.shape[0]]
        for s, e in zip(starts.tolist(), ends.tolist()):
            st = self.points.setdefault(int(k[s]), [0, 0, 0, np.nan])
            seq = v[s:e] if np.isnan(st[3]) else np.r_[st[3], v[s:e]]
            d = np.diff(seq)
            st[0] += e - s
            st[1] += int(np.count_nonzero(d != 0))
            st[2] += int(np.count_nonzero(d < 0))
            st[3] = float(v[e - 1])

    def _is_measurement(self, key) -> np.ndarray:
        if self.learning:  # decide the points that have enough samples now
            new = [k for k, st in self.points.items() if k not in self.decided and st[0] >= self.warmup]
            if new:
                for k in new:
                    self.decided[k] = self._measures(self.points[k])
                self.measurement = np.array(sorted(k for k, m in self.decided.items() if m), np.int64)
        if self.measurement.shape[0] == 0:
            return np.zeros(key.shape[0], bool)
        pos = np.minimum(np.searchsorted(self.measurement, key), self.measurement.shape[0] - 1)
        return self.measurement[pos] == key

    def _measures(self, st, warmup: int | None = None) -> bool:
        n, changes, down = st[0], st[1], st[2]
        return n >= (warmup or self.warmup) and changes >= self.min_change * (n - 1) and down >= 0.05 * changes

    def _vectors(self, ev: EventBatch):
        """(device+client, vector hash, ts, row of the report's first point) per report with enough measurements."""
        m = (ev.kind == KIND_POINT) & np.isfinite(ev.value)
        if not m.any():
            return None
        idx = np.flatnonzero(m)
        dev = hash_columns(ev.src[idx], ev.protocol[idx], ev.unit[idx])
        key = hash_columns(dev, ev.object[idx], ev.address[idx])
        # runs are per device *and* client: an HMI reading the same state as the master a moment later is
        # the same state, not a second repeat
        pair = hash_columns(dev, ev.dst[idx])
        val = ev.value[idx]
        if self.learning:
            self._point_stats(key, val)
        meas = self._is_measurement(key)
        if not meas.any():
            return None
        idx, pair, key, val = idx[meas], pair[meas], key[meas], val[meas]
        h = hash_columns(key, val.view(np.int64))
        pid = ev.pdu_id[idx]
        order = np.argsort(pid, kind="stable")
        pid, h, idx, pair = pid[order], h[order], idx[order], pair[order]
        starts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])
        counts = np.diff(np.r_[starts, pid.shape[0]])
        with np.errstate(over="ignore"):
            vec = np.add.reduceat(h.view(np.uint64), starts).view(np.int64)  # order-free sum of point hashes
        ok = counts >= self.min_points
        if not ok.any():
            return None
        vec = hash_columns(vec[ok], counts[ok])
        first = idx[starts[ok]]
        return pair[starts[ok]], vec, ev.ts[first], first

    def _match_and_store(self, vec, ts):
        """Per vector: it equals one first reported at least ``min_age_s`` earlier; and that lag (ns)."""
        slot = vec & self.mask
        lag = ts - self.slot_ts[slot]
        old = (self.slot_key[slot] == vec) & (lag >= self.min_age_s * NS)
        new = self.slot_key[slot] != vec
        self.slot_key[slot[new]] = vec[new]
        self.slot_ts[slot[new]] = ts[new]
        return old, lag

    def _runs(self, dev, vec, old, lag, ts):
        """Yield (i, run length, first ts) for every vector that continues or starts a run of old vectors
        of its device at one lag; a vector that is new, or old at another lag, ends (or restarts) it.  The
        same vector again (a state read twice in a row, a flood of reads) neither extends nor ends it."""
        if not old.any():
            for d in np.unique(dev).tolist():
                self.runs.pop(d, None)
            return
        for i in range(dev.shape[0]):  # only batches with an old vector get here
            d = int(dev[i])
            if not old[i]:
                self.runs.pop(d, None)
                continue
            run = self.runs.get(d)
            if run is not None and run[3] == int(vec[i]):
                continue
            if run is not None and abs(int(lag[i]) - run[1]) <= self.lag_tol:
                run[0] += 1
                run[3] = int(vec[i])
            else:
                run = self.runs[d] = [1, int(lag[i]), int(ts[i]), int(vec[i])]
            yield i, run[0], run[2]

    def learn(self, ev: EventBatch) -> None:
        v = self._vectors(ev)
        if v is None:
            return
        dev, vec, ts, _ = v
        old, lag = self._match_and_store(vec, ts)
        self.vectors += int(vec.shape[0])
        for _, run, _ in self._runs(dev, vec, old, lag, ts):
            if run == 1:
                self.firsts += 1
            else:
                self.follows += 1

    def finish_learning(self, allowed_alerts: float) -> None:
        """``allowed_alerts``: false alerts the budget allows over the learning span (0.5/h x hours)."""
        self.learning = False
        for k, st in self.points.items():  # slow points (a 60 s integrity poll) may still be undecided
            if k not in self.decided and st[0] >= 10:
                self.decided[k] = self._measures(st, 10)
        self.measurement = np.array(sorted(k for k, m in self.decided.items() if m), np.int64)
        self.runs.clear()
        self.p_first = (self.firsts + 0.5) / (self.vectors + 1.0)
        self.p_next = (self.follows + 0.5) / (self.firsts + 1.0)
        self.budget = allowed_alerts / max(self.vectors, 1)
        # a run of k: chance p_first * p_next ** (k - 1) per vector, below the budget
        if self.vectors < 20 or self.p_next >= 1:
            self.run_needed = 10 ** 9
        else:
            need = 1 + np.log(max(self.budget, 1e-300) / min(self.p_first, 1.0)) / np.log(self.p_next)
            # at least 3: with no chance run seen while learning, p_next is a guess (half a sighting)
            self.run_needed = int(max(3, np.ceil(need)))

    def findings(self, ev: EventBatch) -> list:
        v = self._vectors(ev)
        if v is None:
            return []
        dev, vec, ts, rows = v
        old, lag = self._match_and_store(vec, ts)
        out = []
        for i, run, first_ts in self._runs(dev, vec, old, lag, ts):
            if run == self.run_needed:
                out.append(self._finding(ev, int(rows[i]), run, first_ts, int(lag[i])))
        return out

    def _finding(self, ev, r, run, first_ts, lag) -> Finding:
        src, dst, p = int(ev.src[r]), int(ev.dst[r]), int(ev.protocol[r])
        chance = self.p_first * self.p_next ** (run - 1)
        expl = [f"{run} reports in a row repeat, value for value and in order, the measurements reported "
                f"{lag / NS:.0f} s earlier",
                f"while learning {self.firsts} of {self.vectors} reports equalled an old one by chance and "
                f"{self.follows} continued such a run (chance of {run} in a row about {chance:.1e}, "
                f"budget {self.budget:.1e})"]
        return Finding(
            # opens when the run is long enough to convict, not at its first report (that one may be live: a
            # seamless splice starts where the recording equals the present)
            rule="state.replayed", detector="state", severity="high", first_ts=int(ev.ts[r]), last_ts=int(ev.ts[r]),
            src=src, dst=dst, protocol=p, entity=f"{ip_text(src)}>{ip_text(dst)}/{p}",
            message=(f"{protocol_text(p)} {ip_text(src)} reports to {ip_text(dst)} a process state it already "
                     f"reported {lag / NS:.0f} s earlier ({run} reports in a row): replayed measurements"),
            technique="T0856", count=run, score=float(run), threshold=float(self.run_needed), explanation=expl,
            fields={"run": run, "run_first_ts": first_ts, "lag_s": round(lag / NS, 3), "p_first": self.p_first, "p_next": self.p_next,
                    "vectors_learned": self.vectors})

    # -- persistence ----------------------------------------------------------------------------
    def to_state(self):
        return ({"state.measurement": self.measurement},
                {"p_first": self.p_first, "p_next": self.p_next, "budget": self.budget, "run_needed": self.run_needed,
                 "vectors": self.vectors, "firsts": self.firsts, "follows": self.follows})

    @classmethod
    def from_state(cls, arrays, meta) -> "ProcessStateModel":
        m = cls()
        m.learning = False
        m.measurement = np.asarray(arrays["state.measurement"], np.int64)
        m.p_first, m.p_next = float(meta["p_first"]), float(meta["p_next"])
        m.budget, m.run_needed = float(meta["budget"]), int(meta["run_needed"])
        m.vectors, m.firsts, m.follows = int(meta["vectors"]), int(meta["firsts"]), int(meta["follows"])
        return m  # the table of past vectors re-fills from the live stream

    def memory_bytes(self) -> int:
        return int(self.slot_key.nbytes + self.slot_ts.nbytes)
