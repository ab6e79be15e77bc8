"""The process-variable model: every register, DNP3 point and IOA has a range, a rate and a rhythm.

A point is (server, protocol, unit, object, address): the device that owns the value, whether the
value was read from it or written to it.  Learning keeps per point: count, min, max, largest
|change| per second, the longest run of identical consecutive values, how often the value changes,
and whether it only rises (a counter).  The same statistics are kept per *role point*
(protocol, object, address, all devices together) so a setpoint written to one outstation is
judged against the setpoints written to its siblings when it has little history of its own.

Monitoring, per point row:

- ``process.out_of_range``: outside ``[min - m, max + m]`` with ``m = 0.25 * (max - min)``
  (counters: only a decrease);
- ``process.fast_change``: |change| per second above 3x the learned largest (and above the range
  margin);
- ``process.stuck``: a value that used to change at least every other sample repeats more than
  ``max(2 * longest learned run, longest run + 3)`` times (a frozen measurement);
- ``process.new_point``: a point never seen, on a device and in a role never seen.

Rows are sorted by point once per batch; runs and changes come from ``np.diff`` within groups.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS, DIR_RESPONSE
>>> b = EventBuilder()
>>> for t in range(50):
...     ctx = StreamContext(ts=t * 10**9, src=2, dst=1, direction=DIR_RESPONSE)
...     b.points(ctx, PROTO_MODBUS, t, function=3, addresses=np.array([0]), values=np.array([100.0 + t % 5]), obj=4)
>>> pm = ProcessModel(); pm.learn(b.build()); pm.finish_learning()
>>> b.points(StreamContext(ts=60 * 10**9, src=2, dst=1, direction=DIR_RESPONSE), PROTO_MODBUS, 99, function=3,
...          addresses=np.array([0]), values=np.array([145.0]), obj=4)
>>> [f.rule for f in pm.findings(b.build())]
['process.out_of_range']
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, KIND_POINT, EventBatch

from .features import NS, KeyTable, hash_columns
from .findings import Finding, ip_text, protocol_text

STATS = ("count", "min", "max", "max_rate", "max_run", "changes", "decreases")


def point_keys(ev: EventBatch):
    server = np.where(ev.direction == DIR_REQUEST, ev.dst, ev.src)
    key = hash_columns(21, server, ev.protocol, ev.unit, ev.object, ev.address)
    role = hash_columns(22, ev.protocol, ev.object, ev.address)
    return server, key, role


class PointTable:
    """Per-point statistics in flat arrays, slots from a bounded :class:`KeyTable`."""

    def __init__(self, capacity: int):
        self.table = KeyTable(capacity)
        self.s = {k: np.zeros(capacity) for k in STATS}
        self.s["min"][:] = np.inf
        self.s["max"][:] = -np.inf
        self.last_value = np.full(capacity, np.nan)
        self.last_ts = np.zeros(capacity, np.int64)
        self.run = np.zeros(capacity)  # current run of identical values
        self.table.on_evict = self._reset

    def _reset(self, slots):
        for k in STATS:
            self.s[k][slots] = 0.0
        self.s["min"][slots] = np.inf
        self.s["max"][slots] = -np.inf
        self.last_value[slots] = np.nan
        self.run[slots] = 0

    def update(self, key, ts, value, learn: bool):
        """Fold rows (sorted by key then ts) into the table; return per-row (rate, run, slot).

        ``learn`` updates the statistics; without it only last value/run/time move on."""
        uk, starts = np.unique(key, return_index=True)
        slots = self.table.slots(uk, float(ts.max()) / NS) if learn else self.table.lookup(uk)
        n = key.shape[0]
        grp = np.repeat(np.arange(uk.shape[0]), np.diff(np.r_[starts, n]))
        slot = slots[grp]
        ok = slot >= 0
        prev_v = np.empty(n)
        prev_t = np.empty(n, np.int64)
        prev_v[1:], prev_t[1:] = value[:-1], ts[:-1]
        first = np.zeros(n, bool)
        first[starts] = True
        sl = np.maximum(slot, 0)
        prev_v[first] = self.last_value[sl[first]]
        prev_t[first] = self.last_ts[sl[first]]
        prev_v[~ok] = np.nan
        dv = value - prev_v
        dt = np.maximum((ts - prev_t) / NS, 1e-3)
        rate = np.abs(dv) / dt
        same = dv == 0
        # run length of identical values, continuing the stored run at each group's first row
        brk = ~same
        run_start = np.flatnonzero(brk | first)
        seg = np.cumsum(brk | first) - 1
        base = np.where(same[run_start] & first[run_start], self.run[sl[run_start]], 0.0)
        run = (np.arange(n) - run_start[seg]) + 1 + base[seg]
        if learn and ok.any():
            s = self.s
            fin = ~np.isnan(value) & ok
            np.add.at(s["count"], slot[fin], 1)
            np.minimum.at(s["min"], slot[fin], value[fin])
            np.maximum.at(s["max"], slot[fin], value[fin])
            has_prev = fin & ~np.isnan(prev_v)
            np.maximum.at(s["max_rate"], slot[has_prev], rate[has_prev])
            np.maximum.at(s["max_run"], slot[fin], run[fin])
            np.add.at(s["changes"], slot[has_prev & ~same], 1)
            np.add.at(s["decreases"], slot[has_prev & (dv < 0)], 1)
        last = np.r_[starts[1:], n] - 1
        good = slots >= 0
        self.last_value[slots[good]] = value[last][good]
        self.last_ts[slots[good]] = ts[last][good]
        self.run[slots[good]] = run[last][good]
        return rate, run, slot


class ProcessModel:
    name = "process"

    def __init__(self, capacity: int = 100_000, min_count: int = 20):
        self.points = PointTable(capacity)
        self.roles = PointTable(capacity)
        self.min_count = min_count
        self.learning = True
        self.info: dict[int, dict] = {}

    def _prepare(self, ev: EventBatch):
        ev = ev.select((ev.kind == KIND_POINT) & ~np.isnan(ev.value))
        if len(ev) == 0:
            return None
        server, key, role = point_keys(ev)
        order = np.lexsort((ev.ts, key))
        return ev.select(order), server[order], key[order], role[order]

    def learn(self, ev: EventBatch) -> None:
        p = self._prepare(ev)
        if p is None:
            return
        ev, server, key, role = p
        self.points.update(key, ev.ts, ev.value, learn=True)
        ro = np.lexsort((ev.ts, role))
        self.roles.update(role[ro], ev.ts[ro], ev.value[ro], learn=True)

    def finish_learning(self) -> None:
        self.learning = False

    def _limits(self, tbl: PointTable, slot):
        s = {k: v[np.maximum(slot, 0)] for k, v in tbl.s.items()}
        known = (slot >= 0) & (s["count"] > 0)
        return s, known

    def findings(self, ev: EventBatch) -> list:
        p = self._prepare(ev)
        if p is None:
            return []
        ev, server, key, role = p
        rate, run, slot = self.points.update(key, ev.ts, ev.value, learn=False)
        ro = np.lexsort((ev.ts, role))
        _, _, rslot_sorted = self.roles.update(role[ro], ev.ts[ro], ev.value[ro], learn=False)
        rslot = np.empty_like(rslot_sorted)
        rslot[ro] = rslot_sorted
        ps, pknown = self._limits(self.points, slot)
        rs, rknown = self._limits(self.roles, rslot)
        # a point with little history of its own borrows its role's statistics
        own = pknown & (ps["count"] >= self.min_count)
        use = {k: np.where(own, ps[k], rs[k]) for k in STATS}
        known = own | rknown
        v = ev.value
        span = use["max"] - use["min"]
        margin = np.maximum(0.25 * span, 1e-9 * np.abs(use["max"]))
        counter = (use["decreases"] == 0) & (use["changes"] > 0)
        too_high = (v > use["max"] + margin) & ~counter
        too_low = v < use["min"] - margin
        oor = known & (too_high | too_low)
        fast = known & own & ~oor & (rate > 3 * use["max_rate"]) & (rate > 0) & \
            (np.abs(rate) > margin) & (ps["changes"] > 0)
        changing = own & (ps["changes"] >= 0.5 * ps["count"])
        stuck_limit = np.maximum(2 * ps["max_run"], ps["max_run"] + 3)
        stuck = changing & (run > stuck_limit) & ~oor
        new = ~pknown & ~rknown
        out = []
        for rule, mask, sev, tech in (("out_of_range", oor, "high", "T0836"), ("fast_change", fast, "medium", "T0836"),
                                      ("stuck", stuck, "medium", "T0856"), ("new_point", new, "medium", "T0861")):
            if not mask.any():
                continue
            rows = np.flatnonzero(mask)
            uk, first = np.unique(key[rows], return_index=True)
            for j, r in enumerate(rows[first].tolist()):  # one finding per point in the batch
                rr = rows[key[rows] == uk[j]]
                out.append(self._finding(rule, sev, tech, ev, server, rr, r, use, stuck_limit, margin, rate, run))
        return out

    def _finding(self, rule, sev, tech, ev, server, rows, r, use, stuck_limit, margin, rate, run) -> Finding:
        srv = ip_text(server[r])
        peer = ev.src[r] if ev.direction[r] == DIR_REQUEST else ev.dst[r]
        proto = int(ev.protocol[r])
        where = (f"{protocol_text(proto)} point {int(ev.address[r])} (object {int(ev.object[r])}, unit "
                 f"{int(ev.unit[r])}) on {srv}")
        v = float(ev.value[r])
        written = ev.direction[r] == DIR_REQUEST
        verb = f"{ip_text(peer)} wrote" if written else f"{srv} reported"
        lo, hi = float(use["min"][r]), float(use["max"][r])
        if rule == "out_of_range":
            msg = f"{verb} {v:g} for {where}; the baseline range is {lo:g} to {hi:g}"
            if written:
                sev = "critical" if abs(v - (lo + hi) / 2) > 2 * max(hi - lo, 1e-9) else "high"
        elif rule == "fast_change":
            msg = (f"{where} changed at {float(rate[r]):g}/s to {v:g}; the baseline never changed faster than "
                   f"{float(use['max_rate'][r]):g}/s")
        elif rule == "stuck":
            rmax = int(rows.shape[0] and run[rows].max())
            msg = (f"{where} has reported the same value {v:g} {rmax} times in a row; during the baseline it "
                   f"changed at least every {int(use['max_run'][r])} samples (frozen or spoofed measurement)")
        else:
            msg = f"{verb} {v:g} for {where}, a point never seen during the baseline"
        return Finding(
            rule=f"process.{rule}", detector=self.name, severity=sev if not (rule == "stuck" and written) else "low",
            first_ts=int(ev.ts[rows].min()), last_ts=int(ev.ts[rows].max()), src=int(ev.src[r]),
            dst=int(ev.dst[r]), protocol=proto,
            entity=f"{srv}/{proto}/u{int(ev.unit[r])}/o{int(ev.object[r])}/a{int(ev.address[r])}",
            message=msg, technique="T0855" if written and rule == "out_of_range" and sev == "critical" else tech,
            count=int(rows.shape[0]), score=v, fields={
                "value": v, "address": int(ev.address[r]), "object": int(ev.object[r]), "unit": int(ev.unit[r]),
                "function": int(ev.function[r]), "baseline_min": lo, "baseline_max": hi, "frame": int(ev.frame[r])})

    def size(self) -> int:
        return len(self.points.table)

    def to_state(self) -> tuple[dict, dict]:
        arrays = {}
        for name, t in (("points", self.points), ("roles", self.roles)):
            used = np.flatnonzero(t.table.used)
            arrays[f"process.{name}.keys"] = t.table.slot_key[used]
            for k in STATS:
                arrays[f"process.{name}.{k}"] = t.s[k][used]
        return arrays, {"capacity": self.points.table.capacity, "min_count": self.min_count}

    @classmethod
    def from_state(cls, arrays, meta) -> "ProcessModel":
        m = cls(capacity=meta["capacity"], min_count=meta["min_count"])
        for name, t in (("points", m.points), ("roles", m.roles)):
            keys = np.asarray(arrays[f"process.{name}.keys"], np.int64)
            if keys.shape[0]:
                slots = t.table.slots(keys, 0.0)
                for k in STATS:
                    t.s[k][slots] = arrays[f"process.{name}.{k}"]
        m.learning = False
        return m
