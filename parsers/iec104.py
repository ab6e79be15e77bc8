"""IEC 60870-5-104 (IEC 104) stream parser: APCI framing, I/S/U formats, sequence numbers, ASDUs.

An APDU (IEC 60870-5-104 §5, figure 3) is the APCI -- start octet 0x68, length L (octets after the
length field, 4 <= L <= 253), four control octets -- optionally followed by an ASDU (I format only).
The ASDU (IEC 60870-5-101 §7.1, with the -104 §9 field sizes) is: type identification (1 octet),
variable structure qualifier (SQ bit + number of objects), cause of transmission (2 octets: cause
with T and P/N bits, originator address), common address (2 octets), then the information objects,
each a 3-octet information object address (IOA) and an element (layouts in
:mod:`parsers.iec104_types`).  With SQ=1 only the first object carries an IOA; the others follow it
at IOA+1, IOA+2, ...

Events (see docs/parser-iec104.md): one PDU row per APDU, one point row per information object.

>>> from parsers.base import Chunk, FROM_SERVER
>>> from parsers.events import EventBuilder
>>> apdu = bytes.fromhex("6812" "02000400" "0d01" "0300" "0a00" "b80b00" "0000c841" "00")  # M_ME_NC_1
>>> out = EventBuilder()
>>> Iec104Parser().feed(Chunk(apdu, flow=1, direction=FROM_SERVER, frame=7), out)
>>> ev = out.build()
>>> ev.function.tolist(), ev.seq.tolist(), ev.ack.tolist(), ev.unit.tolist(), ev.cause.tolist()
([13, 13], [1, 1], [2, -1], [10, 10], [3, 3])
>>> ev.address.tolist(), float(ev.value[1]), int(ev.quality[1]), ev.direction.tolist()
([3000, 3000], 25.0, 0, [1, 1])
"""

from __future__ import annotations

import calendar
import math
import re
import struct

import numpy as np

from .base import FROM_CLIENT, Chunk
from .events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, KIND_POINT, PROTO_IEC104, REASON_BAD_LENGTH, REASON_GAP,
    REASON_NONE, REASON_RESYNC, REASON_SEQ_GAP, REASON_SEQ_REPEAT, REASON_TOO_LARGE, REASON_TRUNCATED,
    REASON_UNKNOWN_FUNCTION, STATUS_MALFORMED, STATUS_OK, STATUS_UNKNOWN, EventBuilder,
)
from .iec104_types import (
    CONTROL_TYPES, ELEMENTS, FUNC_S, FUNC_U_INVALID, U_FUNCTIONS, VARIABLE_TYPES, WRITE_TYPES,
)

DEFAULT_PORTS = (2404,)  # IEC 60870-5-104 §10.2 (IANA "iec-104")
TRANSPORTS = ("tcp",)

START = 0x68  # §5.1
APCI_LEN = 6
MIN_L, MAX_L = 4, 253  # §5.1: "maximum length of APDU = 253"; the control field alone is 4
MAX_APDU = 2 + 255  # what one length octet can ever announce: the most we ever buffer
ASDU_HEADER = struct.Struct("<BBBBH")  # type id, VSQ, COT, originator address, common address
ASDU_HEADER_LEN = 6
assert ASDU_HEADER.size == ASDU_HEADER_LEN
SEQ_MOD = 1 << 15  # N(S), N(R) are 15-bit (§5.1)
SEQ_HALF = SEQ_MOD // 2
_NAN = math.nan

# Quality carried in the point ``quality`` column beyond the IEC octet (see docs/parser-iec104.md).
VTI_TRANSIENT = 0x100  # the T bit of a VTI (step position) moved above the QDS octet


def _sign7(v: int) -> int:
    """VTI value: I7 (two's complement in 7 bits), -101 §7.2.6.5."""
    return ((v & 0x7F) ^ 0x40) - 0x40


