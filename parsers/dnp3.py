"""DNP3 (IEEE 1815-2012) over TCP and UDP: data link, transport and application layers.

Three layers, each in its own method of :class:`Dnp3Parser`:

* data link (clause 9): frames ``05 64 LEN CTRL DEST SRC CRC`` followed by the user data in blocks
  of up to 16 octets, each with its own CRC-16/DNP (``parsers.crc``).  A frame whose header or data
  CRC fails becomes a malformed row (``REASON_BAD_CRC``) and is discarded, as clause 9.2.6 says.
  Frames that carry no user data (link status, reset link, ACK...) become PDU rows whose
  ``function`` is ``1000 + link function`` (PRM=1) or ``1100 + link function`` (PRM=0).
* transport (clause 8): one header octet (FIN, FIR, 6-bit SEQ); segments are joined into an
  application fragment per (stream, source, destination), bounded by ``max_fragment`` octets
  (2048 by default, the size clause 8.2.1 expects every device to accept).
* application (clause 4.2): control (FIR/FIN/CON/UNS/SEQ), function code, IIN on responses,
  object headers; values of the common object groups become point rows.

``feed_batch`` reads a whole list of chunks at once with compiled walks (``parsers.dnp3_batch``)
and writes the same rows as ``feed`` on each chunk in turn; frames it does not read itself go
through ``_frame``, the per-frame step ``_scan`` uses.

Rows (see ``docs/parser-dnp3.md``): ``function`` application FC, ``subfunction`` application
control flags (FIR FIN CON UNS as bits 3..0; link-only rows: the link control octet), ``seq``
application SEQ, ``unit`` outstation address, ``peer_unit`` master address, ``quality`` IIN
(IIN1 << 8 | IIN2) on response PDU rows and flags/status on point rows, ``object``/``variation``/
``address`` the first object header's group, variation and first index, ``count`` the number of
objects over all headers, ``length`` the application fragment length.

>>> from parsers.base import Chunk
>>> from parsers.events import EventBuilder
>>> from parsers.crc import crc16_dnp
>>> def frame(ctrl, dst, src, user):
...     h = bytes([0x05, 0x64, 5 + len(user), ctrl]) + dst.to_bytes(2, "little") + src.to_bytes(2, "little")
...     return h + crc16_dnp(h).to_bytes(2, "little") + user + crc16_dnp(user).to_bytes(2, "little")
>>> read_class0 = bytes([0xC0, 0xC1, 0x01, 0x3C, 0x01, 0x06])  # transport, AC, READ, g60v1 all
>>> out = EventBuilder()
>>> Dnp3Parser().feed(Chunk(frame(0xC4, 10, 1, read_class0), frame=7), out)
>>> b = out.build()
>>> b.function.tolist(), b.unit.tolist(), b.peer_unit.tolist(), b.object.tolist(), b.frame.tolist()
([1], [10], [1], [60], [7])
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .base import Chunk
from .crc import TABLE16, crc16_dnp
from .dnp3_objects import (
    CONTROL_FUNCTIONS, FUNCTION_NAMES, HEADER_ONLY_FUNCTIONS, LENGTH_IS_VARIATION, LINK_PRIMARY_BASE,
    LINK_PRIMARY_NAMES, LINK_SECONDARY_BASE, LINK_SECONDARY_NAMES, NO_DATA_GROUPS, OBJECTS, PACKED_BITS,
    PREFIXES, RANGE_FIELDS, RESPONSE_FUNCTIONS, V_BIT7, V_DBIT, V_TIME48, WRITE_FUNCTIONS,
    attribute_name, attribute_value,
)
from .events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, KIND_POINT, PROTO_DNP3, REASON_BAD_CRC, REASON_BAD_HEADER, REASON_BAD_LENGTH,
    REASON_GAP, REASON_NONE, REASON_RESYNC, REASON_SEQ_GAP, REASON_SEQ_REPEAT, REASON_TOO_LARGE,
    REASON_TRUNCATED, REASON_UNKNOWN_FUNCTION, REASON_UNKNOWN_OBJECT, STATUS_MALFORMED, STATUS_OK,
    STATUS_UNKNOWN, EventBuilder,
)

DEFAULT_PORTS: tuple[int, ...] = (20000,)
TRANSPORTS: tuple[str, ...] = ("tcp", "udp")

# --- Data link layer (IEEE 1815-2012 clause 9.2.4) ---------------------------------------------
START = b"\x05\x64"
#: start (05 64 read little-endian), length, control, destination, source, header CRC
LINK_HEADER = struct.Struct("<HBBHHH")
LINK_HEADER_SIZE = 10
MIN_LENGTH = 5  # LEN counts CTRL, DEST, SRC and user data (clause 9.2.4.1.2)
MAX_USER_DATA = 250
MAX_LINK_FRAME = LINK_HEADER_SIZE + MAX_USER_DATA + 2 * 16  # 292 octets
CTRL_DIR, CTRL_PRM = 0x80, 0x40
LINK_USER_DATA_FUNCTIONS = (3, 4)  # CONFIRMED_USER_DATA, UNCONFIRMED_USER_DATA (table 9-1)

# --- Transport layer (clause 8.2.1) ------------------------------------------------------------
TH_FIN, TH_FIR, TH_SEQ = 0x80, 0x40, 0x3F
DEFAULT_MAX_FRAGMENT = 2048
MAX_FRAGMENTS_PER_STREAM = 16  # (source, destination) pairs reassembled at once in one stream

# --- Application layer (clause 4.2.2.4): application control octet ----------------------------
AC_FLAGS_SHIFT, AC_SEQ = 4, 0x0F

_HEADER8 = struct.Struct("<4H")
_FULL_BLOCK = struct.Struct("<9H")  # 16 user data octets as eight words, then their CRC (9.2.4.2)
_PREFIX_FORMAT = {1: "B", 2: "H", 4: "I"}
_NUMPY_CODES = {"B": "u1", "H": "<u2", "I": "<u4", "Q": "<u8", "b": "i1", "h": "<i2", "i": "<i4",
                "f": "<f4", "d": "<f8"}
INT32_MAX = 0x7FFFFFFF  # the count column is int32; ranges may claim up to 2^32 objects
#: runs at least this long are decoded with np.frombuffer instead of struct.iter_unpack
NUMPY_RUN = 48
#: PDUs with at least this many points hand them to EventBuilder.points (one NumPy block); fewer
#: are appended as rows (a block costs about as much as 40 rows when the batch is built)
POINTS_BLOCK = 48
_NAN = math.nan


def _pdu_row(out: EventBuilder, ctx, direction, function, sub, unit, peer, seq, address, count, obj, variation,
             quality, length, is_write, is_control, status, reason) -> int:
    """``out.pdu(...)`` for one DNP3 PDU row, positional: appends the row tuple
    :meth:`EventBuilder.pdu` would append, straight onto the builder's public row list."""
    pid = out.take_pdu_id()
    rows = out.rows
    rows.append((ctx.ts, ctx.frame, PROTO_DNP3, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow, ctx.transport,
                 direction, KIND_PDU, pid, function, sub, -1, unit, peer, seq, -1, address, count, obj, variation,
                 _NAN, quality, length, is_write, is_control, status, reason))
    if reason != REASON_NONE:
        out.count_error(PROTO_DNP3, reason)
    return pid


