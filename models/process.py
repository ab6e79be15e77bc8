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
- ``process.new_point``: a point never seen, on a device and in a role never seen;
- ``process.inconsistent``: measurements of one device that obeyed a relation while learning (power =
  voltage x current) no longer do (:mod:`models.relations`: a frozen or spoofed value).

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

from parsers.events import DIR_REQUEST, KIND_POINT, PROTO_DNP3, PROTO_IEC104, EventBatch

from .features import NS, KeyTable, hash_columns
from .findings import Finding, ip_text, protocol_text
from .points import point_keys, point_space, space_of  # noqa: F401  (re-exported: older imports)
from .relations import Relations

STATS = ("count", "min", "max", "max_rate", "max_run", "changes", "decreases", "max_still_s", "span0", "min_step",
         "sum_step", "max_step")
REL_ANALOG, REL_STEP = 0.01, 0.05  # range tolerance as a fraction of the level (see the module doc)


class PointTable:
    """Per-point statistics in flat arrays, slots from a bounded :class:`KeyTable`."""

    def __init__(self, capacity: int):
        self.table = KeyTable(capacity)
        self.s = {k: np.zeros(capacity) for k in STATS}
        self.s["min"][:] = np.inf
        self.s["max"][:] = -np.inf
        self.s["min_step"][:] = np.inf
        self.last_value = np.full(capacity, np.nan)
        self.last_ts = np.zeros(capacity, np.int64)
        self.run = np.zeros(capacity)  # current run of identical values
        self.run_t0 = np.zeros(capacity, np.int64)  # when that run began
        self.table.on_evict = self._reset

    def _reset(self, slots):
        for k in STATS:
            self.s[k][slots] = 0.0
        self.s["min"][slots] = np.inf
        self.s["max"][slots] = -np.inf
        self.s["min_step"][slots] = np.inf
        self.last_value[slots] = np.nan
        self.run[slots] = 0
        self.run_t0[slots] = 0

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
        t0 = np.where(same[run_start] & first[run_start], self.run_t0[sl[run_start]], ts[run_start])
        still = (ts - t0[seg]) / NS  # seconds the value has not changed
        # seconds since the value before this row appeared: for a repeated value the same as ``still``,
        # for a changed one how long the previous value lasted (its learned maximum is the longest time
        # the point went without a change, which a sparse poll makes at least the poll interval)
        prev_run_t0 = np.empty(n, np.int64)
        prev_run_t0[1:] = t0[seg][:-1]
        prev_run_t0[first] = np.where(self.last_ts[sl[first]] > 0, self.run_t0[sl[first]], ts[first])
        since = np.where(same, still, (ts - prev_run_t0) / NS)
        if learn and ok.any():
            s = self.s
            fin = ~np.isnan(value) & ok
            np.add.at(s["count"], slot[fin], 1)
            np.minimum.at(s["min"], slot[fin], value[fin])
            np.maximum.at(s["max"], slot[fin], value[fin])
            has_prev = fin & ~np.isnan(prev_v)
            np.maximum.at(s["max_rate"], slot[has_prev], rate[has_prev])
            np.maximum.at(s["max_run"], slot[fin], run[fin])
            np.maximum.at(s["max_still_s"], slot[has_prev], since[has_prev])
            np.add.at(s["changes"], slot[has_prev & ~same], 1)
            step = np.abs(dv)
            np.minimum.at(s["min_step"], slot[has_prev & ~same], step[has_prev & ~same])
            np.add.at(s["sum_step"], slot[has_prev], step[has_prev])
            np.maximum.at(s["max_step"], slot[has_prev], step[has_prev])
            np.add.at(s["decreases"], slot[has_prev & (dv < 0)], 1)
        last = np.r_[starts[1:], n] - 1
        good = slots >= 0
        self.last_value[slots[good]] = value[last][good]
        self.last_ts[slots[good]] = ts[last][good]
        self.run[slots[good]] = run[last][good]
        self.run_t0[slots[good]] = (ts[last] - (still[last] * NS).astype(np.int64))[good]
        return rate, run, since, slot, dt