def _cp56_seconds(ms, minute, hour, day, month, year) -> float:
    """CP56Time2a (-101 §7.2.6.18) as POSIX seconds, read as UTC; NaN when not a valid date.

    Years 0-69 are 2000-2069 and 70-99 are 1970-1999 (as Wireshark reads them).

    >>> _cp56_seconds(30500, 1, 2, 3, 4, 24)  # 2024-04-03 02:01:30.5
    1712109690.5
    """
    y = year & 0x7F
    y += 2000 if y < 70 else 1900
    mo, d, h, mi = month & 0x0F, day & 0x1F, hour & 0x1F, minute & 0x3F
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and ms < 60000):
        return _NAN
    try:
        return calendar.timegm((y, mo, d, h, mi, 0, 0, 0, 0)) + ms / 1000.0
    except (ValueError, OverflowError):
        return _NAN


# (value, quality) from the fields of one element, by Element.kind.  ``f[k]`` is field k of the
# element: an int or float unpacked by struct (one element), or a NumPy column (a whole run, see
# _Fields), so one table serves both.
# SIQ/DIQ: value is SPI/DPI, quality the BL SB NT IV bits (0xF0); QDS, QOS, QPM, QDP, BCR's
# sequence/flags octet are kept whole; SCO/DCO/RCO keep the qualifier (QU, S/E) as quality.
_DECODE = {
    "siq": lambda f: (f[0] & 0x01, f[0] & 0xF0),
    "diq": lambda f: (f[0] & 0x03, f[0] & 0xF0),
    "vti_qds": lambda f: (_sign7(f[0]), f[1] | ((f[0] & 0x80) << 1)),
    "bsi_qds": lambda f: (f[0], f[1]),
    "nva_qds": lambda f: (f[0] / 32768.0, f[1]),
    "sva_qds": lambda f: (f[0], f[1]),
    "flt_qds": lambda f: (f[0], f[1]),
    "bcr": lambda f: (f[0], f[1]),
    "nva": lambda f: (f[0] / 32768.0, -1),
    "sep": lambda f: (f[0] & 0x03, f[0] & 0xFC),
    "spe_qdp": lambda f: (f[0], f[1]),
    "aid_bcr": lambda f: (f[1], f[2]),
    "sco": lambda f: (f[0] & 0x01, f[0] & 0xFC),
    "dco": lambda f: (f[0] & 0x03, f[0] & 0xFC),
    "bsi": lambda f: (f[0], -1),
    "octet": lambda f: (f[0], -1),
    "word": lambda f: (f[0], -1),
    "none": lambda f: (_NAN, -1),
    "cp56": lambda f: (_cp56_seconds(*f), -1),  # calendar arithmetic: one element at a time only
}
#: kinds whose _DECODE also works on whole columns (_Fields)
VECTOR_KINDS = frozenset(_DECODE) - {"cp56"}
_ELEMENT_DECODERS = {t: (e, _DECODE[e.kind]) for t, e in ELEMENTS.items()}

#: point runs at least this long go through EventBuilder.points (one NumPy block); shorter ones are
#: appended as rows (a block costs about as much as 40 rows when the batch is built)
POINTS_BLOCK = 48


_NUMPY_CODES = {"B": "u1", "H": "<u2", "I": "<u4", "h": "<i2", "i": "<i4", "f": "<f4"}
_RUN_DTYPES: dict = {}


