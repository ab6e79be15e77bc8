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


import numpy as np

from .base import FROM_CLIENT
from .batch import ChunkColumns, compiled, count_dropped, rows
from .events import (
    COLUMNS, DIR_REQUEST, DIR_RESPONSE, PROTO_IEC104, REASON_BAD_LENGTH, REASON_NONE, STATUS_MALFORMED, STATUS_OK,
    EventBuilder,
)
from .iec104 import (
    APCI_LEN, ASDU_HEADER_LEN, MAX_L, MIN_L, START, _run_dtype, _Stream, control_fields,
    decode_run, next_ns, plausible_apci, sender_controls, seq_reason,
)
from .iec104_types import CONTROL_TYPES, ELEMENTS, FUNC_S, WRITE_TYPES

_plausible_apci = compiled(plausible_apci)
_seq_reason = compiled(seq_reason)
_next_ns = compiled(next_ns)
_sender_controls = compiled(sender_controls)
_control_fields = compiled(control_fields)

# Per type id: the element size where this path decodes the type (-1 elsewhere), the flags.
_ELEMENT_SIZE = np.full(256, -1, np.int64)
for _t, _e in ELEMENTS.items():
    _ELEMENT_SIZE[_t] = _e.size
_IS_CONTROL = np.isin(np.arange(256), sorted(CONTROL_TYPES))
_IS_WRITE = np.isin(np.arange(256), sorted(WRITE_TYPES))
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
                    next_ns = _next_ns(next_ns, ns, reason)
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


def _chunk_order(apdu_k, layout):
    """The walk's APDUs (layout order, chunk ``layout[apdu_k[i]]``) put in chunk order: (the walk
    index of each, its chunk).  A chunk's APDUs are consecutive in the walk and keep their order."""
    n = layout.shape[0]
    first = np.zeros(n + 1, np.int64)  # per chunk: where its APDUs begin in chunk order
    for i in range(apdu_k.shape[0]):
        first[layout[apdu_k[i]] + 1] += 1
    for c in range(n):
        first[c + 1] += first[c]
    order = np.empty(apdu_k.shape[0], np.int64)
    chunk = np.empty(apdu_k.shape[0], np.int64)
    for i in range(apdu_k.shape[0]):
        c = layout[apdu_k[i]]
        order[first[c]] = i
        chunk[first[c]] = c
        first[c] += 1
    return order, chunk


chunk_order = compiled(_chunk_order)


