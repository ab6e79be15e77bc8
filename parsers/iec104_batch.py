"""IEC 60870-5-104 batch path: :meth:`parsers.iec104.Iec104Parser.feed_batch`.

Same rows as feeding the chunks one by one (``Iec104Parser.feed``), read as arrays:

1. The chunk bytes are laid out stream by stream, after the partial APDU each stream held from
   before (``ChunkColumns``), and ``walk_apcis`` (compiled) frames every stream's APDUs from the
   length octet (-104 §5.1) in one pass, an APDU split over segments included.  The same walk
   tracks N(S) per stream (:func:`parsers.iec104.seq_reason`) and what a capture gap does to it.
2. Chunks go in order.  From the first octet of a stream where ``feed`` would resynchronise (no
   start octet 0x68, or an implausible APCI after a gap), that stream's chunks go to ``feed``; the
   others form runs of clean chunks.
3. In a run, each APDU's sender role is settled in order (``apdu_directions``, compiled, with
   :func:`parsers.iec104.sender_controls`); S and U frames, short frames and the I frames whose
   ASDU is exactly as long as its type and object count say (every type but C_CS_NA_1's calendar
   time) are read as arrays, their elements decoded type by type with the parser's own decode table
   (:func:`parsers.iec104.decode_run`).  Any other I frame (truncated or over-long ASDU, unknown or
   variable-length type, clock sync) goes through the parser's per-ASDU code (``_asdu``) with the
   role and sequence reason the run computed, and its rows take their place in the order.

The stream records (``parser._streams``) and the role table (``parser._controlling``) are the
ones ``feed`` uses, written back before any call into ``feed``, so both paths can be mixed freely.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from .base import FROM_CLIENT
from .batch import ChunkColumns, compiled, point_offsets, rows
from .events import (
    COLUMNS, DIR_REQUEST, DIR_RESPONSE, PROTO_IEC104, REASON_BAD_LENGTH, REASON_GAP, REASON_NONE,
    REASON_TOO_LARGE, REASON_TRUNCATED, REASON_UNKNOWN_FUNCTION, STATUS_MALFORMED, STATUS_OK, EventBuilder,
)
from .iec104 import (
    APCI_LEN, ASDU_HEADER_LEN, MAX_L, MIN_L, SEQ_MOD, START, VECTOR_KINDS, _run_dtype, _Stream, decode_run,
    plausible_apci, sender_controls, seq_reason,
)
from .iec104_types import CONTROL_TYPES, ELEMENTS, FUNC_S, FUNC_U_INVALID, U_FUNCTIONS, WRITE_TYPES

_plausible_apci = compiled(plausible_apci)
_seq_reason = compiled(seq_reason)
_sender_controls = compiled(sender_controls)

# Per type id: the element size where this path decodes the type (-1 elsewhere), the flags.
_ELEMENT_SIZE = np.full(256, -1, np.int64)
for _t, _e in ELEMENTS.items():
    if _e.kind in VECTOR_KINDS:
        _ELEMENT_SIZE[_t] = _e.size
_IS_CONTROL = np.isin(np.arange(256), sorted(CONTROL_TYPES))
_IS_WRITE = np.isin(np.arange(256), sorted(WRITE_TYPES))
# U format (§5.3): function bits (control octet 1 >> 2) -> event function code.
_U_CODE = np.full(64, FUNC_U_INVALID, np.int64)
for _bits, _code in U_FUNCTIONS.items():
    _U_CODE[_bits] = _code
_I_HEADER = APCI_LEN + ASDU_HEADER_LEN  # first octet of the information objects


def _walk_apcis(buf, head, start, end, stream_first, gap, datagram, sync0, ns0):
    """Frame the APDUs of each stream by the length octet (-104 §5.1), chunk by chunk in layout
    order (ChunkColumns with held octets), as ``feed`` would: an APDU may begin in an earlier chunk
    (or in held octets) and belongs to the chunk that completes it.  ``sync0``/``ns0`` are each
    stream's in-sync flag and expected N(S) before the batch (read at ``stream_first`` chunks).

    Returns (first octet of each APDU, layout index of its chunk, its N(S) reason (I frames), per
    chunk: ``clean`` -- False from the first octet where ``feed`` would resynchronise on, ``entry``,
    ``entry_ns``, ``entry_sync`` -- where the stream stood when the chunk began, ``stop``,
    ``stop_ns``, ``stop_sync`` -- after it, ``dropped`` -- 1 when a gap dropped held octets, 2
    when a datagram had octets left).
    """
    n = start.shape[0]
    cap = 0
    for k in range(n):
        cap += (end[k] - head[k]) // 2 + 1
    apdu_pos = np.empty(cap, np.int64)
    apdu_k = np.empty(cap, np.int64)
    apdu_seq = np.empty(cap, np.uint8)
    clean = np.ones(n, np.bool_)
    entry = np.empty(n, np.int64)
    entry_ns = np.empty(n, np.int64)
    entry_sync = np.empty(n, np.bool_)
    stop = np.empty(n, np.int64)
    stop_ns = np.empty(n, np.int64)
    stop_sync = np.empty(n, np.bool_)
    dropped = np.zeros(n, np.int8)
    count = 0
    pos = np.int64(0)
    next_ns = np.int64(-1)
    in_sync = True
    broken = False
    for k in range(n):
        if stream_first[k]:
            pos = head[k]
            next_ns = ns0[k]
            in_sync = sync0[k]
            broken = False
        entry[k] = pos
        entry_ns[k] = next_ns
        entry_sync[k] = in_sync
        if broken:
            clean[k] = False
        else:
            mark = count
            if gap[k]:  # octets lost before this chunk: drop the partial APDU, forget N(S)
                if pos < start[k]:
                    dropped[k] = 1
                pos = start[k]
                next_ns = -1
                in_sync = False
            e = end[k]
            while e - pos >= 2:
                if buf[pos] != START:
                    broken = True
                    break
                if not in_sync:
                    if e - pos < APCI_LEN:
                        break
                    if not _plausible_apci(buf, pos):
                        broken = True
                        break
                total = np.int64(buf[pos + 1]) + 2
                if e - pos < total:
                    break
                reason = 0
                if total >= APCI_LEN and buf[pos + 2] & 0x01 == 0:  # I format: N(S) in octets 1-2
                    ns = ((np.int64(buf[pos + 3]) << 8) | buf[pos + 2]) >> 1
                    reason = _seq_reason(next_ns, ns)
                    next_ns = (ns + 1) % SEQ_MOD
                apdu_pos[count] = pos
                apdu_k[count] = k
                apdu_seq[count] = reason
                count += 1
                in_sync = True
                pos += total
            if broken:  # feed reads this chunk again from where the stream stood
                clean[k] = False
                count = mark
                dropped[k] = 0
                pos = entry[k]
                next_ns = entry_ns[k]
                in_sync = entry_sync[k]
            elif datagram[k] and pos < e:
                dropped[k] = 2
                pos = e
        stop[k] = pos
        stop_ns[k] = next_ns
        stop_sync[k] = in_sync
    return (apdu_pos[:count], apdu_k[:count], apdu_seq[:count], clean, entry, entry_ns, entry_sync, stop, stop_ns,
            stop_sync, dropped)


walk_apcis = compiled(_walk_apcis)


def _apdu_directions(buf, pos, tcp_direction, flow_index, side):
    """Each APDU's ``direction`` (DIR_REQUEST from the controlling station), in order, as
    ``Iec104Parser._role`` gives it: ``side[f]`` is the TCP side that controls flow ``f`` (-1 while
    unknown), set by the first APDU that proves a role (updated in place)."""
    m = pos.shape[0]
    direction = np.empty(m, np.uint8)
    for j in range(m):
        p = pos[j]
        length = np.int64(buf[p + 1])
        d = tcp_direction[j]
        if length < MIN_L:  # no control field: the TCP role
            direction[j] = DIR_REQUEST if d == FROM_CLIENT else DIR_RESPONSE
            continue
        f = flow_index[j]
        if side[f] < 0:
            type_id = 0
            cot = 0
            if length >= MIN_L + 4:
                type_id = np.int64(buf[p + 6])
                cot = np.int64(buf[p + 8]) & 0x3F
            controls = _sender_controls(np.int64(buf[p + 2]), length, type_id, cot)
            if controls >= 0:
                side[f] = d if controls else 1 - d
        s = side[f] if side[f] >= 0 else FROM_CLIENT
        direction[j] = DIR_REQUEST if d == s else DIR_RESPONSE
    return direction


apdu_directions = compiled(_apdu_directions)


def feed_batch(parser, chunks: list, out, tags=None) -> None:
    """Parse ``chunks`` (in order) into ``out``; ``tags`` are the chunks' order tags (or None)."""
    if not chunks:
        return
    streams = parser._streams
    n = len(chunks)
    cols = ChunkColumns(chunks, tags, held={key: st.pending for key, st in streams.items() if st.pending})
    lay = cols.layout
    gap = np.fromiter(map(attrgetter("gap"), chunks), dtype=bool, count=n)
    datagram = np.fromiter(map(attrgetter("datagram"), chunks), dtype=bool, count=n)
    first_k = np.flatnonzero(cols.stream_first)
    sync0 = np.ones(n, bool)
    ns0 = np.full(n, -1, np.int64)
    stream_of_k = {}
    for k in first_k.tolist():
        chunk = chunks[lay[k]]
        key = (chunk.flow, chunk.direction)
        st = streams.get(key)
        if st is None:
            st = streams[key] = _Stream()
        stream_of_k[k] = st
        sync0[k] = st.in_sync
        ns0[k] = st.next_ns
    (apdu_pos, apdu_k, apdu_seq, clean_k, entry_k, entry_ns, entry_sync, stop_k, stop_ns, stop_sync,
     dropped_k) = walk_apcis(cols.buf, cols.head[lay], cols.start[lay], cols.end[lay], cols.stream_first, gap[lay],
                             datagram[lay], sync0, ns0)
    clean = np.empty_like(clean_k)
    clean[lay] = clean_k
    for flag, reason in ((1, REASON_GAP), (2, REASON_TRUNCATED)):
        n_dropped = int(np.count_nonzero((dropped_k == flag) & clean_k))
        if n_dropped:
            out.count_error(PROTO_IEC104, reason, n_dropped)
    # APDUs in chunk order (stable: a chunk's APDUs stay in stream order)
    apdu_chunk = lay[apdu_k]
    order = np.argsort(apdu_chunk, kind="stable")
    run = _Run(parser, out, cols, apdu_chunk[order], apdu_pos[order], apdu_seq[order])
    # Streams that stay clean keep their state (partial APDU, N(S), sync) for the next batch; a
    # stream that breaks goes to feed from the chunk where it broke, as it stood there.
    last_k = np.r_[first_k[1:] - 1, n - 1]
    firsts = first_k.tolist()
    for i, k in enumerate(last_k.tolist()):
        if clean_k[k]:
            st = stream_of_k[firsts[i]]
            st.pending = cols.raw[stop_k[k]: cols.end[lay[k]]]
            st.next_ns = int(stop_ns[k])
            st.in_sync = bool(stop_sync[k])
    first_apdu = np.searchsorted(run.chunk, np.arange(n + 1)).tolist()
    layout_index = np.empty(n, np.int64)
    layout_index[lay] = np.arange(n)
    broken: set = set()
    a = 0
    for c in np.flatnonzero(~clean).tolist():
        run.emit(a, first_apdu[c])
        a = first_apdu[c + 1]
        chunk = chunks[c]
        key = (chunk.flow, chunk.direction)
        if key not in broken:
            broken.add(key)
            k = int(layout_index[c])
            st = streams[key]
            st.pending = cols.raw[entry_k[k]: cols.start[c]]
            st.next_ns = int(entry_ns[k])
            st.in_sync = bool(entry_sync[k])
        if cols.tags is not None:
            out.set_tag(int(cols.tags[c]))
        parser.feed(chunk, out)
    run.emit(a, first_apdu[n])


