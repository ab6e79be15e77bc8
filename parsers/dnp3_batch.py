"""DNP3 batch path: :meth:`parsers.dnp3.Dnp3Parser.feed_batch`.

Same rows as feeding the chunks one by one (``Dnp3Parser.feed``), read with two compiled walks and
NumPy instead of Python per frame:

1. The chunk bytes are laid out stream by stream after the bytes each stream held from before
   (``ChunkColumns``).  ``walk_links`` cuts every stream into link frames exactly as
   ``Dnp3Parser._scan`` does -- resynchronisation on ``05 64`` (clause 9.2.6), the header CRC, LEN,
   the CRC of every 16-octet data block (clause 9.2.4.2) -- and copies the user data of each frame,
   CRCs removed, into one array.  A frame split over chunks belongs to the chunk that completes it.
2. The frames that make up nearly all traffic are read as arrays: link-only frames (table 9-1/9-2)
   and single-segment application fragments (transport FIR and FIN, clause 8.2.1) in a stream with
   no fragment being reassembled.  ``walk_objects`` walks the object headers of those fragments
   (clause 4.2.2.7) and decodes their points; the PDU and point rows are written with
   ``parsers.batch.rows``.
3. Every other frame -- a bad CRC or LEN, a segment of a multi-frame fragment (and every later
   user-data frame of that stream in the batch), a fragment whose objects are malformed, device
   attributes (group 0), size-prefixed objects -- goes through the parser's own per-frame code
   (``_link_error`` / ``_link_frame``), in order, into a side builder.  The frames read as arrays
   change no state, so the per-frame code sees exactly the state ``feed`` would; the two sets of
   rows are then merged back into frame order and the PDU ids renumbered.

The partial-frame tails (``_Stream.buf``) and the transport fragments are the same objects ``feed``
uses, so both paths can be mixed freely.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from .batch import ChunkColumns, compiled, rows
from .crc import TABLE8
from .dnp3_objects import (
    CONTROL_FUNCTIONS, FUNCTION_NAMES, HEADER_ONLY_FUNCTIONS, LENGTH_IS_VARIATION, LINK_PRIMARY_BASE,
    LINK_PRIMARY_NAMES, LINK_SECONDARY_BASE, LINK_SECONDARY_NAMES, NO_DATA_GROUPS, OBJECTS, PACKED_BITS,
    PREFIXES, RANGE_FIELDS, RESPONSE_FUNCTIONS, V_BIT7, V_DBIT, V_TIME48, WRITE_FUNCTIONS,
)
from .events import (
    COLUMNS, DIR_REQUEST, DIR_RESPONSE, KIND_PDU, PROTO_DNP3, REASON_BAD_CRC, REASON_BAD_LENGTH, REASON_GAP, REASON_NONE,
    REASON_RESYNC, REASON_TRUNCATED, REASON_UNKNOWN_FUNCTION, STATUS_OK, STATUS_UNKNOWN, EventBuilder,
)

_CRC_TABLE = np.array(TABLE8, dtype=np.int64)

# Frame kinds found by walk_links (what Dnp3Parser._scan does with each).
FRAME_OK, FRAME_BAD_HEADER_CRC, FRAME_BAD_LENGTH, FRAME_BAD_DATA_CRC = 0, 1, 2, 3

# --- Tables the compiled object walk indexes (built from parsers.dnp3_objects) ----------------
# Object prefix (table 4-5): octets, kind 0 none / 1 index / 2 size; -1 reserved.
_PREFIX_NONE, _PREFIX_INDEX, _PREFIX_SIZE = 0, 1, 2
PREFIX_OCTETS = np.zeros(8, np.int64)
PREFIX_KIND = np.full(8, -1, np.int64)
for _code, (_octets, _kind) in PREFIXES.items():
    PREFIX_OCTETS[_code] = _octets
    PREFIX_KIND[_code] = {None: _PREFIX_NONE, "index": _PREFIX_INDEX, "size": _PREFIX_SIZE}[_kind]
# Range specifier (table 4-6): octets of the whole range field, kind 0 start-stop / 1 count /
# 2 none (all objects); -1 reserved.
_RANGE_STARTSTOP, _RANGE_COUNT, _RANGE_NONE = 0, 1, 2
RANGE_OCTETS = np.zeros(16, np.int64)
RANGE_KIND = np.full(16, -1, np.int64)
for _code, (_struct, _kind) in RANGE_FIELDS.items():
    RANGE_OCTETS[_code] = 0 if _struct is None else _struct.size
    RANGE_KIND[_code] = {"startstop": _RANGE_STARTSTOP, "count": _RANGE_COUNT, "none": _RANGE_NONE}[_kind]
# Application function codes (clause 4.2.2.5): bit flags per code.
_FC_KNOWN, _FC_RESPONSE, _FC_HEADER_ONLY = 1, 2, 4
FUNCTION_FLAGS = np.zeros(256, np.int64)
for _fc in range(256):
    FUNCTION_FLAGS[_fc] = ((_fc in FUNCTION_NAMES) * _FC_KNOWN | (_fc in RESPONSE_FUNCTIONS) * _FC_RESPONSE
                           | (_fc in HEADER_ONLY_FUNCTIONS) * _FC_HEADER_ONLY)
IS_WRITE = np.isin(np.arange(256), list(WRITE_FUNCTIONS))
IS_CONTROL = np.isin(np.arange(256), list(CONTROL_FUNCTIONS))
# Groups: no object data (A.29 class data), or variation = object length (A.34-A.37).
_GROUP_NO_DATA, _GROUP_LENGTH_IS_VARIATION = 1, 2
GROUP_FLAGS = np.zeros(256, np.int64)
GROUP_FLAGS[list(NO_DATA_GROUPS)] |= _GROUP_NO_DATA
GROUP_FLAGS[list(LENGTH_IS_VARIATION)] |= _GROUP_LENGTH_IS_VARIATION
# Objects by group * 256 + variation (Annex A): kind 0 unknown / 1 fixed size / 2 packed bits;
# octets per object (fixed) or bits per point (packed); where the value and the flags octet sit
# in the object (-1: no flags) and how the value is read.
_OBJ_UNKNOWN, _OBJ_FIXED, _OBJ_PACKED = 0, 1, 2
# value types: the struct codes of Annex A layouts, plus the three conversions of ObjectLayout
VALUE_TYPES = {"B": 1, "H": 2, "I": 3, "Q": 4, "b": 5, "h": 6, "i": 7, "f": 8, "d": 9}
_VALUE_TIME48, _VALUE_BIT7, _VALUE_DBIT = 10, 11, 12
_CODE_OCTETS = {"B": 1, "H": 2, "I": 4, "Q": 8, "b": 1, "h": 2, "i": 4, "f": 4, "d": 8}
OBJ_KIND = np.zeros(65536, np.int64)
OBJ_SIZE = np.zeros(65536, np.int64)
OBJ_VALUE_AT = np.zeros(65536, np.int64)
OBJ_VALUE_TYPE = np.zeros(65536, np.int64)
OBJ_FLAGS_AT = np.full(65536, -1, np.int64)
for (_g, _v), _layout in OBJECTS.items():
    _key = _g * 256 + _v
    _codes = _layout.struct.format[1:]
    _offsets = np.cumsum([0] + [_CODE_OCTETS[c] for c in _codes]).tolist()
    OBJ_KIND[_key], OBJ_SIZE[_key] = _OBJ_FIXED, _layout.size
    OBJ_VALUE_AT[_key] = _offsets[_layout.value_at]
    OBJ_VALUE_TYPE[_key] = {V_TIME48: _VALUE_TIME48, V_BIT7: _VALUE_BIT7, V_DBIT: _VALUE_DBIT}.get(
        _layout.convert, VALUE_TYPES[_codes[_layout.value_at]])
    if _layout.flags_at >= 0:
        assert _codes[_layout.flags_at] == "B"  # flags / status are one octet in every layout
        OBJ_FLAGS_AT[_key] = _offsets[_layout.flags_at]
for (_g, _v), _bits in PACKED_BITS.items():
    OBJ_KIND[_g * 256 + _v], OBJ_SIZE[_g * 256 + _v] = _OBJ_PACKED, _bits


# --- Data link layer (clause 9.2), compiled ----------------------------------------------------
def _crc_ok(buf, pos, n, table):
    """CRC-16/DNP of ``buf[pos:pos + n]`` equals the two octets after them (clause 9.2.4.1.2)."""
    crc = 0
    for i in range(pos, pos + n):
        crc = (crc >> 8) ^ table[(crc ^ buf[i]) & 0xFF]
    return crc ^ 0xFFFF == buf[pos + n] | (np.int64(buf[pos + n + 1]) << 8)


crc_ok = compiled(_crc_ok)


def _walk_links(buf, head, start, end, stream_first, gap, datagram, table):
    """Cut each stream into link frames as ``Dnp3Parser._scan`` does, chunk by chunk in layout order
    (ChunkColumns with held bytes); a frame belongs to the chunk that completes it.

    Returns per frame: first octet, layout index of its chunk, kind (FRAME_*), where its user data
    (CRCs removed) begins in ``user``; ``user``; per chunk: ``stop`` (where the stream stood after
    it), ``resyncs`` (garbage runs skipped), ``dropped`` (1: a gap dropped held bytes, 2: a datagram
    had bytes left over).
    """
    n = start.shape[0]
    cap = 0
    for k in range(n):
        cap += (end[k] - head[k]) // 2 + 1
    frame_pos = np.empty(cap, np.int64)
    frame_k = np.empty(cap, np.int64)
    frame_kind = np.empty(cap, np.int64)
    user_at = np.empty(cap, np.int64)
    user = np.empty(buf.shape[0], np.uint8)
    stop = np.empty(n, np.int64)
    resyncs = np.zeros(n, np.int64)
    dropped = np.zeros(n, np.int8)
    count = 0
    used = 0
    pos = 0
    for k in range(n):
        if stream_first[k]:
            pos = head[k]
        if gap[k] and pos < start[k]:
            dropped[k] = 1
            pos = start[k]
        if datagram[k]:
            pos = start[k]  # a datagram is read on its own (feed keeps no bytes for UDP)
        e = end[k]
        while e - pos >= 2:
            if buf[pos] != 0x05 or buf[pos + 1] != 0x64:
                # garbage: on to the next 05 64 (clause 9.2.6)
                resyncs[k] += 1
                nxt = pos + 1
                while nxt < e - 1 and not (buf[nxt] == 0x05 and buf[nxt + 1] == 0x64):
                    nxt += 1
                if nxt >= e - 1:
                    pos = e - 1 if buf[e - 1] == 0x05 else e
                    break
                pos = nxt
                continue
            if e - pos < 10:
                break
            kind = FRAME_OK
            user_at[count] = used
            length = np.int64(buf[pos + 2])
            total = 10
            if not crc_ok(buf, pos, 8, table):
                kind = FRAME_BAD_HEADER_CRC
                total = 2  # feed steps over the start octets only
            elif length < 5:
                kind = FRAME_BAD_LENGTH
            else:
                n_user = length - 5
                total = 10 + n_user + 2 * ((n_user + 15) >> 4)
                if e - pos < total:
                    break
                at = pos + 10
                while n_user > 0:
                    size = min(n_user, 16)
                    if not crc_ok(buf, at, size, table):
                        kind = FRAME_BAD_DATA_CRC
                        break
                    user[used:used + size] = buf[at:at + size]
                    used += size
                    at += size + 2
                    n_user -= size
            frame_pos[count] = pos
            frame_k[count] = k
            frame_kind[count] = kind
            count += 1
            pos += total
        if datagram[k] and pos < e:
            dropped[k] = 2
            pos = e
        stop[k] = pos
    return frame_pos[:count], frame_k[:count], frame_kind[:count], user_at[:count], user[:used + 8], stop, \
        resyncs, dropped


walk_links = compiled(_walk_links)


# --- Application layer (clause 4.2.2), compiled ------------------------------------------------
def _unsigned(data, pos, octets):
    """Little-endian unsigned integer of 1, 2 or 4 octets at ``pos``."""
    value = 0
    for i in range(octets):
        value |= np.int64(data[pos + i]) << (8 * i)
    return value


unsigned = compiled(_unsigned)


def _object_value(data, at, value_type, flags):
    """One object's value (Annex A layouts; ``flags`` for the values kept in the flags octet)."""
    if value_type == _VALUE_BIT7:
        return float((flags >> 7) & 1)
    if value_type == _VALUE_DBIT:
        return float((flags >> 6) & 3)
    if value_type == _VALUE_TIME48:
        return float(unsigned(data, at, 4) | (unsigned(data, at + 4, 2) << 32))
    if value_type == 1:
        return float(data[at])
    if value_type == 2:
        return float(unsigned(data, at, 2))
    if value_type == 3:
        return float(unsigned(data, at, 4))
    if value_type == 4:
        return float(data[at:at + 8].view(np.uint64)[0])
    if value_type == 5:
        return float(data[at:at + 1].view(np.int8)[0])
    if value_type == 6:
        return float(data[at:at + 2].view(np.int16)[0])
    if value_type == 7:
        return float(data[at:at + 4].view(np.int32)[0])
    if value_type == 8:
        return float(data[at:at + 4].view(np.float32)[0])
    return float(data[at:at + 8].view(np.float64)[0])