def _read_apdus(buf, pos, seq, tcp_direction, flow_index, side):
    """The PDU row fields of the APDUs at ``pos`` (in order; ``seq`` their N(S) reasons from the
    walk), and the point row fields of the I frames read here.

    ``direction`` is the role ``Iec104Parser._role`` gives: ``side[f]`` is the TCP side that
    controls flow ``f`` (-1 while unknown), set by the first APDU that proves a role (updated in
    place).  I frames whose ASDU is not exactly as long as its type and object count need (or of a
    type not read here, or L > 253) are marked ``slow`` and get no fields: the parser's ``_asdu``
    reads them.
    """
    m = pos.shape[0]
    direction = np.empty(m, np.uint8)
    total = np.empty(m, np.int64)
    function = np.full(m, -1, np.int64)
    subfunction = np.full(m, -1, np.int64)
    cause = np.full(m, -1, np.int64)
    unit = np.full(m, -1, np.int64)
    peer_unit = np.full(m, -1, np.int64)
    ns = np.full(m, -1, np.int64)
    nr = np.full(m, -1, np.int64)
    address = np.full(m, -1, np.int64)
    count = np.zeros(m, np.int64)
    obj = np.full(m, -1, np.int64)
    variation = np.full(m, -1, np.int64)
    is_write = np.zeros(m, np.bool_)
    is_control = np.zeros(m, np.bool_)
    status = np.full(m, STATUS_OK, np.int64)
    reason = np.zeros(m, np.int64)
    slow = np.zeros(m, np.bool_)
    n_points = np.zeros(m, np.int64)
    for j in range(m):
        p = pos[j]
        length = np.int64(buf[p + 1])
        total[j] = length + 2
        d = tcp_direction[j]
        if length < MIN_L:  # §5.1: no control field; the TCP role
            direction[j] = DIR_REQUEST if d == FROM_CLIENT else DIR_RESPONSE
            status[j] = STATUS_MALFORMED
            reason[j] = REASON_BAD_LENGTH
            continue
        c1 = np.int64(buf[p + 2])
        type_id = np.int64(buf[p + 6])
        cot = np.int64(buf[p + 8])
        f = flow_index[j]
        if side[f] < 0:
            controls = _sender_controls(c1, length, type_id if length >= MIN_L + 4 else 0,
                                        cot & 0x3F if length >= MIN_L + 4 else 0)
            if controls >= 0:
                side[f] = d if controls else 1 - d
        s = side[f] if side[f] >= 0 else FROM_CLIENT
        direction[j] = DIR_REQUEST if d == s else DIR_RESPONSE
        receive = ((np.int64(buf[p + 5]) << 8) | buf[p + 4]) >> 1
        if c1 & 0x01:  # S or U format
            function[j], subfunction[j], status[j], reason[j] = _control_fields(c1, length)
            if function[j] == FUNC_S:
                nr[j] = receive
            continue
        # I format (§5.1): N(S), N(R); ASDU (-101 §7.1): type id, VSQ, COT, originator, common address
        vsq = np.int64(buf[p + 7])
        n, sq = vsq & 0x7F, vsq >> 7
        size = _ELEMENT_SIZE[type_id]
        need = 3 + n * size if sq else n * (3 + size)
        if length < MIN_L + ASDU_HEADER_LEN or length > MAX_L or size < 0 or n == 0 or length + 2 - _I_HEADER != need:
            slow[j] = True
            continue
        function[j] = type_id
        subfunction[j] = cot
        cause[j] = cot & 0x3F
        peer_unit[j] = buf[p + 9]
        unit[j] = (np.int64(buf[p + 11]) << 8) | buf[p + 10]
        ns[j] = ((np.int64(buf[p + 3]) << 8) | c1) >> 1
        nr[j] = receive
        q = p + _I_HEADER
        address[j] = (np.int64(buf[q + 2]) << 16) | (np.int64(buf[q + 1]) << 8) | buf[q]
        count[j] = n
        obj[j] = type_id
        variation[j] = sq
        is_write[j] = _IS_WRITE[type_id]
        is_control[j] = _IS_CONTROL[type_id]
        reason[j] = seq[j]  # a sequence anomaly: status stays OK, reason says why
        n_points[j] = n
    # Points (-101 §7.2.2.1): SQ=1, one IOA and consecutive objects; SQ=0, an IOA per object.
    total_points = n_points.sum()
    p_address = np.empty(total_points, np.int64)
    p_at = np.empty(total_points, np.int64)
    p_owner = np.empty(total_points, np.int64)
    k = 0
    kept = 0
    for j in range(m):
        if slow[j]:
            continue
        q = pos[j] + _I_HEADER
        size = _ELEMENT_SIZE[obj[j]] if n_points[j] else 0
        for i in range(n_points[j]):
            if variation[j]:
                p_address[k] = address[j] + i
                p_at[k] = q + 3 + i * size
            else:
                at = q + i * (3 + size)
                p_address[k] = (np.int64(buf[at + 2]) << 16) | (np.int64(buf[at + 1]) << 8) | buf[at]
                p_at[k] = at + 3
            p_owner[k] = kept
            k += 1
        kept += 1
    return (direction, total, function, subfunction, cause, unit, peer_unit, ns, nr, address, count, obj, variation,
            is_write, is_control, status, reason, slow, n_points, p_address, p_at, p_owner)


read_apdus = compiled(_read_apdus)


def feed_batch(parser, chunks: list, out, tags=None) -> None:
    """Parse ``chunks`` (in order) into ``out``; ``tags`` are the chunks' order tags (or None)."""
    if not chunks:
        return
    streams = parser._streams
    n = len(chunks)
    cols = ChunkColumns(chunks, tags, held={key: st.pending for key, st in streams.items() if st.pending})
    lay = cols.layout
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
     dropped_k) = walk_apcis(cols.buf, cols.head[lay], cols.start[lay], cols.end[lay], cols.stream_first,
                             cols.gap[lay], cols.datagram[lay], sync0, ns0)
    clean = np.empty_like(clean_k)
    clean[lay] = clean_k
    count_dropped(out, PROTO_IEC104, dropped_k, clean_k)
    order, apdu_chunk = chunk_order(apdu_k, lay)
    stream_flows = np.unique(cols.flow[lay[first_k]])
    run = _Run(parser, out, cols, apdu_chunk, apdu_pos[order], apdu_seq[order], stream_flows)
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