def _run_dtype(element, with_ioa: bool) -> np.dtype:
    """The NumPy structured dtype of one element (fields f0, f1, ...; time tags as opaque bytes),
    after a 3-octet IOA (``ioa_lo``, ``ioa_hi``) for SQ=0 objects: the vector form of the struct.

    >>> _run_dtype(ELEMENTS[36], True).names, _run_dtype(ELEMENTS[36], True).itemsize
    (('ioa_lo', 'ioa_hi', 'f0', 'f1', 'pad4'), 15)

    A run decoded this way gives the rows the per-element decode gives:

    >>> from parsers.base import Chunk
    >>> from parsers import iec104
    >>> gi = bytes([0x68, 4 + 6 + 3 + 64, 0, 0, 0, 0, 1, 0x80 | 64, 20, 0, 1, 0, 7, 0, 0]) + bytes(range(0, 256, 4))
    >>> def parse(block):
    ...     iec104.POINTS_BLOCK, out = block, EventBuilder()
    ...     iec104.Iec104Parser().feed(Chunk(gi, flow=1, direction=1), out)
    ...     return out.build().to_records().tobytes()
    >>> parse(48) == parse(10**6), len(parse(48)) // 104
    (True, 65)
    >>> iec104.POINTS_BLOCK = 48
    """
    key = (element.fmt, with_ioa)
    dtype = _RUN_DTYPES.get(key)
    if dtype is None:
        fields = [("ioa_lo", "<u2"), ("ioa_hi", "u1")] if with_ioa else []
        values = 0
        for repeat, code in re.findall(r"(\d*)([A-Za-z])", element.fmt):
            if code == "x":
                fields.append((f"pad{len(fields)}", f"V{repeat or 1}"))
            else:
                for _ in range(int(repeat or 1)):
                    fields.append((f"f{values}", _NUMPY_CODES[code]))
                    values += 1
        dtype = _RUN_DTYPES[key] = np.dtype(fields)
    return dtype


class _Fields:
    """The elements of a run as ``f[k]`` columns for _DECODE: field k of every record, as int64
    (or float64 for IEEE 754 fields), from a structured array of _run_dtype."""

    __slots__ = ("records",)

    def __init__(self, records: np.ndarray):
        self.records = records

    def __getitem__(self, k: int) -> np.ndarray:
        column = self.records[f"f{k}"]
        return column.astype(np.float64 if column.dtype.kind == "f" else np.int64)


def decode_run(element, records: np.ndarray):
    """(values, qualities) of a run of elements of one type (records of ``_run_dtype(element, False)``,
    or None for an element without octets): _DECODE on whole columns, or element by element for the
    kinds that only read one at a time."""
    decode = _DECODE[element.kind]
    if element.kind not in VECTOR_KINDS:
        pairs = [decode(f) for f in element.struct.iter_unpack(records.tobytes())]
        return (np.array([v for v, _ in pairs], np.float64), np.array([q for _, q in pairs], np.int64))
    with np.errstate(invalid="ignore"):  # a float NaN (even signalling) is a value to report, not an error
        return decode(None if records is None else _Fields(records))


def _pdu_row(out: EventBuilder, ctx, direction, function, sub, cause, unit, peer, seq, ack, address, count, obj,
             variation, length, is_write, is_control, status, reason) -> int:
    """``out.pdu(...)`` for one IEC 104 PDU row, positional: appends the row tuple
    :meth:`EventBuilder.pdu` would append, straight onto the builder's public row list."""
    pid = out.take_pdu_id()
    rows = out.rows
    rows.append((ctx.ts, ctx.frame, PROTO_IEC104, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow, ctx.transport,
                 direction, KIND_PDU, pid, function, sub, cause, unit, peer, seq, ack, address, count, obj,
                 variation, _NAN, -1, length, is_write, is_control, status, reason))
    if reason != REASON_NONE:
        out.count_error(PROTO_IEC104, reason)
    return pid


# The three small rules below are read by ``feed`` one APDU at a time and, compiled, by the batch
# walk (parsers.iec104_batch) over whole buffers: plain integer code, so Numba compiles them as they
# are (``data`` is bytes here, a NumPy uint8 array there).