object_value = compiled(_object_value)


def _walk_objects(data, app_at, app_len, function_flags, group_flags, prefix_octets, prefix_kind, range_octets,
                  range_kind, obj_kind, obj_size, obj_value_at, obj_value_type, obj_flags_at):
    """Walk the object headers of each application fragment ``data[app_at:app_at + app_len]`` as
    ``Dnp3Parser._objects`` does (clause 4.2.2.7) and decode the points of the common groups.

    Returns per fragment: ``ok`` (False where the fragment is not one this path reads: too short,
    an unknown function, any header or object ``_objects`` would report, device attributes,
    size-prefixed objects -- the per-PDU code reads those), the first header's group, variation
    and index, the objects counted, the points decoded; and per point: group, variation, index,
    value, flags (-1: none).
    """
    m = app_at.shape[0]
    cap = 0
    for f in range(m):
        cap += 8 * app_len[f]  # a packed object holds at most 8 points per octet, others >= 1 octet
    ok = np.ones(m, np.bool_)
    first_group = np.full(m, -1, np.int64)
    first_variation = np.full(m, -1, np.int64)
    first_index = np.full(m, -1, np.int64)
    total = np.zeros(m, np.int64)
    n_points = np.zeros(m, np.int64)
    p_group = np.empty(cap, np.int64)
    p_variation = np.empty(cap, np.int64)
    p_index = np.empty(cap, np.int64)
    p_value = np.empty(cap, np.float64)
    p_flags = np.empty(cap, np.int64)
    count = 0
    for f in range(m):
        pos = app_at[f]
        end = pos + app_len[f]
        if app_len[f] < 2:
            ok[f] = False
            continue
        fc_flags = function_flags[data[pos + 1]]
        if not fc_flags & _FC_KNOWN:
            ok[f] = False
            continue
        if fc_flags & _FC_RESPONSE:
            if app_len[f] < 4:
                ok[f] = False
                continue
            pos += 4  # AC, FC, IIN1, IIN2
        else:
            pos += 2
        header_only = fc_flags & _FC_HEADER_ONLY
        mark = count
        good = True
        g0, v0, i0, objects = -1, -1, -1, 0
        while pos < end:
            if end - pos < 3:
                good = False
                break
            group, variation, qualifier = np.int64(data[pos]), np.int64(data[pos + 1]), np.int64(data[pos + 2])
            pos += 3
            pkind = prefix_kind[(qualifier >> 4) & 0x07]
            rkind = range_kind[qualifier & 0x0F]
            if qualifier & 0x80 or pkind < 0 or rkind < 0:
                good = False
                break
            psize = prefix_octets[(qualifier >> 4) & 0x07]
            if rkind == _RANGE_NONE:  # qualifier x6: all objects, nothing follows
                if g0 < 0:
                    g0, v0, i0 = group, variation, -1
                continue
            rsize = range_octets[qualifier & 0x0F]
            if end - pos < rsize:
                good = False
                break
            first = 0
            if rkind == _RANGE_STARTSTOP:
                first = unsigned(data, pos, rsize >> 1)
                last = unsigned(data, pos + (rsize >> 1), rsize >> 1)
                if last < first:
                    good = False
                    break
                n = last - first + 1
            else:
                n = unsigned(data, pos, rsize)
            pos += rsize
            objects += n
            if g0 < 0:
                g0, v0, i0 = group, variation, first if pkind != _PREFIX_INDEX and n else -1
                if pkind == _PREFIX_INDEX and n and end - pos >= psize:
                    i0 = unsigned(data, pos, psize)
            if (header_only or variation == 0 or group_flags[group] & _GROUP_NO_DATA) and pkind != _PREFIX_SIZE:
                skip = n * psize if pkind == _PREFIX_INDEX else 0
                if end - pos < skip:
                    good = False
                    break
                pos += skip
                continue
            key = group * 256 + variation
            kind = obj_kind[key]
            if pkind == _PREFIX_SIZE or group == 0:
                good = False  # size-prefixed objects, device attributes: the per-PDU code
                break
            if kind == _OBJ_PACKED:
                bits = obj_size[key]
                nbytes = (n * bits + 7) >> 3
                if pkind == _PREFIX_INDEX or end - pos < nbytes:
                    good = False
                    break
                mask = (1 << bits) - 1
                for i in range(n):
                    bit = i * bits
                    p_group[count], p_variation[count], p_index[count] = group, variation, first + i
                    p_value[count] = float((np.int64(data[pos + (bit >> 3)]) >> (bit & 7)) & mask)
                    p_flags[count] = -1
                    count += 1
                pos += nbytes
            elif group_flags[group] & _GROUP_LENGTH_IS_VARIATION:
                need = n * (psize + variation)
                if end - pos < need:
                    good = False
                    break
                pos += need
            elif kind == _OBJ_FIXED:
                size = psize + obj_size[key]
                if (end - pos) // size < n:
                    good = False
                    break
                value_at, value_type, flags_at = obj_value_at[key], obj_value_type[key], obj_flags_at[key]
                for i in range(n):
                    at = pos + psize
                    flags = np.int64(data[at + flags_at]) if flags_at >= 0 else -1
                    p_group[count], p_variation[count] = group, variation
                    p_index[count] = unsigned(data, pos, psize) if psize else first + i
                    p_value[count] = object_value(data, at + value_at, value_type, flags)
                    p_flags[count] = flags
                    count += 1
                    pos += size
            else:
                good = False
                break
        if not good:
            ok[f] = False
            count = mark
            continue
        first_group[f], first_variation[f], first_index[f], total[f] = g0, v0, i0, objects
        n_points[f] = count - mark
    return (ok, first_group, first_variation, first_index, total, n_points, p_group[:count], p_variation[:count],
            p_index[:count], p_value[:count], p_flags[:count])


