"""Modbus/TCP batch path: :meth:`parsers.modbus.ModbusParser.feed_batch`.

Same rows as feeding the chunks one by one (``ModbusParser.feed``), several times faster:

1. The chunk bytes are laid out stream by stream, after the bytes each stream held from before
   (``ChunkColumns``), and ``walk_mbap`` (compiled) frames every stream's ADUs from the MBAP length
   fields in one pass, an ADU split over segments included.
2. Chunks go in order.  From the first bad MBAP header of a stream on (where ``feed`` would
   resynchronise), that stream's chunks go to ``feed``; the others form runs of clean chunks.
3. In a run, the ADUs that make up nearly all traffic -- reads (FC 1-4) and single writes
   (FC 5, 6), requests and responses -- are read as arrays, and requests are paired with their
   responses by (flow, transaction id) with a sort instead of a dict per ADU.  Every other ADU (and a
   response that does not pair cleanly) goes through the parser's per-ADU code at its place in the
   order, after the state it depends on has been written back.

The pending-request table (``parser._pending``) and the partial-ADU tails are the same objects
``feed`` uses, so both paths can be mixed freely.
"""

from __future__ import annotations

import numpy as np

from .batch import ChunkColumns, compiled, count_dropped, point_offsets, rows
from .events import (
    DIR_REQUEST, DIR_RESPONSE, MB_COIL, MB_DISCRETE_INPUT, MB_HOLDING_REGISTER, MB_INPUT_REGISTER, PROTO_MODBUS,
    REASON_UNPAIRED, STATUS_EXCEPTION, STATUS_OK,
)
from .modbus import MAX_LENGTH, mbap_ok

_mbap_ok = mbap_ok  # compiled with walk_mbap on its first use

# Point table per function (MB-AP §4.3): FC 1 coils, 2 discrete inputs, 3 holding, 4 input registers;
# the writes FC 5 and 15 coils, 6, 16 and 23 holding registers.
_POINT_TABLE = np.full(24, -1, dtype=np.int16)
_POINT_TABLE[[1, 2, 3, 4, 5, 6, 15, 16, 23]] = [MB_COIL, MB_DISCRETE_INPUT, MB_HOLDING_REGISTER, MB_INPUT_REGISTER,
                                                MB_COIL, MB_HOLDING_REGISTER, MB_COIL, MB_HOLDING_REGISTER,
                                                MB_HOLDING_REGISTER]
#: after this many responses in one run that do not pair cleanly, the rest of the run goes ADU by ADU
_MAX_SPLITS = 8


def _walk_mbap(buf, head, start, end, stream_first, gap, datagram, min_length, max_length):
    """Frame the ADUs of each stream by the MBAP length (MB-TCP §3.1.3), chunk by chunk in layout
    order (ChunkColumns with held bytes), as ``feed`` would: an ADU may begin in an earlier chunk
    (or in held bytes) and belongs to the chunk that completes it.

    Returns (first byte of each ADU, layout index of its chunk, per chunk: ``clean`` -- False from
    the first header with protocol id != 0 or a length out of range on, where ``feed`` would
    resynchronise, ``entry`` -- where the stream stood when the chunk began, ``stop`` -- where it
    stood after it, ``dropped`` -- 1 when a gap dropped held bytes, 2 when a datagram had bytes left).
    """
    n = start.shape[0]
    cap = 0
    for k in range(n):
        cap += (end[k] - head[k]) // 8 + 1
    adu_pos = np.empty(cap, np.int64)
    adu_chunk = np.empty(cap, np.int64)
    clean = np.ones(n, np.bool_)
    entry = np.empty(n, np.int64)
    stop = np.empty(n, np.int64)
    dropped = np.zeros(n, np.int8)
    count = 0
    pos = 0
    broken = False
    for k in range(n):
        if stream_first[k]:
            pos = head[k]
            broken = False
        entry[k] = pos
        if broken:
            clean[k] = False
            stop[k] = pos
            continue
        if gap[k] and pos < start[k]:
            dropped[k] = 1
            pos = start[k]
        e = end[k]
        mark = count
        while e - pos >= 8:
            protocol_id = (np.int64(buf[pos + 2]) << 8) | buf[pos + 3]
            length = (np.int64(buf[pos + 4]) << 8) | buf[pos + 5]
            if not _mbap_ok(protocol_id, length, max_length):
                broken = True
                break
            if pos + 6 + length > e:
                break
            adu_pos[count] = pos
            adu_chunk[count] = k
            count += 1
            pos += 6 + length
        if broken:
            clean[k] = False
            count = mark
            dropped[k] = 0
            pos = entry[k]
        elif datagram[k] and pos < e:
            dropped[k] = 2
            pos = e
        stop[k] = pos
    return adu_pos[:count], adu_chunk[:count], clean, entry, stop, dropped