def plausible_apci(data, pos: int) -> bool:
    """A strict test of the APCI at ``data[pos:]`` (needs 6 octets): used to resynchronise and by
    :func:`looks_like`.  S and U frames have L=4 and their spare control bits zero (§5.2, §5.3);
    a U frame has exactly one function bit set.

    >>> plausible_apci(bytes.fromhex("680443000000"), 0), plausible_apci(bytes.fromhex("680453000000"), 0)
    (True, False)
    """
    length, c1 = data[pos + 1], data[pos + 2]
    if c1 & 0x01 == 0:  # I format: an ASDU header must follow
        return 4 + ASDU_HEADER_LEN <= length <= MAX_L
    if length != 4 or data[pos + 3] != 0:
        return False
    if c1 & 0x03 == 0x01:  # S
        return c1 == 0x01
    bits = c1 >> 2  # one of the six U function bits (U_FUNCTIONS)
    return bits != 0 and bits & (bits - 1) == 0 and data[pos + 4] == 0 and data[pos + 5] == 0


def seq_reason(expected: int, ns: int) -> int:
    """What an I frame's N(S) says against the N(S) the stream expected (-104 §5.1; -1: unknown):
    REASON_SEQ_REPEAT at or behind it (within half the sequence space), REASON_SEQ_GAP ahead.

    >>> seq_reason(-1, 9), seq_reason(9, 9), seq_reason(9, 8), seq_reason(9, 10)
    (0, 0, 7, 6)
    """
    if expected < 0 or ns == expected:
        return REASON_NONE
    behind = (expected - ns) % SEQ_MOD
    return REASON_SEQ_REPEAT if behind <= SEQ_HALF else REASON_SEQ_GAP


def next_ns(expected: int, ns: int, reason: int) -> int:
    """The N(S) expected after an I frame carrying ``ns``: the one after it -- unless it repeated an
    earlier N(S) (a replayed or duplicated APDU), which leaves the count where it was, so the next
    genuine frame is not reported as a gap too.

    >>> next_ns(9, 9, seq_reason(9, 9)), next_ns(40, 38, seq_reason(40, 38)), next_ns(9, 12, seq_reason(9, 12))
    (10, 40, 13)
    """
    return expected if reason == REASON_SEQ_REPEAT else (ns + 1) % SEQ_MOD


# U format function bits (control octet 1 >> 2) -> event function code; FUNC_U_INVALID unless
# exactly one of the six bits is set.
U_CODES = tuple(U_FUNCTIONS.get(bits, FUNC_U_INVALID) for bits in range(64))


def control_fields(c1: int, length: int) -> tuple:
    """(function, subfunction, status, reason) of the S or U frame whose first control octet is
    ``c1`` and length L = ``length`` (>= 4).  S format (§5.2, figure 5): N(R) only.  U format
    (§5.3, figure 6): exactly one of STARTDT/STOPDT/TESTFR act/con.  Both have L = 4.

    >>> control_fields(0x01, 4), control_fields(0x43, 4), control_fields(0x0F, 4), control_fields(0x07, 5)
    ((512, -1, 0, 0), (517, 16, 0, 0), (519, 3, 2, 4), (513, 1, 2, 2))
    """
    if c1 & 0x03 == 0x01:
        function, sub, status, reason = FUNC_S, -1, STATUS_OK, REASON_NONE
    else:
        sub = c1 >> 2
        function, status, reason = U_CODES[sub], STATUS_OK, REASON_NONE
        if function == FUNC_U_INVALID:
            status, reason = STATUS_MALFORMED, REASON_UNKNOWN_FUNCTION
    if length != MIN_L and status == STATUS_OK:
        status, reason = STATUS_MALFORMED, (REASON_TOO_LARGE if length > MAX_L else REASON_BAD_LENGTH)
    return function, sub, status, reason


