"""Streaming features over event batches: keys, damped statistics, latency, per-channel windows.

Everything here is array work over a whole :class:`~parsers.events.EventBatch`: rows are grouped by
entity with ``np.unique``/``np.bincount``; the only Python loops run over the distinct seconds of a
batch or the few entities in it, never over events.

- :func:`hash_columns` turns key columns (host pair, function, unit, address...) into one int64 per
  row, so allow-lists and per-entity tables are ``np.isin``/``np.searchsorted`` lookups.
- :class:`KeyTable` maps int64 keys to slots of fixed-size arrays; it is capped and evicts the
  entries idle longest, so per-entity state never grows without bound.
- :class:`DecayedStats` keeps damped incremental statistics per entity at several decay rates, in
  the manner of Kitsune's AfterImage (Mirsky et al., NDSS 2018): weight ``w``, linear sum and
  squared sum, each decayed by ``2**(-lambda * dt)``.
- :func:`pair_latency` pairs each response with the request it answers (same flow, protocol rules
  below) and returns the response time.
- :class:`WindowFeatures` aggregates PDUs per channel (client, server, protocol) per second of
  capture time into the feature vectors the River and PyOD detectors see, one row per active
  channel-second.

>>> h = hash_columns(np.array([1, 1, 2]), np.array([5, 5, 5]))
>>> bool(h[0] == h[1]), bool(h[0] == h[2])
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parsers.events import (DIR_REQUEST, DIR_RESPONSE, KIND_PDU, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS,
                            REASON_BAD_CRC, REASON_GAP, REASON_SEQ_GAP, REASON_SEQ_REPEAT, STATUS_EXCEPTION,
                            STATUS_MALFORMED, STATUS_UNKNOWN, EventBatch)

NS = 1_000_000_000
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al., 2014) over a uint64 array; wraps modulo 2**64.

    Works in place on ``x`` (callers pass a temporary): ``x ^= x >> 30; x *= M1; x ^= x >> 27;
    x *= M2; x ^= x >> 31``."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def hash_columns(*cols) -> np.ndarray:
    """One int64 per row from any number of integer columns (or scalars broadcast to them).

    >>> int(hash_columns(np.array([7]))[0]) == int(hash_columns(7)[0])
    True
    """
    arrays = [np.atleast_1d(np.asarray(c)) for c in cols]
    n = max(a.shape[0] for a in arrays)
    h = np.full(n, 0x2545F4914F6CDD1D, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            v = a.astype(np.int64, copy=False).view(np.uint64)
            t = v + _GOLDEN  # a new array
            if t.shape[0] == n:
                t ^= h
            else:  # a scalar column
                t = h ^ t
            h = _mix64(t)
    return h.view(np.int64)


class KeyTable:
    """int64 key -> slot in fixed arrays, capped at ``capacity``; idle entries are evicted first.

    >>> t = KeyTable(capacity=2)
    >>> t.slots(np.array([10, 20]), now=1.0).tolist()
    [0, 1]
    >>> t.slots(np.array([30]), now=5.0).tolist()  # full: the entry idle longest (10) makes room
    [0]
    >>> t.lookup(np.array([10, 20, 30])).tolist()
    [-1, 1, 0]
    """

    def __init__(self, capacity: int = 65536):
        self.capacity = int(capacity)
        self.keys = np.empty(0, dtype=np.int64)  # sorted
        self.key_slot = np.empty(0, dtype=np.int64)  # slot of keys[i]
        self.slot_key = np.zeros(self.capacity, dtype=np.int64)
        self.last_seen = np.full(self.capacity, -np.inf)
        self.used = np.zeros(self.capacity, dtype=bool)
        self.evicted = 0
        self.on_evict = None  # callback(slots) so owners can reset their per-slot arrays

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 when absent (no state change)."""
        if self.keys.shape[0] == 0:
            return np.full(keys.shape[0], -1, dtype=np.int64)
        i = np.searchsorted(self.keys, keys)
        i = np.minimum(i, self.keys.shape[0] - 1)
        found = self.keys[i] == keys
        return np.where(found, self.key_slot[i], -1)

    def slots(self, keys: np.ndarray, now: float) -> np.ndarray:
        """Slot of each key, adding the missing ones (evicting idle entries when full)."""
        s = self.lookup(keys)
        missing = s < 0
        if missing.any():
            new = np.unique(keys[missing])
            free = np.flatnonzero(~self.used)
            if free.shape[0] < new.shape[0]:
                need = new.shape[0] - free.shape[0]
                victims = np.argsort(np.where(self.used, self.last_seen, np.inf), kind="stable")[:need]
                self._remove(victims)
                free = np.flatnonzero(~self.used)
            if free.shape[0] < new.shape[0]:  # more new keys in one call than capacity: keep the first
                new = new[: free.shape[0]]
            take = free[: new.shape[0]]
            self.used[take] = True
            self.slot_key[take] = new
            self.last_seen[take] = now
            keys_all = np.concatenate([self.keys, new])
            slots_all = np.concatenate([self.key_slot, take])
            order = np.argsort(keys_all, kind="stable")
            self.keys, self.key_slot = keys_all[order], slots_all[order]
            s = self.lookup(keys)
        ok = s >= 0
        self.last_seen[s[ok]] = now
        return s

    def _remove(self, slots: np.ndarray) -> None:
        if slots.shape[0] == 0:
            return
        if self.on_evict is not None:
            self.on_evict(slots)
        gone = self.slot_key[slots]
        keep = ~np.isin(self.keys, gone)
        self.keys, self.key_slot = self.keys[keep], self.key_slot[keep]
        self.used[slots] = False
        self.last_seen[slots] = -np.inf
        self.evicted += int(slots.shape[0])

    def evict_idle(self, now: float, idle_s: float) -> int:
        """Drop entries not seen for ``idle_s`` seconds; returns how many."""
        old = np.flatnonzero(self.used & (self.last_seen < now - idle_s))
        self._remove(old)
        return int(old.shape[0])