def _u16(buf, pos):
    """Little-endian 16-bit words at ``pos`` (-101 §7.2.6: octets low first)."""
    return buf[pos].astype(np.int64) | (buf[pos + 1].astype(np.int64) << 8)


def _u24(buf, pos):
    """Information object addresses (3 octets, -104 §9) at ``pos``."""
    return _u16(buf, pos) | (buf[pos + 2].astype(np.int64) << 16)


class _Run:
    """The APDUs of the clean chunks of one batch, in chunk order; ``emit(a, b)`` writes APDUs
    a..b-1 (after any ``feed`` call the chunks before them needed)."""

    def __init__(self, parser, out, cols: ChunkColumns, apdu_chunk, apdu_pos, apdu_seq):
        self.parser, self.out, self.cols = parser, out, cols
        self.chunk, self.pos, self.seq_reason = apdu_chunk, apdu_pos, apdu_seq
        flows, self.flow_index = np.unique(cols.flow[apdu_chunk], return_inverse=True)
        self.flows = flows.tolist()
        self.tcp_direction = cols.direction[apdu_chunk].astype(np.int64)

    def _directions(self, a: int, b: int) -> np.ndarray:
        """Roles of APDUs a..b-1, with the parser's role table read before and written after."""
        controlling = self.parser._controlling
        side = np.array([controlling.get(f, -1) for f in self.flows], np.int64)
        direction = apdu_directions(self.cols.buf, self.pos[a:b], self.tcp_direction[a:b], self.flow_index[a:b],
                                    side)
        for u in np.flatnonzero(side >= 0).tolist():
            controlling.setdefault(self.flows[u], int(side[u]))
        return direction

    def emit(self, a: int, b: int) -> None:
        if a >= b:
            return
        out, cols, buf = self.out, self.cols, self.cols.buf
        m = b - a
        base = out.next_pdu_id
        pos, chunk = self.pos[a:b], self.chunk[a:b]
        direction = self._directions(a, b)
        length = buf[pos + 1].astype(np.int64)
        total = length + 2
        c1 = buf[pos + 2].astype(np.int64)
        short = length < MIN_L
        is_i = ~short & ((c1 & 0x01) == 0)
        is_s = ~short & ((c1 & 0x03) == 0x01)
        is_u = ~short & ((c1 & 0x03) == 0x03)
        too_large = length > MAX_L
        ns = _u16(buf, pos + 2) >> 1
        nr = _u16(buf, pos + 4) >> 1
        # ASDU header (-101 §7.1): type id, VSQ, COT, originator address, common address.
        type_id = buf[pos + 6].astype(np.int64)
        vsq = buf[pos + 7].astype(np.int64)
        cot = buf[pos + 8].astype(np.int64)
        n_objects, sq = vsq & 0x7F, vsq >> 7
        size = _ELEMENT_SIZE[type_id]
        need = np.where(sq == 1, 3 + n_objects * size, n_objects * (3 + size))
        fast_i = (is_i & (length >= MIN_L + ASDU_HEADER_LEN) & ~too_large & (size >= 0) & (n_objects > 0)
                  & (total - _I_HEADER == need))
        slow = is_i & ~fast_i
        seq = self.seq_reason[a:b]
        # S (§5.2) and U (§5.3) frames: L must be 4; a U frame needs exactly one function bit.
        bits = c1 >> 2
        u_code = _U_CODE[bits]
        bad_u = is_u & (u_code == FUNC_U_INVALID)
        bad_su = (is_s | is_u) & ~bad_u & (length != MIN_L)
        status = np.where(short | bad_u | bad_su, STATUS_MALFORMED, STATUS_OK)
        reason = np.where(is_i, seq, np.where(bad_u, REASON_UNKNOWN_FUNCTION, np.where(
            bad_su & too_large, REASON_TOO_LARGE, np.where(short | bad_su, REASON_BAD_LENGTH, REASON_NONE))))
        pdu = {
            "direction": direction,
            "function": np.where(is_i, type_id, np.where(is_s, FUNC_S, np.where(is_u, u_code, -1))),
            "subfunction": np.where(is_i, cot, np.where(is_u, bits, -1)),
            "cause": np.where(is_i, cot & 0x3F, -1),
            "unit": np.where(is_i, _u16(buf, pos + 10), -1),
            "peer_unit": np.where(is_i, buf[pos + 9].astype(np.int64), -1),
            "seq": np.where(is_i, ns, -1),
            "ack": np.where(is_i | is_s, nr, -1),
            "address": np.where(is_i, _u24(buf, pos + _I_HEADER), -1),
            "count": np.where(is_i, n_objects, 0),
            "object": np.where(is_i, type_id, -1),
            "variation": np.where(is_i, sq, -1),
            "length": total,
            "is_write": is_i & _IS_WRITE[type_id],
            "is_control": is_i & _IS_CONTROL[type_id],
            "status": status,
            "reason": reason,
        }
        kept = None
        if slow.any():
            kept = np.flatnonzero(~slow)
            pdu = {name: v[kept] for name, v in pdu.items()}
            fast_i, pos, chunk, sq, size, type_id = fast_i[kept], pos[kept], chunk[kept], sq[kept], size[kept], type_id[kept]
            n_objects = n_objects[kept]
        reasons, counts = np.unique(pdu["reason"][pdu["reason"] != REASON_NONE], return_counts=True)
        for r, c in zip(reasons.tolist(), counts.tolist()):  # as _pdu_row counts them
            out.count_error(PROTO_IEC104, r, c)
        n_points = np.where(fast_i, n_objects, 0)
        point = self._points(pos, sq, size, type_id, pdu, n_points)
        columns, owner = rows(cols, chunk, PROTO_IEC104, base, pdu, n_points, point)
        if kept is not None:
            columns["pdu_id"] = base + kept[owner]
            columns = self._with_slow(columns, a, np.flatnonzero(slow), direction, total, ns, nr, too_large, base)
        out.next_pdu_id = base + m
        row_tags = None
        if cols.tags is not None:
            row_tags = cols.tags[self.chunk[a:b][columns["pdu_id"] - base]]
        out.add_columns(columns, row_tags)

    def _points(self, pos, sq, size, type_id, pdu, n_points) -> dict:
        """The point rows of the I frames read here: addresses (-101 §7.2.2.1: SQ=1, one IOA for
        consecutive objects; SQ=0, an IOA per object), values and qualities by type."""
        buf = self.cols.buf
        owner = np.repeat(np.arange(n_points.shape[0]), n_points)
        i = point_offsets(n_points)
        p_sq = sq[owner] == 1
        p_size = size[owner]
        body = pos[owner] + _I_HEADER
        ioa_at = np.where(p_sq, body, body + i * (3 + p_size))
        element_at = np.where(p_sq, body + 3 + i * p_size, ioa_at + 3)
        address = _u24(buf, ioa_at) + np.where(p_sq, i, 0)
        p_type = type_id[owner]
        values = np.empty(owner.shape[0], np.float64)
        qualities = np.empty(owner.shape[0], np.int64)
        for t in np.unique(p_type).tolist():
            element = ELEMENTS[t]
            sel = np.flatnonzero(p_type == t)
            records = None
            if element.size:
                octets = buf[element_at[sel][:, None] + np.arange(element.size)]
                records = octets.view(_run_dtype(element, False)).reshape(-1)
            v, q = decode_run(element, records)
            values[sel] = v
            qualities[sel] = q
        return {"address": address, "value": values, "quality": qualities, "cause": pdu["cause"][owner],
                "object": p_type, "variation": sq[owner], "is_write": pdu["is_write"][owner],
                "is_control": pdu["is_control"][owner]}

    def _with_slow(self, columns, a, slow, direction, total, ns, nr, too_large, base) -> dict:
        """``columns`` with the rows of the ``slow`` I frames (indices in a..) written by the parser's
        per-ASDU code, each PDU's rows in its place (by pdu_id)."""
        cols, raw = self.cols, self.cols.raw
        slow_out = EventBuilder()
        asdu = self.parser._asdu
        for j, p, d, t, s, r, big, why in zip(slow.tolist(), self.pos[a + slow].tolist(), direction[slow].tolist(),
                                              total[slow].tolist(), ns[slow].tolist(), nr[slow].tolist(),
                                              too_large[slow].tolist(), self.seq_reason[a + slow].tolist()):
            slow_out.next_pdu_id = base + j
            asdu(raw, p + APCI_LEN, p + t, s, r, why, big, cols.chunks[int(self.chunk[a + j])], d, t, slow_out)
        for key, count in slow_out.errors.items():
            self.out.count_error(*key, count)
        written = slow_out.build()
        merged = {name: np.concatenate((columns[name], written[name])) for name in COLUMNS}
        order = np.argsort(merged["pdu_id"], kind="stable")
        return {name: col[order] for name, col in merged.items()}
