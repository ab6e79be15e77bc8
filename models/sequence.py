"""Command sequences: per channel, which request follows which, and how surprising a transition is.

A rule cannot be written in advance for the *order* of allowed requests: a DNP3 master that always
SELECTs before it OPERATEs, an IEC-104 station that always selects before it executes, a master that
writes a setpoint once per maintenance step.  Each of those requests passes the allow-list; only the
order is new.  This model learns, per channel (client, server, protocol), a first-order Markov chain
over request *classes* (function, object/type, start address) from the learning window and scores
every transition ``a -> b`` in monitoring by two surprises:

- forward, ``-log P(b | a)``: how rarely ``a`` was followed by ``b``;
- backward, ``-log P(a | b)``: how rarely ``b`` was preceded by ``a`` (an OPERATE always came after
  a SELECT: a READ before it is new even though READs are followed by many things).

Probabilities are counts; a transition never seen gets the Good-Turing mass of novelty of its state,
``(N1 + 0.5) / (n + 1)`` (``N1`` transitions seen once out of ``n`` from that state): a state with many
one-off successors (an engineering workstation) makes novelty cheap, a strict polling cycle makes it
costly.  The score is the sum of both surprises, in nats.  A request that comes more than ``pause_s``
after the previous one on its channel follows a *pause*, not that request: independent timers (a
setpoint every few minutes, a counter interrogation every 15) have no order between them.

Only a transition never seen (in learning or since) can alert -- one seen before, however rarely, is
learned behaviour, as in the allow-list -- and only into a *command* (a write or an operate) *bound*
to its predecessor: one that, every one of the at least ``min_bound`` times it was learned, came right
after the same request (the OPERATE of a select-before-operate, an IEC-104 execute after its select),
where that is no coincidence of timing: a command fired by a timer at a random moment finds request
``a`` the last one a share ``f`` of the time (measured while learning), so ``n`` times in a row with
chance ``f ** n``; the binding counts when that is below ``bound_alpha``.  (A Modbus setpoint write
that came after the 2 s poll's coil read 7 times out of 7 -- the read is "last" half of the time --
is not bound; an OPERATE that came after a SELECT, "last" 0.3 s in 15 minutes, is.)  A request that
follows a timer or many kinds of request has no order to break.  The threshold is ``-log(budget)``, the
engine's false-alarm budget spread over the request transitions of the learning window, raised to
the empirical quantile at that budget of the learning transitions scored *leave-one-out* (each as if
it were being seen for the first time when it was seen once) when the model is less sure than it
claims.  (:func:`models.thresholds.calibrate`'s exponential tail does not fit these scores: they are
a few discrete levels, and a handful of rare-but-benign transitions stretch the fitted tail.)

Learning goes on in monitoring from transitions that do not alert (counts only grow; new transitions
are merged every slice); memory is bounded by ``max_transitions`` keys.  Link/transport mechanics
(IEC-104 S/U frames, DNP3 link frames and confirms) are not requests of the process and are skipped.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_DNP3
>>> b = EventBuilder(); t = 0
>>> def req(fn, obj):
...     global t; t += 10**9
...     b.pdu(StreamContext(ts=t, src=1, dst=2), PROTO_DNP3, function=fn, unit=10, obj=obj, is_control=fn in (3, 4, 5))
>>> for i in range(400):
...     req(1, 60)
...     if i % 40 == 0: req(3, 12); req(4, 12)
>>> m = SequenceModel(); m.learn(b.build()); m.finish_learning(0.4)
>>> req(1, 60); req(4, 12); req(1, 60)
>>> [f.rule for f in m.findings(b.build())]
['sequence.unusual_order']
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, KIND_PDU, KIND_POINT, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, EventBatch

from .features import hash_columns
from .findings import Finding, ip_text, protocol_text
from .function_classes import is_mechanics

DNP3_FUNCTIONS = {1: "READ", 2: "WRITE", 3: "SELECT", 4: "OPERATE", 5: "DIRECT OPERATE", 6: "DIRECT OPERATE NR",
                  7: "FREEZE", 13: "COLD RESTART", 14: "WARM RESTART", 20: "ENABLE UNSOLICITED",
                  21: "DISABLE UNSOLICITED", 23: "DELAY MEASURE"}
NOVEL_PRIOR = 0.5  # Good-Turing novelty mass added to the states' singletons (never zero)
IDLE = -1  # the "previous request" of one that follows a pause (int64 class code; hashes are never -1 in practice)
PAUSE_NS = 1_000_000_000


def class_text(protocol: int, function: int, obj: int, address: int, select: int = 0) -> str:
    """A request class in words.

    >>> class_text(PROTO_DNP3, 4, 12, 0), class_text(PROTO_MODBUS, 6, 4, 2), class_text(PROTO_IEC104, 46, 46, 2003, 1)
    ('OPERATE g12 index 0', 'FC 6 at 2', 'type 46 select IOA 2003')
    """
    if protocol == PROTO_DNP3:
        name = DNP3_FUNCTIONS.get(function, f"function {function}")
        return f"{name} g{obj}" + (f" index {address}" if address >= 0 else "")
    if protocol == PROTO_IEC104:
        kind = (" select" if select else " execute") if 45 <= function <= 64 else ""
        return f"type {function}{kind}" + (f" IOA {address}" if address >= 0 else "")
    if protocol == PROTO_MODBUS:
        return f"FC {function}" + (f" at {address}" if address >= 0 else "")
    return f"function {function}"


class SequenceModel:
    def __init__(self, max_transitions: int = 200_000, pause_s: float = 1.0, min_bound: int = 4,
                 bound_alpha: float = 1e-3):
        self.max_transitions = max_transitions
        self.min_bound, self.bound_alpha = min_bound, bound_alpha
        self.pause_ns = int(pause_s * 1e9)
        self.learning = True
        self.last: dict[int, tuple] = {}  # channel -> (class, ts) of its last request
        self.words: dict[int, str] = {IDLE: f"a pause (over {pause_s:g} s)"}  # class -> text (bounded)
        self._learned: list = []  # (channel, prev, cur) arrays while learning
        self.threshold = float("inf")
        self.budget = 0.0
        self.trans_keys = np.empty(0, np.int64)  # sorted hash(channel, prev, cur)
        self.trans_count = np.empty(0, np.int64)
        self.fwd_keys = np.empty(0, np.int64)  # sorted hash(channel, prev): out-degree state
        self.fwd_n = np.empty(0, np.int64)
        self.fwd_n1 = np.empty(0, np.int64)
        self.bwd_keys = np.empty(0, np.int64)  # sorted hash(channel, cur): in-degree state
        self.bwd_n = np.empty(0, np.int64)
        self.bwd_n1 = np.empty(0, np.int64)
        self.bound_keys = np.empty(0, np.int64)  # hash(channel, cur) of requests bound to their predecessor
        self.bound_ok: set = set()  # ... of those, the commands whose binding is no timing coincidence
        self.commands: set = set()  # request classes that write or operate
        self.cover_ns: dict = {}  # hash(channel, class) -> ns it was the last request (within a pause)
        self.chan_ns: dict = {}  # channel -> ns between its requests, while learning
        self._pending: list = []  # non-alerting transitions of monitoring, merged each slice
        self.scored = 0

    # -- the stream of requests -----------------------------------------------------------------
    def _transitions(self, ev: EventBatch):
        """(channel, prev, cur, row index) for every request of the batch that has a predecessor."""
        m = (ev.kind == KIND_PDU) & (ev.direction == DIR_REQUEST)
        if not m.any():
            return None
        m &= ~is_mechanics(ev.protocol, ev.function)
        idx = np.flatnonzero(m)
        if idx.shape[0] == 0:
            return None
        proto = ev.protocol[idx]
        addr = ev.address[idx]  # a command's or write's point; a read's block
        se = self._select_bit(ev, idx, proto)
        chan = hash_columns(ev.src[idx], ev.dst[idx], proto)
        cls = hash_columns(proto, ev.function[idx], ev.object[idx], addr, ev.unit[idx], se)
        acts = ev.is_write[idx] | ev.is_control[idx]
        for c in np.unique(cls).tolist():
            if c not in self.words and len(self.words) < 100_000:
                i = int(np.flatnonzero(cls == c)[0])
                self.words[c] = class_text(int(proto[i]), int(ev.function[idx[i]]), int(ev.object[idx[i]]),
                                           int(addr[i]), int(se[i]))
                if acts[i]:
                    self.commands.add(c)
        order = np.argsort(chan, kind="stable")
        chan_s, cls_s, idx_s = chan[order], cls[order], idx[order]
        ts_s = ev.ts[idx_s]
        first = np.r_[True, chan_s[1:] != chan_s[:-1]]
        prev = np.empty_like(cls_s)
        prev[1:] = cls_s[:-1]
        prev_ts = np.empty_like(ts_s)
        prev_ts[1:] = ts_s[:-1]
        starts = np.flatnonzero(first)
        ends = np.r_[starts[1:], chan_s.shape[0]] - 1
        has_prev = np.ones(chan_s.shape[0], bool)
        for s, e in zip(starts.tolist(), ends.tolist()):
            c = int(chan_s[s])
            p = self.last.get(c)
            if p is None:
                has_prev[s] = False
            else:
                prev[s], prev_ts[s] = p
            self.last[c] = (int(cls_s[e]), int(ts_s[e]))
        gap = ts_s - prev_ts
        if self.learning:  # how much of the time each request was "the last one" (within a pause)
            ok = has_prev
            self._cover(chan_s[ok], prev[ok], np.minimum(gap[ok], self.pause_ns), gap[ok])
        # independent timers (a setpoint every few minutes, a counter interrogation every 15) are not an
        # order: a request after a pause follows the pause, not whatever came last
        prev[gap > self.pause_ns] = IDLE
        if len(self.last) > 4 * self.max_transitions:  # bounded: forget the channels of long ago
            self.last.clear()
        keep = has_prev
        back = np.argsort(idx_s[keep], kind="stable")  # capture order again
        return chan_s[keep][back], prev[keep][back], cls_s[keep][back], idx_s[keep][back]

    def _cover(self, chan, prev, cover, gap) -> None:
        for table, keys, v in ((self.cover_ns, hash_columns(chan, prev), cover), (self.chan_ns, chan, gap)):
            u, inv = np.unique(keys, return_inverse=True)
            sums = np.bincount(inv, weights=v.astype(np.float64))
            for k, x in zip(u.tolist(), sums.tolist()):
                table[k] = table.get(k, 0.0) + x

    @staticmethod
    def _select_bit(ev: EventBatch, idx, proto) -> np.ndarray:
        """IEC-104 commands (type 45-64): the S/E bit of the command qualifier (select 1, execute 0), which
        the parser keeps as the point row's quality; 0 for every other request."""
        out = np.zeros(idx.shape[0], np.int64)
        cmd = (proto == PROTO_IEC104) & (ev.function[idx] >= 45) & (ev.function[idx] <= 64)
        if not cmd.any():
            return out
        pts = np.flatnonzero((ev.kind == KIND_POINT) & (ev.protocol == PROTO_IEC104) & (ev.direction == DIR_REQUEST))
        if pts.shape[0] == 0:
            return out
        pid = ev.pdu_id[pts]
        order = np.argsort(pid, kind="stable")
        pid, q = pid[order], ev.quality[pts][order]
        want = ev.pdu_id[idx[cmd]]
        pos = np.minimum(np.searchsorted(pid, want), pid.shape[0] - 1)
        found = pid[pos] == want
        out[cmd] = np.where(found & (q[pos] >= 0), (q[pos] >> 7) & 1, 0)
        return out

    def learn(self, ev: EventBatch) -> None:
        tr = self._transitions(ev)
        if tr is not None:
            self._learned.append(tr[:3])

    def finish_learning(self, allowed_alerts: float) -> None:
        """Build the counts and calibrate the threshold (module docstring).  ``allowed_alerts``: the false
        alerts the engine's budget allows over the learning span (0.5/h x hours), spread over its transitions."""
        self.learning = None  # _states() decides the bindings once, then learning is False
        if self._learned:
            chan = np.concatenate([t[0] for t in self._learned])
            prev = np.concatenate([t[1] for t in self._learned])
            cur = np.concatenate([t[2] for t in self._learned])
        else:
            chan = prev = cur = np.empty(0, np.int64)
        self._learned = []
        self._rebuild(chan, prev, cur)
        self.learning = False
        self.budget = float(allowed_alerts) / max(chan.shape[0], 1)
        if chan.shape[0] >= 50:
            loo = self._score(chan, prev, cur, leave_one_out=True)[0]
            # a score is a negative log-probability: over -log(budget) about a budget's share of the time when
            # the model is right; the leave-one-out scores check it and raise the threshold where it is not
            loo_q = float(np.quantile(loo, 1.0 - self.budget)) if self.budget * loo.shape[0] >= 1 else -np.inf
            self.threshold = max(-np.log(max(self.budget, 1e-300)), loo_q)

    def _rebuild(self, chan, prev, cur) -> None:
        t = hash_columns(chan, prev, cur)
        self.trans_keys, inv, self.trans_count = np.unique(t, return_inverse=True, return_counts=True)
        # one representative (channel, prev, cur) per transition key, to recount the states
        rep = np.zeros(self.trans_keys.shape[0], np.int64)
        rep[inv] = np.arange(t.shape[0])
        self._rep = (chan[rep], prev[rep], cur[rep])
        self._states()

    def _states(self) -> None:
        chan, prev, cur = self._rep
        cnt = self.trans_count
        single = (cnt == 1).astype(np.int64)
        for side, node in (("fwd", prev), ("bwd", cur)):
            k = hash_columns(chan, node)
            keys, inv = np.unique(k, return_inverse=True)
            n = np.bincount(inv, weights=cnt, minlength=keys.shape[0]).astype(np.int64)
            n1 = np.bincount(inv, weights=single, minlength=keys.shape[0]).astype(np.int64)
            setattr(self, side + "_keys", keys)
            setattr(self, side + "_n", n)
            setattr(self, side + "_n1", n1)
        # a request bound to the one before it: every time it was learned, it came right after the same
        # request (not after a pause) -- the OPERATE of a select-before-operate, the execute of a select
        k = hash_columns(chan, cur)
        pos = np.searchsorted(self.bwd_keys, k)
        bound = (cnt == self.bwd_n[pos]) & (prev != IDLE) & (cnt >= self.min_bound)
        if self.learning is None:  # end of learning: keep the bindings that are commands and no coincidence
            pk = hash_columns(chan, prev)
            for i in np.flatnonzero(bound).tolist():
                # a timer firing at a random moment finds request a "last" a share f of the time; n times in a
                # row by chance: f ** n.  A SELECT is "last" for 0.3 s in 15 min; a poll for half the time
                f = self.cover_ns.get(int(pk[i]), 0.0) / max(self.chan_ns.get(int(chan[i]), 0.0), 1.0)
                if int(cur[i]) in self.commands and f ** int(cnt[i]) < self.bound_alpha:
                    self.bound_ok.add(int(k[i]))
            self.cover_ns, self.chan_ns = {}, {}
        self.bound_keys = np.array(sorted(set(k[bound].tolist()) & self.bound_ok), np.int64)

    @staticmethod
    def _lookup(keys, values_list, q):
        if keys.shape[0] == 0:
            return (np.zeros(q.shape[0], bool),) + tuple(np.zeros(q.shape[0], np.int64) for _ in values_list)
        pos = np.minimum(np.searchsorted(keys, q), keys.shape[0] - 1)
        hit = keys[pos] == q
        return (hit,) + tuple(np.where(hit, v[pos], 0) for v in values_list)

    def _score(self, chan, prev, cur, leave_one_out: bool = False):
        t = hash_columns(chan, prev, cur)
        _, c = self._lookup(self.trans_keys, [self.trans_count], t)
        _, fn, fn1 = self._lookup(self.fwd_keys, [self.fwd_n, self.fwd_n1], hash_columns(chan, prev))
        _, bn, bn1 = self._lookup(self.bwd_keys, [self.bwd_n, self.bwd_n1], hash_columns(chan, cur))
        c = c.astype(np.float64)
        if leave_one_out:  # this sighting removed: a transition seen once becomes novel
            was_single = c == 1
            c, fn, bn = c - 1, fn - 1, bn - 1
            fn1, bn1 = fn1 - was_single, bn1 - was_single
        fn, bn = np.maximum(fn, 0), np.maximum(bn, 0)
        fwd = np.where(c > 0, c, fn1 + NOVEL_PRIOR) / (fn + 1.0)
        bwd = np.where(c > 0, c, bn1 + NOVEL_PRIOR) / (bn + 1.0)
        score = -np.log(np.minimum(fwd, 1.0)) - np.log(np.minimum(bwd, 1.0))
        return score, c, fn, bn

    # -- monitoring -----------------------------------------------------------------------------
    def findings(self, ev: EventBatch) -> list:
        self._merge()
        tr = self._transitions(ev)
        if tr is None:
            return []
        chan, prev, cur, rows = tr
        score, c, fn, bn = self._score(chan, prev, cur)
        self.scored += chan.shape[0]
        # only a request bound to its predecessor can be out of order; one that follows a timer, or many
        # kinds of request, has no order to break (a Modbus write now after a read, now after a pause)
        hit = (score > self.threshold) & (c == 0)  # an order seen before is learned behaviour, never an alert
        if hit.any():
            hit &= np.isin(hash_columns(chan, cur), self.bound_keys)
        ok = ~hit
        if ok.any():
            self._pending.append((chan[ok], prev[ok], cur[ok]))
        out = []
        seen = set()
        for i in np.flatnonzero(hit).tolist():
            r = int(rows[i])
            key = (int(ev.src[r]), int(ev.dst[r]))
            if key in seen:
                continue
            seen.add(key)
            out.append(self._finding(ev, r, int(prev[i]), int(cur[i]), int(chan[i]), float(score[i]),
                                     int(c[i]), int(fn[i]), int(bn[i])))
        return out

    def _merge(self) -> None:
        """Fold the non-alerting transitions of the last slices into the counts (online learning)."""
        if not self._pending:
            return
        chan = np.concatenate([p[0] for p in self._pending])
        prev = np.concatenate([p[1] for p in self._pending])
        cur = np.concatenate([p[2] for p in self._pending])
        self._pending = []
        t = hash_columns(chan, prev, cur)
        pos = np.minimum(np.searchsorted(self.trans_keys, t), max(self.trans_keys.shape[0] - 1, 0))
        known = (self.trans_keys[pos] == t) if self.trans_keys.shape[0] else np.zeros(t.shape[0], bool)
        new = ~known
        if not new.any() or self.trans_keys.shape[0] >= self.max_transitions:
            # the common case, only known transitions: the counts of transitions and states grow in place
            k = pos[known]
            was_single = self.trans_count[k] == 1
            np.add.at(self.trans_count, k, 1)
            for keys, n, n1, node in ((self.fwd_keys, self.fwd_n, self.fwd_n1, prev[known]),
                                      (self.bwd_keys, self.bwd_n, self.bwd_n1, cur[known])):
                sp = np.searchsorted(keys, hash_columns(chan[known], node))
                np.add.at(n, sp, 1)
                u = np.unique(np.flatnonzero(was_single))  # a singleton that recurred is one no more
                if u.shape[0]:
                    first = np.unique(k[u], return_index=True)[1]  # once per transition
                    np.add.at(n1, sp[u[first]], -1)
            return
        if known.any():
            np.add.at(self.trans_count, pos[known], 1)
        if new.any():
            rc, rp, rn = self._rep
            keys = np.concatenate([self.trans_keys, t[new]])
            counts = np.concatenate([self.trans_count, np.ones(int(new.sum()), np.int64)])
            allc, allp, alln = (np.concatenate([rc, chan[new]]), np.concatenate([rp, prev[new]]),
                                np.concatenate([rn, cur[new]]))
            uk, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            self.trans_keys = uk
            self.trans_count = np.bincount(inv, weights=counts, minlength=uk.shape[0]).astype(np.int64)
            self._rep = (allc[first], allp[first], alln[first])
        self._states()

    def _finding(self, ev, r, prev, cur, chan, score, c, fn, bn) -> Finding:
        src, dst, p = int(ev.src[r]), int(ev.dst[r]), int(ev.protocol[r])
        a, b = self.words.get(prev, "?"), self.words.get(cur, "?")
        succ = self._top(chan, prev, forward=True)
        pred = self._top(chan, cur, forward=False)
        expl = [f"after {a} this client sent {succ} ({fn} times learned)" if fn else f"{a} was never learned here",
                f"{b} came after {pred} ({bn} times learned)" if bn else f"{b} was never learned here",
                f"{a} -> {b}: never seen"]
        control = bool(ev.is_control[r] or ev.is_write[r])
        return Finding(
            rule="sequence.unusual_order", detector="sequence", severity="high" if control else "medium",
            first_ts=int(ev.ts[r]), last_ts=int(ev.ts[r]), src=src, dst=dst, protocol=p,
            entity=f"{ip_text(src)}>{ip_text(dst)}/{p}",
            message=(f"{protocol_text(p)} {ip_text(src)} -> {ip_text(dst)}: {b} right after {a}, an order never "
                     f"seen (score {score:.3g} over {self.threshold:.3g}); "
                     + "; ".join(expl[:2])),
            technique="T0855" if control else "T0846", score=score, threshold=self.threshold, explanation=expl,
            fields={"previous": a, "request": b, "transition_count": c, "from_count": fn, "to_count": bn})

    def _top(self, chan, node, forward: bool, k: int = 2) -> str:
        """The learned neighbours of ``node`` on ``chan``, most frequent first, in words."""
        rc, rp, rn = self._rep
        m = (rc == chan) & ((rp == node) if forward else (rn == node))
        if not m.any():
            return "nothing"
        other = (rn if forward else rp)[m]
        cnt = self.trans_count[m]
        order = np.argsort(-cnt)[:k]
        return " or ".join(f"{self.words.get(int(other[i]), '?')} ({int(cnt[i])}x)" for i in order.tolist())

    # -- persistence ----------------------------------------------------------------------------
    def to_state(self):
        rc, rp, rn = getattr(self, "_rep", (np.empty(0, np.int64),) * 3)
        arrays = {"sequence.chan": rc, "sequence.prev": rp, "sequence.cur": rn, "sequence.count": self.trans_count}
        meta = {"threshold": self.threshold, "budget": self.budget,
                "words": {str(k): v for k, v in self.words.items()}, "bound": sorted(self.bound_ok)}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays, meta) -> "SequenceModel":
        m = cls()
        m.learning = False
        chan, prev, cur = (np.asarray(arrays[f"sequence.{k}"], np.int64) for k in ("chan", "prev", "cur"))
        count = np.asarray(arrays["sequence.count"], np.int64)
        m.trans_keys = hash_columns(chan, prev, cur)
        order = np.argsort(m.trans_keys)
        m.trans_keys, m.trans_count = m.trans_keys[order], count[order]
        m._rep = (chan[order], prev[order], cur[order])
        m.bound_ok = set(int(k) for k in meta.get("bound", []))
        m._states()
        m.threshold, m.budget = float(meta["threshold"]), float(meta["budget"])
        m.words = {int(k): v for k, v in meta.get("words", {}).items()}
        return m

    def size(self) -> int:
        return int(self.trans_keys.shape[0])