class DecayedStats:
    """Damped incremental statistics per entity at several decay rates (Kitsune's AfterImage).

    For an entity seen at times ``t_i`` with values ``x_i``, at time ``t`` and decay rate ``lam``:
    ``w = sum(2**(-lam*(t-t_i)))``, ``mean = sum(x_i*d_i)/w``, ``var = sum(x_i**2*d_i)/w - mean**2``.
    :meth:`update` adds a batch of rows at once: the stored sums are decayed to each entity's last
    time in the batch and the batch's rows are added with weights decayed to that same time
    (``np.bincount`` per entity, so exact and loop-free).

    >>> s = DecayedStats(lambdas=(1.0,), capacity=8)
    >>> s.update(np.array([5, 5]), np.array([0.0, 1.0]), np.array([2.0, 4.0]))
    >>> w, mean, std = s.get(np.array([5]), now=1.0)
    >>> round(float(w[0, 0]), 3), round(float(mean[0, 0]), 3)
    (1.5, 3.333)
    """

    def __init__(self, lambdas=(5.0, 3.0, 1.0, 0.1, 0.01), capacity: int = 65536):
        self.lambdas = np.asarray(lambdas, dtype=np.float64)
        self.table = KeyTable(capacity)
        L = self.lambdas.shape[0]
        self.w = np.zeros((capacity, L))
        self.ls = np.zeros((capacity, L))
        self.ss = np.zeros((capacity, L))
        self.t = np.zeros(capacity)
        self.table.on_evict = self._reset

    def _reset(self, slots):
        self.w[slots] = 0.0
        self.ls[slots] = 0.0
        self.ss[slots] = 0.0
        self.t[slots] = 0.0

    def update(self, keys: np.ndarray, t: np.ndarray, x: np.ndarray) -> None:
        if keys.shape[0] == 0:
            return
        uk, inv = np.unique(keys, return_inverse=True)
        t_end = np.full(uk.shape[0], -np.inf)
        np.maximum.at(t_end, inv, t)
        slots = self.table.slots(uk, float(t_end.max()))
        ok = slots >= 0
        lam = self.lambdas
        # decay what is stored to the entity's last time in this batch
        fresh = self.w[slots].sum(axis=1) == 0
        dt_store = np.where(fresh, 0.0, np.maximum(t_end - self.t[slots], 0.0))
        f = np.exp2(-np.outer(dt_store, lam))
        w, ls, ss = self.w[slots] * f, self.ls[slots] * f, self.ss[slots] * f
        d = np.exp2(-np.outer(t_end[inv] - t, lam))  # each row's weight at its entity's t_end
        n = uk.shape[0]
        for j in range(lam.shape[0]):
            dj = d[:, j]
            w[:, j] += np.bincount(inv, weights=dj, minlength=n)
            ls[:, j] += np.bincount(inv, weights=dj * x, minlength=n)
            ss[:, j] += np.bincount(inv, weights=dj * x * x, minlength=n)
        self.w[slots[ok]], self.ls[slots[ok]], self.ss[slots[ok]] = w[ok], ls[ok], ss[ok]
        self.t[slots[ok]] = t_end[ok]

    def update_windows(self, win_key: np.ndarray, win_end: np.ndarray, inv: np.ndarray, t: np.ndarray,
                       x: np.ndarray, valid: np.ndarray | None = None):
        """Fold rows in window by window and return ``(w, mean, std)`` at the end of every window.

        Row ``i`` belongs to window ``inv[i]``; window ``j`` belongs to entity ``win_key[j]`` and ends
        at ``win_end[j]`` (its last row's time); an entity's windows are later than its stored state.
        The same numbers as :meth:`update` then :meth:`get` once per window in time order, but the
        rows are summed per window in one pass (``np.bincount``) and only the short recurrence
        ``W_k = W_{k-1} * 2**(-lam * (end_k - end_{k-1})) + S_k`` runs per window rank.
        """
        nw = win_key.shape[0]
        L = self.lambdas.shape[0]
        out = (np.zeros((nw, L)), np.zeros((nw, L)), np.zeros((nw, L)))
        if nw == 0:
            return out
        lam = self.lambdas
        d = np.exp2(-np.outer(win_end[inv] - t, lam))  # each row's weight at its window's end
        if valid is not None:
            d = d * valid[:, None]
            x = np.where(valid, x, 0.0)
        S = [np.stack([np.bincount(inv, weights=d[:, j] * p, minlength=nw) for j in range(L)], axis=1)
             for p in (1.0, x, x * x)]
        uk, e_inv = np.unique(win_key, return_inverse=True)
        slots = self.table.slots(uk, float(win_end.max()))
        ok = slots >= 0
        sl = np.maximum(slots, 0)
        W, LS, SS = self.w[sl] * ok[:, None], self.ls[sl] * ok[:, None], self.ss[sl] * ok[:, None]
        T = np.where(ok, self.t[sl], 0.0)
        order = np.lexsort((win_end, e_inv))
        e_sorted = e_inv[order]
        start = np.r_[0, np.flatnonzero(e_sorted[1:] != e_sorted[:-1]) + 1]
        rank = np.arange(nw) - np.repeat(start, np.diff(np.r_[start, nw]))
        for k in range(int(rank.max()) + 1):  # windows per entity in the batch: a few seconds' worth
            idx = order[rank == k]
            e = e_inv[idx]
            f = np.exp2(-np.outer(np.maximum(win_end[idx] - T[e], 0.0), lam))
            W[e] = W[e] * f + S[0][idx]
            LS[e] = LS[e] * f + S[1][idx]
            SS[e] = SS[e] * f + S[2][idx]
            T[e] = win_end[idx]
            ww = W[e]
            with np.errstate(invalid="ignore", divide="ignore"):
                m = np.where(ww > 0, LS[e] / ww, 0.0)
                v = np.where(ww > 0, SS[e] / ww - m * m, 0.0)
            out[0][idx], out[1][idx], out[2][idx] = ww, m, np.sqrt(np.maximum(v, 0.0))
        self.w[slots[ok]], self.ls[slots[ok]], self.ss[slots[ok]] = W[ok], LS[ok], SS[ok]
        self.t[slots[ok]] = T[ok]
        return out

    def get(self, keys: np.ndarray, now: float | np.ndarray):
        """(weight, mean, std) of each key at time ``now``, arrays of shape (len(keys), len(lambdas))."""
        slots = self.table.lookup(keys)
        L = self.lambdas.shape[0]
        w = np.zeros((keys.shape[0], L))
        mean = np.zeros_like(w)
        std = np.zeros_like(w)
        ok = slots >= 0
        if ok.any():
            s = slots[ok]
            now_ok = np.broadcast_to(np.asarray(now, dtype=np.float64), keys.shape)[ok]
            f = np.exp2(-np.outer(np.maximum(now_ok - self.t[s], 0.0), self.lambdas))
            ww = self.w[s] * f
            with np.errstate(invalid="ignore", divide="ignore"):
                m = np.where(ww > 0, self.ls[s] * f / ww, 0.0)
                v = np.where(ww > 0, self.ss[s] * f / ww - m * m, 0.0)
            w[ok], mean[ok], std[ok] = ww, m, np.sqrt(np.maximum(v, 0.0))
        return w, mean, std