_compiled_walk = None


def walk_mbap(*args):
    """_walk_mbap compiled (Numba loaded and the walk compiled on first use)."""
    global _compiled_walk, _mbap_ok
    if _compiled_walk is None:
        _mbap_ok = compiled(mbap_ok)
        _compiled_walk = compiled(_walk_mbap)
    return _compiled_walk(*args)


def frame_simple(buf, head, start, end, stream_first, gap, datagram, min_length, max_length):
    """walk_mbap's result with NumPy alone, where each chunk after the first of its stream begins
    on an ADU boundary (the common case: whole ADUs per segment) -- else None.

    Every chunk is walked on its own, all chunks one ADU at a time together (as many steps as the
    most ADUs in one chunk); that is walk_mbap's walk when no ADU runs from one chunk into the next
    of its stream, which the walk itself shows: each chunk but its stream's last must end exactly
    on an ADU boundary, with no bad header anywhere.
    """
    n = start.shape[0]
    # a chunk's walk begins where its stream stands: held bytes (first chunk) or its own start
    pos = np.where(stream_first, head, start)
    dropped = np.zeros(n, np.int8)
    gapped = gap & (pos < start)
    dropped[gapped] = 1
    pos[gapped] = start[gapped]
    entry = np.where(stream_first, head, start)
    adu_pos, adu_chunk = [], []
    active = np.flatnonzero(end - pos >= 8)
    while active.size:
        p = pos[active]
        protocol_id = (buf[p + 2].astype(np.int64) << 8) | buf[p + 3]
        length = (buf[p + 4].astype(np.int64) << 8) | buf[p + 5]
        if not mbap_ok(protocol_id, length, max_length).all():
            return None  # a stream resynchronises: the compiled walk (or feed) reads this batch
        whole = p + 6 + length <= end[active]
        active = active[whole]
        p = p[whole]
        adu_pos.append(p)
        adu_chunk.append(active)
        pos[active] = p + 6 + length[whole]
        active = active[end[active] - pos[active] >= 8]
    left = datagram & (pos < end)  # a datagram's bytes after its last whole ADU are dropped
    dropped[left] = 2
    pos[left] = end[left]
    last = np.r_[stream_first[1:], True]
    if (~last & (pos != end)).any():
        return None  # an ADU runs on into the next chunk of its stream
    if adu_pos:
        adu_pos, adu_chunk = np.concatenate(adu_pos), np.concatenate(adu_chunk)
        order = np.argsort(adu_chunk, kind="stable")  # stream order within each chunk
        adu_pos, adu_chunk = adu_pos[order], adu_chunk[order]
    else:
        adu_pos = adu_chunk = np.zeros(0, np.int64)
    return adu_pos, adu_chunk, np.ones(n, bool), entry, pos, dropped