def _header_crc_ok(data, pos: int) -> bool:
    """CRC of the 8 header octets at ``pos`` (four 16-bit table steps, see parsers.crc)."""
    t16 = TABLE16
    w0, w1, w2, w3 = _HEADER8.unpack_from(data, pos)
    crc = t16[t16[t16[t16[w0] ^ w1] ^ w2] ^ w3] ^ 0xFFFF
    return crc == data[pos + 8] | (data[pos + 9] << 8)


def looks_like(data: bytes) -> bool:
    """A DNP3 link header at the start of ``data``: 05 64, LEN >= 5, valid header CRC.

    >>> looks_like(bytes.fromhex("0564 05c0 0100 0a00") + b"\\xff\\xff")
    False
    >>> h = bytes.fromhex("056405c001000a00"); looks_like(h + crc16_dnp(h).to_bytes(2, "little"))
    True
    """
    return (len(data) >= LINK_HEADER_SIZE and data[0] == 0x05 and data[1] == 0x64
            and data[2] >= MIN_LENGTH and _header_crc_ok(data, 0))


def frame_size(length: int) -> int:
    """Octets on the wire of a link frame whose LEN field is ``length`` (clause 9.2.4.1.2).

    >>> frame_size(5), frame_size(6), frame_size(21), frame_size(22), frame_size(255)
    (10, 13, 28, 31, 292)
    """
    n = length - MIN_LENGTH
    return LINK_HEADER_SIZE + n + 2 * ((n + 15) >> 4)


