"""Protocol sessions: who holds the session to a server, and whether its sequence and handshakes hold.

One estimator over PDU rows, grouped by **session** (protocol, client address and port, server
address and port; DNP3 also by outstation address): it learns while the engine learns, then turns
clear violations into findings.  Each check follows the protocol's own rules first (what a
conforming stack can never do) and uses learned per-channel values only to widen a limit, never
to narrow the standard's:

======================== ==========================================================================
rule                     what it sees
======================== ==========================================================================
second_session           a server gets a session from another host or port while the one it had
                         is still talking (more concurrent sessions than learned, else one; a
                         Modbus server's clients are counted host by host, as many clients are
                         normal there)
seq_jump                 Modbus transaction ids or DNP3 request sequence numbers that jump inside a
                         session whose channel always counted up by one while learning; IEC-104 N(S)
                         the parser flagged (``seq_gap``/``seq_repeat``); IEC-104 N(R) acknowledging
                         I-frames never sent, or going backwards
response_without_request a Modbus response whose transaction id answers no outstanding request; a
                         DNP3 solicited response whose sequence number answers neither of the
                         last two requests (or a second first fragment to one request); an
                         IEC-104 ACT_CON/ACT_TERM for no activation, a U-format con for no act
operate_without_select   DNP3 OPERATE with no SELECT of the same object on the association within
                         the select timeout (10 s, or twice the longest learned)
direct_operate           DNP3 DIRECT_OPERATE on a channel that used SELECT/OPERATE while learning
                         and never DIRECT_OPERATE
unconfirmed_command      an IEC-104 command activation (types 45-69, COT 6) of a type the station
                         confirmed while learning, or a STARTDT/STOPDT/TESTFR act, with no
                         confirmation (positive or negative) within t1 (15 s, or three times the
                         longest learned) while the connection kept talking
flow_control             IEC-104 k (unacknowledged I-frames, 12) or w (I-frames received before an
                         acknowledgement, 8) beyond both the standard's default and the learned
                         maximum of the channel
======================== ==========================================================================

S-frames and U-frames are link mechanics here (acknowledgements and keep-alives, as
:func:`models.function_classes.is_mechanics` says), checked for what they are, never as functions.
Every finding names the client and the server.  State is bounded: at most ``max_sessions``
sessions (least recently seen evicted), ``max_channels`` learned channels, a fixed tail per
session.

>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS, DIR_REQUEST, DIR_RESPONSE
>>> b = EventBuilder()
>>> for i in range(30):
...     _ = b.pdu(StreamContext(ts=i * 10**9, src=1, dst=2, sport=5000, dport=502), PROTO_MODBUS,
...               function=3, direction=DIR_REQUEST, seq=i)
...     _ = b.pdu(StreamContext(ts=i * 10**9 + 10**6, src=2, dst=1, sport=502, dport=5000), PROTO_MODBUS,
...               function=3, direction=DIR_RESPONSE, seq=i)
>>> m = SessionModel(); m.learn(b.build()); m.finish_learning()
>>> _ = b.pdu(StreamContext(ts=31 * 10**9, src=2, dst=1, sport=502, dport=5000), PROTO_MODBUS,
...           function=3, direction=DIR_RESPONSE, seq=77)
>>> [f.rule for f in m.findings(b.build())]
['sessions.response_without_request']
"""

from __future__ import annotations

import numpy as np

from parsers.events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, REASON_SEQ_GAP,
    REASON_SEQ_REPEAT, STATUS_OK, EventBatch,
)

from .findings import Finding, ip_text, protocol_text

NS = 1_000_000_000
TAIL = 64  # rows of a session kept for the next batch (outstanding Modbus requests live here)
MIN_LEARNED = 20  # sequence steps a channel needs while learning before its counting is trusted
CONFORM = 0.98  # ... and the share of them that must be +0/+1
# IEC 60870-5-104 §5.5, table 3: default k, w and t1
IEC_K, IEC_W, IEC_T1_S = 12, 8, 15.0
IEC_MOD, IEC_HALF = 1 << 15, 1 << 14
FUNC_S = 512
U_ACT_CON = {513: 514, 515: 516, 517: 518}  # STARTDT, STOPDT, TESTFR: act -> con
U_NAMES = {513: "STARTDT", 515: "STOPDT", 517: "TESTFR"}
IEC_COMMANDS = range(45, 70)  # process commands (-101 §7.3.2/§7.3.4 and their time-tagged forms)
IEC_SYSTEM = range(100, 108)  # interrogation, counter interrogation, read, clock sync, test, reset, delay
COT_ACT, COT_ACTCON, COT_DEACT, COT_DEACTCON, COT_ACTTERM = 6, 7, 8, 9, 10
COT_NEGATIVE = (44, 45, 46, 47)  # unknown type / cause / common address / IOA: the station's negative answer
DNP3_SELECT, DNP3_OPERATE, DNP3_DIRECT, DNP3_DIRECT_NR = 3, 4, 5, 6
DNP3_FIR = 0x8  # application control FIR, as the parser puts it in ``subfunction`` (FIR FIN CON UNS)
SELECT_TIMEOUT_S = 10.0  # a typical outstation select timeout (IEEE 1815 leaves it to the device)
KEEP_CONN_S = 3600.0  # connections remembered per server for the concurrency test

RULES = ("second_session", "seq_jump", "response_without_request", "operate_without_select", "direct_operate",
         "unconfirmed_command", "flow_control")


def _who(proto: int, server: bool) -> str:
    return {PROTO_MODBUS: ("client", "server"), PROTO_DNP3: ("master", "outstation"),
            PROTO_IEC104: ("controlling station", "controlled station")}.get(proto, ("client", "server"))[int(server)]


