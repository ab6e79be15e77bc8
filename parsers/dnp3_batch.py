"""DNP3 batch path: :meth:`parsers.dnp3.Dnp3Parser.feed_batch`.

Same rows as feeding the chunks one by one (``Dnp3Parser.feed``), read with two compiled walks and
NumPy instead of Python per frame:

1. The chunk bytes are laid out stream by stream after the bytes each stream held from before
   (``ChunkColumns``).  ``walk_links`` cuts every stream into link frames exactly as
   ``Dnp3Parser._scan`` does -- resynchronisation on ``05 64`` (clause 9.2.6), the header CRC, LEN,
   the CRC of every 16-octet data block (clause 9.2.4.2) -- and copies the user data of each frame,
   CRCs removed, into one array.  A frame split over chunks belongs to the chunk that completes it.
2. The frames that make up nearly all traffic are read as arrays (``walk_frames``): link-only
   frames (table 9-1/9-2) and one-segment application fragments (transport FIR and FIN, clause
   8.2.1) whose addresses have no fragment open.  The walk follows each stream's transport state
   (one open fragment, its SEQ and size, as ``_transport`` keeps them) through the segments the
   per-frame code reads, so a multi-frame fragment does not hold up the frames after it.
   ``walk_objects`` walks the object headers of those fragments (clause 4.2.2.7) and decodes their
   points; the PDU and point rows are written with ``parsers.batch.rows``.
3. Every other frame -- a bad CRC or LEN, a segment of a multi-frame fragment, a fragment whose
   objects are malformed, device attributes (group 0), size-prefixed objects; every user-data frame
   of a stream whose transport state is beyond the walk's tracking (two fragments open at once, one
   refused as too large) until a gap clears it -- goes through the parser's own per-frame code, in
   order, into a side builder: ``Dnp3Parser._link_frame`` with the user data walk_links checked,
   ``Dnp3Parser._frame`` (the step ``_scan`` takes per frame) for a bad CRC or LEN.  The frames read as arrays change no
   state, so the per-frame code sees exactly the state ``feed`` would; the two sets of rows are then
   merged back into frame order and the PDU ids renumbered.

The partial-frame tails (``_Stream.buf``) and the transport fragments are the same objects ``feed``
uses, so both paths can be mixed freely.

>>> from parsers.base import Chunk
>>> from parsers.crc import crc16_dnp
>>> from parsers.dnp3 import Dnp3Parser
>>> def frame(user):
...     h = bytes([0x05, 0x64, 5 + len(user), 0xC4, 10, 0, 1, 0])
...     return h + crc16_dnp(h).to_bytes(2, "little") + user + crc16_dnp(user).to_bytes(2, "little")
>>> read = frame(bytes([0xC0, 0xC1, 0x01, 0x3C, 0x02, 0x06]))  # READ g60v2 (class 1), one segment
>>> out = EventBuilder()
>>> Dnp3Parser().feed_batch([Chunk(read[:9], frame=1), Chunk(read[9:], frame=2)], out)
>>> b = out.build()
>>> b.function.tolist(), b.object.tolist(), b.variation.tolist(), b.frame.tolist()
([1], [60], [2], [2])
"""

from __future__ import annotations

import numpy as np

from .batch import ChunkColumns, compiled, count_dropped, rows
from .crc import TABLE8
from .dnp3_objects import (
    CONTROL_FUNCTIONS, FUNCTION_NAMES, HEADER_ONLY_FUNCTIONS, LENGTH_IS_VARIATION, LINK_PRIMARY_BASE,
    LINK_PRIMARY_NAMES, LINK_SECONDARY_BASE, LINK_SECONDARY_NAMES, NO_DATA_GROUPS, OBJECTS, PACKED_BITS,
    PREFIXES, RANGE_FIELDS, RESPONSE_FUNCTIONS, V_BIT7, V_DBIT, V_TIME48, WRITE_FUNCTIONS,
)
from .events import (
    COLUMNS, DIR_REQUEST, DIR_RESPONSE, KIND_PDU, PROTO_DNP3, REASON_GAP, REASON_NONE, REASON_RESYNC,
    REASON_UNKNOWN_FUNCTION, STATUS_OK, STATUS_UNKNOWN, EventBuilder,
)

_CRC_TABLE = np.array(TABLE8, dtype=np.int64)

# Frame kinds found by walk_links (what Dnp3Parser._scan does with each).
FRAME_OK, FRAME_BAD_HEADER_CRC, FRAME_BAD_LENGTH, FRAME_BAD_DATA_CRC = 0, 1, 2, 3