def feed_batch(parser, chunks: list, out, tags=None, numba: bool = True) -> None:
    """Parse ``chunks`` (in order) into ``out``; ``tags`` are the chunks' order tags (or None).
    ``numba=False``: frame with NumPy alone (frame_simple); a batch it cannot frame goes chunk by
    chunk through ``feed``."""
    from .modbus import FRAMING_MAX_LENGTH, MIN_LENGTH

    parser._last_out = out
    if not chunks:
        return
    tails = parser._tails
    cols = ChunkColumns(chunks, tags, held=tails)
    lay = cols.layout
    walk_args = (cols.buf, cols.head[lay], cols.start[lay], cols.end[lay], cols.stream_first, cols.gap[lay],
                 cols.datagram[lay], MIN_LENGTH, FRAMING_MAX_LENGTH)
    framed = frame_simple(*walk_args)
    if framed is None and not numba:
        for k in np.flatnonzero(cols.stream_first).tolist():  # the held bytes back where feed looks
            c = int(lay[k])
            if cols.head[c] < cols.start[c]:
                tails[(int(cols.flow[c]), int(cols.direction[c]))] = cols.raw[cols.head[c]: cols.start[c]]
        for c, chunk in enumerate(chunks):
            if cols.tags is not None:
                out.set_tag(int(cols.tags[c]))
            parser.feed(chunk, out)
        return
    adu_pos, adu_k, clean_k, entry_k, stop_k, dropped_k = framed if framed is not None else walk_mbap(*walk_args)
    clean = np.empty_like(clean_k)
    clean[lay] = clean_k
    count_dropped(out, PROTO_MODBUS, dropped_k, clean_k)
    # ADUs in chunk order (stable: a chunk's ADUs stay in stream order)
    adu_chunk = lay[adu_k]
    order = np.argsort(adu_chunk, kind="stable")
    adu_chunk, adu_pos = adu_chunk[order], adu_pos[order]
    ports = np.fromiter(parser.server_ports, dtype=np.int64) if parser.server_ports else np.zeros(0, np.int64)
    to_server = np.isin(cols.dport, ports)
    from_server = np.isin(cols.sport, ports)
    role = np.where(to_server != from_server, np.where(to_server, DIR_REQUEST, DIR_RESPONSE),
                    np.where(cols.direction == 0, DIR_REQUEST, DIR_RESPONSE)).astype(np.uint8)
    run = _Run(parser, out, cols, adu_chunk, adu_pos, role)
    # Streams that stay clean keep their partial ADU for the next batch; a stream that breaks goes
    # to feed from the chunk where it broke, holding what it held there.
    last_k = np.r_[np.flatnonzero(cols.stream_first)[1:] - 1, len(chunks) - 1]
    for k in last_k[clean_k[last_k]].tolist():
        if stop_k[k] < cols.end[lay[k]]:
            chunk = chunks[lay[k]]
            tails[(chunk.flow, chunk.direction)] = cols.raw[stop_k[k]: cols.end[lay[k]]]
    first_adu = np.searchsorted(adu_chunk, np.arange(len(chunks) + 1)).tolist()
    broken: set = set()
    a = 0
    for c in np.flatnonzero(~clean).tolist():
        run.adus(a, first_adu[c])
        a = first_adu[c + 1]
        chunk = chunks[c]
        key = (chunk.flow, chunk.direction)
        if key not in broken:
            broken.add(key)
            k = int(np.flatnonzero(lay == c)[0])
            held = cols.raw[entry_k[k]: cols.start[c]]
            if held:
                tails[key] = held
        if cols.tags is not None:
            out.set_tag(int(cols.tags[c]))
        parser.feed(chunk, out)
    run.adus(a, first_adu[len(chunks)])