def sender_controls(c1: int, length: int, type_id: int, cot: int) -> int:
    """1 if the APDU (first control octet ``c1``, length L; type id and 6-bit cause when L >= 8)
    proves its sender is the controlling station, 0 if it proves the sender is the controlled one,
    -1 if it says nothing: only the controlling station sends STARTDT/STOPDT act (§5.3); a command
    or interrogation with cause "activation" comes from it (-101 §7.2.3); periodic, spontaneous or
    interrogated monitor data comes from the controlled station.

    >>> sender_controls(0x07, 4, 0, 0), sender_controls(0x00, 14, 13, 3), sender_controls(0x43, 4, 0, 0)
    (1, 0, -1)
    """
    if c1 & 0x03 == 0x03:
        bits = c1 >> 2
        if bits == 0x01 or bits == 0x04:
            return 1
        if bits == 0x02 or bits == 0x08:
            return 0
    elif c1 & 0x01 == 0 and length >= MIN_L + 4:
        if cot == 6 and (45 <= type_id <= 69 or 100 <= type_id <= 107):
            return 1
        if 1 <= type_id <= 44 and (1 <= cot <= 3 or cot == 5) or 20 <= cot <= 41 and type_id < 45:
            return 0
    return -1


def _plausible_asdu(data, pos: int, length: int) -> bool:
    """The ASDU of the I frame at ``pos`` is of a known type, carries objects, has a used cause
    (1-47) and exactly the length its type and count need."""
    type_id, vsq, cot = data[pos + 6], data[pos + 7], data[pos + 8] & 0x3F
    n, body = vsq & 0x7F, length - 4 - ASDU_HEADER.size
    element = ELEMENTS.get(type_id)
    if element is None or n == 0 or not 1 <= cot <= 47:
        return False
    need = 3 + n * element.size if vsq & 0x80 else n * (3 + element.size)
    return body == need


def looks_like(data: bytes) -> bool:
    """Whether a payload on a non-standard port starts like IEC 104: one or more complete,
    well-formed APDUs back to back (known type ids, ASDU lengths consistent with their type and
    object count), possibly followed by the start of another.

    >>> looks_like(bytes.fromhex("680407000000"))  # STARTDT act
    True
    >>> looks_like(bytes.fromhex("680443000000" "680483000000"))  # TESTFR act, TESTFR con
    True
    >>> looks_like(b"GET / HTTP/1.1\\r\\n"), looks_like(bytes.fromhex("680408000000"))
    (False, False)
    """
    pos, n, seen = 0, len(data), 0
    while pos < n:
        if data[pos] != START:
            return False
        if n - pos < APCI_LEN:
            break
        if not plausible_apci(data, pos):
            return False
        length = data[pos + 1]
        if n - pos < length + 2:
            break
        if data[pos + 2] & 0x01 == 0 and not _plausible_asdu(data, pos, length):
            return False
        seen += 1
        pos += length + 2
    return seen > 0


class _Stream:
    """What one direction of one connection keeps between chunks."""

    __slots__ = ("pending", "next_ns", "in_sync")

    def __init__(self):
        self.pending = b""  # an incomplete APDU (< MAX_APDU octets) left at the end of the last chunk
        self.next_ns = -1  # N(S) the next I frame should carry; -1 = unknown (start, after a gap)
        self.in_sync = True  # False after a gap or garbage: accept only a plausible APCI