walk_objects = compiled(_walk_objects)


class _HeldBytes:
    """The partial frames the streams hold (``_Stream.buf``), as the mapping ChunkColumns takes
    them out of: ``pop`` hands over a stream's bytes and empties its buffer."""

    def __init__(self, streams: dict):
        self.streams = streams

    def __bool__(self) -> bool:
        return True

    def pop(self, key, default=None):
        st = self.streams.get(key)
        if st is None or not st.buf:
            return default
        held, st.buf = st.buf, b""
        return held


def feed_batch(parser, chunks: list, out: EventBuilder, tags=None) -> None:
    """Parse ``chunks`` (in order) into ``out``; ``tags`` are the chunks' order tags (or None)."""
    from .dnp3 import INT32_MAX, _Stream

    if not chunks:
        return
    streams = parser._streams
    cols = ChunkColumns(chunks, tags, held=_HeldBytes(streams))
    lay = cols.layout
    n_chunks = len(chunks)
    gap = np.fromiter(map(attrgetter("gap"), chunks), dtype=bool, count=n_chunks)
    datagram = np.fromiter(map(attrgetter("datagram"), chunks), dtype=bool, count=n_chunks)
    frame_pos, frame_k, frame_kind, user_at, user, stop_k, resyncs, dropped_k = walk_links(
        cols.buf, cols.head[lay], cols.start[lay], cols.end[lay], cols.stream_first, gap[lay], datagram[lay],
        _CRC_TABLE)
    for flag, reason in ((1, REASON_GAP), (2, REASON_TRUNCATED)):
        n_dropped = int(np.count_nonzero(dropped_k == flag))
        if n_dropped:
            out.count_error(PROTO_DNP3, reason, n_dropped)
    n_resync = int(resyncs.sum())
    if n_resync:
        out.count_error(PROTO_DNP3, REASON_RESYNC, n_resync)
    # Streams: index per layout position, their state objects (created as feed creates them),
    # and the partial frame each keeps for the next batch.
    stream_of_k = np.cumsum(cols.stream_first) - 1
    stream_state = []
    last_k = np.r_[np.flatnonzero(cols.stream_first)[1:] - 1, n_chunks - 1]
    for k in last_k.tolist():
        chunk = chunks[lay[k]]
        key = (chunk.flow, chunk.direction)
        st = streams.get(key)
        if st is None:
            st = streams[key] = _Stream()
        stream_state.append(st)
        if stop_k[k] < cols.end[lay[k]]:
            st.buf = cols.raw[stop_k[k]: cols.end[lay[k]]]
    # Frames in chunk order (stable: a chunk's frames stay in stream order).
    frame_chunk = lay[frame_k]
    order = np.argsort(frame_chunk, kind="stable")
    frame_chunk, frame_pos, frame_kind, user_at = frame_chunk[order], frame_pos[order], frame_kind[order], user_at[order]
    frame_stream = stream_of_k[frame_k[order]]
    _Frames(parser, out, cols, chunks, stream_state, gap, stream_of_k, frame_chunk, frame_pos, frame_kind, frame_stream,
            user_at, user, INT32_MAX).emit()