class _Run:
    """The ADUs of the clean chunks of one batch, as columns; ``adus(a, b)`` parses ADUs a..b-1."""

    def __init__(self, parser, out, cols: ChunkColumns, adu_chunk, adu_pos, chunk_role):
        self.parser, self.out, self.cols = parser, out, cols
        self.chunk, self.pos = adu_chunk, adu_pos
        buf = cols.buf
        self.tid = cols.u16(adu_pos)
        self.length = cols.u16(adu_pos + 4)
        self.unit = buf[adu_pos + 6].astype(np.int64)
        self.fc = buf[adu_pos + 7].astype(np.int64)
        self.w1 = cols.u16(adu_pos + 8)  # start address (requests, write echoes)
        self.w2 = cols.u16(adu_pos + 10)  # quantity (reads, multiple writes) or value (single writes)
        self.w3 = cols.u16(adu_pos + 12)  # FC 23 write start address
        self.w4 = cols.u16(adu_pos + 14)  # FC 23 write quantity
        self.nbytes = buf[adu_pos + 8].astype(np.int64)  # byte count (read responses)
        self.flow = cols.flow[adu_chunk].astype(np.int64)
        self.role = chunk_role[adu_chunk]
        req = self.role == DIR_REQUEST
        fc, length = self.fc, self.length
        self.exc = fc >= 0x80
        self.fcm = fc & 0x7F  # function code without the exception bit
        single = ((fc == 5) | (fc == 6)) & (length == 6)
        sane = length <= MAX_LENGTH  # longer ADUs are counted too_large by the per-ADU code
        # FC 15/16 (MB-AP §6.11, 6.12): address, quantity, byte count = the quantity's size, values.
        nb_multi = buf[adu_pos + 12].astype(np.int64)
        multi_req = (((fc == 15) & (nb_multi == (self.w2 + 7) >> 3)) | ((fc == 16) & (nb_multi == 2 * self.w2))) \
            & (length == 7 + nb_multi)
        # FC 23 (§6.17): read address, read quantity, write address, write quantity, byte count, values.
        rw_req = (fc == 23) & (buf[adu_pos + 16] == 2 * self.w4) & (length == 11 + 2 * self.w4)
        # What this path reads; any other ADU goes to the parser's own per-ADU code: requests with
        # a bad length or the exception bit, other functions, malformed or unpaired responses (the
        # pairing checks in _pair_and_emit), exception responses with trailing bytes.
        self.fast = np.where(
            req, ((fc >= 1) & (fc <= 4) & (length == 6)) | single | ((multi_req | rw_req) & sane),
            ((fc >= 1) & (fc <= 4)) | single | ((((fc == 15) | (fc == 16)) & (length == 6))
                                                | (fc == 23) | (self.exc & (length == 3))) & sane)

    def adus(self, a: int, b: int) -> None:
        slow = np.flatnonzero(~self.fast[a:b]) + a
        for s in slow.tolist() + [b]:
            self._fast(a, s)
            if s < b:
                self._slow(s)
            a = s + 1

    def _slow(self, j: int) -> None:
        """ADU ``j`` through the parser's per-ADU code, exactly as ``feed`` would read it."""
        c = int(self.chunk[j])
        chunk = self.cols.chunks[c]
        if self.cols.tags is not None:
            self.out.set_tag(int(self.cols.tags[c]))
        pos = int(self.pos[j])  # in cols.raw: an ADU may begin in an earlier chunk
        length = int(self.length[j])
        self.parser._one(chunk, self.out, int(self.role[j]), self.cols.raw, pos, pos + 6 + length,
                         int(self.tid[j]), int(self.unit[j]), int(self.fc[j]), length)

    def _fast(self, a: int, b: int) -> None:
        """ADUs a..b-1, all of kinds this path reads."""
        splits = 0
        while a < b:
            if splits >= _MAX_SPLITS:
                for j in range(a, b):
                    self._slow(j)
                return
            stop = self._pair_and_emit(a, b)
            if stop >= b:
                return
            self._slow(stop)
            a = stop + 1
            splits += 1

    def _pair_and_emit(self, a: int, b: int) -> int:
        """Pair and write ADUs a..; return where it stopped: b, or a response that does not pair
        cleanly (to be read by the per-ADU code once the state before it is written back)."""
        parser = self.parser
        sl = slice(a, b)
        m = b - a
        flow, tid, fc, unit = self.flow[sl], self.tid[sl], self.fcm[sl], self.unit[sl]
        exc = self.exc[sl]
        req = self.role[sl] == DIR_REQUEST
        key = (flow << 16) | tid
        # Previous and next ADU with the same (flow, transaction id), in order.
        order = np.argsort(key, kind="stable")
        same = key[order[1:]] == key[order[:-1]]
        prev = np.full(m, -1, np.int64)
        prev[order[1:][same]] = order[:-1][same]
        nxt = np.full(m, -1, np.int64)
        nxt[order[:-1][same]] = order[1:][same]
        # Requests still pending from earlier (the parser's table), for the flows of this run.
        pending = parser._pending
        entries = [(f, t, e) for f in np.unique(flow).tolist() for t, e in (pending.get(f) or {}).items()]
        in_table = np.zeros(m, bool)
        t_fc = np.zeros(m, np.int64)
        t_unit = np.zeros(m, np.int64)
        t_addr = np.zeros(m, np.int64)
        t_count = np.zeros(m, np.int64)
        first = np.flatnonzero(prev < 0)
        if entries and first.size:
            tkeys = np.array([(f << 16) | t for f, t, _ in entries], dtype=np.int64)
            torder = np.argsort(tkeys)
            at = np.searchsorted(tkeys[torder], key[first])
            found = at < tkeys.size
            found[found] = tkeys[torder[at[found]]] == key[first[found]]
            for j, e in zip(first[found].tolist(), torder[at[found]].tolist()):
                in_table[j] = True
                t_fc[j], t_unit[j], t_addr[j], t_count[j] = entries[e][2]
        # The request pending right before each ADU: the previous same-key ADU if it is a
        # request (a response in between would have taken it), else the table's.
        has_prev = prev >= 0
        p = np.where(has_prev, prev, 0)
        from_run = has_prev & req[p]
        present = from_run | (~has_prev & in_table)
        r_count = np.where((fc == 5) | (fc == 6), 1, self.w2[sl])  # what a request asks for (or writes)
        c_fc = np.where(from_run, fc[p], t_fc)
        c_unit = np.where(from_run, unit[p], t_unit)
        c_addr = np.where(from_run, self.w1[sl][p], t_addr)
        c_count = np.where(from_run, r_count[p], t_count)
        matched = present & (c_fc == fc) & (c_unit == unit)
        resp = ~req
        read_resp = resp & ~exc & ((fc <= 4) | (fc == 23))
        nbytes = self.nbytes[sl]
        sized = np.where(fc > 2, (c_count == nbytes >> 1) & ((nbytes & 1) == 0), (c_count + 7) >> 3 == nbytes)
        bad = read_resp & ~(matched & (self.length[sl] == 3 + nbytes) & sized)
        # The table holds at most max_pending requests per flow; where this run would overflow it
        # (the oldest would be dropped), read ADU by ADU instead.
        delta = np.where(req, ~present, np.where(present, -1, 0)).astype(np.int64)
        by_flow = np.argsort(flow, kind="stable")
        d = delta[by_flow]
        run_total = np.cumsum(d) - d
        starts = np.r_[True, flow[by_flow][1:] != flow[by_flow][:-1]]
        before = run_total - run_total[np.flatnonzero(starts)][np.cumsum(starts) - 1]
        held = np.array([len(pending.get(f) or ()) for f in flow[by_flow].tolist()], np.int64) if entries else 0
        overflow = np.zeros(m, bool)
        overflow[by_flow] = req[by_flow] & ~present[by_flow] & (held + before >= parser.max_pending)
        stop_at = np.flatnonzero(bad | overflow)
        stop = int(stop_at[0]) if stop_at.size else m
        if stop:
            self._write_back(a, stop, flow, tid, fc, unit, req, present, matched, in_table, prev, nxt, r_count)
            self._emit(a, stop, req, exc, matched, c_addr, c_count)
        if stop < m and overflow[stop]:
            for j in range(a + stop, b):  # rare: more outstanding requests than the table keeps
                self._slow(j)
            return b
        return a + stop

    def _write_back(self, a, stop, flow, tid, fc, unit, req, present, matched, in_table, prev, nxt, r_count):
        """The pending table and the unpaired count after ADUs a..a+stop-1, as feed leaves them."""
        parser, out = self.parser, self.out
        k = slice(0, stop)
        req_k, present_k = req[k], present[k]
        unpaired = int(np.count_nonzero(req_k & present_k) + np.count_nonzero(~req_k & ~matched[k]))
        if unpaired:
            out.count_error(PROTO_MODBUS, REASON_UNPAIRED, unpaired)
        pending = parser._pending
        for j in np.flatnonzero((prev[k] < 0) & in_table[k]).tolist():  # taken or replaced
            del pending[int(flow[j])][int(tid[j])]
        keep = req_k & ((nxt[k] < 0) | (nxt[k] >= stop))  # requests still waiting at the end
        w1 = self.w1[a: a + stop]
        for j in np.flatnonzero(keep).tolist():
            f = int(flow[j])
            table = pending.get(f)
            if table is None:
                table = pending[f] = {}
            table[int(tid[j])] = (int(fc[j]), int(unit[j]), int(w1[j]), int(r_count[j]))

    def _emit(self, a, stop, req, exc, matched, c_addr, c_count) -> None:
        """The rows of ADUs a..a+stop-1 (PDU rows each followed by its point rows)."""
        out, cols = self.out, self.cols
        sl = slice(a, a + stop)
        k = slice(0, stop)
        req, exc, matched, c_addr, c_count = req[k], exc[k], matched[k], c_addr[k], c_count[k]
        fc, w1, w2, pos = self.fcm[sl], self.w1[sl], self.w2[sl], self.pos[sl]
        read = (fc <= 4) | ((fc == 23) & ~req)  # a response carrying read values (FC 1-4, 23)
        read_resp = ~req & ~exc & read
        single = (fc == 5) | (fc == 6)
        chunk = self.chunk[sl]
        # Points: the values a write request writes; the values a read response returns.
        n_points = np.where(read_resp, c_count,
                            np.where(req & ~read, np.where(single, 1, np.where(fc == 23, self.w4[sl], w2)), 0))
        owner = np.repeat(np.arange(stop), n_points)
        i = point_offsets(n_points)
        p_fc, p_req = fc[owner], req[owner]
        # where a point's values begin: after the byte count of a read response (pos + 9), of an
        # FC 15/16 request (pos + 13), of an FC 23 request (pos + 17)
        data = pos[owner] + np.where(p_req, np.where(p_fc == 23, 17, 13), 9)
        is_bits = (p_fc <= 2) | (p_fc == 15)
        registers = cols.u16(np.where(is_bits, 0, data + 2 * i))
        bits = (cols.buf[np.where(is_bits, data + (i >> 3), 0)] >> (i & 7)) & 1
        value = w2[owner]
        coil = np.where(value == 0xFF00, 1, np.where(value == 0, 0, value))  # modbus.coil_value
        value = np.where(p_fc == 5, coil, np.where(p_fc == 6, value, np.where(is_bits, bits, registers)))
        first = np.where(p_req, np.where(p_fc == 23, self.w3[sl][owner], w1[owner]), c_addr[owner])
        pdu_address = np.where(read_resp, c_addr, np.where(exc, np.where(matched, c_addr, -1), w1))
        count = np.where(exc, 0, np.where(read_resp, c_count, np.where(single, 1, w2)))
        is_write = ~exc & (single | (fc == 15) | (fc == 16) | ((fc == 23) & req))
        columns, row_owner = rows(
            cols, chunk, PROTO_MODBUS, out.next_pdu_id,
            {"direction": self.role[sl], "function": fc, "unit": self.unit[sl], "seq": self.tid[sl],
             "address": pdu_address, "count": count, "cause": np.where(exc, self.nbytes[sl], -1),
             "length": self.length[sl] + 6, "is_write": is_write,
             "status": np.where(exc, STATUS_EXCEPTION, STATUS_OK)},
            n_points,
            {"address": first + i, "value": value, "object": _POINT_TABLE[p_fc], "is_write": p_req})
        out.next_pdu_id += stop
        out.add_columns(columns, None if cols.tags is None else cols.tags[chunk[row_owner]])