# --- request/response pairing ------------------------------------------------------------------

def pair_latency(ev: EventBatch, last_request: dict | None = None) -> np.ndarray:
    """Seconds from the request a response answers to the response; NaN where none is paired.

    A response is paired with the row just before it in the same flow when that row is a request
    and they match: Modbus same transaction id and function (MB-AP §4.1); DNP3 same application
    SEQ for a response (IEEE 1815-2012 §4.2.2.5) or LINK_STATUS after REQUEST_LINK_STATUS; IEC-104
    U-format confirmations (STARTDT/STOPDT/TESTFR con after act, IEC 60870-5-104 §5.3) or the
    activation confirmation of the same type id.  ``last_request`` (flow -> (ts, function, seq))
    carries the last request of each flow across batches.
    """
    n = len(ev)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    order = np.lexsort((ev.ts, ev.flow))
    flow = ev.flow[order]
    prev_same = np.zeros(n, dtype=bool)
    prev_same[1:] = flow[1:] == flow[:-1]
    idx_prev = np.arange(n) - 1
    ts, fn, seq, d, pr = (ev.ts[order], ev.function[order], ev.seq[order], ev.direction[order],
                          ev.protocol[order])
    p_ts = np.where(prev_same, ts[idx_prev], 0)
    p_fn = np.where(prev_same, fn[idx_prev], -1)
    p_seq = np.where(prev_same, seq[idx_prev], -2)
    p_dir = np.where(prev_same, d[idx_prev], DIR_RESPONSE)
    if last_request is not None:
        first = np.flatnonzero(~prev_same)
        for i in first.tolist():  # one per flow in the batch
            got = last_request.get(int(flow[i]))
            if got is not None:
                p_ts[i], p_fn[i], p_seq[i], p_dir[i] = got[0], got[1], got[2], DIR_REQUEST
        # remember each flow's last row if it is a request
        last = np.flatnonzero(np.r_[flow[1:] != flow[:-1], True])
        for i in last.tolist():
            if d[i] == DIR_REQUEST:
                last_request[int(flow[i])] = (int(ts[i]), int(fn[i]), int(seq[i]))
            else:
                last_request.pop(int(flow[i]), None)
        if len(last_request) > 32768:  # bounded (more than the flows tracked): forget the oldest half
            for k in list(last_request)[: len(last_request) // 2]:
                del last_request[k]
    resp = (d == DIR_RESPONSE) & (p_dir == DIR_REQUEST)
    mb = (pr == PROTO_MODBUS) & (seq == p_seq) & (fn == p_fn)
    dn = (pr == PROTO_DNP3) & (((fn == 129) & (seq == p_seq) & (p_fn != 0)) | ((fn == 1111) & (p_fn == 1009)))
    ie = (pr == PROTO_IEC104) & (((p_fn >= 513) & (p_fn <= 517) & (fn == p_fn + 1)) | ((fn == p_fn) & (fn < 512)))
    ok = resp & (mb | dn | ie)
    lat = np.where(ok, (ts - p_ts) / NS, np.nan)
    out[order] = lat
    return out


# --- per-channel windows -----------------------------------------------------------------------

FEATURE_NAMES = (
    "requests", "responses", "bytes", "writes", "controls", "exceptions", "bad_pdus", "sequence_errors",
    "functions", "points", "latency_ms_mean", "latency_ms_max", "client_peers",
    "rate_5", "rate_1", "rate_0.1", "rate_0.01", "size_mean_0.1", "size_std_0.1", "iat_mean_0.1", "iat_std_0.1",
)
# What each feature means, for alert explanations.
FEATURE_WORDS = {
    "requests": "requests in the second", "responses": "responses in the second",
    "bytes": "bytes in the second", "writes": "write requests in the second",
    "controls": "control commands in the second", "exceptions": "exception responses in the second",
    "bad_pdus": "malformed or unknown PDUs in the second", "sequence_errors": "sequence or CRC errors in the second",
    "functions": "distinct function codes in the second", "points": "point values in the second",
    "latency_ms_mean": "mean response time (ms)", "latency_ms_max": "longest response time (ms)",
    "client_peers": "servers the client talked to in the second",
    "rate_5": "PDUs/s over the last ~0.2 s", "rate_1": "PDUs/s over the last ~1 s",
    "rate_0.1": "PDUs/s over the last ~10 s", "rate_0.01": "PDUs/s over the last ~100 s",
    "size_mean_0.1": "mean PDU size (bytes, ~10 s)", "size_std_0.1": "PDU size spread (bytes, ~10 s)",
    "iat_mean_0.1": "mean gap between PDUs (s, ~10 s)", "iat_std_0.1": "spread of gaps between PDUs (s, ~10 s)",
}
F = {name: i for i, name in enumerate(FEATURE_NAMES)}
RATE_LAMBDAS = (5.0, 1.0, 0.1, 0.01)
SESSION_GAP_S = 100.0  # 10 half-lives of the slowest iat statistic (lambda 0.1)
_SEQ_REASONS = (REASON_SEQ_GAP, REASON_SEQ_REPEAT, REASON_BAD_CRC, REASON_GAP)


@dataclass
class FeatureBatch:
    """One row per (channel, second): ``X[i]`` are the features of channel ``key[i]`` in second ``sec[i]``."""

    key: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # channel hash
    sec: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # capture second
    client: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))
    server: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))
    protocol: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    first_ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    last_ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    X: np.ndarray = field(default_factory=lambda: np.empty((0, len(FEATURE_NAMES))))

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def select(self, m) -> "FeatureBatch":
        return FeatureBatch(self.key[m], self.sec[m], self.client[m], self.server[m], self.protocol[m],
                            self.first_ts[m], self.last_ts[m], self.X[m])


