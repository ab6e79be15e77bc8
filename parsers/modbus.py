"""Modbus/TCP: MBAP framing, every public function code, request/response pairing.

References: *Modbus Application Protocol Specification V1.1b3* (2012, "MB-AP" below) and *Modbus
Messaging on TCP/IP Implementation Guide V1.0b* (2006, "MB-TCP" below).

An ADU on TCP is the 7-byte MBAP header followed by the PDU (MB-TCP §3.1.3)::

    transaction id (2) | protocol id (2) = 0 | length (2) = unit + PDU bytes | unit id (1) | PDU

The PDU is the function code (1 byte) and its data, at most 253 bytes (MB-AP §4.1), so a valid
length field lies in 2..254 and a whole ADU is at most 260 bytes: that is all a stream ever buffers.

Events written (see ``docs/parser-modbus.md`` for the full table):

* one PDU row per request and per response: ``function`` (without the 0x80 exception bit),
  ``unit``, ``seq`` = transaction id, ``address``/``count`` = the start address and quantity the
  request names (a response carries those of its paired request), ``subfunction`` = FC 8
  sub-function / FC 43 MEI type / FC 90 UMAS code, ``cause`` = exception code;
* point rows for the values a read response returns (addresses from the paired request) and for the
  values a write request writes (``is_write``).

>>> from parsers.base import Chunk
>>> from parsers.events import EventBuilder
>>> p, out = ModbusParser(), EventBuilder()
>>> req = bytes.fromhex("0001 0000 0006 11 03 006b 0002")        # MB-AP §6.3 example
>>> rsp = bytes.fromhex("0001 0000 0007 11 03 04 022b 0064")
>>> p.feed(Chunk(req, frame=1, sport=40000, dport=502), out)
>>> p.feed(Chunk(rsp, frame=2, sport=502, dport=40000, direction=1), out)
>>> b = out.build()
>>> b.kind.tolist(), b.address.tolist(), b.value[2:].tolist()
([0, 0, 1, 1], [107, 107, 107, 108], [555.0, 100.0])
>>> looks_like(req), looks_like(b"GET / HTTP/1.1\\r\\n")
(True, False)
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .base import FROM_CLIENT, Chunk
from .events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, KIND_POINT, MB_COIL, MB_DISCRETE_INPUT, MB_HOLDING_REGISTER, MB_INPUT_REGISTER,
    PROTO_MODBUS, REASON_BAD_HEADER, REASON_BAD_LENGTH, REASON_GAP, REASON_NONE, REASON_TOO_LARGE,
    REASON_TRUNCATED,
    REASON_UNKNOWN_FUNCTION, REASON_UNPAIRED, STATUS_EXCEPTION, STATUS_MALFORMED, STATUS_OK,
    STATUS_UNKNOWN, EventBuilder,
)

DEFAULT_PORTS: tuple[int, ...] = (502,)
TRANSPORTS: tuple[str, ...] = ("tcp",)

# MB-TCP §3.1.3: MBAP header, plus the function code that always follows it.
MBAP = struct.Struct(">HHHBB")
MBAP_LEN = 7
MIN_LENGTH, MAX_LENGTH = 2, 254  # unit id + FC .. unit id + 253-byte PDU (MB-AP §4.1)
# Schneider UMAS (FC 90) sends length 255 in practice; framing tolerates a few bytes over the
# specification's limit (counted as too_large) so such streams stay in sync.
FRAMING_MAX_LENGTH = 260
MAX_ADU = 6 + FRAMING_MAX_LENGTH



def mbap_ok(protocol_id, length, max_length=MAX_LENGTH):
    """The MBAP header check (MB-TCP §3.1.3: protocol id 0, length = unit id + PDU within
    MIN_LENGTH..max_length), written once for every reader: ``feed`` and its resynchronisation,
    ``looks_like``, and the batch paths' walks -- on ints, on NumPy arrays, and compiled by Numba.

    >>> mbap_ok(0, 6), mbap_ok(1, 6), mbap_ok(0, 255), mbap_ok(0, 255, FRAMING_MAX_LENGTH)
    (True, False, False, True)
    """
    return (protocol_id == 0) & (length >= MIN_LENGTH) & (length <= max_length)


U16 = struct.Struct(">H")
U16X2 = struct.Struct(">HH")
U16X3 = struct.Struct(">HHH")
U16X4 = struct.Struct(">HHHH")

# MB-AP §5.1 public function codes.
FUNCTION_NAMES = {
    1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers", 4: "read_input_registers",
    5: "write_single_coil", 6: "write_single_register", 7: "read_exception_status", 8: "diagnostics",
    11: "get_comm_event_counter", 12: "get_comm_event_log", 15: "write_multiple_coils",
    16: "write_multiple_registers", 17: "report_server_id", 20: "read_file_record",
    21: "write_file_record", 22: "mask_write_register", 23: "read_write_multiple_registers",
    24: "read_fifo_queue", 43: "encapsulated_interface_transport",
    # Not public, but named so reports read well (MB-AP §5.1 "reserved" / vendor use).
    90: "umas",
}
PUBLIC_FUNCTIONS = frozenset(k for k in FUNCTION_NAMES if k != 90)
# MB-AP §5: user-defined ranges.
USER_DEFINED_FUNCTIONS = frozenset(range(65, 73)) | frozenset(range(100, 111))

# MB-AP §7: exception codes.
EXCEPTION_NAMES = {
    1: "illegal_function", 2: "illegal_data_address", 3: "illegal_data_value",
    4: "server_device_failure", 5: "acknowledge", 6: "server_device_busy", 8: "memory_parity_error",
    10: "gateway_path_unavailable", 11: "gateway_target_failed_to_respond",
}

# MB-AP §6.8.1: FC 8 diagnostics sub-functions.
DIAGNOSTIC_NAMES = {
    0: "return_query_data", 1: "restart_communications_option", 2: "return_diagnostic_register",
    3: "change_ascii_input_delimiter", 4: "force_listen_only_mode",
    10: "clear_counters_and_diagnostic_register",
    11: "return_bus_message_count", 12: "return_bus_communication_error_count",
    13: "return_bus_exception_error_count", 14: "return_server_message_count",
    15: "return_server_no_response_count", 16: "return_server_nak_count", 17: "return_server_busy_count",
    18: "return_bus_character_overrun_count", 20: "clear_overrun_counter_and_flag",
}
# Sub-functions that change how the device operates (restart, go silent) and those that change
# stored state (counters, the ASCII delimiter).
DIAGNOSTIC_CONTROL = frozenset({1, 4})
DIAGNOSTIC_WRITE = frozenset({1, 3, 4, 10, 20})

# MB-AP §6.19-6.21: MEI types and the device identification objects.
MEI_NAMES = {13: "canopen_general_reference", 14: "read_device_identification"}
DEVICE_ID_OBJECT_NAMES = {
    0: "vendor_name", 1: "product_code", 2: "major_minor_revision", 3: "vendor_url", 4: "product_name",
    5: "model_name", 6: "user_application_name",
}

# Schneider UMAS on FC 90 (not in MB-AP; the UMAS code is the byte after the pairing key).  Names
# follow the public research write-ups; only the codes used for the flags below matter here.
UMAS_NAMES = {
    0x01: "init_comm", 0x02: "read_id", 0x03: "read_project_info", 0x04: "read_plc_info",
    0x06: "read_card_info", 0x0A: "repeat", 0x10: "take_plc_reservation", 0x11: "release_plc_reservation",
    0x12: "keep_alive", 0x20: "read_memory_block", 0x22: "read_variables", 0x23: "write_variables",
    0x24: "read_coils_registers", 0x25: "write_coils_registers", 0x30: "initialize_upload",
    0x31: "upload_block", 0x32: "end_strategy_upload", 0x33: "initialize_download", 0x34: "download_block",
    0x35: "end_download", 0x39: "read_eth_master_data", 0x40: "start_plc", 0x41: "stop_plc",
    0x50: "monitor_plc", 0x58: "check_plc", 0x70: "read_io_object", 0x71: "write_io_object",
    0x73: "get_status_module", 0xFD: "response_error", 0xFE: "response_ok",
}
UMAS_WRITE = frozenset({0x23, 0x25, 0x33, 0x34, 0x35, 0x71})
UMAS_CONTROL = frozenset({0x33, 0x34, 0x35, 0x40, 0x41})


# Requests whose data starts with an address (and a quantity): MB-AP §6.1-6.6, 6.11, 6.12, 6.16-6.18.
ADDRESSED_REQUESTS = frozenset({1, 2, 3, 4, 5, 6, 15, 16, 22, 23, 24})
QUANTITY_REQUESTS = frozenset({1, 2, 3, 4, 15, 16, 23})


def _name(table: dict, code: int) -> str:
    return table.get(code, f"unknown-{code}")


def function_name(fc: int) -> str:
    """>>> function_name(3), function_name(99)
    ('read_holding_registers', 'unknown-99')"""
    return _name(FUNCTION_NAMES, fc)


def exception_name(code: int) -> str:
    return _name(EXCEPTION_NAMES, code)


def diagnostic_name(code: int) -> str:
    return _name(DIAGNOSTIC_NAMES, code)


def looks_like(data: bytes) -> bool:
    """Does ``data`` (the first payload bytes of a flow) start with plausible Modbus/TCP ADUs?

    MB-TCP §3.1.3: protocol id 0, length 2..254, a function code that is not 0; every complete ADU
    in ``data`` must be followed by another plausible header or by the end of the data, and at
    least one complete ADU must be present (8 bytes of noise match too easily otherwise).
    """
    n = len(data)
    pos = 0
    complete = 0
    while n - pos >= 8:
        _tid, pid, length, _unit, fc = MBAP.unpack_from(data, pos)
        if not mbap_ok(pid, length) or fc in (0, 0x80):
            return False
        if fc & 0x80 and length != 3:  # MB-AP §7: an exception response is FC + code
            return False
        end = pos + 6 + length
        if end > n:
            return complete > 0
        complete += 1
        pos = end
    if n - pos >= 4 and data[pos + 2: pos + 4] != b"\x00\x00":
        return False  # the start of the next header is already wrong
    return complete > 0


# A request waiting for its response (MB-TCP §4.2: paired by transaction id) is kept as the tuple
# (function, unit, address, count): no object per request on the hot path.
_P_FUNCTION, _P_UNIT, _P_ADDRESS, _P_COUNT = range(4)

#: point blocks at least this long go through EventBuilder.points (one NumPy block); shorter ones
#: are appended as rows (a block costs about as much as 40 rows when the batch is built)
POINTS_BLOCK = 48
_NAN = math.nan


def coil_value(value: int) -> int:
    """MB-AP §6.5: a coil write carries 0xFF00 (on) or 0x0000 (off); another value is kept raw."""
    return 1 if value == 0xFF00 else 0 if value == 0 else value


def _diagnostic(data, body: int, blen: int) -> tuple[int, bool, bool, int]:
    """FC 8 (§6.8), request or echoed response: (sub-function, is_write, is_control, data words)."""
    sub = U16.unpack_from(data, body)[0]
    return sub, sub in DIAGNOSTIC_WRITE, sub in DIAGNOSTIC_CONTROL, (blen - 2) // 2


def _pdu_row(out: EventBuilder, ctx, direction: int, fc: int, sub: int, cause: int, unit: int, tid: int,
             address: int, count: int, length: int, is_write: bool, is_control: bool, status: int,
             reason: int) -> int:
    """``out.pdu(...)`` for one Modbus PDU row, positional and without keyword handling.

    Appends the same row tuple :meth:`EventBuilder.pdu` appends (see parsers.events) straight to
    the builder's public row list (EventBuilder.rows).
    """
    pid = out.take_pdu_id()
    rows = out.rows
    rows.append((ctx.ts, ctx.frame, PROTO_MODBUS, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow, ctx.transport,
                 direction, KIND_PDU, pid, fc, sub, cause, unit, -1, tid, -1, address, count, -1, -1, _NAN, -1,
                 length, is_write, is_control, status, reason))
    if reason != REASON_NONE:
        out.count_error(PROTO_MODBUS, reason)
    return pid


def _point_rows(out: EventBuilder, ctx, pid: int, direction: int, fc: int, unit: int, tid: int, obj: int,
                first: int, values, is_write: bool) -> None:
    """Point rows for ``values`` at addresses ``first``, ``first + 1``, ... (one register or bit
    block); the same rows :meth:`EventBuilder.point` would append one by one."""
    n = len(values)
    if not n:
        return
    rows = out.rows
    if n >= POINTS_BLOCK:
        out.points(ctx, PROTO_MODBUS, pid, function=fc, direction=direction, unit=unit, obj=obj, seq=tid,
                   is_write=is_write, addresses=np.arange(first, first + n, dtype=np.int64),
                   values=np.asarray(values, dtype=np.float64))
        return
    ts, frame, src, dst, sport, dport, flow, transport = (ctx.ts, ctx.frame, ctx.src, ctx.dst, ctx.sport,
                                                          ctx.dport, ctx.flow, ctx.transport)
    rows.extend([(ts, frame, PROTO_MODBUS, src, dst, sport, dport, flow, transport, direction, KIND_POINT, pid,
                  fc, -1, -1, unit, -1, tid, -1, address, 1, obj, -1, float(v), -1, 0, is_write, False,
                  STATUS_OK, REASON_NONE) for address, v in enumerate(values, first)])


def _registers(data, offset: int, n: int) -> list:
    """``n`` big-endian 16-bit registers from ``data[offset:]`` as Python ints (MB-AP §4.2)."""
    if n > 32:
        return np.frombuffer(data, dtype=">u2", count=n, offset=offset).tolist()
    return list(struct.unpack_from(">%dH" % n, data, offset))


def _bits(data, offset: int, nbytes: int, n: int) -> list:
    """``n`` bits packed LSB first in ``nbytes`` bytes (MB-AP §6.1: first coil in bit 0)."""
    if n <= 0 or nbytes <= 0:
        return []
    raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
    return np.unpackbits(raw, bitorder="little")[:n].tolist()


class ModbusParser:
    """Stream parser for Modbus/TCP (implements :class:`parsers.base.StreamParser`).

    State per flow: the unparsed tail of each direction (< 260 bytes) and a table of requests
    waiting for their response, keyed by transaction id and bounded by ``max_pending``.

    ``device_ids`` collects what servers say about themselves, for the asset inventory:
    ``{(server_ip, unit): {"vendor_name": ..., "product_code": ..., "major_minor_revision": ...,
    "objects": {object_id: value}, "conformity_level": int, "server_id": hex, "run_indicator": bool,
    "frame": last frame}}`` from FC 43/14 and FC 17 responses (at most ``max_device_ids`` entries).
    """

    protocol = PROTO_MODBUS

    def __init__(self, server_ports=DEFAULT_PORTS, max_pending: int = 64, max_device_ids: int = 4096):
        self.server_ports = frozenset(server_ports)
        self.max_pending = max_pending
        self.max_device_ids = max_device_ids
        self._tails: dict = {}  # (flow, direction) -> bytes not yet parsed
        self._pending: dict = {}  # flow -> {transaction id: (function, unit, address, count)}
        self.device_ids: dict = {}
        self._last_out: EventBuilder | None = None

    # -- stream handling -------------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Bytes held across all streams (tests check this stays bounded)."""
        return sum(len(v) for v in self._tails.values())

    def pending_requests(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def close(self, flow: int, out: EventBuilder | None = None) -> None:
        """Forget ``flow``; a partial ADU still buffered is counted as truncated, unanswered
        requests as unpaired (into ``out``, or the builder last fed)."""
        out = out or self._last_out
        for key in ((flow, 0), (flow, 1)):
            tail = self._tails.pop(key, None)
            if tail and out is not None:
                out.count_error(PROTO_MODBUS, REASON_TRUNCATED)
        pending = self._pending.pop(flow, None)
        if pending and out is not None:
            out.count_error(PROTO_MODBUS, REASON_UNPAIRED, len(pending))

    def _role(self, chunk: Chunk) -> int:
        """Requests go to the server port (MB-TCP §4.1); when the ports do not tell (both or neither
        are server ports: a looks_like flow), the TCP role does."""
        to_server = chunk.dport in self.server_ports
        from_server = chunk.sport in self.server_ports
        if to_server != from_server:
            return DIR_REQUEST if to_server else DIR_RESPONSE
        return DIR_REQUEST if chunk.direction == FROM_CLIENT else DIR_RESPONSE

    def feed_batch(self, chunks: list, out: EventBuilder, tags=None) -> None:
        """Parse a list of chunks in order: the same rows as ``feed`` on each, read as arrays
        (``parsers.modbus_batch``); ``tags`` are the chunks' order tags for ``out`` (or None)."""
        from .modbus_batch import feed_batch

        feed_batch(self, chunks, out, tags)

    def feed_batch_numpy(self, chunks: list, out: EventBuilder, tags=None) -> None:
        """``feed_batch`` without Numba (the edge path): ADUs framed with NumPy where each segment
        holds whole ADUs (``parsers.modbus_batch.frame_simple``); a batch where one runs over
        segments goes through ``feed``."""
        from .modbus_batch import feed_batch

        feed_batch(self, chunks, out, tags, numba=False)

    def feed(self, chunk: Chunk, out: EventBuilder) -> None:
        self._last_out = out
        key = (chunk.flow, chunk.direction)
        tail = self._tails.pop(key, b"")
        if chunk.gap and tail:
            out.count_error(PROTO_MODBUS, REASON_GAP)
            tail = b""
        data = tail + bytes(chunk.data) if tail else chunk.data
        n = len(data)
        pos = 0
        role = self._role(chunk)
        unpack = MBAP.unpack_from
        one = self._one
        while n - pos >= 8:
            tid, pid, length, unit, fc = unpack(data, pos)
            if not mbap_ok(pid, length, FRAMING_MAX_LENGTH):
                # MB-TCP §3.1.3 violated: not (or no longer) Modbus at this point.  Resynchronise on
                # the next header that is followed by another header or the end of the data.
                out.count_error(PROTO_MODBUS, REASON_BAD_HEADER)
                pos = self._resync(data, pos + 1)
                continue
            end = pos + 6 + length
            if end > n:
                break
            one(chunk, out, role, data, pos, end, tid, unit, fc, length)
            pos = end
        if pos < n and chunk.datagram:
            # Modbus over UDP: a datagram carries whole ADUs; the rest is lost, not kept.
            out.count_error(PROTO_MODBUS, REASON_TRUNCATED)
        elif pos < n:
            # A partial ADU (< MAX_ADU bytes by the length check above, or < 8 bytes of header).
            self._tails[key] = bytes(data[pos:])

    def _one(self, chunk, out: EventBuilder, role: int, data, pos: int, end: int, tid: int, unit: int, fc: int,
             length: int) -> None:
        """One framed ADU ``data[pos:end]`` (MBAP already checked)."""
        if 1 <= fc <= 4:
            # Fast path for the well-formed reads that make up most traffic (MB-AP §6.1-6.4);
            # the same rows as _adu -> _request/_response, which handles everything else.
            if role == DIR_REQUEST:
                if length == 6:  # unit, FC, starting address, quantity
                    address, count = U16X2.unpack_from(data, pos + 8)
                    _pdu_row(out, chunk, DIR_REQUEST, fc, -1, -1, unit, tid, address, count, 12, False, False,
                             STATUS_OK, REASON_NONE)
                    self._remember(chunk, out, tid, unit, fc, address, count)
                    return
            else:
                table = self._pending.get(chunk.flow)
                request = table.get(tid) if table else None
                if request is not None and request[_P_FUNCTION] == fc and request[_P_UNIT] == unit:
                    nbytes = data[pos + 8]
                    count = request[_P_COUNT]
                    if length == 3 + nbytes and (count == nbytes >> 1 and not nbytes & 1 if fc > 2
                                                 else (count + 7) >> 3 == nbytes):
                        del table[tid]
                        address = request[_P_ADDRESS]
                        pdu = _pdu_row(out, chunk, DIR_RESPONSE, fc, -1, -1, unit, tid, address, count,
                                       length + 6, False, False, STATUS_OK, REASON_NONE)
                        if fc > 2:
                            _point_rows(out, chunk, pdu, DIR_RESPONSE, fc, unit, tid,
                                        MB_INPUT_REGISTER if fc == 4 else MB_HOLDING_REGISTER, address,
                                        _registers(data, pos + 9, count), False)
                        else:
                            _point_rows(out, chunk, pdu, DIR_RESPONSE, fc, unit, tid,
                                        MB_COIL if fc == 1 else MB_DISCRETE_INPUT, address,
                                        _bits(data, pos + 9, nbytes, count), False)
                        return
        elif (fc == 5 or fc == 6) and length == 6:
            # Fast path for well-formed single writes (MB-AP §6.5, §6.6): address, value; the
            # response echoes the request.  Same rows as _adu.
            address, value = U16X2.unpack_from(data, pos + 8)
            if role == DIR_REQUEST:
                pdu = _pdu_row(out, chunk, DIR_REQUEST, fc, -1, -1, unit, tid, address, 1, 12, True, False,
                               STATUS_OK, REASON_NONE)
                self._remember(chunk, out, tid, unit, fc, address, 1)
                if fc == 5:
                    _point_rows(out, chunk, pdu, DIR_REQUEST, fc, unit, tid, MB_COIL, address,
                                (coil_value(value),), True)
                else:
                    _point_rows(out, chunk, pdu, DIR_REQUEST, fc, unit, tid, MB_HOLDING_REGISTER, address,
                                (value,), True)
            else:
                self._match(chunk, out, tid, unit, fc)
                _pdu_row(out, chunk, DIR_RESPONSE, fc, -1, -1, unit, tid, address, 1, 12, True, False, STATUS_OK,
                         REASON_NONE)
            return
        if length > MAX_LENGTH:
            out.count_error(PROTO_MODBUS, REASON_TOO_LARGE)
        self._adu(chunk, out, role, data, pos, end, tid, unit, fc)

    @staticmethod
    def _resync(data, start: int) -> int:
        n = len(data)
        find = data.find if hasattr(data, "find") else bytes(data).find
        p = find(b"\x00\x00", start + 2)
        while p != -1 and p - 2 + 8 <= n:
            c = p - 2
            _tid, _pid, length, _unit, fc = MBAP.unpack_from(data, c)
            if mbap_ok(0, length) and fc not in (0, 0x80):  # the protocol id is the 00 00 found
                end = c + 6 + length
                if end == n:
                    return c
                if end + 8 <= n:
                    _t, pid2, len2, _u, fc2 = MBAP.unpack_from(data, end)
                    if mbap_ok(pid2, len2) and fc2 not in (0, 0x80):
                        return c
            p = find(b"\x00\x00", p + 1)
        return n  # nothing plausible: drop the rest

    # -- one ADU ---------------------------------------------------------------------------------

    def _adu(self, ctx, out: EventBuilder, role, data, start, end, tid, unit, fc_byte) -> None:
        fc = fc_byte & 0x7F
        pdu_len = end - start - MBAP_LEN  # function code + data
        body = start + 8  # first byte after the function code
        blen = pdu_len - 1
        alen = end - start
        if role == DIR_REQUEST:
            self._request(ctx, out, data, body, blen, alen, tid, unit, fc_byte, fc)
            return
        pending = self._match(ctx, out, tid, unit, fc)
        if fc_byte & 0x80:
            # MB-AP §7: exception response = FC | 0x80, exception code.
            if blen >= 1:
                # Trailing bytes after the code are counted, not allowed to hide the exception.
                code, status, reason = data[body], STATUS_EXCEPTION, REASON_NONE
                if blen != 1:
                    out.count_error(PROTO_MODBUS, REASON_BAD_LENGTH)
            else:
                code, status, reason = -1, STATUS_MALFORMED, REASON_TRUNCATED
            _pdu_row(out, ctx, DIR_RESPONSE, fc, -1, code, unit, tid, pending[_P_ADDRESS] if pending else -1, 0,
                     alen, False, False, status, reason)
            return
        self._response(ctx, out, data, body, blen, alen, tid, unit, fc, pending)

    def _match(self, ctx, out, tid, unit, fc):
        table = self._pending.get(ctx.flow)
        pending = table.pop(tid, None) if table else None
        if pending is None or pending[_P_FUNCTION] != fc or pending[_P_UNIT] != unit:
            out.count_error(PROTO_MODBUS, REASON_UNPAIRED)
            return None
        return pending

    def _remember(self, ctx, out, tid, unit, fc, address, count) -> None:
        table = self._pending.get(ctx.flow)
        if table is None:
            table = self._pending[ctx.flow] = {}
        if tid in table:
            del table[tid]  # the earlier request with this id was never answered
            out.count_error(PROTO_MODBUS, REASON_UNPAIRED)
        elif len(table) >= self.max_pending:
            del table[next(iter(table))]
            out.count_error(PROTO_MODBUS, REASON_UNPAIRED)
        table[tid] = (fc, unit, address, count)

    # -- requests (MB-AP §6.x, "request" tables) ------------------------------------------------

    def _request(self, ctx, out, data, body, blen, alen, tid, unit, fc_byte, fc) -> None:
        address, count, sub = -1, 0, -1
        status, reason = STATUS_OK, REASON_NONE
        is_write = is_control = False
        points = None  # (obj, start address, values)
        mask_point = None
        if fc_byte & 0x80:
            # A request never has the exception bit; report it, do not pair it.
            _pdu_row(out, ctx, DIR_REQUEST, fc, -1, data[body] if blen >= 1 else -1, unit, tid, -1, 0, alen,
                     False, False, STATUS_MALFORMED, REASON_BAD_HEADER)
            return
        if fc in (1, 2, 3, 4):
            # §6.1-6.4: starting address, quantity.
            if blen >= 4:
                address, count = U16X2.unpack_from(data, body)
                if blen != 4:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 5 or fc == 6:
            # §6.5 write single coil (value 0xFF00 on / 0x0000 off), §6.6 write single register.
            is_write = True
            if blen >= 4:
                address, value = U16X2.unpack_from(data, body)
                count = 1
                if fc == 5:
                    points = (MB_COIL, address, [coil_value(value)])
                else:
                    points = (MB_HOLDING_REGISTER, address, [value])
                if blen != 4:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 15 or fc == 16:
            # §6.11 write multiple coils, §6.12 write multiple registers:
            # address, quantity, byte count, values.
            is_write = True
            if blen >= 5:
                address, count = U16X2.unpack_from(data, body)
                nbytes = data[body + 4]
                avail = blen - 5
                expect = (count + 7) // 8 if fc == 15 else 2 * count
                if nbytes != expect or avail != nbytes:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                usable = min(nbytes, avail, expect)
                if fc == 15:
                    points = (MB_COIL, address, _bits(data, body + 5, usable, min(count, usable * 8)))
                else:
                    points = (MB_HOLDING_REGISTER, address, _registers(data, body + 5, usable // 2))
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 22:
            # §6.16 mask write register: address, AND mask, OR mask.  The point's value is the OR
            # mask, its quality the AND mask (the result depends on the register's current value).
            is_write = True
            if blen >= 6:
                address, and_mask, or_mask = U16X3.unpack_from(data, body)
                count = 1
                mask_point = (and_mask, or_mask)
                if blen != 6:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 23:
            # §6.17 read/write multiple registers: read address, read quantity, write address,
            # write quantity, write byte count, write values.  The write happens first.
            is_write = True
            if blen >= 9:
                address, count, waddr, wcount = U16X4.unpack_from(data, body)
                nbytes = data[body + 8]
                avail = blen - 9
                if nbytes != 2 * wcount or avail != nbytes:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                nwrite = min(nbytes, avail, 2 * wcount) // 2
                points = (MB_HOLDING_REGISTER, waddr, _registers(data, body + 9, nwrite))
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 24:
            # §6.18 read FIFO queue: FIFO pointer address.
            if blen >= 2:
                address = U16.unpack_from(data, body)[0]
                if blen != 2:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 8:
            # §6.8 diagnostics (the response echoes the request): sub-function (2), data.
            if blen >= 2:
                sub, is_write, is_control, count = _diagnostic(data, body, blen)
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc in (7, 11, 12, 17):
            # §6.7, 6.9, 6.10, 6.13: no request data.
            if blen:
                status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
        elif fc == 20 or fc == 21:
            # §6.14 read / §6.15 write file record: byte count, sub-requests of reference type 6.
            is_write = fc == 21
            count, status, reason = self._file_records(data, body, blen, fc == 21)
        elif fc == 43:
            # §6.19 encapsulated interface transport: MEI type; §6.21 device id: code, object id.
            if blen >= 1:
                sub = data[body]
                if sub == 14:
                    if blen >= 3:
                        address = data[body + 2]
                        count = data[body + 1]  # read device id code (1 basic .. 4 one object)
                        if blen != 3:
                            status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                    else:
                        status, reason = STATUS_MALFORMED, REASON_TRUNCATED
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        else:
            status, reason = STATUS_UNKNOWN, REASON_UNKNOWN_FUNCTION
            if fc == 90 and blen >= 2:
                sub = data[body + 1]
                is_write = sub in UMAS_WRITE
                is_control = sub in UMAS_CONTROL
        if reason == REASON_TRUNCATED and fc in ADDRESSED_REQUESTS and blen >= 2:
            # Keep what a truncated request does say: its start address (and quantity).
            address = U16.unpack_from(data, body)[0]
            if blen >= 4 and fc in QUANTITY_REQUESTS:
                count = U16.unpack_from(data, body + 2)[0]
        pid = _pdu_row(out, ctx, DIR_REQUEST, fc, sub, -1, unit, tid, address, count, alen, is_write, is_control,
                       status, reason)
        self._remember(ctx, out, tid, unit, fc, address, count)
        if mask_point is not None:
            and_mask, or_mask = mask_point
            out.point(ctx, PROTO_MODBUS, pid, function=fc, address=address, value=float(or_mask),
                      direction=DIR_REQUEST, unit=unit, obj=MB_HOLDING_REGISTER, quality=and_mask, seq=tid,
                      is_write=True)
        elif points is not None:
            obj, first, values = points
            _point_rows(out, ctx, pid, DIR_REQUEST, fc, unit, tid, obj, first, values, True)

    @staticmethod
    def _file_records(data, body, blen, with_data):
        """§6.14/6.15: count the sub-requests; check lengths."""
        if blen < 1:
            return 0, STATUS_MALFORMED, REASON_TRUNCATED
        nbytes = data[body]
        if nbytes != blen - 1:
            return 0, STATUS_MALFORMED, REASON_BAD_LENGTH
        pos, end, n = body + 1, body + blen, 0
        while pos < end:
            if end - pos < 7:
                return n, STATUS_MALFORMED, REASON_BAD_LENGTH
            rec_len = U16.unpack_from(data, pos + 5)[0]
            pos += 7 + (2 * rec_len if with_data else 0)
            n += 1
        if pos != end:
            return n, STATUS_MALFORMED, REASON_BAD_LENGTH
        return n, STATUS_OK, REASON_NONE

    # -- responses (MB-AP §6.x, "response" tables) ----------------------------------------------

    def _response(self, ctx, out, data, body, blen, alen, tid, unit, fc, pending) -> None:
        address = pending[_P_ADDRESS] if pending else -1
        count, sub = 0, -1
        status, reason = STATUS_OK, REASON_NONE
        is_write = is_control = False
        points = None
        if fc in (1, 2, 3, 4) or fc == 23:
            # §6.1-6.4, 6.17: byte count, values.  Addresses come from the paired request.
            if blen >= 1:
                nbytes = data[body]
                avail = blen - 1
                if avail != nbytes:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                usable = min(nbytes, avail)
                if fc <= 2:
                    count = pending[_P_COUNT] if pending else usable * 8
                    bits = min(count, usable * 8)
                    if pending and (usable * 8 < count or (count + 7) // 8 != nbytes):
                        status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                    if pending:
                        obj = MB_COIL if fc == 1 else MB_DISCRETE_INPUT
                        points = (obj, address, _bits(data, body + 1, usable, bits))
                else:
                    count = usable // 2
                    if nbytes & 1:
                        status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                    if pending:
                        if pending[_P_COUNT] != count:
                            status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
                        points = (MB_INPUT_REGISTER if fc == 4 else MB_HOLDING_REGISTER, address,
                                  _registers(data, body + 1, count))
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc in (5, 6, 15, 16):
            # §6.5/6.6 echo of the request; §6.11/6.12 address and quantity.  No points: the values
            # were emitted with the request.
            is_write = True
            if blen >= 4:
                address, count = U16X2.unpack_from(data, body)
                if fc in (5, 6):
                    count = 1
                if blen != 4:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 22:
            is_write = True
            if blen >= 6:
                address = U16.unpack_from(data, body)[0]
                count = 1
                if blen != 6:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 24:
            # §6.18: byte count (2), FIFO count (2, <= 31), values.  All values come from one
            # FIFO address, so they are not emitted as points.
            if blen >= 4:
                nbytes, count = U16X2.unpack_from(data, body)
                if nbytes != blen - 2 or nbytes != 2 + 2 * count:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 8:
            # §6.8 diagnostics (the response echoes the request): sub-function (2), data.
            if blen >= 2:
                sub, is_write, is_control, count = _diagnostic(data, body, blen)
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 7:
            # §6.7: one byte of output data.
            if blen != 1:
                status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
        elif fc == 11:
            # §6.9: status (2), event count (2).
            if blen >= 4:
                count = U16.unpack_from(data, body + 2)[0]
                if blen != 4:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 12:
            # §6.10: byte count, status (2), event count (2), message count (2), events.
            if blen >= 7:
                count = data[body] - 6
                if data[body] != blen - 1 or count < 0:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        elif fc == 17:
            # §6.13: byte count, server id, run indicator (0x00 off / 0xFF on), additional data.
            if blen >= 1 and data[body] == blen - 1:
                count = data[body]
                if count >= 1:
                    self._server_id(ctx, unit, bytes(data[body + 1: body + 1 + count]))
            else:
                status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH if blen else REASON_TRUNCATED
        elif fc == 20 or fc == 21:
            is_write = fc == 21
            if fc == 21:
                count, status, reason = self._file_records(data, body, blen, True)
            elif blen >= 1 and data[body] == blen - 1:
                pos, end = body + 1, body + blen
                while pos < end:  # sub-responses: length, reference type, data
                    pos += 1 + data[pos]
                    count += 1
                if pos != end:
                    status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH
            else:
                status, reason = STATUS_MALFORMED, REASON_BAD_LENGTH if blen else REASON_TRUNCATED
        elif fc == 43:
            if blen >= 1:
                sub = data[body]
                if sub == 14:
                    address, count, status, reason = self._device_id(ctx, unit, data, body, blen)
            else:
                status, reason = STATUS_MALFORMED, REASON_TRUNCATED
        else:
            status, reason = STATUS_UNKNOWN, REASON_UNKNOWN_FUNCTION
            if fc == 90 and blen >= 2:
                sub = data[body + 1]
        pid = _pdu_row(out, ctx, DIR_RESPONSE, fc, sub, -1, unit, tid, address, count, alen, is_write, is_control,
                       status, reason)
        if points is not None:
            obj, first, values = points
            _point_rows(out, ctx, pid, DIR_RESPONSE, fc, unit, tid, obj, first, values, False)

    # -- asset inventory side table ------------------------------------------------------------

    def _device_entry(self, ctx, unit):
        key = (ctx.src, unit)
        entry = self.device_ids.get(key)
        if entry is None:
            if len(self.device_ids) >= self.max_device_ids:
                return None
            entry = self.device_ids[key] = {"objects": {}}
        entry["frame"] = ctx.frame
        return entry

    def _server_id(self, ctx, unit, payload: bytes) -> None:
        """§6.13: the server id's length is device specific, so the raw bytes are kept; when the
        second byte is 0x00/0xFF it is read as the run indicator of a one-byte server id."""
        entry = self._device_entry(ctx, unit)
        if entry is None:
            return
        entry["server_id"] = payload.hex()
        if len(payload) >= 2 and payload[1] in (0x00, 0xFF):
            entry["run_indicator"] = payload[1] == 0xFF

    def _device_id(self, ctx, unit, data, body, blen):
        """§6.21 read device identification response: MEI type, read device id code, conformity
        level, more follows, next object id, number of objects, then (id, length, value) triples.
        Returns (first object id, number of objects, status, reason)."""
        if blen < 6:
            return -1, 0, STATUS_MALFORMED, REASON_TRUNCATED
        conformity = data[body + 2]
        nobj = data[body + 5]
        pos, end = body + 6, body + blen
        objects = {}
        first = -1
        for _ in range(nobj):
            if end - pos < 2 or end - pos - 2 < data[pos + 1]:
                return first, nobj, STATUS_MALFORMED, REASON_BAD_LENGTH
            oid, olen = data[pos], data[pos + 1]
            if first < 0:
                first = oid
            raw = bytes(data[pos + 2: pos + 2 + olen])
            objects[oid] = raw.decode("latin-1") if oid < 0x80 else raw.hex()
            pos += 2 + olen
        status, reason = (STATUS_OK, REASON_NONE) if pos == end else (STATUS_MALFORMED, REASON_BAD_LENGTH)
        entry = self._device_entry(ctx, unit)
        if entry is not None:
            entry["conformity_level"] = conformity
            for oid, value in objects.items():
                entry["objects"][oid] = value
                if oid in DEVICE_ID_OBJECT_NAMES:
                    entry[DEVICE_ID_OBJECT_NAMES[oid]] = value
        return first, nobj, status, reason