class _Frames:
    """The link frames of one batch, in chunk order, as columns; ``emit()`` writes their rows."""

    def __init__(self, parser, out, cols, chunks, stream_state, gap, stream_of_k, chunk, pos, kind, stream, user_at,
                 user, int32_max):
        self.parser, self.out, self.cols, self.chunks = parser, out, cols, chunks
        self.stream_state, self.gap, self.stream_of_k = stream_state, gap, stream_of_k
        self.chunk, self.pos, self.kind, self.stream, self.user_at, self.user = chunk, pos, kind, stream, user_at, user
        self.int32_max = int32_max
        buf = cols.buf
        self.length = buf[pos + 2].astype(np.int64)
        self.ctrl = buf[pos + 3].astype(np.int64)
        self.dst = buf[pos + 4] | (buf[pos + 5].astype(np.int64) << 8)
        self.src = buf[pos + 6] | (buf[pos + 7].astype(np.int64) << 8)
        n_user = np.maximum(self.length - 5, 0)
        self.n_user = n_user
        self.total = 10 + n_user + 2 * ((n_user + 15) >> 4)
        func = self.ctrl & 0x0F
        good = kind == FRAME_OK
        # user data for the transport layer: PRM=1, CONFIRMED/UNCONFIRMED_USER_DATA, not empty (9.2.4.1.3)
        self.user_frame = good & ((self.ctrl & 0x40) != 0) & ((func == 3) | (func == 4)) & (n_user > 0)
        self.link_only = good & ~self.user_frame
        th = user[np.where(self.user_frame, user_at, 0)]
        whole = self.user_frame & ((th & 0xC0) == 0xC0)  # FIR and FIN: a one-segment fragment
        # A stream reassembling a fragment (at the start of the batch, or from its first segment
        # that is not FIR+FIN on) has all its later user-data frames read by the per-frame code.
        segment = np.flatnonzero(self.user_frame & ~whole)
        first_segment = np.full(len(stream_state), pos.shape[0], np.int64)
        np.minimum.at(first_segment, stream[segment], segment)
        for s, st in enumerate(stream_state):
            if st.fragments:
                first_segment[s] = 0
        candidates = np.flatnonzero(whole & (np.arange(pos.shape[0]) < first_segment[stream]))
        app_ok = walk_objects(user, user_at[candidates] + 1, n_user[candidates] - 1, FUNCTION_FLAGS, GROUP_FLAGS,
                              PREFIX_OCTETS, PREFIX_KIND, RANGE_OCTETS, RANGE_KIND, OBJ_KIND, OBJ_SIZE, OBJ_VALUE_AT,
                              OBJ_VALUE_TYPE, OBJ_FLAGS_AT)
        ok = app_ok[0]
        self.app = candidates[ok]
        self.app_walk = [a[ok] for a in app_ok[1:6]] + list(app_ok[6:])
        self.fast = self.link_only.copy()
        self.fast[self.app] = True

    def emit(self) -> None:
        fast_cols, fast_key, fast_chunk = self._fast_rows()
        side_cols, side_key, side_chunk = self._slow_rows()
        out, cols = self.out, self.cols
        if side_cols is None:
            if fast_cols is None:
                return
            columns, chunk_of_row = fast_cols, fast_chunk
        else:
            if fast_cols is None:
                columns, key, chunk_of_row = side_cols, side_key, side_chunk
            else:
                key = np.concatenate([fast_key, side_key])
                order = np.argsort(key, kind="stable")
                columns = {name: np.concatenate([fast_cols[name], side_cols[name]])[order] for name in fast_cols}
                chunk_of_row = np.concatenate([fast_chunk, side_chunk])[order]
            is_pdu = columns["kind"] == KIND_PDU
            columns["pdu_id"] = out.next_pdu_id + np.cumsum(is_pdu) - 1  # points follow their PDU
        n_pdus = int(np.count_nonzero(columns["kind"] == KIND_PDU))
        out.next_pdu_id += n_pdus
        out.add_columns(columns, None if cols.tags is None else cols.tags[chunk_of_row])

    def _fast_rows(self):
        """PDU and point rows of the frames read as arrays; each row's order key and chunk."""
        fast = np.flatnonzero(self.fast)
        if not fast.size:
            return None, None, None
        out = self.out
        ctrl, dst, src = self.ctrl[fast], self.dst[fast], self.src[fast]
        link_only = self.link_only[fast]
        # Link-only frames (tables 9-1, 9-2): DIR=1 from the master; function 1000/1100 + code.
        to_outstation = (ctrl & 0x80) != 0
        prm = (ctrl & 0x40) != 0
        func = ctrl & 0x0F
        known = np.where(prm, np.isin(func, list(LINK_PRIMARY_NAMES)), np.isin(func, list(LINK_SECONDARY_NAMES)))
        unknown = link_only & ~known
        n_unknown = int(np.count_nonzero(unknown))
        if n_unknown:
            out.count_error(PROTO_DNP3, REASON_UNKNOWN_FUNCTION, n_unknown)
        function = np.where(prm, LINK_PRIMARY_BASE, LINK_SECONDARY_BASE) + func
        direction = np.where(to_outstation, DIR_REQUEST, DIR_RESPONSE)
        unit = np.where(to_outstation, dst, src)
        peer = np.where(to_outstation, src, dst)
        sub = ctrl.copy()
        seq = np.full(fast.size, -1, np.int64)
        address = np.full(fast.size, -1, np.int64)
        count = np.zeros(fast.size, np.int64)
        group = np.full(fast.size, -1, np.int64)
        variation = np.full(fast.size, -1, np.int64)
        quality = np.full(fast.size, -1, np.int64)
        length = self.total[fast].copy()
        n_points = np.zeros(fast.size, np.int64)
        # Application fragments (clause 4.2.2): AC (FIR FIN CON UNS SEQ), FC, IIN on responses.
        at = np.searchsorted(fast, self.app)
        first_group, first_variation, first_index, total, app_points = self.app_walk[:5]
        p_group, p_variation, p_index, p_value, p_flags = self.app_walk[5:]
        user, frag = self.user, self.user_at[self.app] + 1
        ac, fc = user[frag].astype(np.int64), user[frag + 1].astype(np.int64)
        response = (FUNCTION_FLAGS[fc] & _FC_RESPONSE) != 0
        function[at] = fc
        sub[at] = ac >> 4
        seq[at] = ac & 0x0F
        direction[at] = np.where(response, DIR_RESPONSE, DIR_REQUEST)
        unit[at] = np.where(response, src[at], dst[at])
        peer[at] = np.where(response, dst[at], src[at])
        address[at], count[at] = first_index, np.minimum(total, self.int32_max)
        group[at], variation[at] = first_group, first_variation
        quality[at] = np.where(response, (user[frag + 2].astype(np.int64) << 8) | user[frag + 3], -1)
        length[at] = self.n_user[self.app] - 1
        n_points[at] = app_points
        is_write = np.zeros(fast.size, bool)
        is_control = np.zeros(fast.size, bool)
        is_write[at], is_control[at] = IS_WRITE[fc], IS_CONTROL[fc]
        owner = np.repeat(np.arange(fast.size), n_points)
        chunk = self.chunk[fast]
        columns, row_owner = rows(
            self.cols, chunk, PROTO_DNP3, out.next_pdu_id,
            {"direction": direction, "function": function, "subfunction": sub, "unit": unit, "peer_unit": peer,
             "seq": seq, "address": address, "count": count, "object": group, "variation": variation,
             "quality": quality, "length": length, "is_write": is_write, "is_control": is_control,
             "status": np.where(unknown, STATUS_UNKNOWN, STATUS_OK),
             "reason": np.where(unknown, REASON_UNKNOWN_FUNCTION, REASON_NONE)},
            n_points,
            {"object": p_group, "variation": p_variation, "address": p_index, "value": p_value, "quality": p_flags,
             "is_write": is_write[owner], "is_control": is_control[owner]})
        return columns, 2 * fast[row_owner] + 1, chunk[row_owner]

    def _slow_rows(self):
        """Rows of every other frame (and the gap of a chunk), through the parser's per-frame code
        in order into a side builder; each row's order key and chunk."""
        slow = np.flatnonzero(~self.fast)
        gaps = np.flatnonzero(self.gap)
        if not slow.size and not gaps.size:
            return None, None, None
        parser, chunks, cols = self.parser, self.chunks, self.cols
        side = EventBuilder()
        # order key: frame i -> 2i + 1; the gap of chunk c -> before its first frame
        first_frame = np.searchsorted(self.chunk, gaps)
        items = sorted([(2 * int(i) + 1, int(i), -1) for i in slow]
                       + [(2 * int(f), -1, int(c)) for f, c in zip(first_frame, gaps)])
        keys, row_chunks, n_rows = [], [], []
        user = self.user
        position = np.empty(len(chunks), np.int64)  # layout position of each chunk
        position[cols.layout] = np.arange(len(chunks))
        stream_state, stream_of_k = self.stream_state, self.stream_of_k
        for key, i, c in items:
            before = len(side)
            if i < 0:  # a gap: the fragments being reassembled are dropped (feed does this first)
                st = stream_state[stream_of_k[position[c]]]
                if st.fragments:
                    side.count_error(PROTO_DNP3, REASON_GAP, len(st.fragments))
                    st.fragments.clear()
                continue
            c = int(self.chunk[i])
            chunk = chunks[c]
            kind = self.kind[i]
            ctrl, dst, src = int(self.ctrl[i]), int(self.dst[i]), int(self.src[i])
            if kind == FRAME_BAD_HEADER_CRC:
                parser._link_error(chunk, side, ctrl, dst, src, 10, REASON_BAD_CRC, known=False)
            elif kind == FRAME_BAD_LENGTH:
                parser._link_error(chunk, side, ctrl, dst, src, 10, REASON_BAD_LENGTH)
            elif kind == FRAME_BAD_DATA_CRC:
                parser._link_error(chunk, side, ctrl, dst, src, int(self.total[i]), REASON_BAD_CRC)
            else:
                a = int(self.user_at[i])
                parser._link_frame(ctrl, dst, src, user[a:a + int(self.n_user[i])].tobytes(), int(self.total[i]),
                                   chunk, stream_state[int(self.stream[i])], side)
            added = len(side) - before
            if added:
                keys.append(key)
                row_chunks.append(c)
                n_rows.append(added)
        for (protocol, reason), n in side.errors.items():
            self.out.count_error(protocol, reason, n)
        if not keys:
            return None, None, None
        batch = side.build()
        columns = {name: batch[name] for name in COLUMNS}
        n_rows = np.array(n_rows, np.int64)
        return columns, np.repeat(np.array(keys, np.int64), n_rows), np.repeat(np.array(row_chunks, np.int64), n_rows)
