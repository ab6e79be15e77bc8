"""Relations between the measurements one device reports together: a frozen or spoofed value stops agreeing.

A bay controller reports voltage, current and power in one response; power is (nearly) the product of the
other two, so ``log P - log V - log I`` stays constant to within the rounding of the three registers while
each of them moves with the load.  A value frozen or replaced by an attacker keeps its own range and rhythm
but breaks the product as soon as the others move on -- evidence from a single sample, where the stuck test
(:mod:`models.process`) needs a run of repeats that a point polled once a minute cannot give.

Nothing about voltage or power is assumed: while learning, every device's reported values are collected
per PDU (the values of one response are simultaneous), and every combination
``log x_j - s_a log x_a - s_b log x_b`` (``s = +-1``) of three measurements is tried.  (Not two: power
follows current alone while the voltage holds still, and stops doing so when an operator moves the
voltage.)  A combination is kept as a *relation* when it is far steadier than any of its terms: its spread
is at most ``max_ratio`` (0.25) of the smallest spread of the terms, each term a measurement that changed
at least at every other sample, over at least ``min_samples`` PDUs.  On the generated plants the one
relation found per device is power = voltage x current (spread ratio 0.06-0.15; the next best combination
of three has 0.86 or more): a physical law, not a coincidence of trends.

Monitoring, per PDU carrying all the points of a relation: the residual from the learned mean alerts
(``process.inconsistent``) above ``max(z * sd, 2 * largest learned residual, 1.5 * rounding bound)``, with
``z`` the two-sided normal quantile of the per-sample budget and the rounding bound the sum over the
terms of half a unit relative to the term's level for integer registers (what rounding alone can do).  Accepted samples
move the mean slowly (weight ``follow``), as a power factor drifts with the load.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_DNP3, DIR_RESPONSE
>>> rng = np.random.default_rng(1); b = EventBuilder()
>>> def poll(k, v, i, p=None):  # one integrity poll: voltage (V), current (A x 10), power (kW)
...     ctx = StreamContext(ts=k * 60 * 10**9, src=2, dst=1, direction=DIR_RESPONSE)
...     p = v * i / 1000 if p is None else p
...     b.points(ctx, PROTO_DNP3, k, function=129, addresses=np.array([0, 1, 2]),
...              values=np.round(np.array([v, i * 10, p])), obj=30)
>>> for k in range(60):
...     poll(k, 11000 + rng.normal(0, 20), 250 + 30 * np.sin(k / 9) + rng.normal(0, 2))
>>> rel = Relations(); rel.learn(b.build()); rel.finish_learning(1e-4); rel.addr.tolist()
[[0, 1, 2]]
>>> poll(61, 11000, 300); rel.findings(b.build())  # power follows voltage and current: they agree
[]
>>> poll(62, 11000, 230, p=11100 * 230 / 1000)  # voltage frozen at 11000 V while the true one is 11100 V
>>> [f.rule for f in rel.findings(b.build())]
['process.inconsistent']
"""

from __future__ import annotations

import itertools
import warnings
from statistics import NormalDist

import numpy as np

from parsers.events import DIR_RESPONSE, KIND_POINT, EventBatch

from .features import hash_columns
from .findings import Finding, ip_text, protocol_text
from .points import point_space, space_of

MAX_COLUMNS = 12  # points per device tried for relations (the first addresses seen)
MAX_SAMPLES = 2048  # PDUs kept per device while learning (the latest)


def _device_rows(ev: EventBatch, rows: np.ndarray | None = None):
    """Reported (response) point rows with a finite value (of ``rows`` when given): (rows, device key,
    server).  A device is (server, protocol, unit, point space)."""
    m = (ev.kind == KIND_POINT) & (ev.direction == DIR_RESPONSE) & np.isfinite(ev.value)
    rows = np.flatnonzero(m) if rows is None else rows[m[rows]]
    server = ev.src[rows]
    if rows.shape[0] == 0:
        return rows, np.empty(0, np.int64), server
    dev = hash_columns(31, server, ev.protocol[rows], ev.unit[rows], space_of(ev.object[rows], ev.protocol[rows]))
    return rows, dev, server