class _Groups:
    """One protocol's sessions in a batch: their keys, live state and learned channel (None when the
    channel was never learned), and for each of their rows (sorted by session, in order) its session."""

    __slots__ = ("keys", "sess", "chan", "grp")

    def __init__(self, keys, sess, chan, grp):
        self.keys, self.sess, self.chan, self.grp = keys, sess, chan, grp


def _starts(grp: np.ndarray) -> np.ndarray:
    """Rows that begin their session's run (``grp`` sorted)."""
    first = np.ones(grp.shape[0], bool)
    first[1:] = grp[1:] != grp[:-1]
    return first


def _ends(grp: np.ndarray) -> np.ndarray:
    """Positions of the last row of each session's run (``grp`` sorted)."""
    last = np.ones(grp.shape[0], bool)
    last[:-1] = grp[1:] != grp[:-1]
    return np.flatnonzero(last)


def _ffill(mask: np.ndarray, grp: np.ndarray) -> np.ndarray:
    """For each row, the position of the latest row at or before it in the same session where ``mask``
    holds; -1 when none.

    >>> _ffill(np.array([0, 1, 0, 0, 1, 0], bool), np.array([0, 0, 0, 1, 1, 1])).tolist()
    [-1, 1, 1, -1, 4, 4]
    """
    pos = np.maximum.accumulate(np.where(mask, np.arange(mask.shape[0]), -1))
    return np.where((pos >= 0) & (grp[np.maximum(pos, 0)] == grp), pos, -1)


class _Session:
    """What one session carries from batch to batch (small, fixed size)."""

    __slots__ = ("first", "last", "tail", "req_seq", "req_seen", "sel", "pending_act", "pending_u", "iec", "rows")

    def __init__(self, t: int):
        self.first = self.last = t
        self.rows = 0
        # the last TAIL rows: direction, seq, function, FIR flag, ts, well-formed (for the matching of responses)
        self.tail = np.zeros((0, 6), dtype=np.int64)
        self.req_seq = -1  # the last request's sequence number (Modbus tid / DNP3 app SEQ)
        self.req_seen = False  # a request was seen in this session
        self.sel: tuple | None = None  # DNP3: last SELECT (ts, object, address)
        self.pending_act: dict = {}  # IEC-104: (type, ioa) -> [activation ts, confirmed, cause]
        self.pending_u: dict = {}  # IEC-104: (U act function, side that sent it) -> ts
        # IEC-104 per side (0 controlling, 1 controlled): next N(S) to send, last N(R) sent
        self.iec = [-1, -1, -1, -1]