def channel_of(ev: EventBatch):
    """(client, server) per row: the requester and the device it talks to, whatever the direction."""
    req = ev.direction == DIR_REQUEST
    client = np.where(req, ev.src, ev.dst)
    server = np.where(req, ev.dst, ev.src)
    return client, server


class WindowFeatures:
    """Per channel (client, server, protocol) per second of capture time, the :data:`FEATURE_NAMES`.

    A second is complete when a later second has been seen; rows of the newest second wait in
    ``pending`` for the next batch (:meth:`flush` emits them at the end of input).
    """

    def __init__(self, capacity: int = 16384):
        self.pending: EventBatch | None = None
        self.pending_latency = np.empty(0)
        self.last_request: dict = {}
        self.rates = DecayedStats(RATE_LAMBDAS, capacity)  # per channel: PDU weight at each time scale
        self.sizes = DecayedStats((0.1,), capacity)  # per channel: PDU size
        self.iats = DecayedStats((0.1,), capacity)  # per channel: gap between PDUs
        self.last_ts = KeyTable(capacity)
        self.last_ts_value = np.zeros(capacity, dtype=np.int64)
        self.windows = 0
        self._points_pending: list = []

    def push(self, events: EventBatch) -> FeatureBatch:
        is_pdu = events.kind == KIND_PDU
        pdus = events.select(is_pdu) if len(events) else events
        if len(events) and not is_pdu.all():
            # point rows only count per window: keep their channel and time, not the rows
            pr = np.flatnonzero(~is_pdu)
            req = events.direction[pr] == DIR_REQUEST
            pc = np.where(req, events.src[pr], events.dst[pr])
            ps = np.where(req, events.dst[pr], events.src[pr])
            self._points_pending.append((hash_columns(pc, ps, events.protocol[pr]), events.ts[pr]))
        lat = pair_latency(pdus, self.last_request) if len(pdus) else np.empty(0)
        if self.pending is not None and len(self.pending):
            pdus = EventBatch.concat([self.pending, pdus])
            lat = np.concatenate([self.pending_latency, lat])
            self.pending = None
        if len(pdus) == 0:
            return FeatureBatch()
        sec = pdus.ts // NS
        newest = int(sec.max())
        done = sec < newest
        self.pending = pdus.select(~done)
        self.pending_latency = lat[~done]
        return self._windows(pdus.select(done), lat[done], newest)

    def flush(self) -> FeatureBatch:
        if self.pending is None or len(self.pending) == 0:
            return FeatureBatch()
        p, lat = self.pending, self.pending_latency
        self.pending = None
        return self._windows(p, lat, None)

    def _windows(self, ev: EventBatch, lat: np.ndarray, newest_sec) -> FeatureBatch:
        parts = [p for p in self._points_pending if p[0].shape[0]]
        p_chan = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        p_ts = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        if newest_sec is not None and p_chan.shape[0]:
            keep = p_ts // NS >= newest_sec
            self._points_pending = [(p_chan[keep], p_ts[keep])]
            p_chan, p_ts = p_chan[~keep], p_ts[~keep]
        else:
            self._points_pending = []
        if len(ev) == 0:
            return FeatureBatch()
        client, server = channel_of(ev)
        chan = hash_columns(client, server, ev.protocol)
        sec = ev.ts // NS
        wkey = hash_columns(chan, sec)
        uw, first_idx, inv = np.unique(wkey, return_index=True, return_inverse=True)
        nw = uw.shape[0]
        X = np.zeros((nw, len(FEATURE_NAMES)))
        cnt = lambda m: np.bincount(inv, weights=m.astype(np.float64), minlength=nw)  # noqa: E731
        req = ev.direction == DIR_REQUEST
        X[:, F["requests"]] = cnt(req)
        X[:, F["responses"]] = cnt(~req)
        X[:, F["bytes"]] = np.bincount(inv, weights=ev.length.astype(np.float64), minlength=nw)
        X[:, F["writes"]] = cnt(ev.is_write & req)
        X[:, F["controls"]] = cnt(ev.is_control & req)
        X[:, F["exceptions"]] = cnt(ev.status == STATUS_EXCEPTION)
        X[:, F["bad_pdus"]] = cnt((ev.status == STATUS_MALFORMED) | (ev.status == STATUS_UNKNOWN))
        X[:, F["sequence_errors"]] = cnt(np.isin(ev.reason, _SEQ_REASONS))
        fk_first = np.unique(hash_columns(wkey, ev.function), return_index=True)[1]
        X[:, F["functions"]] = np.bincount(inv[fk_first], minlength=nw)
        has = ~np.isnan(lat)
        nl = np.bincount(inv[has], minlength=nw)
        sl = np.bincount(inv[has], weights=lat[has] * 1e3, minlength=nw)
        X[:, F["latency_ms_mean"]] = np.where(nl > 0, sl / np.maximum(nl, 1), 0.0)
        mx = np.zeros(nw)
        np.maximum.at(mx, inv[has], lat[has] * 1e3)
        X[:, F["latency_ms_max"]] = mx
        # distinct servers per client in the second (scans)
        csec = hash_columns(client, sec)
        pair_first = np.unique(hash_columns(csec, server), return_index=True)[1]
        uc, cinv = np.unique(csec, return_inverse=True)
        peers = np.bincount(cinv[pair_first], minlength=uc.shape[0])
        X[:, F["client_peers"]] = peers[cinv[first_idx]]
        if p_chan.shape[0]:
            pkey = hash_columns(p_chan, p_ts // NS)
            pos = np.searchsorted(uw, pkey)
            pos = np.minimum(pos, nw - 1)
            hit = uw[pos] == pkey
            X[:, F["points"]] = np.bincount(pos[hit], minlength=nw)
        # damped statistics at the end of every window (summed per window, then a short recurrence)
        t = ev.ts / NS
        w_first = np.full(nw, np.iinfo(np.int64).max)
        w_last = np.zeros(nw, dtype=np.int64)
        np.minimum.at(w_first, inv, ev.ts)
        np.maximum.at(w_last, inv, ev.ts)
        wsec = sec[first_idx]
        wchan = chan[first_idx]
        iat = self._iat(chan, ev.ts)
        now = w_last / NS
        w, _, _ = self.rates.update_windows(wchan, now, inv, t, np.ones(t.shape[0]))
        X[:, [F["rate_5"], F["rate_1"], F["rate_0.1"], F["rate_0.01"]]] = w * self.rates.lambdas / np.log(2)
        _, m, sd = self.sizes.update_windows(wchan, now, inv, t, ev.length.astype(np.float64))
        X[:, F["size_mean_0.1"]], X[:, F["size_std_0.1"]] = m[:, 0], sd[:, 0]
        has_iat = ~np.isnan(iat)
        _, m, sd = self.iats.update_windows(wchan, now, inv, t, np.where(has_iat, iat, 0.0), has_iat)
        X[:, F["iat_mean_0.1"]], X[:, F["iat_std_0.1"]] = m[:, 0], sd[:, 0]
        self.windows += nw
        order = np.lexsort((wchan, wsec))
        fb = FeatureBatch(wchan, wsec, client[first_idx], server[first_idx], ev.protocol[first_idx],
                          w_first, w_last, X)
        return fb.select(order)

    def _iat(self, chan: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Seconds since the previous PDU of the same channel (across batches); NaN for a channel's first
        and after an idle gap over ``SESSION_GAP_S`` (a new session: how long a client stayed away is
        its visiting schedule, not the timing of its conversation, and would swamp the ~10 s stats)."""
        order = np.lexsort((ts, chan))
        c, t = chan[order], ts[order]
        same = np.r_[False, c[1:] == c[:-1]]
        iat = np.full(c.shape[0], np.nan)
        iat[1:] = np.where(same[1:], (t[1:] - t[:-1]) / NS, np.nan)
        first = np.flatnonzero(~same)
        slots = self.last_ts.lookup(c[first])
        known = slots >= 0
        iat[first[known]] = (t[first[known]] - self.last_ts_value[slots[known]]) / NS
        last = np.flatnonzero(np.r_[c[1:] != c[:-1], True])
        s = self.last_ts.slots(c[last], float(t[last].max()) / NS)
        ok = s >= 0
        self.last_ts_value[s[ok]] = t[last][ok]
        iat[iat > SESSION_GAP_S] = np.nan
        out = np.empty_like(iat)
        out[order] = iat
        return out