class Relations:
    def __init__(self, max_ratio: float = 0.25, min_samples: int = 12, follow: float = 0.02,
                 budget: float = 1e-4):
        self.max_ratio, self.min_samples, self.follow = float(max_ratio), int(min_samples), float(follow)
        self.budget = float(budget)
        # learning: per device the column of each address (the first MAX_COLUMNS seen), its server, and
        # the samples (one row per PDU: the device's values in their columns), tagged with the device
        self.columns: dict[int, dict[int, int]] = {}
        self.servers: dict[int, int] = {}
        self._pair_key = np.empty(0, np.int64)  # sorted hash(device, address) -> its column
        self._pair_col = np.empty(0, np.int64)
        self._chunks: list = []  # [(device per row, samples (n, MAX_COLUMNS))]
        self._n = 0
        # the relations, one row each: device, the three addresses (-1: unused), signs, mean, threshold
        self.dev = np.empty(0, np.int64)
        self.addr = np.empty((0, 3), np.int64)
        self.sign = np.empty((0, 3))
        self.mean = np.empty(0)
        self.thr = np.empty(0)
        self.spread = np.empty(0)
        self.server = np.empty(0, np.int64)  # the device's address (a cheap first filter in monitoring)

    def __len__(self) -> int:
        return int(self.dev.shape[0])

    # -- learning ------------------------------------------------------------------------------
    def learn(self, ev: EventBatch) -> None:
        rows, dev, server = _device_rows(ev)
        if rows.shape[0] == 0:
            return
        addr, value, pdu = ev.address[rows].astype(np.int64), ev.value[rows], ev.pdu_id[rows].astype(np.int64)
        pk = hash_columns(dev, addr)
        upk, first, pinv = np.unique(pk, return_index=True, return_inverse=True)
        col = self._cols(upk)
        added = np.flatnonzero(col == -2)
        added = added[np.argsort(addr[first[added]], kind="stable")]  # columns in address order
        for j in added.tolist():  # (device, address) pairs never seen: the first batches
            d, a = int(dev[first[j]]), int(addr[first[j]])
            self.servers.setdefault(d, int(server[first[j]]))
            cols = self.columns.setdefault(d, {})
            if len(cols) < MAX_COLUMNS:
                cols[a] = len(cols)
            col[j] = cols.get(a, -1)
            self._pair_key = np.r_[self._pair_key, upk[j]]
            self._pair_col = np.r_[self._pair_col, col[j]]
        if added.shape[0]:
            o = np.argsort(self._pair_key, kind="stable")
            self._pair_key, self._pair_col = self._pair_key[o], self._pair_col[o]
        col = col[pinv]
        sk = hash_columns(dev, pdu)
        us, sfirst, sinv = np.unique(sk, return_index=True, return_inverse=True)
        M = np.full((us.shape[0], MAX_COLUMNS), np.nan)
        ok = col >= 0
        M[sinv[ok], col[ok]] = value[ok]
        self._chunks.append((dev[sfirst], M))
        self._n += us.shape[0]
        if self._n > 2 * MAX_SAMPLES * max(len(self.columns), 1):
            self._compact()

    def _cols(self, keys: np.ndarray) -> np.ndarray:
        """Column of each hash(device, address); -2 when never seen."""
        if self._pair_key.shape[0] == 0:
            return np.full(keys.shape[0], -2, np.int64)
        i = np.minimum(np.searchsorted(self._pair_key, keys), self._pair_key.shape[0] - 1)
        return np.where(self._pair_key[i] == keys, self._pair_col[i], -2)

    def _compact(self):
        """One chunk holding the latest MAX_SAMPLES samples of each device, in order."""
        if not self._chunks:
            return np.empty(0, np.int64), np.empty((0, MAX_COLUMNS))
        D = np.concatenate([c[0] for c in self._chunks])
        M = np.concatenate([c[1] for c in self._chunks])
        o = np.argsort(D, kind="stable")
        D, M = D[o], M[o]
        end = np.r_[np.flatnonzero(D[1:] != D[:-1]) + 1, D.shape[0]]
        from_end = np.repeat(end, np.diff(np.r_[0, end])) - np.arange(D.shape[0])
        keep = from_end <= MAX_SAMPLES
        D, M = D[keep], M[keep]
        self._chunks, self._n = [(D, M)], int(D.shape[0])
        return D, M

    def finish_learning(self, budget: float | None = None) -> None:
        if budget is not None:
            self.budget = float(min(max(budget, 1e-9), 0.01))
        z = NormalDist().inv_cdf(1.0 - self.budget / 2)
        found = []
        D, S = self._compact()
        bounds = np.r_[0, np.flatnonzero(D[1:] != D[:-1]) + 1, D.shape[0]]
        for a0, a1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):  # per device
            if a1 <= a0:  # nothing learned
                continue
            d = int(D[a0])
            addrs = {c: a for a, c in self.columns[d].items()}
            found.extend(self._search(d, S[a0:a1], addrs, z))
        if found:
            self.dev = np.array([f[0] for f in found], np.int64)
            self.addr = np.array([f[1] for f in found], np.int64)
            self.sign = np.array([f[2] for f in found], np.float64)
            self.mean = np.array([f[3] for f in found])
            self.thr = np.array([f[4] for f in found])
            self.spread = np.array([f[5] for f in found])
            self.server = np.array([self.servers.get(f[0], 0) for f in found], np.int64)
        self.columns, self.servers, self._chunks, self._n = {}, {}, [], 0
        self._pair_key, self._pair_col = np.empty(0, np.int64), np.empty(0, np.int64)

    def _search(self, d: int, M: np.ndarray, addrs: dict, z: float) -> list:
        k = len(addrs)
        if k < 2 or M.shape[0] < self.min_samples:
            return []
        M = M[:, :k]
        with np.errstate(invalid="ignore", divide="ignore"):
            L = np.where(M > 0, np.log(M), np.nan)
        # measurements only: a term must change at least at every other consecutive sample
        analog, res = [], []
        for j in range(k):
            x = M[:, j][~np.isnan(L[:, j])]
            dx = np.abs(np.diff(x))
            analog.append(x.shape[0] >= self.min_samples and np.count_nonzero(dx) >= 0.5 * max(dx.shape[0], 1))
            # what rounding to the register's unit can do to log x (integers: half a unit; floats: nothing)
            res.append(0.5 / float(np.median(x)) if x.shape[0] and np.all(x == np.round(x)) else 0.0)
        cand = [j for j in range(k) if analog[j]]
        combos = [(t, (1.0,) + sg) for t in itertools.combinations(cand, 3)
                  for sg in itertools.product((1.0, -1.0), repeat=2)]
        if not combos:
            return []
        idx_all = np.array([c[0] for c in combos], np.int64)  # (combos, 3) columns
        sg_all = np.array([c[1] for c in combos])  # (combos, 3) signs
        out = []
        for c0 in range(0, len(combos), 64):  # 64 combinations at a time: a few MB whatever the device
            idx, sg = idx_all[c0:c0 + 64], sg_all[c0:c0 + 64]
            T = L[:, idx]  # (n, combos, 3)
            C = (T * sg).sum(axis=2)
            ok = ~np.isnan(C)
            n = ok.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # combinations with no complete sample
                spreads = np.nanstd(np.where(ok[:, :, None], T, np.nan), axis=0).min(axis=1)
                sd = np.nanstd(np.where(ok, C, np.nan), axis=0)
                keep = (n >= self.min_samples) & (spreads > 0) & (sd <= self.max_ratio * spreads)
            for ci in np.flatnonzero(keep).tolist():  # the relations found: one or two per device
                c = C[ok[:, ci], ci]
                mean = float(np.mean(c))
                bound = sum(res[j] for j in idx[ci].tolist())
                thr = max(z * float(sd[ci]), 2.0 * float(np.max(np.abs(c - mean))), 1.5 * bound)
                out.append((d, [addrs[j] for j in idx[ci].tolist()], sg[ci].tolist(), mean, thr,
                            float(sd[ci] / spreads[ci])))
        return out

    # -- monitoring ----------------------------------------------------------------------------
    def findings(self, ev: EventBatch) -> list:
        if len(self) == 0 or len(ev) == 0:
            return []
        # first the cheap filter (the relations' servers and addresses), then device keys for what is left
        cand = np.flatnonzero(np.isin(ev.address, self.addr[self.addr >= 0]) & np.isin(ev.src, self.server))
        if cand.shape[0] == 0:
            return []
        rows, dev, _ = _device_rows(ev, cand)
        order = np.argsort(self.dev, kind="stable")
        rdev = self.dev[order]
        has = np.isin(dev, rdev)
        if not has.any():
            return []
        rows, dev = rows[has], dev[has]
        pdu = ev.pdu_id[rows].astype(np.int64)
        # value of (device, pdu, address), the last row wins
        vkey = hash_columns(dev, pdu, ev.address[rows])
        vo = np.argsort(vkey, kind="stable")
        vk, vv = vkey[vo], ev.value[rows][vo]
        last = np.r_[vk[1:] != vk[:-1], True]
        vk, vv = vk[last], vv[last]
        # every (sample, relation of its device)
        skey = hash_columns(dev, pdu)
        _, first = np.unique(skey, return_index=True)
        s_dev, s_pdu, s_row = dev[first], pdu[first], rows[first]
        lo = np.searchsorted(rdev, s_dev, "left")
        hi = np.searchsorted(rdev, s_dev, "right")
        cnt = hi - lo
        sample = np.repeat(np.arange(s_dev.shape[0]), cnt)
        rel = order[np.repeat(lo, cnt) + (np.arange(sample.shape[0]) - np.repeat(np.cumsum(cnt) - cnt, cnt))]
        comb = np.zeros(sample.shape[0])
        complete = np.ones(sample.shape[0], bool)
        for t in range(3):
            a = self.addr[rel, t]
            used = a >= 0
            k = hash_columns(s_dev[sample], s_pdu[sample], a)
            i = np.minimum(np.searchsorted(vk, k), vk.shape[0] - 1)
            found = vk[i] == k
            v = np.where(found, vv[i], np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                lv = np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
            complete &= ~used | (found & ~np.isnan(lv))
            comb += np.where(used, self.sign[rel, t] * np.nan_to_num(lv), 0.0)
        sample, rel, comb = sample[complete], rel[complete], comb[complete]
        if sample.shape[0] == 0:
            return []
        resid = comb - self.mean[rel]
        bad = np.abs(resid) > self.thr[rel]
        out = []
        for r in np.unique(rel[bad]).tolist():  # one finding per relation (device) in the batch
            m = bad & (rel == r)
            worst = int(np.flatnonzero(m)[np.argmax(np.abs(resid[m]))])
            out.append(self._finding(ev, int(s_row[sample[worst]]), r, float(resid[worst]),
                                     int(np.count_nonzero(m)), ev.ts[s_row[sample[m]]]))
        ok = ~bad
        if ok.any() and self.follow > 0:  # accepted samples move the relation's mean slowly
            np.add.at(self.mean, rel[ok], self.follow * resid[ok])
        return out

    def _finding(self, ev, r: int, rel: int, resid: float, n: int, ts) -> Finding:
        srv, peer, proto = ip_text(ev.src[r]), ip_text(ev.dst[r]), int(ev.protocol[r])
        a = [int(x) for x in self.addr[rel] if x >= 0]
        s = self.sign[rel]
        law = " x ".join(f"point {x}" + ("" if si > 0 else "^-1") for x, si in zip(a, s)) + " = constant"
        space = int(point_space(ev.select(slice(r, r + 1)))[0])
        pct = 100.0 * (np.exp(abs(resid)) - 1.0)
        msg = (f"{protocol_text(proto)} points {', '.join(map(str, a))} (object {int(ev.object[r])}, unit "
               f"{int(ev.unit[r])}) reported by {srv} to {peer} no longer agree: during the baseline {law} held "
               f"to within {100.0 * (np.exp(float(self.thr[rel])) - 1.0):.3g} % (spread {self.spread[rel]:.2g} of "
               f"the points' own), now off by {pct:.3g} % in {n} report(s) (a frozen or spoofed measurement)")
        return Finding(
            rule="process.inconsistent", detector="process", severity="medium", first_ts=int(np.min(ts)),
            last_ts=int(np.max(ts)), src=int(ev.src[r]), dst=int(ev.dst[r]), protocol=proto,
            entity=f"{srv}/{proto}/u{int(ev.unit[r])}/s{space}/rel", message=msg, technique="T0856", count=n,
            score=abs(resid), threshold=float(self.thr[rel]),
            fields={"addresses": a, "object": int(ev.object[r]), "unit": int(ev.unit[r]),
                    "residual": round(resid, 6), "threshold": round(float(self.thr[rel]), 6),
                    "frame": int(ev.frame[r])},
            hold_s=120.0)

    # -- state ---------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict]:
        arrays = {"process.rel.dev": self.dev, "process.rel.addr": self.addr, "process.rel.sign": self.sign,
                  "process.rel.mean": self.mean, "process.rel.thr": self.thr, "process.rel.spread": self.spread,
                  "process.rel.server": self.server}
        # learning in progress: the samples collected so far, tagged with their device
        D, S = self._compact()
        arrays["process.rel.sample_dev"], arrays["process.rel.samples"] = D, S
        meta = {"max_ratio": self.max_ratio, "min_samples": self.min_samples, "follow": self.follow,
                "budget": self.budget, "servers": {str(d): a for d, a in self.servers.items()},
                "columns": {str(d): {str(a): c for a, c in cols.items()} for d, cols in self.columns.items()}}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict | None) -> "Relations":
        if not meta or "process.rel.dev" not in arrays:  # a state saved before relations existed
            return cls()
        r = cls(meta["max_ratio"], meta["min_samples"], meta["follow"], meta["budget"])
        r.dev = np.asarray(arrays["process.rel.dev"], np.int64)
        r.addr = np.asarray(arrays["process.rel.addr"], np.int64).reshape(-1, 3)
        r.sign = np.asarray(arrays["process.rel.sign"], np.float64).reshape(-1, 3)
        r.mean = np.asarray(arrays["process.rel.mean"], np.float64).copy()
        r.thr = np.asarray(arrays["process.rel.thr"], np.float64)
        r.spread = np.asarray(arrays["process.rel.spread"], np.float64)
        r.server = np.asarray(arrays["process.rel.server"], np.int64)
        r.servers = {int(d): int(a) for d, a in meta.get("servers", {}).items()}
        r.columns = {int(d): {int(a): int(c) for a, c in cols.items()} for d, cols in meta["columns"].items()}
        sd = np.asarray(arrays["process.rel.sample_dev"], np.int64)
        S = np.asarray(arrays["process.rel.samples"], np.float64).reshape(-1, MAX_COLUMNS)
        if sd.shape[0]:
            r._chunks, r._n = [(sd, S)], int(sd.shape[0])
        pairs = [(d, a, c) for d, cols in r.columns.items() for a, c in cols.items()]
        if pairs:
            keys = hash_columns(np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64))
            o = np.argsort(keys, kind="stable")
            r._pair_key, r._pair_col = keys[o], np.array([p[2] for p in pairs], np.int64)[o]
        return r