# --- Tables the compiled walks index (built from parsers.dnp3_objects) ------------------------
# Qualifier (clause 4.2.2.7.3): rows of QUALIFIERS, indexed by the prefix code (table 4-5: octets,
# kind) and by the range specifier code (table 4-6: octets of the whole range field, kind).
_Q_PREFIX_OCTETS, _Q_PREFIX_KIND, _Q_RANGE_OCTETS, _Q_RANGE_KIND = range(4)
_PREFIX_NONE, _PREFIX_INDEX, _PREFIX_SIZE = 0, 1, 2
_RANGE_STARTSTOP, _RANGE_COUNT, _RANGE_NONE = 0, 1, 2
QUALIFIERS = np.full((4, 16), -1, np.int64)  # kind -1: reserved code
for _code, (_octets, _kind) in PREFIXES.items():
    QUALIFIERS[_Q_PREFIX_OCTETS, _code] = _octets
    QUALIFIERS[_Q_PREFIX_KIND, _code] = {None: _PREFIX_NONE, "index": _PREFIX_INDEX, "size": _PREFIX_SIZE}[_kind]
for _code, (_struct, _kind) in RANGE_FIELDS.items():
    QUALIFIERS[_Q_RANGE_OCTETS, _code] = 0 if _struct is None else _struct.size
    QUALIFIERS[_Q_RANGE_KIND, _code] = {"startstop": _RANGE_STARTSTOP, "count": _RANGE_COUNT, "none": _RANGE_NONE}[_kind]
# Function codes: row 0 application FC flags (clause 4.2.2.5), rows 1-2 is_write / is_control,
# rows 3-4 the link functions named with PRM=0 / PRM=1 (tables 9-1, 9-2).
_F_FLAGS, _F_WRITE, _F_CONTROL, _F_LINK_SECONDARY, _F_LINK_PRIMARY = range(5)
_FC_KNOWN, _FC_RESPONSE, _FC_HEADER_ONLY = 1, 2, 4
FUNCTIONS = np.zeros((5, 256), np.int64)
for _fc in range(256):
    FUNCTIONS[_F_FLAGS, _fc] = ((_fc in FUNCTION_NAMES) * _FC_KNOWN | (_fc in RESPONSE_FUNCTIONS) * _FC_RESPONSE
                                | (_fc in HEADER_ONLY_FUNCTIONS) * _FC_HEADER_ONLY)
FUNCTIONS[_F_WRITE, list(WRITE_FUNCTIONS)] = 1
FUNCTIONS[_F_CONTROL, list(CONTROL_FUNCTIONS)] = 1
FUNCTIONS[_F_LINK_SECONDARY, list(LINK_SECONDARY_NAMES)] = 1
FUNCTIONS[_F_LINK_PRIMARY, list(LINK_PRIMARY_NAMES)] = 1
# Groups: no object data (A.29 class data), or variation = object length (A.34-A.37).
_GROUP_NO_DATA, _GROUP_LENGTH_IS_VARIATION = 1, 2
GROUPS = np.zeros(256, np.int64)
GROUPS[list(NO_DATA_GROUPS)] |= _GROUP_NO_DATA
GROUPS[list(LENGTH_IS_VARIATION)] |= _GROUP_LENGTH_IS_VARIATION
# Objects, column group * 256 + variation (Annex A): kind (unknown / fixed size / packed bits),
# octets per object (fixed) or bits per point (packed), where the value and the flags octet sit
# in the object (-1: no flags) and how the value is read.
_O_KIND, _O_SIZE, _O_VALUE_AT, _O_VALUE_TYPE, _O_FLAGS_AT = range(5)
_OBJ_UNKNOWN, _OBJ_FIXED, _OBJ_PACKED = 0, 1, 2
#: value types: the struct codes of the Annex A layouts, then the conversions of ObjectLayout
VALUE_TYPES = {"B": 1, "H": 2, "I": 3, "Q": 4, "b": 5, "h": 6, "i": 7, "f": 8, "d": 9}
_VALUE_TIME48, _VALUE_BIT7, _VALUE_DBIT = 10, 11, 12
_CODE_OCTETS = {"B": 1, "H": 2, "I": 4, "Q": 8, "b": 1, "h": 2, "i": 4, "f": 4, "d": 8}
OBJECT_TABLE = np.zeros((5, 65536), np.int64)
OBJECT_TABLE[_O_FLAGS_AT] = -1
for (_g, _v), _layout in OBJECTS.items():
    _codes = _layout.struct.format[1:]
    _offsets = np.cumsum([0] + [_CODE_OCTETS[c] for c in _codes]).tolist()
    _column = OBJECT_TABLE[:, _g * 256 + _v]
    _column[_O_KIND], _column[_O_SIZE], _column[_O_VALUE_AT] = _OBJ_FIXED, _layout.size, _offsets[_layout.value_at]
    _column[_O_VALUE_TYPE] = {V_TIME48: _VALUE_TIME48, V_BIT7: _VALUE_BIT7, V_DBIT: _VALUE_DBIT}.get(
        _layout.convert, VALUE_TYPES[_codes[_layout.value_at]])
    if _layout.flags_at >= 0:
        assert _codes[_layout.flags_at] == "B"  # flags / status are one octet in every layout
        _column[_O_FLAGS_AT] = _offsets[_layout.flags_at]