class Iec104Parser:
    """:class:`parsers.base.StreamParser` for IEC 60870-5-104 over TCP."""

    protocol = PROTO_IEC104

    def __init__(self):
        self._streams: dict[tuple[int, int], _Stream] = {}
        #: flow -> the TCP side (FROM_CLIENT/FROM_SERVER) that is the controlling station, once the
        #: traffic has shown it; until then the client is assumed to be (it usually opens the link).
        self._controlling: dict[int, int] = {}

    def close(self, flow: int, out: EventBuilder | None = None) -> None:
        self._streams.pop((flow, 0), None)
        self._streams.pop((flow, 1), None)
        self._controlling.pop(flow, None)

    def _role(self, data, pos: int, length: int, ctx) -> int:
        """DIR_REQUEST if the sender of this APDU is the controlling station, else DIR_RESPONSE.

        The TCP roles usually say it (the controlling station connects to port 2404, §10.2), but not
        always (some stations connect out).  So the first APDU that proves a role
        (:func:`sender_controls`) decides for the connection.
        """
        side = self._controlling.get(ctx.flow)
        if side is None:
            type_id, cot = (data[pos + 6], data[pos + 8] & 0x3F) if length >= MIN_L + 4 else (0, 0)
            controls = sender_controls(data[pos + 2], length, type_id, cot)
            if controls < 0:
                side = FROM_CLIENT
            else:
                side = ctx.direction if controls else 1 - ctx.direction
                self._controlling[ctx.flow] = side
        return DIR_REQUEST if ctx.direction == side else DIR_RESPONSE

    def buffered(self) -> int:
        """Octets held across all streams (bounded by MAX_APDU per stream)."""
        return sum(len(s.pending) for s in self._streams.values())

    def feed_batch(self, chunks: list, out: EventBuilder, tags=None) -> None:
        """Parse a list of chunks in order: the same rows as ``feed`` on each, read as arrays
        (``parsers.iec104_batch``); ``tags`` are the chunks' order tags for ``out`` (or None)."""
        from .iec104_batch import feed_batch

        feed_batch(self, chunks, out, tags)

    def feed(self, chunk: Chunk, out: EventBuilder) -> None:
        key = (chunk.flow, chunk.direction)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if chunk.gap:
            # Bytes are missing before this chunk: drop the partial APDU, forget N(S) (the lost
            # bytes may have held I frames) and accept only a plausible APCI from here.
            if st.pending:
                out.count_error(PROTO_IEC104, REASON_GAP)
            st.pending = b""
            st.next_ns = -1
            st.in_sync = False
        data = st.pending + chunk.data if st.pending else chunk.data
        direction = DIR_REQUEST if chunk.direction == FROM_CLIENT else DIR_RESPONSE
        pos, end = 0, len(data)
        while end - pos >= 2:
            if data[pos] != START or (not st.in_sync and end - pos >= APCI_LEN
                                      and not plausible_apci(data, pos)):
                # Not at an APCI: skip to the next start octet that begins a plausible APCI.
                nxt = data.find(b"\x68", pos + 1)
                while nxt >= 0 and end - nxt >= APCI_LEN and not plausible_apci(data, nxt):
                    nxt = data.find(b"\x68", nxt + 1)
                out.count_error(PROTO_IEC104, REASON_RESYNC)
                st.in_sync = False
                if nxt < 0:
                    pos = end
                    break
                pos = nxt
                continue
            if not st.in_sync and end - pos < APCI_LEN:
                break  # wait for the 6 octets that say whether this 0x68 starts a plausible APCI
            total = data[pos + 1] + 2
            if end - pos < total:
                break  # wait for the rest (at most MAX_APDU octets are ever held)
            self._apdu(data, pos, total - 2, st, chunk, direction, out)
            st.in_sync = True
            pos += total
        rest = data[pos:] if pos < end else b""
        if chunk.datagram and rest:  # not expected for IEC 104 (TCP only); a datagram is whole
            out.count_error(PROTO_IEC104, REASON_TRUNCATED)
            rest = b""
        st.pending = rest

    # -- one APDU: data[pos] is 0x68, data[pos+1] == length, data[pos : pos+2+length] is present --
    def _apdu(self, data, pos, length, st, ctx, direction, out):
        total = length + 2
        if length >= MIN_L:
            direction = self._role(data, pos, length, ctx)
        if length < MIN_L:  # §5.1: the control field needs 4 octets
            _pdu_row(out, ctx, direction, -1, -1, -1, -1, -1, -1, -1, -1, 0, -1, -1, total, False, False,
                     STATUS_MALFORMED, REASON_BAD_LENGTH)
            return
        c1, c2, c3, c4 = data[pos + 2], data[pos + 3], data[pos + 4], data[pos + 5]
        nr = (c3 | (c4 << 8)) >> 1
        too_large = length > MAX_L
        if c1 & 0x01 == 0:
            # I format (§5.1, figure 4): N(S) in octets 1-2, N(R) in octets 3-4.
            ns = (c1 | (c2 << 8)) >> 1
            reason = seq_reason(st.next_ns, ns)
            st.next_ns = next_ns(st.next_ns, ns, reason)
            self._asdu(data, pos + APCI_LEN, pos + total, ns, nr, reason, too_large, ctx, direction, total, out)
            return
        function, sub, status, reason = control_fields(c1, length)
        _pdu_row(out, ctx, direction, function, sub, -1, -1, -1, -1, nr if function == FUNC_S else -1, -1, 0, -1,
                 -1, total, False, False, status, reason)

    def _asdu(self, data, start, end, ns, nr, seq_reason, too_large, ctx, direction, total, out):
        """The ASDU in data[start:end] (-101 §7.1, -104 §9 field sizes)."""
        if end - start < ASDU_HEADER.size:
            _pdu_row(out, ctx, direction, data[start] if end > start else -1, -1, -1, -1, -1, ns, nr, -1, 0, -1,
                     -1, total, False, False, STATUS_MALFORMED, REASON_TRUNCATED)
            return
        type_id, vsq, cot, oa, ca = ASDU_HEADER.unpack_from(data, start)
        n, sq = vsq & 0x7F, vsq >> 7
        cause = cot & 0x3F  # -101 §7.2.3: bit 8 T (test), bit 7 P/N (negative confirm)
        is_control = type_id in CONTROL_TYPES
        is_write = type_id in WRITE_TYPES
        body = start + ASDU_HEADER.size
        body_len = end - body
        first_ioa = (data[body] | (data[body + 1] << 8) | (data[body + 2] << 16)) if body_len >= 3 else -1
        decoder = _ELEMENT_DECODERS.get(type_id)
        status, reason = STATUS_OK, REASON_NONE
        if decoder is None:
            if type_id not in VARIABLE_TYPES:
                status, reason = STATUS_UNKNOWN, REASON_UNKNOWN_FUNCTION
            elif body_len < 3 and n:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
            nfit = 0
        else:
            size = decoder[0].size
            if sq:
                need = 3 + n * size if n else 0
                nfit = 0 if body_len < 3 else (n if size == 0 else min(n, (body_len - 3) // size))
            else:
                need = n * (3 + size)
                nfit = min(n, body_len // (3 + size))
            if body_len < need:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
            elif body_len > need:
                status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
        if too_large and status == STATUS_OK:
            status, reason = STATUS_MALFORMED, REASON_TOO_LARGE
        if status == STATUS_OK:
            reason = seq_reason  # a sequence anomaly on a good PDU: status stays OK, reason says why
        elif seq_reason != REASON_NONE:
            out.count_error(PROTO_IEC104, seq_reason)  # the row's reason says malformed; count both
        pid = _pdu_row(out, ctx, direction, type_id, cot, cause, ca, oa, ns, nr, first_ioa, n, type_id, sq, total,
                       is_write, is_control, status, reason)
        if not nfit:
            return
        element, decode = decoder
        if nfit >= POINTS_BLOCK and element.size and element.kind in VECTOR_KINDS:
            # A long run (a general interrogation answered with SQ=1, a big SQ=0 block): decode all
            # elements at once from a structured view of the octets.
            start_at = body + 3 if sq else body
            records = np.frombuffer(data, dtype=_run_dtype(element, not sq), count=nfit, offset=start_at)
            values, qualities = decode_run(element, records)
            if sq:
                addresses = np.arange(first_ioa, first_ioa + nfit, dtype=np.int64)
            else:
                addresses = records["ioa_lo"].astype(np.int64) | (records["ioa_hi"].astype(np.int64) << 16)
            out.points(ctx, PROTO_IEC104, pid, function=type_id, addresses=addresses, values=values,
                       direction=direction, unit=ca, peer_unit=oa, obj=type_id, variation=sq, quality=qualities,
                       cause=cause, seq=ns, is_write=is_write, is_control=is_control)
            return
        rows = out.rows
        if nfit >= POINTS_BLOCK:  # long runs of the types not decoded as vectors
            self._points_block(data, body, nfit, sq, first_ioa, element, decode, pid, type_id, cause, ca, oa, ns,
                               is_write, is_control, ctx, direction, out)
            return
        # One row per object, appended as it is decoded (the tuple EventBuilder.point appends).
        ts, frame, src, dst, sport, dport, flow, transport = (ctx.ts, ctx.frame, ctx.src, ctx.dst, ctx.sport,
                                                              ctx.dport, ctx.flow, ctx.transport)
        append = rows.append
        if sq:
            # SQ=1 (-101 §7.2.2.1): one IOA, then nfit elements at IOA, IOA+1, ...
            if element.size == 0:  # C_RD_NA_1: addresses only
                value, quality = decode(())
                for ioa in range(first_ioa, first_ioa + nfit):
                    append((ts, frame, PROTO_IEC104, src, dst, sport, dport, flow, transport, direction, KIND_POINT,
                            pid, type_id, -1, cause, ca, oa, ns, -1, ioa, 1, type_id, sq, value, quality, 0,
                            is_write, is_control, STATUS_OK, REASON_NONE))
                return
            ioa = first_ioa
            for fields in element.struct.iter_unpack(data[body + 3:body + 3 + nfit * element.size]):
                value, quality = decode(fields)
                append((ts, frame, PROTO_IEC104, src, dst, sport, dport, flow, transport, direction, KIND_POINT, pid,
                        type_id, -1, cause, ca, oa, ns, -1, ioa, 1, type_id, sq, value, quality, 0, is_write,
                        is_control, STATUS_OK, REASON_NONE))
                ioa += 1
        else:
            # SQ=0: every object carries its own IOA.
            for fields in element.with_ioa.iter_unpack(data[body:body + nfit * (3 + element.size)]):
                value, quality = decode(fields[2:])
                append((ts, frame, PROTO_IEC104, src, dst, sport, dport, flow, transport, direction, KIND_POINT, pid,
                        type_id, -1, cause, ca, oa, ns, -1, fields[0] | (fields[1] << 16), 1, type_id, sq, value,
                        quality, 0, is_write, is_control, STATUS_OK, REASON_NONE))

    @staticmethod
    def _points_block(data, body, nfit, sq, first_ioa, element, decode, pid, type_id, cause, ca, oa, ns, is_write,
                      is_control, ctx, direction, out) -> None:
        """The objects of one ASDU as one EventBuilder.points block, decoded element by element."""
        if sq:
            if element.size == 0:
                decoded = [decode(())] * nfit
            else:
                decoded = [decode(f) for f in element.struct.iter_unpack(data[body + 3:body + 3 + nfit * element.size])]
            addresses = range(first_ioa, first_ioa + nfit)
        else:
            records = element.with_ioa.iter_unpack(data[body:body + nfit * (3 + element.size)])
            decoded, addresses = [], []
            for fields in records:
                addresses.append(fields[0] | (fields[1] << 16))
                decoded.append(decode(fields[2:]))
        values, qualities = zip(*decoded)
        out.points(ctx, PROTO_IEC104, pid, function=type_id, addresses=np.array(addresses, dtype=np.int64),
                   values=np.array(values, dtype=np.float64), direction=direction, unit=ca, peer_unit=oa,
                   obj=type_id, variation=sq, quality=np.array(qualities, dtype=np.int64), cause=cause, seq=ns,
                   is_write=is_write, is_control=is_control)