class _Run:
    """The APDUs of the clean chunks of one batch, in chunk order; ``emit(a, b)`` writes APDUs
    a..b-1 (after any ``feed`` call the chunks before them needed)."""

    def __init__(self, parser, out, cols: ChunkColumns, apdu_chunk, apdu_pos, apdu_seq, flows):
        self.parser, self.out, self.cols = parser, out, cols
        self.chunk, self.pos, self.seq_reason = apdu_chunk, apdu_pos, apdu_seq
        self.flow_index = np.searchsorted(flows, cols.flow[apdu_chunk])  # flows: the batch's, sorted
        self.flows = flows.tolist()
        self.tcp_direction = cols.direction[apdu_chunk].astype(np.int64)

    def emit(self, a: int, b: int) -> None:
        if a >= b:
            return
        out, cols = self.out, self.cols
        m = b - a
        base = out.next_pdu_id
        pos, chunk = self.pos[a:b], self.chunk[a:b]
        controlling = self.parser._controlling  # the role table, read before and written after
        side = np.array([controlling.get(f, -1) for f in self.flows], np.int64)
        (direction, total, function, subfunction, cause, unit, peer_unit, ns, nr, address, count, obj, variation,
         is_write, is_control, status, reason, slow, n_points, p_address, p_at, p_owner) = read_apdus(
            cols.buf, pos, self.seq_reason[a:b], self.tcp_direction[a:b], self.flow_index[a:b], side)
        for u in np.flatnonzero(side >= 0).tolist():
            controlling.setdefault(self.flows[u], int(side[u]))
        pdu = {"direction": direction, "function": function, "subfunction": subfunction, "cause": cause,
               "unit": unit, "peer_unit": peer_unit, "seq": ns, "ack": nr, "address": address, "count": count,
               "object": obj, "variation": variation, "length": total, "is_write": is_write,
               "is_control": is_control, "status": status, "reason": reason}
        kept = None
        if slow.any():
            kept = np.flatnonzero(~slow)
            pdu = {name: v[kept] for name, v in pdu.items()}
            chunk, n_points = chunk[kept], n_points[kept]
        if pdu["reason"].any():
            reasons, counts = np.unique(pdu["reason"][pdu["reason"] != REASON_NONE], return_counts=True)
            for r, c in zip(reasons.tolist(), counts.tolist()):  # as _pdu_row counts them
                out.count_error(PROTO_IEC104, r, c)
        point = self._points(p_at, pdu, p_owner)
        point["address"] = p_address
        columns, owner = rows(cols, chunk, PROTO_IEC104, base, pdu, n_points, point)
        if kept is not None:
            columns["pdu_id"] = base + kept[owner]
            slow = np.flatnonzero(slow)
            columns = self._with_slow(columns, a, slow, direction[slow], total[slow], base)
        out.next_pdu_id = base + m
        row_tags = None
        if cols.tags is not None:
            row_tags = cols.tags[self.chunk[a:b][columns["pdu_id"] - base]]
        out.add_columns(columns, row_tags)

    def _points(self, p_at, pdu, p_owner) -> dict:
        """Point row columns: values and qualities decoded type by type with the parser's table."""
        buf = self.cols.buf
        p_type = pdu["object"][p_owner]
        n = p_at.shape[0]
        values = np.empty(n, np.float64)
        qualities = np.empty(n, np.int64)
        per_type = np.bincount(p_type, minlength=1) if n else np.zeros(1, np.int64)
        types = np.flatnonzero(per_type)
        by_type = None
        if types.shape[0] > 1:  # points sorted by type: each type's a slice
            by_type = np.argsort(p_type, kind="stable")
            p_at = p_at[by_type]
        ends = np.cumsum(per_type[types]).tolist()
        for t, lo, hi in zip(types.tolist(), [0] + ends[:-1], ends):
            element = ELEMENTS[t]
            records = None
            if element.size:
                octets = buf[p_at[lo:hi, None] + np.arange(element.size)]
                records = octets.view(_run_dtype(element, False)).reshape(-1)
            values[lo:hi], qualities[lo:hi] = decode_run(element, records)
        if by_type is not None:
            values[by_type], qualities[by_type] = values.copy(), qualities.copy()
        return {"value": values, "quality": qualities, "cause": pdu["cause"][p_owner], "object": p_type,
                "variation": pdu["variation"][p_owner], "is_write": pdu["is_write"][p_owner],
                "is_control": pdu["is_control"][p_owner]}

    def _with_slow(self, columns, a, slow, direction, total, base) -> dict:
        """``columns`` with the rows of the ``slow`` I frames (indices in a..) written by the parser's
        per-ASDU code, each PDU's rows in its place (by pdu_id)."""
        cols, raw = self.cols, self.cols.raw
        slow_out = EventBuilder()
        asdu = self.parser._asdu
        for j, d, t, why in zip(slow.tolist(), direction.tolist(), total.tolist(), self.seq_reason[a + slow].tolist()):
            p = int(self.pos[a + j])
            ns = (raw[p + 2] | (raw[p + 3] << 8)) >> 1  # -104 §5.1, figure 4
            nr = (raw[p + 4] | (raw[p + 5] << 8)) >> 1
            slow_out.next_pdu_id = base + j
            asdu(raw, p + APCI_LEN, p + t, ns, nr, why, t - 2 > MAX_L, cols.chunks[int(self.chunk[a + j])], d, t,
                 slow_out)
        for key, count in slow_out.errors.items():
            self.out.count_error(*key, count)
        written = slow_out.build()
        merged = {name: np.concatenate((columns[name], written[name])) for name in COLUMNS}
        order = np.argsort(merged["pdu_id"], kind="stable")
        return {name: col[order] for name, col in merged.items()}