for (_g, _v), _bits in PACKED_BITS.items():
    OBJECT_TABLE[_O_KIND, _g * 256 + _v], OBJECT_TABLE[_O_SIZE, _g * 256 + _v] = _OBJ_PACKED, _bits


# --- Data link layer (clause 9.2), compiled ----------------------------------------------------
def _crc_ok(buf, pos, n, table):
    """CRC-16/DNP of ``buf[pos:pos + n]`` equals the two octets after them (clause 9.2.4.1.2).

    >>> from parsers.crc import crc16_dnp
    >>> header = bytes.fromhex("056405c001000a00")
    >>> framed = np.frombuffer(header + crc16_dnp(header).to_bytes(2, "little"), np.uint8)
    >>> bool(crc_ok(framed, 0, 8, _CRC_TABLE)), bool(crc_ok(framed, 0, 7, _CRC_TABLE))
    (True, False)
    """
    crc = 0
    for i in range(pos, pos + n):
        crc = (crc >> 8) ^ table[(crc ^ np.int64(buf[i])) & 0xFF]
    return crc ^ 0xFFFF == buf[pos + n] | (np.int64(buf[pos + n + 1]) << 8)


crc_ok = compiled(_crc_ok)


def _walk_links(buf, head, start, end, stream_first, gap, datagram, table):
    """Cut each stream into link frames as ``Dnp3Parser._scan`` does, chunk by chunk in layout order
    (ChunkColumns with held bytes); a frame belongs to the chunk that completes it.

    Returns per frame: first octet, layout index of its chunk, kind (FRAME_*), where its user data
    (CRCs removed) begins in ``user``; ``user``; per chunk: ``stop`` (where the stream stood after
    it), ``resyncs`` (garbage runs skipped), ``dropped`` (1: a gap dropped held bytes, 2: a datagram
    had bytes left over).  A datagram is read on its own, as ``feed`` reads it; a stream is taken to
    be all datagrams (UDP) or none (TCP), so no held bytes ever precede one.
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


def _walk_objects(data, pos, end, header_only, groups, objects, qualifiers, point, value, count, is_write,
                  is_control):
    """Walk the object headers of one application fragment, ``data[pos:end]`` after its AC, FC
    (and IIN), as ``Dnp3Parser._objects`` does (clause 4.2.2.7), decoding the points of the common
    groups into ``point`` (rows: group, variation, index, flags, is_write, is_control) and ``value``
    from column ``count`` on.

    Returns (ok, first header's group, variation and index, objects counted, the new point count).
    ``ok`` is False where the fragment is not one this path reads: any header or object that
    ``_objects`` would report, device attributes (group 0), size-prefixed objects.
    """
    g0, v0, i0, objects_counted = -1, -1, -1, 0
    while pos < end:
        if end - pos < 3:
            return False, g0, v0, i0, objects_counted, count
        group, variation, qualifier = np.int64(data[pos]), np.int64(data[pos + 1]), np.int64(data[pos + 2])
        pos += 3
        prefix_code, range_code = (qualifier >> 4) & 0x07, qualifier & 0x0F
        pkind, rkind = qualifiers[_Q_PREFIX_KIND, prefix_code], qualifiers[_Q_RANGE_KIND, range_code]
        if qualifier & 0x80 or pkind < 0 or rkind < 0:
            return False, g0, v0, i0, objects_counted, count
        psize = qualifiers[_Q_PREFIX_OCTETS, prefix_code]
        if rkind == _RANGE_NONE:  # qualifier x6: all objects, nothing follows
            if g0 < 0:
                g0, v0, i0 = group, variation, -1
            continue
        rsize = qualifiers[_Q_RANGE_OCTETS, range_code]
        if end - pos < rsize:
            return False, g0, v0, i0, objects_counted, count
        first = 0
        if rkind == _RANGE_STARTSTOP:
            first = unsigned(data, pos, rsize >> 1)
            last = unsigned(data, pos + (rsize >> 1), rsize >> 1)
            if last < first:
                return False, g0, v0, i0, objects_counted, count
            n = last - first + 1
        else:
            n = unsigned(data, pos, rsize)
        pos += rsize
        objects_counted += n
        if g0 < 0:
            g0, v0, i0 = group, variation, first if pkind != _PREFIX_INDEX and n else -1
            if pkind == _PREFIX_INDEX and n and end - pos >= psize:
                i0 = unsigned(data, pos, psize)
        if (header_only or variation == 0 or groups[group] & _GROUP_NO_DATA) and pkind != _PREFIX_SIZE:
            skip = n * psize if pkind == _PREFIX_INDEX else 0  # only indices follow
            if end - pos < skip:
                return False, g0, v0, i0, objects_counted, count
            pos += skip
            continue
        key = group * 256 + variation
        kind = objects[_O_KIND, key]
        if pkind == _PREFIX_SIZE or group == 0:
            return False, g0, v0, i0, objects_counted, count
        if kind == _OBJ_PACKED:
            bits = objects[_O_SIZE, key]
            nbytes = (n * bits + 7) >> 3
            if pkind == _PREFIX_INDEX or end - pos < nbytes:
                return False, g0, v0, i0, objects_counted, count
            mask = (1 << bits) - 1
            for i in range(n):
                bit = i * bits
                point[0, count], point[1, count], point[2, count], point[3, count] = group, variation, first + i, -1
                point[4, count], point[5, count] = is_write, is_control
                value[count] = float((np.int64(data[pos + (bit >> 3)]) >> (bit & 7)) & mask)
                count += 1
            pos += nbytes
        elif groups[group] & _GROUP_LENGTH_IS_VARIATION:
            need = n * (psize + variation)
            if end - pos < need:
                return False, g0, v0, i0, objects_counted, count
            pos += need
        elif kind == _OBJ_FIXED:
            size = psize + objects[_O_SIZE, key]
            if (end - pos) // size < n:
                return False, g0, v0, i0, objects_counted, count
            value_at, value_type, flags_at = objects[_O_VALUE_AT, key], objects[_O_VALUE_TYPE, key], objects[_O_FLAGS_AT, key]
            for i in range(n):
                at = pos + psize
                flags = np.int64(data[at + flags_at]) if flags_at >= 0 else -1
                point[0, count], point[1, count] = group, variation
                point[2, count] = unsigned(data, pos, psize) if psize else first + i
                point[3, count], point[4, count], point[5, count] = flags, is_write, is_control
                value[count] = object_value(data, at + value_at, value_type, flags)
                count += 1
                pos += size
        else:  # unknown object size: nothing tells where the next header starts
            return False, g0, v0, i0, objects_counted, count
    return True, g0, v0, i0, objects_counted, count


walk_objects = compiled(_walk_objects)

# Columns of the PDU rows walk_frames writes (rows of its ``fields`` output).
(F_FRAME, F_DIRECTION, F_FUNCTION, F_SUB, F_UNIT, F_PEER, F_SEQ, F_ADDRESS, F_COUNT, F_OBJECT, F_VARIATION,
 F_QUALITY, F_LENGTH, F_WRITE, F_CONTROL, F_STATUS, F_REASON, F_POINTS) = range(18)
#: event columns filled from those rows
PDU_FIELDS = {"direction": F_DIRECTION, "function": F_FUNCTION, "subfunction": F_SUB, "unit": F_UNIT,
              "peer_unit": F_PEER, "seq": F_SEQ, "address": F_ADDRESS, "count": F_COUNT, "object": F_OBJECT,
              "variation": F_VARIATION, "quality": F_QUALITY, "length": F_LENGTH, "is_write": F_WRITE,
              "is_control": F_CONTROL, "status": F_STATUS, "reason": F_REASON}
POINT_FIELDS = {"object": 0, "variation": 1, "address": 2, "quality": 3, "is_write": 4, "is_control": 5}


def _grown(point, value, cap, used):
    """The point arrays with room for ``cap`` points, the first ``used`` kept."""
    more_point = np.empty((point.shape[0], cap), point.dtype)
    more_point[:, :used] = point[:, :used]
    more_value = np.empty(cap, value.dtype)
    more_value[:used] = value[:used]
    return more_point, more_value


grown = compiled(_grown)


# What walk_frames knows of a stream's transport state (rows of ``transport``, one column a stream):
# the (source, destination) of its one open fragment (-1: none), the SEQ expected next, the octets
# so far, and whether the state is beyond this tracking (more than one fragment open, one refused
# as too large): then every user-data frame of the stream goes to the per-frame code.
T_OPEN, T_SEQ, T_SIZE, T_UNTRACKED = range(4)


def _one_segment(th, key, n_data, transport, s, max_fragment):
    """Whether a transport segment (header ``th``, ``n_data`` octets after it, link (source,
    destination) ``key``) of stream ``s`` is a whole fragment that ``Dnp3Parser._transport`` would
    hand to the application layer without touching its state (clause 8.2.1: FIR and FIN, no
    fragment of ``key`` open).  Otherwise follow what ``_transport`` does to the stream's fragments
    and return False: the per-frame code reads that segment.
    """
    if transport[T_UNTRACKED, s]:
        return False
    open_key = transport[T_OPEN, s]
    seq = th & 0x3F
    if th & 0x40:  # FIR: a fragment of the same addresses still open is abandoned
        if th & 0x80:
            if open_key != key:
                return True
            transport[T_OPEN, s] = -1
        elif open_key >= 0 and open_key != key:
            transport[T_UNTRACKED, s] = 1  # a second fragment open at once
        else:
            transport[T_OPEN, s], transport[T_SEQ, s], transport[T_SIZE, s] = key, (seq + 1) & 0x3F, n_data
        return False
    if open_key != key:
        return False  # no FIR seen: counted, nothing kept
    expected = transport[T_SEQ, s]
    if seq != expected:
        if seq != (expected - 1) & 0x3F:  # a repeat is ignored, a gap drops the fragment
            transport[T_OPEN, s] = -1
    elif transport[T_SIZE, s] + n_data > max_fragment:
        transport[T_UNTRACKED, s] = 1  # refused: its later segments are counted by _transport
    elif th & 0x80:
        transport[T_OPEN, s] = -1
    else:
        transport[T_SEQ, s], transport[T_SIZE, s] = (seq + 1) & 0x3F, transport[T_SIZE, s] + n_data
    return False


one_segment = compiled(_one_segment)


def _abort(s, assembling, pend_head, pend_next, slow, n_slow):
    """Stop assembling stream ``s``'s fragment: its segments so far go to the per-frame code
    (which then keeps the fragment open exactly as ``feed`` would).  Returns the new n_slow."""
    if assembling[s] >= 0:
        j = pend_head[s]
        while j >= 0:
            slow[n_slow] = j
            n_slow += 1
            j = pend_next[j]
        assembling[s] = -1
        pend_head[s] = -1
    return n_slow


abort = compiled(_abort)


def _walk_frames(buf, user, frame_pos, frame_kind, user_at, frame_stream, frame_gaps, transport, stream_gaps,
                 max_fragment, functions, groups, objects, qualifiers, int32_max):
    """Read the frames found by walk_links (in chunk order) as ``Dnp3Parser._link_frame`` would,
    where that needs no state: link-only frames (clause 9.2.4.1.3), one-segment fragments
    (transport FIR and FIN, clause 8.2.1, see one_segment) and fragments of several segments that
    open and close within the batch (FIR, then each SEQ in turn, FIN; nothing else of the stream's
    read by the per-frame code in between), whose application header and objects (clause 4.2.2)
    are all well formed.  ``transport`` is what is known of each stream's transport state (T_*
    rows), followed frame by frame; ``frame_gaps`` counts the gaps of the frame's stream up to its
    chunk, ``stream_gaps`` those seen so far (a gap drops all fragments).

    Returns the PDU rows of those frames (``fields``, one column per row, row F_FRAME is the frame
    -- for a fragment of several segments the one with FIN), how many, the other frames (for the
    per-frame code, not in order), how many, the points (``point`` rows as in walk_objects,
    ``value``), how many, and the link-only frames with an unknown function.
    """
    n = frame_pos.shape[0]
    n_streams = transport.shape[1]
    fields = np.empty((18, n), np.int64)
    slow = np.empty(n, np.int64)
    cap = 2 * n + 64  # grown as needed: at most 8 points an octet (packed objects), others >= 1 octet
    point = np.empty((6, cap), np.int64)
    value = np.empty(cap, np.float64)
    # fragments being assembled: per stream the (source, destination) key (-1: none), where its
    # octets start in ``asm`` and the chain of its segments so far (pend_head, pend_next)
    asm = np.empty(user.shape[0] + 16, np.uint8)
    asm_used = 0
    assembling = np.full(n_streams, -1, np.int64)
    asm_start = np.zeros(n_streams, np.int64)
    pend_head = np.full(n_streams, -1, np.int64)
    pend_tail = np.full(n_streams, -1, np.int64)
    pend_next = np.full(n, -1, np.int64)
    n_fast = n_slow = count = unknown = 0
    for i in range(n):
        pos = frame_pos[i]
        stream = frame_stream[i]
        if frame_kind[i] != FRAME_OK:
            n_slow = abort(stream, assembling, pend_head, pend_next, slow, n_slow)
            slow[n_slow] = i
            n_slow += 1
            continue
        length, ctrl = np.int64(buf[pos + 2]), np.int64(buf[pos + 3])
        dst = np.int64(buf[pos + 4]) | (np.int64(buf[pos + 5]) << 8)
        src = np.int64(buf[pos + 6]) | (np.int64(buf[pos + 7]) << 8)
        n_user = length - 5
        prm, func = (ctrl >> 6) & 1, ctrl & 0x0F
        row = fields[:, n_fast]
        if not (prm and (func == 3 or func == 4) and n_user > 0):
            # link-only frame: one row, function 1000 + code (PRM=1) or 1100 + code (PRM=0)
            known = functions[_F_LINK_SECONDARY + prm, func]
            unknown += 1 - known
            to_outstation = ctrl & 0x80
            row[F_FRAME], row[F_FUNCTION], row[F_SUB] = i, (LINK_PRIMARY_BASE if prm else LINK_SECONDARY_BASE) + func, ctrl
            row[F_DIRECTION] = DIR_REQUEST if to_outstation else DIR_RESPONSE
            row[F_UNIT], row[F_PEER] = (dst, src) if to_outstation else (src, dst)
            row[F_SEQ] = row[F_ADDRESS] = row[F_OBJECT] = row[F_VARIATION] = row[F_QUALITY] = -1
            row[F_COUNT] = row[F_WRITE] = row[F_CONTROL] = row[F_POINTS] = 0
            row[F_LENGTH] = 10 + n_user + 2 * ((n_user + 15) >> 4)
            row[F_STATUS] = STATUS_OK if known else STATUS_UNKNOWN
            row[F_REASON] = REASON_NONE if known else REASON_UNKNOWN_FUNCTION
            n_fast += 1
            continue
        if frame_gaps[i] != stream_gaps[stream]:  # feed drops the fragments at a gap
            n_slow = abort(stream, assembling, pend_head, pend_next, slow, n_slow)
            stream_gaps[stream] = frame_gaps[i]
            transport[T_OPEN, stream], transport[T_UNTRACKED, stream] = -1, 0
        th = np.int64(user[user_at[i]])
        key = (src << 16) | dst
        was_open, was_seq, was_size = transport[T_OPEN, stream], transport[T_SEQ, stream], transport[T_SIZE, stream]
        was_untracked = transport[T_UNTRACKED, stream]
        n_data = n_user - 1
        data = user
        assembled = False
        app, app_len = user_at[i] + 1, n_data
        if not one_segment(th, key, n_data, transport, stream, max_fragment):
            # part of a fragment of several segments: assembled here when it opens and closes
            # within the batch with nothing in between for the per-frame code, else read there
            seq = th & 0x3F
            if assembling[stream] >= 0:
                if (th & 0x40) or key != assembling[stream] or seq != was_seq or was_size + n_data > max_fragment:
                    n_slow = abort(stream, assembling, pend_head, pend_next, slow, n_slow)
                    slow[n_slow] = i
                    n_slow += 1
                    continue
                asm[asm_used: asm_used + n_data] = user[app: app + n_data]
                asm_used += n_data
                pend_next[pend_tail[stream]] = i
                pend_tail[stream] = i
                if not th & 0x80:
                    continue
                # FIN: the whole fragment, read below from asm
                data = asm
                assembled = True
                app = asm_start[stream]
                app_len = asm_used - app
                assembling[stream] = -1
            elif (th & 0x40) and not (th & 0x80) and was_open < 0 and not was_untracked \
                    and transport[T_OPEN, stream] == key:
                assembling[stream] = key
                asm_start[stream] = asm_used
                asm[asm_used: asm_used + n_data] = user[app: app + n_data]
                asm_used += n_data
                pend_head[stream] = pend_tail[stream] = i
                pend_next[i] = -1
                continue
            else:
                n_slow = abort(stream, assembling, pend_head, pend_next, slow, n_slow)
                slow[n_slow] = i
                n_slow += 1
                continue
        fc = np.int64(data[app + 1]) if app_len >= 2 else 0
        flags = functions[_F_FLAGS, fc]
        response = flags & _FC_RESPONSE
        ok = not (app_len < 2 or not flags & _FC_KNOWN or (response and app_len < 4))
        is_write, is_control = functions[_F_WRITE, fc], functions[_F_CONTROL, fc]
        g0 = v0 = i0 = objects_counted = 0
        new_count = count
        if ok:
            if count + 8 * app_len > cap:
                cap = max(2 * cap, count + 8 * app_len)
                point, value = grown(point, value, cap, count)
            ok, g0, v0, i0, objects_counted, new_count = walk_objects(
                data, app + (4 if response else 2), app + app_len, flags & _FC_HEADER_ONLY, groups, objects,
                qualifiers, point, value, count, is_write, is_control)
        if not ok:
            if assembled:  # every segment of the fragment to the per-frame code
                j = pend_head[stream]
                while j >= 0:
                    slow[n_slow] = j
                    n_slow += 1
                    j = pend_next[j]
                pend_head[stream] = -1
            else:
                n_slow = abort(stream, assembling, pend_head, pend_next, slow, n_slow)
                slow[n_slow] = i
                n_slow += 1
            continue
        if assembled:
            pend_head[stream] = -1
        ac = np.int64(data[app])
        row[F_FRAME], row[F_FUNCTION], row[F_SUB], row[F_SEQ] = i, fc, ac >> 4, ac & 0x0F
        row[F_DIRECTION] = DIR_RESPONSE if response else DIR_REQUEST
        row[F_UNIT], row[F_PEER] = (src, dst) if response else (dst, src)
        row[F_ADDRESS], row[F_COUNT], row[F_OBJECT], row[F_VARIATION] = i0, min(objects_counted, int32_max), g0, v0
        row[F_QUALITY] = (np.int64(data[app + 2]) << 8) | data[app + 3] if response else -1
        row[F_LENGTH], row[F_WRITE], row[F_CONTROL] = app_len, is_write, is_control
        row[F_STATUS], row[F_REASON], row[F_POINTS] = STATUS_OK, REASON_NONE, new_count - count
        count = new_count
        n_fast += 1
    for st in range(n_streams):  # fragments still open at the end: the per-frame code keeps them
        n_slow = abort(st, assembling, pend_head, pend_next, slow, n_slow)
    return fields, n_fast, slow, n_slow, point, value, count, unknown


walk_frames = compiled(_walk_frames)


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
    gap, datagram = cols.gap, cols.datagram
    frame_pos, frame_k, frame_kind, user_at, user, stop_k, resyncs, dropped_k = walk_links(
        cols.buf, cols.head[lay], cols.start[lay], cols.end[lay], cols.stream_first, gap[lay], datagram[lay],
        _CRC_TABLE)
    count_dropped(out, PROTO_DNP3, dropped_k)
    n_resync = int(resyncs.sum())
    if n_resync:
        out.count_error(PROTO_DNP3, REASON_RESYNC, n_resync)
    # Streams (in layout order): their state (created as feed creates it), its transport part as
    # walk_frames follows it, and the partial frame each keeps for the next batch.
    stream_of_k = np.cumsum(cols.stream_first) - 1
    first_k = np.flatnonzero(cols.stream_first)
    last_k = np.append(first_k[1:] - 1, n_chunks - 1).tolist()
    stream_state = []
    transport = np.zeros((4, len(last_k)), np.int64)
    transport[T_OPEN] = -1
    tails = stop_k[last_k] < cols.end[lay[last_k]]
    for s, k in enumerate(last_k):
        chunk = chunks[lay[k]]
        key = (chunk.flow, chunk.direction)
        st = streams.get(key)
        if st is None:
            st = streams[key] = _Stream()
        stream_state.append(st)
        if st.fragments:
            (src, dst), (held, seq) = next(iter(st.fragments.items()))
            if len(st.fragments) > 1 or held is None:
                transport[T_UNTRACKED, s] = 1
            else:
                transport[T_OPEN, s], transport[T_SEQ, s], transport[T_SIZE, s] = (src << 16) | dst, seq, len(held)
        if tails[s]:
            st.buf = cols.raw[stop_k[k]: cols.end[lay[k]]]
    gaps_in_layout = np.cumsum(gap[lay])  # gaps of each stream so far: streams are contiguous in layout
    # Frames in chunk order (stable: a chunk's frames stay in stream order).
    frame_chunk = lay[frame_k]
    order = np.argsort(frame_chunk, kind="stable")
    frame_chunk, frame_pos, frame_kind, user_at = frame_chunk[order], frame_pos[order], frame_kind[order], user_at[order]
    fields, n_fast, slow, n_slow, point, value, n_points, unknown = walk_frames(
        cols.buf, user, frame_pos, frame_kind, user_at, stream_of_k[frame_k[order]], gaps_in_layout[frame_k[order]],
        transport, gaps_in_layout[first_k] - gap[lay][first_k], parser.max_fragment, FUNCTIONS, GROUPS, OBJECT_TABLE,
        QUALIFIERS, INT32_MAX)
    if unknown:
        out.count_error(PROTO_DNP3, REASON_UNKNOWN_FUNCTION, unknown)
    # Rows of the frames read here, then of the others (per-frame code), merged in frame order.
    fast = fields[F_FRAME, :n_fast]
    chunk = frame_chunk[fast]
    columns, row_owner = rows(cols, chunk, PROTO_DNP3, out.next_pdu_id,
                              {name: fields[f, :n_fast] for name, f in PDU_FIELDS.items()}, fields[F_POINTS, :n_fast],
                              {"value": value[:n_points], **{name: point[f, :n_points] for name, f in POINT_FIELDS.items()}})
    row_chunk = chunk[row_owner]
    gaps = np.flatnonzero(gap)
    if n_slow or gaps.size:
        side = _SideRows(parser, cols, chunks, frame_chunk, frame_pos, frame_kind, user_at, user, stream_state,
                         stream_of_k, gaps, slow[:n_slow])
        if side.columns is not None:
            key = np.concatenate([2 * fast[row_owner] + 1, side.key])
            order = np.argsort(key, kind="stable")
            columns = {name: np.concatenate([columns[name], side.columns[name]])[order] for name in COLUMNS}
            row_chunk = np.concatenate([row_chunk, side.chunk])[order]
            columns["pdu_id"] = out.next_pdu_id + np.cumsum(columns["kind"] == KIND_PDU) - 1  # points follow their PDU
        for (protocol, reason), n in side.errors.items():
            out.count_error(protocol, reason, n)
    if not row_chunk.size:
        return
    out.next_pdu_id += int(np.count_nonzero(columns["kind"] == KIND_PDU))
    out.add_columns(columns, None if cols.tags is None else cols.tags[row_chunk])


class _SideRows:
    """The rows of the frames walk_frames left (and the gaps of chunks), through the parser's
    per-frame code in order into a side builder: ``columns``, each row's order ``key`` (frame i:
    2i + 1) and ``chunk``, ``errors`` counted."""

    def __init__(self, parser, cols, chunks, frame_chunk, frame_pos, frame_kind, user_at, user, stream_state,
                 stream_of_k, gaps, slow):
        from .dnp3 import LINK_HEADER, frame_size

        side = EventBuilder()
        position = np.empty(len(chunks), np.int64)  # layout position of each chunk
        position[cols.layout] = np.arange(len(chunks))
        # a gap is read before the first frame of its chunk
        items = sorted([(2 * i + 1, i, -1) for i in slow.tolist()]
                       + [(2 * f, -1, c) for f, c in zip(np.searchsorted(frame_chunk, gaps).tolist(), gaps.tolist())])
        keys, row_chunks, n_rows = [], [], []
        raw = cols.raw
        for key, i, c in items:
            if i < 0:  # feed drops the fragments being reassembled when bytes are missing
                st = stream_state[stream_of_k[position[c]]]
                if st.fragments:
                    side.count_error(PROTO_DNP3, REASON_GAP, len(st.fragments))
                    st.fragments.clear()
                continue
            before = len(side)
            c = int(frame_chunk[i])
            st = stream_state[stream_of_k[position[c]]]
            pos = int(frame_pos[i])
            if frame_kind[i] == FRAME_OK:  # CRCs checked and user data taken out by walk_links
                _, length, ctrl, dst, src, _ = LINK_HEADER.unpack_from(raw, pos)
                at = int(user_at[i])
                parser._link_frame(ctrl, dst, src, user[at:at + length - 5].tobytes(), frame_size(length), chunks[c],
                                   st, side)
            else:
                parser._frame(raw, pos, len(raw), chunks[c], st, side)
            if len(side) > before:
                keys.append(key)
                row_chunks.append(c)
                n_rows.append(len(side) - before)
        self.errors = side.errors
        self.columns = self.key = self.chunk = None
        if keys:
            batch = side.build()
            self.columns = {name: batch[name] for name in COLUMNS}
            n_rows = np.array(n_rows, np.int64)
            self.key = np.repeat(np.array(keys, np.int64), n_rows)
            self.chunk = np.repeat(np.array(row_chunks, np.int64), n_rows)