class SessionModel:
    """Learn sessions while the engine learns, then report clear violations (module doc)."""

    name = "sessions"

    def __init__(self, max_sessions: int = 4096, max_channels: int = 65536, select_timeout_s: float = SELECT_TIMEOUT_S):
        self.max_sessions = max_sessions
        self.max_channels = max_channels
        self.select_timeout_s = select_timeout_s
        self.learning = True
        self.sessions: dict[tuple, _Session] = {}
        # learned per channel (protocol, client, server, server port): counters, see _learn_channel
        self.channels: dict[tuple, dict] = {}
        # learned per server (protocol, server, port): most sessions seen at once
        self.concurrency: dict[tuple, int] = {}
        # live per server: {(client, client port): [first, last]} for the concurrency test
        self.conns: dict[tuple, dict] = {}
        self.warm_until_ns = 0  # sessions first seen before this may have begun before we looked
        self.now_ns = 0

    # -- the stream ----------------------------------------------------------------------------
    def learn(self, ev: EventBatch) -> None:
        self.learning = True
        self._scan(ev)

    def findings(self, ev: EventBatch, now_ns: int | None = None) -> list:
        self.learning = False
        out = self._scan(ev)
        return out + self._overdue(now_ns if now_ns is not None else self.now_ns)

    def finish_learning(self) -> None:
        self.learning = False

    # -- one batch -----------------------------------------------------------------------------
    def _scan(self, ev: EventBatch) -> list:
        """All sessions of a batch at once, protocol by protocol: each session's rows contiguous and in order."""
        if len(ev) == 0:
            return []
        keep = (ev.kind == KIND_PDU) & (ev.function >= 0) & (ev.protocol >= PROTO_MODBUS) & (ev.protocol <= PROTO_IEC104)
        if not keep.any():
            return []
        idx = np.flatnonzero(keep)  # rows below are positions in ``ev`` (no copy of the batch)
        ts, proto = ev.ts[idx], ev.protocol[idx]
        self.now_ns = max(self.now_ns, int(ts.max()))
        if not self.learning and self.warm_until_ns < 0:  # first batch after a reload: sessions already ran
            self.warm_until_ns = int(ts.min()) + 60 * NS
        req = ev.direction[idx] == DIR_REQUEST
        src, dst, sp, dp = ev.src[idx], ev.dst[idx], ev.sport[idx], ev.dport[idx]
        keys = np.stack([proto.astype(np.int64), np.where(req, src, dst).astype(np.int64),
                         np.where(req, sp, dp).astype(np.int64), np.where(req, dst, src).astype(np.int64),
                         np.where(req, dp, sp).astype(np.int64),
                         np.where(proto == PROTO_DNP3, ev.unit[idx], -1).astype(np.int64)], axis=1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)  # sorted: each protocol's sessions together
        inv = inv.ravel()
        order = np.argsort(inv, kind="stable")
        counts = np.bincount(inv, minlength=uniq.shape[0])
        bounds = np.r_[0, np.cumsum(counts)]
        ts_sorted = ts[order]
        gkeys = [tuple(k) for k in uniq.tolist()]
        gfirst = ts_sorted[bounds[:-1]].tolist()
        gsess = [self._session(k, t) for k, t in zip(gkeys, gfirst)]
        out: list = []
        protos = uniq[:, 0]
        for proto, fn in ((PROTO_MODBUS, self._modbus), (PROTO_DNP3, self._dnp3), (PROTO_IEC104, self._iec104)):
            gs = np.flatnonzero(protos == proto)
            if gs.shape[0] == 0:
                continue
            g0, g1 = int(gs[0]), int(gs[-1]) + 1
            sel = order[bounds[g0]:bounds[g1]]
            grp = inv[sel] - g0
            rows = idx[sel]
            out += fn(_Groups(gkeys[g0:g1], gsess[g0:g1], [self._channel(k) for k in gkeys[g0:g1]], grp), ev, rows)
        touched = set()
        lasts = ts_sorted[bounds[1:] - 1].tolist()
        for k, s, t, n in zip(gkeys, gsess, lasts, counts.tolist()):
            s.last = t
            s.rows += n
            self._conn(k, s)
            touched.add((k[0], k[3], k[4]))
        for server_key in touched:
            out += self._concurrency(server_key)
        return out

    def _session(self, key: tuple, t: int) -> _Session:
        s = self.sessions.get(key)
        if s is None:
            if len(self.sessions) >= self.max_sessions:  # evict the least recently seen
                old = min(self.sessions, key=lambda k: self.sessions[k].last)
                del self.sessions[old]
            s = self.sessions[key] = _Session(t)
            if not self.learning and t < self.warm_until_ns:
                s.req_seen = None  # began before we looked: responses are judged from its first request on
        return s

    def _channel(self, key: tuple) -> dict | None:
        """Learned counters of the session's channel (protocol, client, server, port); created while learning."""
        ck = (key[0], key[1], key[3], key[4])
        c = self.channels.get(ck)
        if c is None and self.learning and len(self.channels) < self.max_channels:
            c = self.channels[ck] = {"steps": 0, "unit_steps": 0, "max_step": 0, "select": 0,
                                     "direct": 0, "select_s": 0.0, "k": 0, "w": 0, "con_s": 0.0, "confirmed": []}
        return c

    # -- shared pieces -------------------------------------------------------------------------
    def _steps(self, G: "_Groups", grp, seq, ts, mod: int, what: str) -> list:
        """Request sequence numbers (``seq`` of the request rows, by session): learn how each channel
        counts, flag jumps after learning."""
        n = seq.shape[0]
        if n == 0:
            return []
        state = np.array([s.req_seq for s in G.sess], dtype=np.int64)
        prev = np.empty(n, np.int64)
        prev[1:] = seq[:-1]
        first = _starts(grp)
        prev[first] = state[grp[first]]
        known = prev >= 0
        step = (seq - prev) % mod
        ends = _ends(grp)
        for g, v in zip(grp[ends].tolist(), seq[ends].tolist()):
            G.sess[g].req_seq = v
        ng = len(G.sess)
        if self.learning:
            steps = np.bincount(grp[known], minlength=ng).tolist()
            unit = np.bincount(grp[known & (step <= 1)], minlength=ng).tolist()
            mx = np.zeros(ng, np.int64)
            small = known & (step < mod // 2)
            np.maximum.at(mx, grp[small], step[small])
            for g, c in enumerate(G.chan):
                if c is not None and steps[g]:
                    c["steps"] += steps[g]
                    c["unit_steps"] += unit[g]
                    c["max_step"] = max(c["max_step"], int(mx[g]))
            return []
        allowed = np.array([max(1, c["max_step"]) if c is not None and c["steps"] >= MIN_LEARNED and
                            c["unit_steps"] >= CONFORM * c["steps"] else mod for c in G.chan], dtype=np.int64)
        # back to 0 or 1 is a counter that wrapped (some clients count in 8 bits) or restarted
        bad = known & (step > allowed[grp]) & (seq > 1)
        out = []
        for g in (np.unique(grp[bad]).tolist() if bad.any() else ()):  # the channel counts up; this jumped
            rows = np.flatnonzero(bad & (grp == g))
            i = int(rows[0])
            back = int(step[i]) >= mod // 2
            jump = f"went back by {mod - int(step[i])}" if back else f"jumped by {int(step[i])}"
            out.append(self._finding(
                "seq_jump", G.keys[g], ts[rows], "medium", "T0830",
                f"{what} {jump} (from {int(prev[i])} to {int(seq[i])}) inside an established session; while "
                f"learning this channel counted up by at most {int(allowed[g])}: frames injected into or replayed "
                "on the session", fields={"from": int(prev[i]), "to": int(seq[i]), "learned_max_step": int(allowed[g])}))
        return out

    def _combined(self, G: "_Groups", grp, cols: np.ndarray):
        """Each session's kept rows, then this batch's rows (``cols``: direction, seq, function, FIR, ts,
        well-formed), sorted by session; the kept rows become each session's last TAIL rows.  Returns
        (rows, session of each, which are this batch's)."""
        tails = [s.tail for s in G.sess]
        lens = [t.shape[0] for t in tails]
        if sum(lens):
            allr = np.concatenate(tails + [cols])
            agrp = np.concatenate([np.repeat(np.arange(len(tails)), lens), grp])
            cur = np.r_[np.zeros(sum(lens), bool), np.ones(cols.shape[0], bool)]
            o = np.argsort(agrp, kind="stable")
            allr, agrp, cur = allr[o], agrp[o], cur[o]
        else:
            allr, agrp, cur = cols, grp, np.ones(cols.shape[0], bool)
        b = np.r_[0, np.cumsum(np.bincount(agrp, minlength=len(tails)))].tolist()
        for g, s in enumerate(G.sess):
            if b[g + 1] > b[g]:
                s.tail = allr[max(b[g], b[g + 1] - TAIL):b[g + 1]]
        return allr, agrp, cur

    def _judged(self, G: "_Groups", grp, isreq) -> np.ndarray | None:
        """Which of this batch's rows may be judged as responses (None: none).

        Requests must be visible in the session itself (seen before or in this batch): a capture of one
        direction, requests the parser could not read, or a device on the server port that opens the
        connection and talks first show none.  A session that began before we looked (after a
        reload) is judged from its first request on."""
        has_req = np.bincount(grp[isreq], minlength=len(G.sess)).tolist()
        ok_g = np.zeros(len(G.sess), bool)
        late = []
        for g, s in enumerate(G.sess):
            before = s.req_seen
            if has_req[g]:
                s.req_seen = True
            ok_g[g] = bool(before or has_req[g])
            if before is None:
                late.append(g)
        if self.learning or not ok_g.any():
            return None
        ok = ok_g[grp]
        for g in late:  # rows before the session's first request are not judged
            rows = np.flatnonzero(grp == g)
            q = rows[isreq[rows]]
            ok[rows[rows < (q[0] if q.shape[0] else rows[-1] + 1)]] = False
        return ok

    # -- Modbus/TCP ----------------------------------------------------------------------------
    def _modbus(self, G: "_Groups", ev: EventBatch, rows: np.ndarray) -> list:
        grp = G.grp
        d, seq, ts, fn = ev.direction[rows], ev.seq[rows].astype(np.int64), ev.ts[rows], ev.function[rows]
        isreq = d == DIR_REQUEST
        out = self._steps(G, grp[isreq], seq[isreq], ts[isreq], 1 << 16, "the Modbus transaction id")
        one = np.ones(seq.shape[0], np.int64)
        allr, agrp, cur = self._combined(G, grp, np.stack([d, seq, fn, 0 * one, ts, one], axis=1).astype(np.int64))
        judged = self._judged(G, grp, isreq)
        if judged is None:
            return out
        # a response is answered if the row before it with the same session, transaction id and function is
        # a request
        o = np.lexsort((np.arange(allr.shape[0]), allr[:, 2], allr[:, 1], agrp))
        a, ga = allr[o], agrp[o]
        same = np.zeros(a.shape[0], bool)
        same[1:] = (a[1:, 1] == a[:-1, 1]) & (a[1:, 2] == a[:-1, 2]) & (ga[1:] == ga[:-1])
        prev_req = np.zeros(a.shape[0], bool)
        prev_req[1:] = a[:-1, 0] == DIR_REQUEST
        bad = np.zeros(allr.shape[0], bool)
        bad[o] = (a[:, 0] == DIR_RESPONSE) & ~(same & prev_req)
        bad = bad[cur] & judged
        for g in (np.unique(grp[bad]).tolist() if bad.any() else ()):
            r = np.flatnonzero(bad & (grp == g))
            i = int(r[0])
            k = G.keys[g]
            out.append(self._finding(
                "response_without_request", k, ts[r], "high", "T0856",
                f"Modbus responses from {ip_text(k[3])} to {ip_text(k[1])} answer no outstanding request "
                f"(transaction id {int(seq[i])}, function {int(fn[i])}): injected or replayed responses "
                "(spoofed reporting)", fields={"transaction_id": int(seq[i]), "function": int(fn[i])}))
        return out

    # -- DNP3 ----------------------------------------------------------------------------------
    def _dnp3(self, G: "_Groups", ev: EventBatch, rows: np.ndarray) -> list:
        app = ev.function[rows] < 1000  # link-only frames (1000+) are link mechanics
        rows, grp = rows[app], G.grp[app]
        if rows.shape[0] == 0:
            return []
        fn = ev.function[rows].astype(np.int64)
        d, seq, ts = ev.direction[rows], ev.seq[rows].astype(np.int64), ev.ts[rows]
        fir = (ev.subfunction[rows] & DNP3_FIR) != 0
        # requests that expect a response: everything but CONFIRM (0) and DIRECT_OPERATE_NR (6)
        isreq = (d == DIR_REQUEST) & (fn != 0)
        out = self._steps(G, grp[isreq], seq[isreq], ts[isreq], 16, "the DNP3 application sequence number of requests")
        ops = np.flatnonzero((fn >= DNP3_SELECT) & (fn <= DNP3_DIRECT_NR))
        if ops.shape[0]:
            out += self._select_operate(G, grp, fn, ev, rows, ts, ops)
        answer = isreq & (fn != DNP3_DIRECT_NR)
        kind = np.where(answer, DIR_REQUEST, np.where(fn == 129, DIR_RESPONSE, 2))
        allr, agrp, cur = self._combined(G, grp, np.stack(
            [kind, seq, fn, fir, ts, ev.status[rows] == STATUS_OK], axis=1).astype(np.int64))
        judged = self._judged(G, grp, answer)
        if judged is None:
            return out
        # a solicited response's first fragment carries the SEQ of the request it answers (IEEE 1815
        # 4.2.2.4.4): one of the last two requests, and only one first fragment per request
        n = allr.shape[0]
        is_r = allr[:, 0] == DIR_REQUEST
        prev_idx = np.where(is_r, -1, _ffill(is_r, agrp))  # for responses: the latest request before
        req_pos = np.flatnonzero(is_r)
        before_of_req = np.full(n, -1)
        if req_pos.shape[0] > 1:
            same = agrp[req_pos[1:]] == agrp[req_pos[:-1]]
            before_of_req[req_pos[1:]] = np.where(same, req_pos[:-1], -1)
        before = np.where(prev_idx >= 0, before_of_req[np.maximum(prev_idx, 0)], -1)
        resp = (allr[:, 0] == DIR_RESPONSE) & (allr[:, 3] == 1)
        s1 = np.where(prev_idx >= 0, allr[np.maximum(prev_idx, 0), 1], -2)
        s2 = np.where(before >= 0, allr[np.maximum(before, 0), 1], -2)
        # a request we could not read whole may hold anything: its answer is not judged
        unread = (prev_idx >= 0) & (allr[np.maximum(prev_idx, 0), 5] == 0)
        ok = (allr[:, 1] == s1) | (allr[:, 1] == s2) | unread
        # a second first fragment answering the same latest request
        cum = np.cumsum(resp & (allr[:, 1] == s1))
        since = cum - np.where(prev_idx >= 0, cum[np.maximum(prev_idx, 0)], 0)
        dup = resp & (allr[:, 1] == s1) & (since > 1)
        bad = ((resp & ~ok) | dup)[cur] & judged
        want_all = s1[cur]
        for g in (np.unique(grp[bad]).tolist() if bad.any() else ()):
            r = np.flatnonzero(bad & (grp == g))
            i = int(r[0])
            k, want = G.keys[g], int(want_all[i])
            out.append(self._finding(
                "response_without_request", k, ts[r], "high", "T0856",
                f"DNP3 outstation {k[5]} at {ip_text(k[3])} sent {ip_text(k[1])} solicited responses that answer "
                f"no request (SEQ {int(seq[i])}, " + (f"the last request had SEQ {want}" if want >= 0 else
                                                    "no request before it") + "): injected or replayed responses "
                "(spoofed reporting)", fields={"seq": int(seq[i]), "request_seq": want, "outstation": k[5]}))
        return out

    def _select_operate(self, G: "_Groups", grp, fn, ev, rows, ts, ops) -> list:
        obj, addr = ev.object[rows], ev.address[rows]
        lone: dict = {}
        direct: dict = {}
        for i in ops.tolist():  # commands are few: one at a time, in order
            g = int(grp[i])
            s, c = G.sess[g], G.chan[g]
            f, t = int(fn[i]), int(ts[i])
            if f == DNP3_SELECT:
                s.sel = (t, int(obj[i]), int(addr[i]))
                if c is not None and self.learning:
                    c["select"] += 1
            elif f == DNP3_OPERATE:
                sel, s.sel = s.sel, None
                matched = sel is not None and sel[1:] == (int(obj[i]), int(addr[i]))
                limit = max(self.select_timeout_s, 2 * c["select_s"]) if c is not None else self.select_timeout_s
                if matched and c is not None and self.learning:
                    c["select_s"] = max(c["select_s"], (t - sel[0]) / NS)
                elif not self.learning and not (matched and (t - sel[0]) / NS <= limit):
                    lone.setdefault(g, []).append((i, limit))
            elif c is not None and self.learning:
                c["direct"] += 1
            elif c is not None and c["select"] > 0 and c["direct"] == 0:
                direct.setdefault(g, []).append(i)
        out = []
        for g, hits in lone.items():
            (i, limit), k = hits[0], G.keys[g]
            out.append(self._finding(
                "operate_without_select", k, ts[[h for h, _ in hits]], "high", "T0855",
                f"DNP3 OPERATE from {ip_text(k[1])} to outstation {k[5]} at {ip_text(k[3])} (object group "
                f"{int(obj[i])}, index {int(addr[i])}) without a matching SELECT in the {limit:g} s before it: "
                "the select-before-operate check was bypassed (unauthorised command)",
                fields={"object": int(obj[i]), "index": int(addr[i]), "select_timeout_s": limit}))
        for g, hits in direct.items():
            i, k, c = hits[0], G.keys[g], G.chan[g]
            out.append(self._finding(
                "direct_operate", k, ts[hits], "medium", "T0855",
                f"DNP3 {'DIRECT_OPERATE_NR' if int(fn[i]) == DNP3_DIRECT_NR else 'DIRECT_OPERATE'} from "
                f"{ip_text(k[1])} to outstation {k[5]} at {ip_text(k[3])} (object group {int(obj[i])}, index "
                f"{int(addr[i])}); this channel used SELECT/OPERATE ({c['select']} selects) and never direct operate "
                "while learning", fields={"object": int(obj[i]), "index": int(addr[i]), "function": int(fn[i])}))
        return out

    # -- IEC 60870-5-104 -----------------------------------------------------------------------
    def _iec104(self, G: "_Groups", ev: EventBatch, rows: np.ndarray) -> list:
        out = []
        grp = G.grp
        fn = ev.function[rows].astype(np.int64)
        d, ts = ev.direction[rows].astype(np.int64), ev.ts[rows]
        ns, nr = ev.seq[rows].astype(np.int64), ev.ack[rows].astype(np.int64)
        # N(S) out of order: the parser's own flags
        rs = ev.reason[rows]
        flagged = (rs == REASON_SEQ_GAP) | (rs == REASON_SEQ_REPEAT)
        if flagged.any() and not self.learning:
            for g in np.unique(grp[flagged]).tolist():
                r = np.flatnonzero(flagged & (grp == g))
                i, k = int(r[0]), G.keys[g]
                what = "repeats an earlier N(S)" if rs[i] == REASON_SEQ_REPEAT else "skips N(S) ahead"
                out.append(self._finding(
                    "seq_jump", k, ts[r], "medium", "T0830",
                    f"IEC-104 {_who(PROTO_IEC104, bool(d[i] == DIR_RESPONSE))} {ip_text(k[3] if d[i] else k[1])} "
                    f"sent an I-frame that {what} (N(S) {int(ns[i])}): a replayed or injected APDU in the session",
                    fields={"ns": int(ns[i]), "reason": "seq_repeat" if rs[i] == REASON_SEQ_REPEAT else "seq_gap"}))
        out += self._iec_counters(G, grp, fn, d, ts, ns, nr)
        hs = np.flatnonzero(((fn >= 513) & (fn <= 518)) |
                            (((fn >= IEC_COMMANDS.start) & (fn < IEC_COMMANDS.stop)) |
                             ((fn >= IEC_SYSTEM.start) & (fn < IEC_SYSTEM.stop))) &
                            np.isin(ev.cause[rows], (COT_ACT, COT_ACTCON, COT_DEACT, COT_DEACTCON, COT_ACTTERM) +
                                    COT_NEGATIVE))
        if hs.shape[0]:
            out += self._iec_handshakes(G, grp, fn, d, ts, ev.cause[rows], ev.address[rows], hs)
        return out

    def _iec_counters(self, G: "_Groups", grp, fn, d, ts, ns, nr) -> list:
        """N(R) against the peer's N(S); k and w (IEC 60870-5-104 §5.5).

        ``_Session.iec`` carries, per side (0 controlling, 1 controlled), the next N(S) it will send
        (``iec[side]``) and the last N(R) it sent (``iec[2 + side]``), -1 while unknown."""
        ng = len(G.sess)
        st = np.array([s.iec for s in G.sess], dtype=np.int64).reshape(ng, 4)
        new = st.copy()
        is_i = (fn < FUNC_S) & (ns >= 0)
        has_nr = (nr >= 0) & ((fn == FUNC_S) | is_i)
        ends = _ends(grp)
        eg = grp[ends]
        k_lim = np.array([max(IEC_K, c["k"] if c else 0) for c in G.chan], dtype=np.int64)
        w_lim = np.array([max(IEC_W, c["w"] if c else 0) for c in G.chan], dtype=np.int64)
        k_max = np.zeros(ng, np.int64)
        w_max = np.zeros(ng, np.int64)
        bad = {"ahead": np.zeros(grp.shape[0], bool), "back": np.zeros(grp.shape[0], bool),
               "k": np.zeros(grp.shape[0], bool), "w": np.zeros(grp.shape[0], bool)}
        for me in (0, 1):
            peer = 1 - me
            p_i = is_i & (d == peer)
            li = _ffill(p_i, grp)  # the peer's latest I-frame at or before each row
            peer_next = np.where(li >= 0, (ns[np.maximum(li, 0)] + 1) % IEC_MOD, st[grp, peer])
            m_ack = (d == me) & has_nr
            la = _ffill(m_ack, grp)  # my latest acknowledgement at or before each row
            acked = np.where(la >= 0, nr[np.maximum(la, 0)], st[grp, 2 + me])
            mine = np.flatnonzero(m_ack)
            if mine.shape[0]:
                pn, mg = peer_next[mine], grp[mine]
                fwd = (nr[mine] - pn) % IEC_MOD
                bad["ahead"][mine[(pn >= 0) & (fwd > 0) & (fwd < IEC_HALF)]] = True  # acknowledges frames never sent
                prev = np.empty(mine.shape[0], np.int64)
                prev[1:] = nr[mine][:-1]
                f0 = _starts(mg)
                prev[f0] = st[mg[f0], 2 + me]
                bwd = (prev - nr[mine]) % IEC_MOD
                bad["back"][mine[(prev >= 0) & (bwd > 0) & (bwd < IEC_HALF)]] = True
                # w: I-frames I had received and not acknowledged when I acknowledged
                lag = np.where((pn >= 0) & (prev >= 0), (pn - prev) % IEC_MOD, 0)
                lag = np.where(lag < IEC_HALF, lag, 0)
                np.maximum.at(w_max, mg, lag)
                bad["w"][mine[lag > w_lim[mg]]] = True
            # k: the peer's I-frames not yet acknowledged by me, right after each one it sent
            sent = np.flatnonzero(p_i)
            if sent.shape[0]:
                a = acked[sent]
                un = np.where(a >= 0, (ns[sent] + 1 - a) % IEC_MOD, 0)
                un = np.where(un < IEC_HALF, un, 0)
                np.maximum.at(k_max, grp[sent], un)
                bad["k"][sent[un > k_lim[grp[sent]]]] = True
            new[eg, peer] = peer_next[ends]
            new[eg, 2 + me] = acked[ends]
        for g, s in enumerate(G.sess):
            s.iec = new[g].tolist()
        if self.learning:
            for g, c in enumerate(G.chan):
                if c is not None:
                    c["k"], c["w"] = max(c["k"], int(k_max[g])), max(c["w"], int(w_max[g]))
            return []
        out = []
        for kind, mask in bad.items():
            for g in (np.unique(grp[mask]).tolist() if mask.any() else ()):
                r = np.flatnonzero(mask & (grp == g))
                i, k, c = int(r[0]), G.keys[g], G.chan[g]
                if kind in ("ahead", "back"):
                    text = ("acknowledges I-frames its peer never sent" if kind == "ahead" else
                            "acknowledges fewer I-frames than it already had (N(R) went back)")
                    out.append(self._finding(
                        "seq_jump", k, ts[r], "medium", "T0830",
                        f"IEC-104 {_who(PROTO_IEC104, bool(d[i] == DIR_RESPONSE))} {ip_text(k[3] if d[i] else k[1])} "
                        f"{text} (N(R) {int(nr[i])}): an injected or replayed APDU in the session",
                        fields={"nr": int(nr[i]), "check": f"nr_{kind}"}))
                elif kind == "k":
                    out.append(self._finding(
                        "flow_control", k, ts[r], "medium", "T0830",
                        f"IEC-104 session {ip_text(k[1])} - {ip_text(k[3])} had more than {int(k_lim[g])} I-frames "
                        f"unacknowledged (k: standard {IEC_K}, learned {c['k'] if c else '-'}): a sender that "
                        "ignores flow control, such as a tool injecting APDUs", fields={"k_limit": int(k_lim[g])}))
                else:
                    out.append(self._finding(
                        "flow_control", k, ts[r], "low", "T0830",
                        f"IEC-104 session {ip_text(k[1])} - {ip_text(k[3])}: a receiver acknowledged more than "
                        f"{int(w_lim[g])} I-frames at once (w: standard {IEC_W}, learned {c['w'] if c else '-'})",
                        fields={"w_limit": int(w_lim[g])}))
        return out

    def _iec_handshakes(self, G: "_Groups", grp, fn, d, ts, cause, addr, hs) -> list:
        """U-format act/con and command activation/confirmation (IEC 60870-5-104 §5.3, -101 §7.2.3)."""
        orphan: dict = {}
        for i in hs.tolist():  # handshakes are few
            g = int(grp[i])
            s, c = G.sess[g], G.chan[g]
            f, t, side = int(fn[i]), int(ts[i]), int(d[i])
            if f in U_ACT_CON:
                s.pending_u[(f, side)] = t
                continue
            if 513 <= f <= 518:
                act = f - 1
                p = s.pending_u.pop((act, 1 - side), None)
                if p is not None:
                    if self.learning and c is not None:
                        c["con_s"] = max(c["con_s"], (t - p) / NS)
                elif not self.learning:
                    orphan.setdefault(g, []).append((i, f"{U_NAMES[act]} con without a {U_NAMES[act]} act"))
                continue
            cot = int(cause[i])
            ioa = int(addr[i]) if f in IEC_COMMANDS else 0
            if cot in (COT_ACT, COT_DEACT):
                if side == DIR_REQUEST and len(s.pending_act) < 64:
                    s.pending_act[(f, ioa)] = [t, False, cot]
                continue
            if side != DIR_RESPONSE:
                continue
            p = s.pending_act.get((f, ioa))
            if cot in COT_NEGATIVE:  # refused: answered all the same
                s.pending_act.pop((f, ioa), None)
            elif cot in (COT_ACTCON, COT_DEACTCON) and p is not None and not p[1]:
                p[1] = True
                if self.learning and c is not None:
                    c["con_s"] = max(c["con_s"], (t - p[0]) / NS)
                    if f not in c["confirmed"]:
                        c["confirmed"].append(f)
            elif cot == COT_ACTTERM and p is not None:
                del s.pending_act[(f, ioa)]
            elif not self.learning:
                name = {COT_ACTCON: "activation confirmation", COT_DEACTCON: "deactivation confirmation",
                        COT_ACTTERM: "activation termination"}[cot]
                orphan.setdefault(g, []).append(
                    (i, f"{name} of type {f} (IOA {ioa}) for a command never sent on this connection"))
        for s in G.sess:  # confirmed activations wait for ACT_TERM; bounded: gone after ten minutes
            for k in [k for k, v in s.pending_act.items() if v[1] and s.last - v[0] > 600 * NS]:
                del s.pending_act[k]
        out = []
        for g, hits in orphan.items():
            (i, text), k = hits[0], G.keys[g]
            out.append(self._finding(
                "response_without_request", k, ts[[h for h, _ in hits]], "high", "T0856",
                f"IEC-104 {_who(PROTO_IEC104, bool(d[i] == DIR_RESPONSE))} "
                f"{ip_text(k[3] if d[i] == DIR_RESPONSE else k[1])} sent {text} (to "
                f"{ip_text(k[1] if d[i] == DIR_RESPONSE else k[3])}): a spoofed or replayed confirmation",
                fields={"type": int(fn[i]), "cause": int(cause[i])}))
        return out

    def _overdue(self, now_ns: int) -> list:
        """IEC-104 activations and U acts left without confirmation beyond t1 while the connection talked on."""
        if self.learning:
            return []
        out = []
        for key, s in self.sessions.items():
            if key[0] != PROTO_IEC104 or not (s.pending_act or s.pending_u):
                continue
            c = self.channels.get((key[0], key[1], key[3], key[4]))
            limit = max(IEC_T1_S, 3 * c["con_s"]) if c is not None else IEC_T1_S
            late = []
            for k, v in list(s.pending_act.items()):
                # only where the station confirmed this type while learning (test benches that never answer do exist)
                confirms = c is not None and k[0] in c.get("confirmed", ())
                if not v[1] and v[2] == COT_ACT and confirms and (s.last - v[0]) / NS > limit:
                    late.append((v[0], f"command type {k[0]} (IOA {k[1]})"))
                    del s.pending_act[k]
                elif not v[1] and (s.last - v[0]) / NS > limit:
                    del s.pending_act[k]
            for (f, side), t in list(s.pending_u.items()):
                if (s.last - t) / NS > limit:
                    late.append((t, f"{U_NAMES[f]} act"))
                    del s.pending_u[(f, side)]
            if late:
                t0 = np.array([t for t, _ in late], dtype=np.int64)
                out.append(self._finding(
                    "unconfirmed_command", key, t0, "medium", "T0855",
                    f"IEC-104 {late[0][1]} from {ip_text(key[1])} to {ip_text(key[3])} got no confirmation within "
                    f"{limit:g} s while the connection kept talking: the station never saw it (injected into the "
                    "session) or a relay in the path withheld its confirmation", fields={"t1_s": limit}))
        return out

    # -- concurrent sessions per server ---------------------------------------------------------
    def _conn(self, key, s: _Session) -> None:
        sk = (key[0], key[3], key[4])
        conns = self.conns.setdefault(sk, {})
        ck = (key[1], key[2])
        span = conns.get(ck)
        if span is None:
            if len(conns) >= 64:
                del conns[min(conns, key=lambda k: conns[k][1])]
            conns[ck] = [s.first, s.last, False]
        else:
            span[0], span[1] = min(span[0], s.first), max(span[1], s.last)

    def _concurrency(self, sk: tuple) -> list:
        conns = self.conns.get(sk)
        if not conns:
            return []
        for k in [k for k, v in conns.items() if (self.now_ns - v[1]) / NS > KEEP_CONN_S]:
            del conns[k]
        if len(conns) < 2:
            if self.learning and conns:
                self.concurrency[sk] = max(self.concurrency.get(sk, 0), 1)
            return []
        ks = list(conns)
        spans = [conns[k] for k in ks]
        same_host = sk[0] == PROTO_MODBUS  # a Modbus server serves many clients: only a host's own second session
        # session j began while session i was talking, and i talked again after (a reconnect never does)
        inside = [[i for i in range(len(ks)) if spans[i][0] < spans[j][0] < spans[i][1] and
                   (not same_host or ks[i][0] == ks[j][0])] for j in range(len(ks))]
        count = [1 + len(x) for x in inside]
        if self.learning:
            self.concurrency[sk] = max(self.concurrency.get(sk, 0), max(count))
            return []
        allowed = self.concurrency.get(sk)
        if allowed is None:
            allowed = 1  # one master per outstation / controlling station per controlled station
        out = []
        for j in [j for j, n in enumerate(count) if n > allowed]:
            if spans[j][2]:
                continue
            spans[j][2] = True
            i = inside[j][0]
            (c_new, p_new), (c_old, p_old) = ks[j], ks[i]
            proto = sk[0]
            same = "the same host" if c_new == c_old else "another host"
            out.append(Finding(
                rule="sessions.second_session", detector=self.name,
                severity="medium" if proto == PROTO_MODBUS else "high", first_ts=spans[j][0], last_ts=spans[j][1],
                src=c_new, dst=sk[1], protocol=proto, sport=p_new, dport=sk[2],
                entity=f"{ip_text(c_new)}:{p_new}>{ip_text(sk[1])}:{sk[2]}/{proto}",
                message=(f"a second {protocol_text(proto)} {_who(proto, False)} session to {_who(proto, True)} "
                         f"{ip_text(sk[1])}:{sk[2]}: {ip_text(c_new)}:{p_new} ({same}) while the session from "
                         f"{ip_text(c_old)}:{p_old} was active ({int(count[j])} at once; at most {allowed} "
                         "while learning): a rogue master or a hijacked session"),
                technique="T0848", count=1, score=float(count[j]), threshold=float(allowed),
                fields={"client": ip_text(c_new), "client_port": p_new, "server": ip_text(sk[1]),
                        "server_port": sk[2], "active_client": ip_text(c_old), "active_client_port": p_old,
                        "concurrent": int(count[j]), "learned_concurrent": allowed}))
        return out

    # -- findings and state ----------------------------------------------------------------------
    def _finding(self, kind, key, ts, severity, technique, message, fields=None) -> Finding:
        proto, client, cport, server, sport = key[:5]
        ts = np.asarray(ts)
        return Finding(
            rule=f"sessions.{kind}", detector=self.name, severity=severity, first_ts=int(ts.min()),
            last_ts=int(ts.max()), src=client, dst=server, protocol=proto, sport=cport, dport=sport,
            entity=f"{ip_text(client)}>{ip_text(server)}:{sport}/{proto}",
            message=message, technique=technique, count=int(ts.shape[0]),
            fields={"client": ip_text(client), "client_port": cport, "server": ip_text(server), "server_port": sport,
                    **(fields or {})})

    def size(self) -> int:
        return len(self.channels)

    def to_state(self) -> tuple[dict, dict]:
        """What was learned (per channel and per server); live sessions are not kept: after a reload
        sessions already running are judged from their first request on."""
        meta = {"channels": [[list(k), v] for k, v in self.channels.items()],
                "concurrency": [[list(k), v] for k, v in self.concurrency.items()],
                "select_timeout_s": self.select_timeout_s, "max_sessions": self.max_sessions,
                "max_channels": self.max_channels}
        return {}, meta

    @classmethod
    def from_state(cls, arrays, meta) -> "SessionModel":
        m = cls(max_sessions=meta["max_sessions"], max_channels=meta["max_channels"],
                select_timeout_s=meta["select_timeout_s"])
        m.channels = {tuple(k): dict(v) for k, v in meta["channels"]}
        m.concurrency = {tuple(k): int(v) for k, v in meta["concurrency"]}
        m.learning = False
        m.warm_until_ns = -1  # set from the first batch monitored
        return m