class _Stream:
    """Per (flow, TCP direction) state: undecoded link bytes and fragments being reassembled."""

    __slots__ = ("buf", "fragments")

    def __init__(self):
        self.buf = b""
        #: (link source, link destination) -> [bytearray, next transport SEQ]
        self.fragments: dict = {}


class Dnp3Parser:
    """Stream parser for DNP3 (see the module docstring).

    ``device_attributes`` collects group 0 device attributes seen in responses, keyed by
    ``(outstation ip, outstation DNP3 address)`` with ``ip`` as in the event ``src`` column, each a
    dict ``attribute name -> value`` (strings as text, numbers as int/float, others as hex).
    """

    protocol = PROTO_DNP3

    def __init__(self, max_fragment: int = DEFAULT_MAX_FRAGMENT):
        self.max_fragment = max_fragment
        self._streams: dict = {}
        self.device_attributes: dict = {}
        self._structs: dict = {}

    # -- StreamParser interface ---------------------------------------------------------------
    def feed_batch(self, chunks: list, out: EventBuilder, tags=None) -> None:
        """Parse a list of chunks in order: the same rows as ``feed`` on each, read as arrays
        (``parsers.dnp3_batch``); ``tags`` are the chunks' order tags for ``out`` (or None)."""
        from .dnp3_batch import feed_batch

        feed_batch(self, chunks, out, tags)

    def feed(self, chunk: Chunk, out: EventBuilder) -> None:
        key = (chunk.flow, chunk.direction)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if chunk.gap:
            if st.buf:
                out.count_error(PROTO_DNP3, REASON_GAP)
                st.buf = b""
            if st.fragments:
                out.count_error(PROTO_DNP3, REASON_GAP, len(st.fragments))
                st.fragments.clear()
        if chunk.datagram:
            data = chunk.data
            pos = self._scan(data, chunk, st, out)
            if pos < len(data):
                out.count_error(PROTO_DNP3, REASON_TRUNCATED)
            return
        data = st.buf + chunk.data if st.buf else chunk.data
        pos = self._scan(data, chunk, st, out)
        st.buf = bytes(data[pos:])

    def close(self, flow: int, out: EventBuilder | None = None) -> None:
        for key in [k for k in self._streams if k[0] == flow]:
            del self._streams[key]

    # -- data link layer (clause 9.2) ---------------------------------------------------------
    def _scan(self, data, chunk, st: _Stream, out: EventBuilder) -> int:
        """Cut ``data`` into link frames; return how far it was consumed.

        What is left is a possible frame start shorter than one whole frame (< 292 octets).
        """
        n = len(data)
        pos = 0
        while n - pos >= 2:
            if data[pos] != 0x05 or data[pos + 1] != 0x64:
                # Garbage: skip to the next start octets (clause 9.2.6: resynchronise on 05 64).
                nxt = data.find(START, pos + 1)
                out.count_error(PROTO_DNP3, REASON_RESYNC)
                if nxt < 0:
                    return n - 1 if data[n - 1] == 0x05 else n
                pos = nxt
                continue
            if n - pos < LINK_HEADER_SIZE:
                break
            used = self._frame(data, pos, n, chunk, st, out)
            if not used:
                break
            pos += used
        return pos

    def _frame(self, data, pos: int, n: int, chunk, st: _Stream, out: EventBuilder) -> int:
        """Read the link frame whose header (``05 64`` and 8 more octets) is at ``pos``; return the
        octets it takes, or 0 when ``data[:n]`` does not hold all of it yet."""
        _, length, ctrl, dst, src, _crc = LINK_HEADER.unpack_from(data, pos)
        if not _header_crc_ok(data, pos):
            self._link_error(chunk, out, ctrl, dst, src, LINK_HEADER_SIZE, REASON_BAD_CRC, known=False)
            return 2
        if length < MIN_LENGTH:
            self._link_error(chunk, out, ctrl, dst, src, LINK_HEADER_SIZE, REASON_BAD_LENGTH)
            return LINK_HEADER_SIZE
        total = frame_size(length)
        if n - pos < total:
            return 0
        user = self._user_data(data, pos + LINK_HEADER_SIZE, length - MIN_LENGTH)
        if user is None:
            self._link_error(chunk, out, ctrl, dst, src, total, REASON_BAD_CRC)
        else:
            self._link_frame(ctrl, dst, src, user, total, chunk, st, out)
        return total

    @staticmethod
    def _user_data(data, pos: int, n: int):
        """The user data of a frame with CRCs removed, or None when a block CRC fails (9.2.4.2)."""
        if n == 0:
            return b""
        blocks = []
        t16 = TABLE16
        unpack = _FULL_BLOCK.unpack_from
        for _ in range(n >> 4):
            # A full block: the CRC of its eight 16-bit words is eight table steps (see parsers.crc).
            w0, w1, w2, w3, w4, w5, w6, w7, sent = unpack(data, pos)
            if t16[t16[t16[t16[t16[t16[t16[t16[w0] ^ w1] ^ w2] ^ w3] ^ w4] ^ w5] ^ w6] ^ w7] ^ 0xFFFF != sent:
                return None
            blocks.append(data[pos:pos + 16])
            pos += 18
        last = n & 15
        if last:
            stop = pos + last
            block = data[pos:stop]
            if crc16_dnp(block) != data[stop] | (data[stop + 1] << 8):
                return None
            blocks.append(block)
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)

    @staticmethod
    def _link_error(chunk, out, ctrl, dst, src, length, reason, known=True):
        # A frame we discard still is an event: what it claimed to be, marked malformed.
        to_outstation = ctrl & CTRL_DIR
        _pdu_row(out, chunk, DIR_REQUEST if to_outstation else DIR_RESPONSE, -1, ctrl if known else -1,
                 (dst if to_outstation else src) if known else -1, (src if to_outstation else dst) if known else -1,
                 -1, -1, 0, -1, -1, -1, length, False, False, STATUS_MALFORMED, reason)

    def _link_frame(self, ctrl, dst, src, user, total, chunk, st, out) -> None:
        prm = ctrl & CTRL_PRM
        func = ctrl & 0x0F
        if prm and func in LINK_USER_DATA_FUNCTIONS and user:
            self._transport(user, dst, src, ctrl, chunk, st, out)
            return
        # Link-only frame (table 9-1/9-2): one row, function 1000+code (primary), 1100+code (secondary).
        to_outstation = ctrl & CTRL_DIR
        known = func in (LINK_PRIMARY_NAMES if prm else LINK_SECONDARY_NAMES)
        _pdu_row(out, chunk, DIR_REQUEST if to_outstation else DIR_RESPONSE,
                 (LINK_PRIMARY_BASE if prm else LINK_SECONDARY_BASE) + func, ctrl,
                 dst if to_outstation else src, src if to_outstation else dst, -1, -1, 0, -1, -1, -1, total,
                 False, False, STATUS_OK if known else STATUS_UNKNOWN,
                 REASON_NONE if known else REASON_UNKNOWN_FUNCTION)

    # -- transport layer (clause 8.2) ---------------------------------------------------------
    def _transport(self, user, dst, src, ctrl, chunk, st, out) -> None:
        th = user[0]
        seq = th & TH_SEQ
        frags = st.fragments
        key = (src, dst)
        if th & TH_FIR:
            if frags.pop(key, None) is not None:
                out.count_error(PROTO_DNP3, REASON_TRUNCATED)  # a new FIR abandons the old fragment
            if th & TH_FIN:
                self._application(user[1:], dst, src, chunk, out)
                return
            if len(frags) >= MAX_FRAGMENTS_PER_STREAM:
                del frags[next(iter(frags))]
                out.count_error(PROTO_DNP3, REASON_TOO_LARGE)
            frags[key] = [bytearray(user[1:]), (seq + 1) & TH_SEQ]
            return
        frag = frags.get(key)
        if frag is None:
            out.count_error(PROTO_DNP3, REASON_SEQ_GAP)  # no FIR seen for this segment
            return
        if frag[0] is None:  # rest of a fragment already refused as too large
            out.count_error(PROTO_DNP3, REASON_TOO_LARGE)
            if th & TH_FIN:
                del frags[key]
            return
        if seq != frag[1]:
            if seq == (frag[1] - 1) & TH_SEQ:
                out.count_error(PROTO_DNP3, REASON_SEQ_REPEAT)  # repeated segment: ignored (8.2.1.2)
                return
            del frags[key]
            out.count_error(PROTO_DNP3, REASON_SEQ_GAP)
            return
        buf = frag[0]
        if len(buf) + len(user) - 1 > self.max_fragment:
            # Refuse the fragment; later segments of it are counted, not buffered.
            if th & TH_FIN:
                del frags[key]
            else:
                frag[0] = None
            to_outstation = ctrl & CTRL_DIR
            _pdu_row(out, chunk, DIR_REQUEST if to_outstation else DIR_RESPONSE, -1, -1,
                     dst if to_outstation else src, src if to_outstation else dst, -1, -1, 0, -1, -1, -1,
                     len(buf) + len(user) - 1, False, False, STATUS_MALFORMED, REASON_TOO_LARGE)
            return
        buf += user[1:]
        frag[1] = (seq + 1) & TH_SEQ
        if th & TH_FIN:
            del frags[key]
            self._application(bytes(buf), dst, src, chunk, out)

    # -- application layer (clause 4.2.2) -----------------------------------------------------
    def _application(self, frag: bytes, dst: int, src: int, chunk, out: EventBuilder) -> None:
        n = len(frag)
        if n < 2:
            _pdu_row(out, chunk, DIR_REQUEST, -1, -1, dst, src, -1, -1, 0, -1, -1, -1, n, False, False,
                     STATUS_MALFORMED, REASON_TRUNCATED)
            return
        ac, fc = frag[0], frag[1]
        flags, seq = ac >> AC_FLAGS_SHIFT, ac & AC_SEQ
        if fc in RESPONSE_FUNCTIONS:
            direction, unit, peer = DIR_RESPONSE, src, dst
            if n < 4:
                _pdu_row(out, chunk, direction, fc, flags, unit, peer, seq, -1, 0, -1, -1, -1, n, False, False,
                         STATUS_MALFORMED, REASON_TRUNCATED)
                return
            iin = (frag[2] << 8) | frag[3]
            pos = 4
        else:
            direction, unit, peer = DIR_REQUEST, dst, src
            iin, pos = -1, 2
        is_write, is_control = fc in WRITE_FUNCTIONS, fc in CONTROL_FUNCTIONS
        if fc not in FUNCTION_NAMES:
            _pdu_row(out, chunk, direction, fc, flags, unit, peer, seq, -1, 0, -1, -1, iin, n, False, False,
                     STATUS_UNKNOWN, REASON_UNKNOWN_FUNCTION)
            return
        points: list = []
        first, count, reason = self._objects(frag, pos, fc, points, chunk.src, unit)
        pid = _pdu_row(out, chunk, direction, fc, flags, unit, peer, seq, first[2], min(count, INT32_MAX), first[0],
                       first[1], iin, n, is_write, is_control,
                       STATUS_OK if reason == REASON_NONE else STATUS_MALFORMED, reason)
        if not points:
            return
        rows = out.rows
        if len(points) >= POINTS_BLOCK:
            groups, variations, indices, values, qualities = zip(*points)
            out.points(chunk, PROTO_DNP3, pid, function=fc, addresses=np.array(indices, dtype=np.int64),
                       values=np.array(values, dtype=np.float64), direction=direction, unit=unit, peer_unit=peer,
                       obj=np.array(groups, dtype=np.int64), variation=np.array(variations, dtype=np.int64),
                       quality=np.array(qualities, dtype=np.int64), seq=seq, is_write=is_write,
                       is_control=is_control)
            return
        ts, frame, src, dst, sport, dport, flow, transport = (chunk.ts, chunk.frame, chunk.src, chunk.dst,
                                                              chunk.sport, chunk.dport, chunk.flow, chunk.transport)
        rows.extend([(ts, frame, PROTO_DNP3, src, dst, sport, dport, flow, transport, direction, KIND_POINT, pid, fc,
                      -1, -1, unit, peer, seq, -1, index, 1, group, variation, value, quality, 0, is_write,
                      is_control, STATUS_OK, REASON_NONE)
                     for group, variation, index, value, quality in points])

    def _objects(self, frag: bytes, pos: int, fc: int, points: list, ip: int, unit: int):
        """Walk the object headers (clause 4.2.2.7); append (group, var, index, value, quality).

        Returns ((group, variation, first index) of the first header, objects counted, reason).
        """
        n = len(frag)
        header_only = fc in HEADER_ONLY_FUNCTIONS
        first = (-1, -1, -1)
        total = 0
        while pos < n:
            if n - pos < 3:
                return first, total, REASON_TRUNCATED
            group, variation, qualifier = frag[pos], frag[pos + 1], frag[pos + 2]
            pos += 3
            prefix = PREFIXES.get((qualifier >> 4) & 0x07)
            range_field = RANGE_FIELDS.get(qualifier & 0x0F)
            if qualifier & 0x80 or prefix is None or range_field is None:
                return first, total, REASON_BAD_HEADER
            range_struct, range_kind = range_field
            psize, pkind = prefix
            start = 0
            if range_kind == "none":  # qualifier x6: all objects, no range field, no objects follow
                if first[0] < 0:
                    first = (group, variation, -1)
                continue
            if n - pos < range_struct.size:
                return first, total, REASON_TRUNCATED
            if range_kind == "startstop":
                start, stop = range_struct.unpack_from(frag, pos)
                if stop < start:
                    return first, total, REASON_BAD_HEADER
                count = stop - start + 1
            else:
                count = range_struct.unpack_from(frag, pos)[0]
            pos += range_struct.size
            total += count
            if first[0] < 0:
                first = (group, variation, start if pkind != "index" and count else -1)
                if pkind == "index" and count and n - pos >= psize:
                    first = (group, variation, int.from_bytes(frag[pos:pos + psize], "little"))
            if (header_only or variation == 0 or group in NO_DATA_GROUPS) and pkind != "size":
                # Only indices (if prefixed) follow these headers; size-prefixed objects (e.g. a
                # file transport object in a READ) always carry their data.
                skip = count * psize if pkind == "index" else 0
                if n - pos < skip:
                    return first, total, REASON_TRUNCATED
                pos += skip
                continue
            if pkind == "size":
                pos, reason = self._sized_objects(frag, pos, group, variation, count, psize, start, points)
            elif group == 0:
                pos, reason = self._device_attributes(frag, pos, variation, count, psize, fc, ip, unit)
            elif (group, variation) in PACKED_BITS:
                if pkind == "index":
                    return first, total, REASON_BAD_HEADER  # packed objects cannot be indexed
                pos, reason = self._packed(frag, pos, group, variation, count, start, points)
            elif group in LENGTH_IS_VARIATION:
                need = count * (psize + variation)
                if n - pos < need:
                    return first, total, REASON_TRUNCATED
                pos += need
                reason = REASON_NONE
            elif (group, variation) in OBJECTS:
                pos, reason = self._fixed(frag, pos, group, variation, count, psize, start, points)
            else:
                # Unknown size: nothing tells where the next header starts.
                return first, total, REASON_UNKNOWN_OBJECT
            if reason != REASON_NONE:
                return first, total, reason
        return first, total, REASON_NONE

    def _record_struct(self, psize: int, group: int, variation: int) -> struct.Struct:
        key = (psize, group, variation)
        s = self._structs.get(key)
        if s is None:
            s = self._structs[key] = struct.Struct(
                "<" + _PREFIX_FORMAT.get(psize, "") + OBJECTS[(group, variation)].struct.format[1:])
        return s

    def _fixed(self, frag, pos, group, variation, count, psize, start, points):
        """Objects of a fixed size from the object library (Annex A), optionally index-prefixed."""
        layout = OBJECTS[(group, variation)]
        s = self._record_struct(psize, group, variation)
        avail = (len(frag) - pos) // s.size
        reason = REASON_NONE
        if avail < count:
            reason = REASON_TRUNCATED
        else:
            avail = count
        vi, fi, conv = layout.value_at + (psize > 0), layout.flags_at + (psize > 0), layout.convert
        end = pos + avail * s.size
        if avail >= NUMPY_RUN:
            columns = self._numpy_columns(frag, pos, avail, s)
            indices = columns[0] if psize else range(start, start + avail)
            flags = columns[fi] if layout.flags_at >= 0 else [-1] * avail
            if conv == V_BIT7:
                values = [(f >> 7) & 1 for f in flags]
            elif conv == V_DBIT:
                values = [(f >> 6) & 3 for f in flags]
            elif conv == V_TIME48:
                values = [lo | (hi << 32) for lo, hi in zip(columns[vi], columns[vi + 1])]
            else:
                values = columns[vi]
            points.extend(zip([group] * avail, [variation] * avail, indices, values, flags))
            return end, reason
        for i, rec in enumerate(s.iter_unpack(frag[pos:end])):
            flags = rec[fi] if layout.flags_at >= 0 else -1
            if conv == V_BIT7:
                value = (flags >> 7) & 1
            elif conv == V_DBIT:
                value = (flags >> 6) & 3
            elif conv == V_TIME48:
                value = rec[vi] | (rec[vi + 1] << 32)
            else:
                value = rec[vi]
            points.append((group, variation, rec[0] if psize else start + i, value, flags))
        return end, reason

    @staticmethod
    def _numpy_columns(frag, pos, count, s: struct.Struct) -> list:
        """Columns of ``count`` packed records as Python lists (np.frombuffer on a structured dtype)."""
        codes = [c for c in s.format[1:]]
        dtype = np.dtype([(f"f{i}", _NUMPY_CODES[c]) for i, c in enumerate(codes)])
        arr = np.frombuffer(frag, dtype=dtype, count=count, offset=pos)
        return [arr[name].tolist() for name in dtype.names]

    @staticmethod
    def _packed(frag, pos, group, variation, count, start, points):
        """Packed single- or double-bit objects (A.2 g1v1, A.4 g3v1, A.6 g10v1, A.30 g80v1)."""
        bits = PACKED_BITS[(group, variation)]
        nbytes = (count * bits + 7) >> 3
        reason = REASON_NONE
        if len(frag) - pos < nbytes:  # decode the points that are there, then report truncation
            nbytes = len(frag) - pos
            count = nbytes * 8 // bits
            reason = REASON_TRUNCATED
        raw = np.unpackbits(np.frombuffer(frag, np.uint8, nbytes, pos), bitorder="little")
        if bits == 2:
            raw = raw[0::2] | (raw[1::2] << 1)
        values = raw[:count].tolist()
        points.extend((group, variation, start + i, v, -1) for i, v in enumerate(values))
        return pos + nbytes, reason

    def _sized_objects(self, frag, pos, group, variation, count, psize, start, points):
        """Objects each preceded by their size (prefix codes 4-6, e.g. free-format qualifier 5B)."""
        n = len(frag)
        layout = OBJECTS.get((group, variation))
        for i in range(count):
            if n - pos < psize:
                return pos, REASON_TRUNCATED
            size = int.from_bytes(frag[pos:pos + psize], "little")
            pos += psize
            if n - pos < size:
                return pos, REASON_TRUNCATED
            if layout is not None and size == layout.size:
                end, _ = self._fixed(frag[pos:pos + size], 0, group, variation, 1, 0, start + i, points)
            pos += size
        return pos, REASON_NONE

    def _device_attributes(self, frag, pos, variation, count, psize, fc, ip, unit):
        """Group 0 device attributes (A.1): data type, length, value per object."""
        n = len(frag)
        for _ in range(count):
            pos += psize
            if n - pos < 2:
                return pos, REASON_TRUNCATED
            type_code, length = frag[pos], frag[pos + 1]
            pos += 2
            if n - pos < length:
                return pos, REASON_TRUNCATED
            if fc in RESPONSE_FUNCTIONS:
                attrs = self.device_attributes.setdefault((ip, unit), {})
                attrs[attribute_name(variation)] = attribute_value(type_code, frag[pos:pos + length])
            pos += length
        return pos, REASON_NONE