class ProcessModel:
    name = "process"

    def __init__(self, capacity: int = 100_000, min_count: int = 20, stuck_alpha: float = 1e-5):
        self.points = PointTable(capacity)
        self.roles = PointTable(capacity)
        self.min_count = min_count
        self.stuck_alpha = stuck_alpha
        self.learning = True
        self.info: dict[int, dict] = {}
        self.relations = Relations()  # measurements that agree with each other (models/relations.py)

    def _prepare(self, ev: EventBatch):
        rows = np.flatnonzero((ev.kind == KIND_POINT) & ~np.isnan(ev.value))
        if rows.shape[0] == 0:
            return None
        server, key, role = point_keys(ev, rows)
        order = np.lexsort((ev.ts[rows], key))
        return ev.select(rows[order]), server[order], key[order], role[order]

    def learn(self, ev: EventBatch) -> None:
        p = self._prepare(ev)
        if p is None:
            return
        ev, server, key, role = p
        self.points.update(key, ev.ts, ev.value, learn=True)
        ro = np.lexsort((ev.ts, role))
        self.roles.update(role[ro], ev.ts[ro], ev.value[ro], learn=True)
        self.relations.learn(ev)

    def finish_learning(self, budget: float | None = None) -> None:
        """Freeze the range tolerances (``span0``); ``budget`` is the false-alarm probability per
        sample the stuck test may spend (the engine passes its per-window budget)."""
        for t in (self.points, self.roles):
            s = t.s
            s["span0"] = np.where(s["count"] > 0, s["max"] - s["min"], 0.0)
        if budget is not None:
            self.stuck_alpha = float(min(max(budget, 1e-9), 0.01))
        self.relations.finish_learning(self.stuck_alpha)
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
        rate, run, still, slot, dt = self.points.update(key, ev.ts, ev.value, learn=False)
        ro = np.lexsort((ev.ts, role))
        _, _, _, rslot_sorted, _ = self.roles.update(role[ro], ev.ts[ro], ev.value[ro], learn=False)
        rslot = np.empty_like(rslot_sorted)
        rslot[ro] = rslot_sorted
        ps, pknown = self._limits(self.points, slot)
        rs, rknown = self._limits(self.roles, rslot)
        # a reported value is judged on its own history only (devices differ: configuration blocks,
        # feeders); a written value also against what was written to the same point on siblings
        own = pknown & (ps["count"] >= self.min_count)
        written = ev.direction == DIR_REQUEST
        own_step = own & (ps["changes"] < 0.5 * np.maximum(ps["count"] - 1, 1))
        # a written value, or a step value (a setpoint register read back), is also judged against the
        # same point on sibling devices: operators move setpoints of one kind within one band
        borrow = (written | own_step) & rknown
        use = {k: np.where(own, ps[k], rs[k]) for k in STATS}
        use["min"] = np.where(borrow, np.minimum(np.where(pknown, ps["min"], np.inf), rs["min"]), use["min"])
        use["max"] = np.where(borrow, np.maximum(np.where(pknown, ps["max"], -np.inf), rs["max"]), use["max"])
        use["span0"] = np.where(borrow, np.maximum(use["span0"], use["max"] - use["min"]), use["span0"])
        known = own | borrow
        v = ev.value
        pairs = np.maximum(use["count"] - 1, 1)
        # analog measurements change at almost every sample; setpoints, limits and breakers hold their
        # value between operator actions (steps).  Written values are operator actions too.
        analog = (use["changes"] >= 0.5 * pairs) & ~written
        with np.errstate(invalid="ignore"):  # unknown points hold +-inf; they are masked by ``known``
            level = np.abs(use["max"] + use["min"]) / 2
        # tolerance: the span learned while learning, or a fraction of the level: 1 % for a measurement
        # (noise, slow drift), 5 % for a step value (an operator moves a setpoint within a band a short
        # baseline has not seen all of; a manipulation is a move far beyond it)
        margin = np.maximum(use["span0"], np.where(analog, REL_ANALOG, REL_STEP) * level)
        # a counter rises at almost every sample and never falls; a 16-bit register holding a counter's
        # low word wraps from the top half of its range to the bottom (Modbus registers are 16 bits)
        counter = (use["decreases"] == 0) & analog
        wraps = counter & (use["max"] >= 32768) & (use["max"] < 65536) & (v < 32768)
        too_high = (v > use["max"] + margin) & ~counter
        too_low = (v < use["min"] - margin) & ~wraps
        oor = known & (too_high | too_low)
        # a rate only means something for a measurement sampled on a cycle (a step's rate depends on
        # how close the next poll happens to follow the operator's command)
        # A point reported on change (IEC-104 spontaneous, DNP3 events) can send two reports milliseconds
        # apart: its rate per second says nothing; the step must also exceed 3x the largest step learned
        step = rate * dt  # |change| from the point's previous sample
        fast = known & own & analog & ~oor & ~wraps & (rate > 3 * use["max_rate"]) & (rate > 0) & \
            (np.abs(rate) > margin) & (ps["changes"] > 0) & (step > 3 * use["max_step"])
        # stuck: a measurement that used to change repeats the same value so many times in a row that
        # the learned chance of a repeat, p0 ** (run - 1), falls below the per-sample budget; or goes
        # without any change for twice the longest time it ever did while learning
        changing = own & analog
        # the chance that the next sample repeats the last one, from the repeats seen while learning, and
        # no more than the value's resolution (its smallest change) against the spread of its changes
        # when none were seen (a float measurement practically never repeats)
        repeats = pairs - ps["changes"]
        mean_step = ps["sum_step"] / pairs
        with np.errstate(invalid="ignore", divide="ignore"):
            p_res = np.where(np.isfinite(ps["min_step"]) & (mean_step > 0), ps["min_step"] / (2 * mean_step), 1.0)
        # (the 95 % upper bound of a Poisson count, k + 1.96 sqrt(k + 1) + 1 for k seen: one repeat in a
        # hundred samples is weak evidence of how rare repeats are; none seen: the rule of three)
        p0 = np.where(repeats > 0, np.minimum((repeats + 1.96 * np.sqrt(np.maximum(repeats, 0) + 1) + 1) / pairs, 1.0),
                      np.minimum(3.0 / pairs, p_res))
        with np.errstate(divide="ignore"):
            need = 1 + np.ceil(np.log(self.stuck_alpha) / np.log(np.clip(p0, 1e-12, 0.999)))
        stuck_limit = np.maximum(need, ps["max_run"] + 1)
        still_limit = 2 * ps["max_still_s"]
        # (a repeat must span time: the same sample sent twice at once, as a spontaneous report and an
        # interrogation answer, is no evidence)
        too_long = (still > still_limit) & (still_limit > 0)
        stuck = changing & (run >= 2) & (still >= 1.0) & ((run >= stuck_limit) | too_long) & ~oor
        # the range follows slow drift: accepted values of a point widen its own range (the tolerance
        # stays the one frozen at the end of learning, so the range moves at most a margin per sample
        # and only with values that also pass the rate test)
        follow = own & ~oor & ~fast & (slot >= 0)
        if follow.any():
            np.minimum.at(self.points.s["min"], slot[follow], v[follow])
            np.maximum.at(self.points.s["max"], slot[follow], v[follow])
        space = point_space(ev)
        # a new point is a value a device reports: a written value is the allow-list's (new write target)
        # and a command's echo (DNP3 g12 CROB / g41 analog output, IEC-104 types 45-69) is no process value
        echo = ((ev.protocol == PROTO_DNP3) & np.isin(ev.object, (12, 41))) | \
            ((ev.protocol == PROTO_IEC104) & (ev.object >= 45) & (ev.object <= 69))
        new = ~pknown & ~rknown & ~written & ~echo
        out = []
        for rule, mask, sev, tech in (("out_of_range", oor, "high", "T0836"), ("fast_change", fast, "medium", "T0836"),
                                      ("stuck", stuck, "medium", "T0856"), ("new_point", new, "medium", "T0861")):
            if not mask.any():
                continue
            rows = np.flatnonzero(mask)
            # one finding per device and point space (a block of registers is one incident)
            # (static and event objects of one point, DNP3 g1 and g2, are one incident)
            gk = hash_columns(server[rows], ev.protocol[rows], ev.unit[rows], space[rows], ev.direction[rows])
            uk, first = np.unique(gk, return_index=True)
            for j, r in enumerate(rows[first].tolist()):
                rr = rows[gk == uk[j]]
                f = self._finding(rule, sev, tech, ev, server, rr, r, use, stuck_limit, margin, rate, run, still)
                # a state that persists (an open breaker, a frozen value) is reported at every poll: the
                # incident stays open for two sampling intervals of the point, however slow its poll
                f.hold_s = 2.0 * float(np.max(dt[rr]))
                out.append(f)
        out += self.relations.findings(ev)
        return out

    def _finding(self, rule, sev, tech, ev, server, rows, r, use, stuck_limit, margin, rate, run, still) -> Finding:
        srv = ip_text(server[r])
        peer = ev.src[r] if ev.direction[r] == DIR_REQUEST else ev.dst[r]
        proto = int(ev.protocol[r])
        addrs = np.unique(ev.address[rows])
        others = f" and {addrs.shape[0] - 1} more point(s) ({int(addrs.min())}-{int(addrs.max())})" \
            if addrs.shape[0] > 1 else ""
        where = (f"{protocol_text(proto)} point {int(ev.address[r])}{others} (object {int(ev.object[r])}, unit "
                 f"{int(ev.unit[r])}) on {srv}")
        v = float(ev.value[r])
        written = ev.direction[r] == DIR_REQUEST
        verb = f"{ip_text(peer)} wrote" if written else f"{srv} reported"
        lo, hi = float(use["min"][r]), float(use["max"][r])
        if rule == "out_of_range":
            msg = f"{verb} {v:g} for {where}; the accepted range is {lo:g} to {hi:g} (tolerance {float(margin[r]):.3g})"
            if written:
                sev = "critical" if abs(v - (lo + hi) / 2) > 2 * max(hi - lo, 1e-9) else "high"
        elif rule == "fast_change":
            msg = (f"{where} changed at {float(rate[r]):g}/s to {v:g}; the baseline never changed faster than "
                   f"{float(use['max_rate'][r]):g}/s")
        elif rule == "stuck":
            rmax = int(rows.shape[0] and run[rows].max())
            msg = (f"{where} has reported the same value {v:g} {rmax} times in a row for {float(still[r]):.0f} s; "
                   f"during the baseline it repeated a value at most {int(use['max_run'][r])} times in a row and "
                   f"never went more than {float(use['max_still_s'][r]):.0f} s without a change "
                   "(frozen or spoofed measurement)")
        else:
            msg = f"{verb} {v:g} for {where}, a point never seen during the baseline"
        return Finding(
            rule=f"process.{rule}", detector=self.name, severity=sev if not (rule == "stuck" and written) else "low",
            first_ts=int(ev.ts[rows].min()), last_ts=int(ev.ts[rows].max()), src=int(ev.src[r]),
            dst=int(ev.dst[r]), protocol=proto,
            entity=f"{srv}/{proto}/u{int(ev.unit[r])}/s{int(point_space(ev.select(slice(r, r + 1)))[0])}"
                   f"/d{int(ev.direction[r])}",
            message=msg, technique="T0855" if written and rule == "out_of_range" and sev == "critical" else tech,
            count=int(rows.shape[0]), score=v, fields={
                "value": v, "address": int(ev.address[r]), "object": int(ev.object[r]), "unit": int(ev.unit[r]),
                "function": int(ev.function[r]), "baseline_min": lo, "baseline_max": hi, "frame": int(ev.frame[r]),
                "addresses": addrs[:32].tolist()})

    def size(self) -> int:
        return len(self.points.table)

    def to_state(self) -> tuple[dict, dict]:
        arrays = {}
        for name, t in (("points", self.points), ("roles", self.roles)):
            used = np.flatnonzero(t.table.used)
            arrays[f"process.{name}.keys"] = t.table.slot_key[used]
            for k in STATS:
                arrays[f"process.{name}.{k}"] = t.s[k][used]
        ra, rm = self.relations.to_state()
        arrays.update(ra)
        return arrays, {"capacity": self.points.table.capacity, "min_count": self.min_count,
                        "stuck_alpha": self.stuck_alpha, "relations": rm}

    @classmethod
    def from_state(cls, arrays, meta) -> "ProcessModel":
        m = cls(capacity=meta["capacity"], min_count=meta["min_count"], stuck_alpha=meta.get("stuck_alpha", 1e-5))
        for name, t in (("points", m.points), ("roles", m.roles)):
            keys = np.asarray(arrays[f"process.{name}.keys"], np.int64)
            if keys.shape[0]:
                slots = t.table.slots(keys, 0.0)
                for k in STATS:
                    got = arrays.get(f"process.{name}.{k}")
                    if got is None and k == "span0":  # a state saved before span0 existed
                        got = np.asarray(arrays[f"process.{name}.max"]) - np.asarray(arrays[f"process.{name}.min"])
                    if got is None and k == "max_step":  # saved before max_step existed: rate test alone
                        got = np.zeros(keys.shape[0])
                    t.s[k][slots] = got
        m.relations = Relations.from_state(arrays, meta.get("relations"))
        m.learning = False
        return m
