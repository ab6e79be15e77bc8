"""The polling-cycle model: ICS masters poll on timers, so every channel has a period and a jitter.

A channel is (client, server, protocol, direction, function): "master 10.20.0.10 reads function 4
from PLC 10.20.0.21".  From the learning window the model keeps, per channel, the inter-arrival
times (median = period, MAD = jitter, max), the largest number of PDUs in one second, and per
(client, server, protocol) the response times of the seconds it saw.  In monitoring it reports:

- ``cycle.inactive``: a regular channel silent for longer than ``max(3 * period, 1.5 * longest
  learned gap)`` (missed polls, a device that stopped answering);
- ``cycle.burst``: more PDUs in one second than ``max(2 * learned max, learned max + 3)`` (write
  bursts, floods on a known channel); a channel of reports that is not periodic (sent on change)
  follows the process, and gets ``max(4 * learned max, learned max + 10)``;
- ``cycle.latency``: two seconds in a row (or one over three times the threshold) whose mean response
  time exceeds a threshold calibrated on the learning seconds (:func:`models.thresholds.calibrate`) —
  relays in the middle add latency to every answer, a delayed ACK to one;
- ``cycle.period``: a regular channel whose recent mean gap moved away from its period by more than
  ``max(0.5 * period, 6 * jitter)``.

Rows are grouped with ``np.unique``; the loops run over channels, not events.
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, KIND_PDU, EventBatch

from .features import F, NS, FeatureBatch, channel_of, hash_columns
from .findings import Finding, function_text, ip_text, protocol_text
from .thresholds import calibrate

MAX_GAPS = 512  # inter-arrival times kept per channel while learning


class CycleModel:
    name = "cycle"

    def __init__(self, min_count: int = 8, max_channels: int = 20000):
        self.min_count = min_count
        self.max_channels = max_channels
        self.gaps: dict[int, list] = {}  # learning: channel -> inter-arrival times (s)
        self.info: dict[int, dict] = {}  # channel -> client, server, protocol, direction, function
        self.last_ts: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.max_per_sec: dict[int, int] = {}
        self.latency_learn: list = []
        self.latency_threshold = np.inf
        self.period: dict[int, tuple] = {}  # channel -> (period, jitter, max gap) for regular channels
        self.recent_gap: dict[int, float] = {}  # monitoring: EWMA of gaps
        self.slow_windows: dict[tuple, int] = {}  # monitoring: slow windows in a row per pair
        self.learned_until = 0

    @staticmethod
    def channel_keys(ev: EventBatch) -> np.ndarray:
        client, server = channel_of(ev)
        return hash_columns(11, client, server, ev.protocol, ev.direction, ev.function)

    def _group(self, ev: EventBatch):
        keys = self.channel_keys(ev)
        order = np.lexsort((ev.ts, keys))
        k, t = keys[order], ev.ts[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], k.shape[0]]
        return keys, order, k, t, starts, ends

    def _per_second_max(self, keys, ts):
        """(channel, PDUs) for every channel-second of the batch."""
        _, first, c = np.unique(hash_columns(keys, ts // NS), return_index=True, return_counts=True)
        return keys[first], c

    # -- learning ------------------------------------------------------------------------------
    def learn(self, ev: EventBatch, fb: FeatureBatch | None = None) -> None:
        ev = ev.select(ev.kind == KIND_PDU)
        if len(ev):
            keys, order, k, t, starts, ends = self._group(ev)
            for s, e in zip(starts.tolist(), ends.tolist()):  # one per channel in the batch
                key = int(k[s])
                if key not in self.info:
                    if len(self.info) >= self.max_channels:
                        continue
                    r = int(order[s])
                    client, server = channel_of(ev.select(slice(r, r + 1)))
                    self.info[key] = {"client": int(client[0]), "server": int(server[0]),
                                      "protocol": int(ev.protocol[r]), "direction": int(ev.direction[r]),
                                      "function": int(ev.function[r])}
                tt = t[s:e]
                prev = self.last_ts.get(key)
                g = np.diff(tt if prev is None else np.r_[prev, tt]) / NS
                lst = self.gaps.setdefault(key, [])
                lst.extend(g.tolist())
                if len(lst) > MAX_GAPS:
                    del lst[: len(lst) - MAX_GAPS]
                self.last_ts[key] = int(tt[-1])
                self.count[key] = self.count.get(key, 0) + (e - s)
            wk, c = self._per_second_max(keys, ev.ts)
            for key, n in zip(wk.tolist(), c.tolist()):
                if key in self.info:  # channels past max_channels are not learned (a flood while learning)
                    self.max_per_sec[key] = max(self.max_per_sec.get(key, 0), n)
            self.learned_until = max(self.learned_until, int(ev.ts.max()))
        if fb is not None and len(fb):
            lat = fb.X[:, F["latency_ms_mean"]]
            self.latency_learn.extend(lat[lat > 0].tolist())

    def finish_learning(self, budget: float = 1e-4) -> None:
        self.period = {}
        for key, g in self.gaps.items():
            g = np.asarray(g)
            if g.shape[0] + 1 < self.min_count:
                continue
            med = float(np.median(g))
            jit = float(1.4826 * np.median(np.abs(g - med)))
            # regular: most gaps within a quarter period of the period (pipelined requests give a few
            # short gaps); the jitter does not widen this, or any spread of gaps would look regular
            # (a DNP3 CONFIRM follows event responses, not a timer)
            if med > 0 and np.mean(np.abs(g - med) <= 0.25 * med) >= 0.8:
                self.period[key] = (med, jit, float(g.max()))
        self.gaps = {}
        lat = np.asarray(self.latency_learn)
        self.latency_threshold = calibrate(lat, budget) if lat.shape[0] >= 20 else np.inf

    # -- monitoring ----------------------------------------------------------------------------
    def _monitor_tables(self):
        """Regular channels and per-second maxima as sorted arrays (built once after learning)."""
        built = getattr(self, "_tables_for", None)
        if built is None or built[0] is not self.period or built[1] is not self.max_per_sec:
            keys = np.array(sorted(self.period), dtype=np.int64)
            per = np.array([self.period[k] for k in keys.tolist()], dtype=np.float64).reshape(-1, 3)
            last = np.array([self.last_ts.get(k, -1) for k in keys.tolist()], dtype=np.int64)
            recent = np.array([self.recent_gap.get(k, self.period[k][0]) for k in keys.tolist()])
            mkeys = np.array(sorted(self.max_per_sec), dtype=np.int64)
            mvals = np.array([self.max_per_sec[k] for k in mkeys.tolist()], dtype=np.int64)
            self._reg = {"keys": keys, "period": per[:, 0], "jitter": per[:, 1], "gmax": per[:, 2], "last": last,
                         "recent": recent}
            self._mps = (mkeys, mvals)
            self._tables_for = (self.period, self.max_per_sec)
        return self._reg, self._mps

    @staticmethod
    def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
        if sorted_keys.shape[0] == 0:
            return np.full(keys.shape[0], -1)
        i = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.shape[0] - 1)
        return np.where(sorted_keys[i] == keys, i, -1)

    def findings(self, ev: EventBatch, fb: FeatureBatch | None, now_ns: int) -> list:
        out = []
        reg, (mkeys, mvals) = self._monitor_tables()
        ev = ev.select(ev.kind == KIND_PDU)
        if len(ev):
            keys, order, k, t, starts, ends = self._group(ev)
            # period drift: an EWMA (weight 0.2) of each regular channel's gaps, all channels at once:
            # after n gaps x_1..x_n, m_n = 0.8**n m_0 + sum(0.2 * 0.8**(n - j) x_j)
            ri = self._find(reg["keys"], k[starts])
            on = ri >= 0
            if on.any():
                gi, r = np.flatnonzero(on), ri[on]
                prev = reg["last"][r]
                known = prev >= 0
                gi, r, prev = gi[known], r[known], prev[known]
                if gi.shape[0]:
                    n = ends[gi] - starts[gi]
                    pos = np.full(starts.shape[0], -1)
                    pos[gi] = np.arange(gi.shape[0])
                    grp_of_row = pos[np.repeat(np.arange(starts.shape[0]), ends - starts)]
                    rows = np.flatnonzero(grp_of_row >= 0)
                    grp = grp_of_row[rows]
                    first = rows == starts[gi][grp]
                    prev_t = np.where(first, prev[grp], t[np.maximum(rows - 1, 0)])
                    gap = (t[rows] - prev_t) / NS
                    j = rows - starts[gi][grp] + 1
                    w = 0.2 * 0.8 ** (n[grp] - j)
                    m = reg["recent"][r] * 0.8 ** n + np.bincount(grp, weights=w * gap, minlength=gi.shape[0])
                    reg["recent"][r] = m
                    p, jit = reg["period"][r], reg["jitter"][r]
                    for q in np.flatnonzero(np.abs(m - p) > np.maximum(0.5 * p, 6 * jit)).tolist():
                        a, b = int(starts[gi[q]]), int(ends[gi[q]])
                        out.append(self._finding("period", int(k[a]), int(t[a]), int(t[b - 1]), b - a,
                                                 f"polls every {m[q]:.2f} s on average instead of every {p[q]:.2f} s",
                                                 "T0831" if m[q] > p[q] else "T0814", "medium", score=float(m[q]),
                                                 threshold=float(p[q])))
                reg["last"][ri[on]] = t[ends[on] - 1]
            # bursts: PDUs per channel-second against the learned maximum
            wk, c = self._per_second_max(keys, ev.ts)
            mi = self._find(mkeys, wk)
            mx = np.where(mi >= 0, mvals[np.maximum(mi, 0)], 0) if mvals.shape[0] else np.zeros(mi.shape[0], np.int64)
            limit = np.maximum(2 * mx, mx + 3)
            # a channel of reports sent on change (IEC-104 spontaneous, DNP3 events/unsolicited) carries
            # as much as the process does: an upset the baseline never saw may quadruple it
            on_change = np.zeros(wk.shape[0], bool)
            if wk.shape[0]:
                ri = self._find(reg["keys"], wk)
                resp = np.array([self.info.get(int(x), {}).get("direction", DIR_REQUEST) != DIR_REQUEST
                                 for x in wk.tolist()], bool)
                on_change = resp & (ri < 0)
            limit = np.where(on_change, np.maximum(4 * mx, mx + 10), limit)
            for q in np.flatnonzero((mi >= 0) & (c > limit)).tolist():  # a channel never learned: allow-list
                key, cnt, mxq = int(wk[q]), int(c[q]), int(mx[q])
                rows = keys == key
                ts = ev.ts[rows]
                write = bool(ev.is_write[rows].any())
                out.append(self._finding("burst", key, int(ts.min()), int(ts.max()), cnt,
                                         f"sent {cnt} PDUs in one second (at most {mxq} during the baseline)",
                                         "T0836" if write else "T0814", "high" if write else "medium",
                                         score=float(cnt), threshold=float(limit[q])))
        # silent channels
        lim = np.maximum(3 * reg["period"], 1.5 * reg["gmax"])
        silent = (now_ns - reg["last"]) / NS
        for q in np.flatnonzero((reg["last"] >= 0) & (silent > lim)).tolist():
            key, last, limit = int(reg["keys"][q]), int(reg["last"][q]), float(lim[q])
            out.append(self._finding("inactive", key, last + int(limit * NS), now_ns, 1,
                                     f"has been silent for {silent[q]:.0f} s (usually every {reg['period'][q]:.2f} s)",
                                     "T0814", "medium", score=float(silent[q]), threshold=limit))
        if fb is not None and len(fb):
            lat = fb.X[:, F["latency_ms_mean"]]
            # a relay in the path slows every answer; one slow second is a stack's delayed ACK or a busy
            # device: report when two windows of a pair in a row are slow, or one is over 3x the threshold
            measured = np.flatnonzero(lat > 0)
            over = lat > self.latency_threshold
            hit = []
            for i in measured[np.argsort(fb.first_ts[measured], kind="stable")].tolist():
                pair = (int(fb.client[i]), int(fb.server[i]), int(fb.protocol[i]))
                n = self.slow_windows.get(pair, 0) + 1 if over[i] else 0
                if n:
                    self.slow_windows[pair] = n
                else:
                    self.slow_windows.pop(pair, None)
                if n >= 2 or lat[i] > 3 * self.latency_threshold:
                    hit.append(i)
            if len(self.slow_windows) > self.max_channels:  # bounded
                self.slow_windows.clear()
            for i in hit:
                c, s = ip_text(fb.client[i]), ip_text(fb.server[i])
                out.append(Finding(
                    rule="cycle.latency", detector=self.name, severity="medium",
                    first_ts=int(fb.first_ts[i]), last_ts=int(fb.last_ts[i]), src=int(fb.client[i]),
                    dst=int(fb.server[i]), protocol=int(fb.protocol[i]), entity=f"{c}>{s}/{int(fb.protocol[i])}",
                    message=(f"{s} answered {c} in {lat[i]:.1f} ms on average (baseline threshold "
                             f"{self.latency_threshold:.1f} ms): a relay in the path (adversary-in-the-middle) "
                             "or an overloaded device"),
                    technique="T0830", score=float(lat[i]), threshold=float(self.latency_threshold),
                    fields={"latency_ms": round(float(lat[i]), 3)}))
        return out

    def _finding(self, kind, key, t0, t1, n, what, technique, severity, score=None, threshold=None) -> Finding:
        info = self.info[key]
        c, s = ip_text(info["client"]), ip_text(info["server"])
        fn = function_text(info["protocol"], info["function"])
        who = f"{c} -> {s}" if info["direction"] == DIR_REQUEST else f"{s} -> {c}"
        return Finding(
            rule=f"cycle.{kind}", detector=self.name, severity=severity, first_ts=t0, last_ts=t1,
            src=info["client"], dst=info["server"], protocol=info["protocol"],
            entity=f"{c}>{s}/{info['protocol']}/d{info['direction']}/f{info['function']}",
            message=f"{protocol_text(info['protocol'])} channel {who} {fn} {what}", technique=technique,
            count=int(n), score=score, threshold=threshold, fields=dict(info) | {"client": c, "server": s})

    def score(self, fb: FeatureBatch) -> np.ndarray:
        """Per window: response time over the calibrated threshold (ratio; >1 alerts)."""
        if not np.isfinite(self.latency_threshold):
            return np.zeros(len(fb))
        return fb.X[:, F["latency_ms_mean"]] / self.latency_threshold

    def regular_channels(self) -> int:
        return len(self.period)

    def to_state(self) -> tuple[dict, dict]:
        meta = {"period": {str(k): list(v) for k, v in self.period.items()},
                "info": {str(k): v for k, v in self.info.items()},
                "max_per_sec": {str(k): v for k, v in self.max_per_sec.items()},
                "latency_threshold": self.latency_threshold if np.isfinite(self.latency_threshold) else None,
                "min_count": self.min_count}
        return {"cycle.latency_learn": np.asarray(self.latency_learn)}, meta

    def learning_state(self) -> tuple[dict, dict]:
        """What learning has gathered so far (gaps, counts, bursts, latencies), for a checkpoint
        taken before learning ends."""
        arrays = {"cycle.latency_learn": np.asarray(self.latency_learn, dtype=np.float64)}
        meta = {"learning": True, "min_count": self.min_count, "learned_until": self.learned_until,
                "info": {str(k): v for k, v in self.info.items()},
                "gaps": {str(k): v for k, v in self.gaps.items()},
                "last_ts": {str(k): v for k, v in self.last_ts.items()},
                "count": {str(k): v for k, v in self.count.items()},
                "max_per_sec": {str(k): v for k, v in self.max_per_sec.items()}}
        return arrays, meta

    @classmethod
    def from_learning_state(cls, arrays, meta) -> "CycleModel":
        m = cls(min_count=meta["min_count"])
        m.learned_until = int(meta["learned_until"])
        m.info = {int(k): v for k, v in meta["info"].items()}
        m.gaps = {int(k): list(v) for k, v in meta["gaps"].items()}
        m.last_ts = {int(k): int(v) for k, v in meta["last_ts"].items()}
        m.count = {int(k): int(v) for k, v in meta["count"].items()}
        m.max_per_sec = {int(k): int(v) for k, v in meta["max_per_sec"].items()}
        m.latency_learn = np.asarray(arrays["cycle.latency_learn"]).tolist()
        return m

    @classmethod
    def from_state(cls, arrays, meta) -> "CycleModel":
        m = cls(min_count=meta["min_count"])
        m.period = {int(k): tuple(v) for k, v in meta["period"].items()}
        m.info = {int(k): v for k, v in meta["info"].items()}
        m.max_per_sec = {int(k): v for k, v in meta["max_per_sec"].items()}
        lt = meta["latency_threshold"]
        m.latency_threshold = np.inf if lt is None else float(lt)
        m.latency_learn = np.asarray(arrays["cycle.latency_learn"]).tolist()
        return m
