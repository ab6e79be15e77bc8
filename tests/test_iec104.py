"""IEC 60870-5-104 parser on hand-built APDUs (bytes per the standard) and bytes out of real captures."""

from __future__ import annotations

import math
import random

import dpkt
import numpy as np
import pytest

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, KIND_POINT, PROTO_IEC104, REASON_BAD_LENGTH, REASON_GAP,
    REASON_NONE, REASON_RESYNC, REASON_SEQ_GAP, REASON_SEQ_REPEAT, REASON_TRUNCATED, REASON_UNKNOWN_FUNCTION,
    STATUS_MALFORMED, STATUS_OK, STATUS_UNKNOWN, EventBuilder,
)
from parsers.iec104 import MAX_APDU, Iec104Parser, looks_like
from parsers.iec104_types import ELEMENTS, FUNC_S, TYPE_NAMES, cause_name, function_name, type_name
from tests.conftest import SHARED_PCAPS, needs_shared


def apci_i(ns: int, nr: int, asdu: bytes) -> bytes:
    """I-format APDU (-104 §5.1): N(S), N(R) shifted left by one, LSB of octet 1 = 0."""
    control = (ns << 1).to_bytes(2, "little") + (nr << 1).to_bytes(2, "little")
    return bytes([0x68, 4 + len(asdu)]) + control + asdu


def asdu(type_id: int, objects: bytes, n: int, sq: int = 0, cot: int = 3, oa: int = 0, ca: int = 1) -> bytes:
    return bytes([type_id, (sq << 7) | n, cot, oa]) + ca.to_bytes(2, "little") + objects


def ioa(a: int) -> bytes:
    return a.to_bytes(3, "little")


STARTDT_ACT, STARTDT_CON = bytes.fromhex("680407000000"), bytes.fromhex("68040b000000")
STOPDT_ACT, STOPDT_CON = bytes.fromhex("680413000000"), bytes.fromhex("680423000000")
TESTFR_ACT, TESTFR_CON = bytes.fromhex("680443000000"), bytes.fromhex("680483000000")


def run(*chunks, parser=None):
    """Feed (data, direction[, gap]) tuples as one flow; return the event batch."""
    parser = parser or Iec104Parser()
    out = EventBuilder()
    for i, c in enumerate(chunks, 1):
        data, direction = c[0], c[1]
        gap = c[2] if len(c) > 2 else False
        parser.feed(Chunk(data, gap=gap, flow=1, direction=direction, frame=i, ts=i), out)
    return out.build()


def test_u_frames_functions_and_direction():
    ev = run((STARTDT_ACT, FROM_CLIENT), (STARTDT_CON, FROM_SERVER), (STOPDT_ACT, FROM_CLIENT),
             (STOPDT_CON, FROM_SERVER), (TESTFR_ACT + TESTFR_CON, FROM_CLIENT))
    assert ev.function.tolist() == [513, 514, 515, 516, 517, 518]
    assert [function_name(f) for f in ev.function.tolist()] == [
        "STARTDT act", "STARTDT con", "STOPDT act", "STOPDT con", "TESTFR act", "TESTFR con"]
    assert ev.subfunction.tolist() == [1, 2, 4, 8, 16, 32]  # the U bits (octet 1 >> 2)
    assert ev.direction.tolist() == [DIR_REQUEST, DIR_RESPONSE] * 2 + [DIR_REQUEST] * 2
    assert ev.seq.tolist() == [-1] * 6 and ev.ack.tolist() == [-1] * 6
    assert ev.length.tolist() == [6] * 6 and (ev.status == STATUS_OK).all()
    assert ev.frame.tolist() == [1, 2, 3, 4, 5, 5]


def test_s_frame_and_invalid_u_frame():
    ev = run((bytes.fromhex("680401000a00"), FROM_CLIENT), (bytes.fromhex("680433000000"), FROM_CLIENT),
             (bytes.fromhex("68050100020000"), FROM_SERVER))
    assert ev.function.tolist() == [FUNC_S, 519, FUNC_S]
    assert ev.ack.tolist() == [5, -1, 1] and ev.seq.tolist() == [-1, -1, -1]
    assert ev.status.tolist() == [STATUS_OK, STATUS_MALFORMED, STATUS_MALFORMED]
    assert ev.reason.tolist() == [REASON_NONE, REASON_UNKNOWN_FUNCTION, REASON_BAD_LENGTH]


def test_measured_float_sq0_fields():
    # M_ME_NC_1 (13), two objects with own IOAs, spont, OA 7, CA 0x1234, QDS IV on the second.
    objs = ioa(1300) + bytes.fromhex("0000c841") + b"\x00" + ioa(1301) + bytes.fromhex("0000803f") + b"\x80"
    ev = run((apci_i(77, 20, asdu(13, objs, 2, cot=3, oa=7, ca=0x1234)), FROM_SERVER))
    pdu, pts = ev.pdus, ev.points
    assert pdu.function.tolist() == [13] and pdu.seq.tolist() == [77] and pdu.ack.tolist() == [20]
    assert pdu.unit.tolist() == [0x1234] and pdu.peer_unit.tolist() == [7] and pdu.cause.tolist() == [3]
    assert pdu.count.tolist() == [2] and pdu.address.tolist() == [1300]
    assert pdu.length.tolist() == [6 + 6 + 16]
    assert pdu.direction.tolist() == [DIR_RESPONSE] and not pdu.is_control[0] and not pdu.is_write[0]
    assert pts.address.tolist() == [1300, 1301] and pts.value.tolist() == [25.0, 1.0]
    assert pts.quality.tolist() == [0, 0x80] and pts.object.tolist() == [13, 13]
    assert (pts.pdu_id == pdu.pdu_id[0]).all()
    assert pts.cause.tolist() == [3, 3] and pts.seq.tolist() == [77, 77]


def test_single_points_sq1_from_capture_bytes():
    # automayt_iec104_sq.pcapng, first APDU: M_SP_NA_1, SQ=1, 16 elements from IOA 0, inrogen, CA 1054.
    data = bytes.fromhex("681d02000200" "01901400" "1e04" "000000") + bytes([0, 1, 0x11, 0x80] * 4)
    ev = run((data, FROM_SERVER))
    pts = ev.points
    assert ev.pdus.count.tolist() == [16] and ev.pdus.variation.tolist() == [1]
    assert ev.pdus.cause.tolist() == [20]
    assert pts.address.tolist() == list(range(16))
    assert pts.value.tolist() == [0, 1, 1, 0] * 4
    assert pts.quality.tolist() == [0, 0, 0x10, 0x80] * 4  # BL, IV; the SPI bit is not quality


@pytest.mark.parametrize("type_id, element, value, quality", [
    (3, b"\x02", 2, 0),                                   # DIQ: DPI on
    (5, bytes([0x7F, 0x00]), -1, 0),                       # VTI: I7 -1, not transient
    (5, bytes([0x85, 0x01]), 5, 0x101),                    # VTI: 5 transient (T -> 0x100), QDS overflow
    (7, bytes.fromhex("02000000") + b"\x00", 2, 0),        # BSI low octet first
    (9, (-16384).to_bytes(2, "little", signed=True) + b"\x10", -0.5, 0x10),  # NVA -0.5 blocked
    (11, (-1234).to_bytes(2, "little", signed=True) + b"\x00", -1234, 0),    # SVA
    (15, (123456).to_bytes(4, "little", signed=True) + b"\x25", 123456, 0x25),  # BCR, SQ=5 CY
    (21, (8192).to_bytes(2, "little", signed=True), 0.25, -1),               # NVA without QDS
    (36, bytes.fromhex("0000c03f") + b"\x40" + bytes(7), 1.5, 0x40),         # float + CP56Time2a
    (45, b"\x81", 1, 0x80),                               # SCO: on, select
    (46, b"\x0a", 2, 0x08),                               # DCO: on, long pulse
    (50, bytes.fromhex("00002042") + b"\x00", 40.0, 0),    # C_SE_NC_1 float + QOS
    (100, b"\x14", 20, -1),                               # QOI station interrogation
    (105, b"\x01", 1, -1),                                # QRP general reset
])
def test_element_values(type_id, element, value, quality):
    ev = run((apci_i(0, 0, asdu(type_id, ioa(100) + element, 1, cot=6)), FROM_CLIENT))
    assert ev.pdus.status.tolist() == [STATUS_OK]
    assert len(ev.points) == 1
    assert ev.points.value[0] == pytest.approx(value) and ev.points.quality[0] == quality


def test_clock_sync_time_value_from_capture_bytes():
    # iti_testdissectiec104.pcap frame 139: C_CS_NA_1 act, CP56Time2a 2008-08-29 08:57:13.000
    ev = run((bytes.fromhex("68140c001600670106040d91000000c83239081d0808"), FROM_CLIENT))
    assert ev.pdus.function.tolist() == [103] and ev.pdus.is_control[0] and ev.pdus.is_write[0]
    assert ev.pdus.subfunction.tolist() == [6] and ev.pdus.peer_unit.tolist() == [4]
    assert ev.points.value[0] == 1220000233.0  # calendar.timegm((2008, 8, 29, 8, 57, 13, 0, 0, 0))


def test_read_command_has_address_only():
    ev = run((apci_i(1, 1, asdu(102, ioa(4711), 1, cot=5)), FROM_CLIENT))
    assert ev.points.address.tolist() == [4711] and math.isnan(ev.points.value[0])


def test_cause_keeps_negative_and_test_bits_in_subfunction():
    # iti_testdissectiec104.pcap frame 134: C_SC_NA_1 ActCon with P/N and T set (COT octet 0xC7).
    ev = run((bytes.fromhex("680e14000a002d01c7020d91ce560081"), FROM_SERVER))
    pdu = ev.pdus
    assert pdu.cause.tolist() == [7] and pdu.subfunction.tolist() == [0xC7]
    assert (pdu.subfunction[0] >> 6) & 1 == 1 and pdu.subfunction[0] >> 7 == 1
    assert ev.points.cause.tolist() == [7] and ev.points.address.tolist() == [22222]


@pytest.mark.parametrize("type_id, control, write", [
    (45, True, False), (46, True, False), (47, True, False), (48, True, True), (49, True, True),
    (50, True, True), (51, True, True), (58, True, False), (61, True, True), (63, True, True),
    (100, True, False), (101, True, False), (103, True, True), (105, True, False), (107, True, False),
    (1, False, False), (13, False, False), (36, False, False), (70, False, False), (110, False, True),
])
def test_control_and_write_flags(type_id, control, write):
    element = bytes(ELEMENTS[type_id].size)
    if type_id == 103:
        element = bytes.fromhex("c83239081d0808")
    ev = run((apci_i(0, 0, asdu(type_id, ioa(1) + element, 1, cot=6)), FROM_CLIENT))
    assert ev.status.tolist() == [STATUS_OK, STATUS_OK]
    assert ev.is_control.tolist() == [control] * 2 and ev.is_write.tolist() == [write] * 2


def test_sequence_gap_and_repeat_per_direction():
    one = asdu(1, ioa(1) + b"\x01", 1)
    ev = run((apci_i(0, 0, one), FROM_SERVER), (apci_i(1, 0, one), FROM_SERVER),
             (apci_i(3, 0, one), FROM_SERVER),
             (apci_i(3, 0, one), FROM_SERVER), (apci_i(4, 0, one), FROM_SERVER),
             (apci_i(9, 5, one), FROM_CLIENT), (apci_i(10, 5, one), FROM_CLIENT))
    pdu = ev.pdus
    assert pdu.seq.tolist() == [0, 1, 3, 3, 4, 9, 10]
    assert pdu.reason.tolist() == [0, 0, REASON_SEQ_GAP, REASON_SEQ_REPEAT, 0, 0, 0]
    assert (pdu.status == STATUS_OK).all()  # a sequence anomaly is reported, the PDU itself is fine
    assert ev.errors == {(PROTO_IEC104, REASON_SEQ_GAP): 1, (PROTO_IEC104, REASON_SEQ_REPEAT): 1}


def test_sequence_wraps_at_32768_and_resets_after_gap():
    one = asdu(1, ioa(1) + b"\x01", 1)
    ev = run((apci_i(32767, 0, one), FROM_SERVER), (apci_i(0, 0, one), FROM_SERVER),
             (apci_i(50, 0, one), FROM_SERVER, True), (apci_i(51, 0, one), FROM_SERVER))
    assert ev.pdus.seq.tolist() == [32767, 0, 50, 51]
    assert (ev.pdus.reason == REASON_NONE).all()


def test_split_at_every_offset_gives_same_events():
    stream = (STARTDT_ACT + apci_i(0, 0, asdu(100, ioa(0) + b"\x14", 1, cot=6))
              + bytes.fromhex("681d02000200" "01901400" "1e04" "000000") + bytes(16) + TESTFR_CON)
    whole = run((stream, FROM_CLIENT))
    cols = ("function", "seq", "ack", "address", "value", "quality", "count", "kind")
    for cut in range(1, len(stream)):
        for cut2 in (cut, min(len(stream), cut + 7)):
            parts = [stream[:cut], stream[cut:cut2], stream[cut2:]]
            ev = run(*[(p, FROM_CLIENT) for p in parts if p])
            for c in cols:
                np.testing.assert_array_equal(ev[c], whole[c], err_msg=f"{cut} {cut2} {c}")


def test_garbage_is_skipped_counted_and_resynchronised():
    ev = run((b"\x00\x01\x02GARBAGE\x68\x02\x02" + TESTFR_ACT, FROM_CLIENT))
    assert ev.function.tolist() == [517]
    assert ev.errors[(PROTO_IEC104, REASON_RESYNC)] >= 1


def test_gap_drops_partial_apdu():
    p = Iec104Parser()
    full = apci_i(0, 0, asdu(13, ioa(1) + bytes(5), 1))
    ev = run((full[:9], FROM_SERVER), (full[4:] + STARTDT_CON, FROM_SERVER, True), parser=p)
    # after the gap the rest of the I frame is garbage: skipped up to the plausible STARTDT con
    assert ev.function.tolist() == [514]
    assert ev.errors[(PROTO_IEC104, REASON_GAP)] == 1


def test_truncated_and_overlong_asdu():
    two = ioa(1) + b"\x01" + ioa(2) + b"\x00"
    ev = run((apci_i(0, 0, asdu(1, two, 3)), FROM_SERVER),  # says 3 objects, carries 2
             (apci_i(1, 0, asdu(1, two + b"\xff", 2)), FROM_SERVER),  # one octet too many
             (bytes.fromhex("6804" "0000" "0000"), FROM_SERVER),  # I frame without ASDU
             (bytes.fromhex("6803010000"), FROM_SERVER))  # L < 4
    pdu = ev.pdus
    assert pdu.status.tolist() == [STATUS_MALFORMED] * 4
    assert pdu.reason.tolist() == [REASON_TRUNCATED, REASON_BAD_LENGTH, REASON_TRUNCATED, REASON_BAD_LENGTH]
    assert pdu.function.tolist() == [1, 1, -1, -1]
    assert ev.points.address.tolist() == [1, 2, 1, 2]  # the objects that fit are still reported


def test_unknown_type_is_reported_unknown():
    ev = run((apci_i(0, 0, asdu(24, ioa(7) + b"\x01\x02", 1)), FROM_SERVER))
    assert ev.status.tolist() == [STATUS_UNKNOWN] and ev.reason.tolist() == [REASON_UNKNOWN_FUNCTION]
    assert ev.function.tolist() == [24] and ev.address.tolist() == [7] and len(ev.points) == 0


def test_buffers_stay_bounded():
    p = Iec104Parser()
    out = EventBuilder()
    p.feed(Chunk(b"\x68\xfd" + bytes(200), flow=1, direction=FROM_SERVER), out)  # waits for a 255-octet APDU
    assert 0 < p.buffered() <= MAX_APDU
    p.feed(Chunk(bytes(random.Random(1).randrange(0, 0x68) for _ in range(100_000)), flow=2,
                 direction=FROM_SERVER), out)
    assert p.buffered() <= 2 * MAX_APDU
    p.close(1)
    p.close(2)
    assert p.buffered() == 0


def test_names():
    assert type_name(58) == "C_SC_TA_1" and type_name(107) == "C_TS_TA_1" and type_name(127) == "F_SC_NB_1"
    standard = [*range(1, 22), *range(30, 42), *range(45, 52), *range(58, 65), 70, *range(100, 108),
                *range(110, 114), *range(120, 128)]
    assert all(type_name(t) != f"unknown-{t}" for t in standard)
    assert type_name(22) == "unknown-22" and cause_name(7) == "actcon" and cause_name(0) == "unknown-0"
    assert set(ELEMENTS) <= set(TYPE_NAMES)


# --- looks_like ---------------------------------------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex(
    "16030100c8010000c40303" + "11" * 32 + "20" + "22" * 32 + "0008130213031301c02f0100007300000010000e00000b"
    "6578616d706c652e636f6d")
COMMON_PAYLOADS = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    TLS_CLIENT_HELLO, b"SSH-2.0-OpenSSH_9.6\r\n", b"220 mail.example.com ESMTP\r\n",
    bytes.fromhex("000100000006010300000002"),  # Modbus read holding registers
    bytes.fromhex("0564050c00040300e07c"),  # DNP3 link header
    b"\x68", b"\x68\x04", b"", b"hello world",
]


@pytest.mark.parametrize("payload", COMMON_PAYLOADS)
def test_looks_like_rejects_common_payloads(payload):
    assert not looks_like(payload)


def test_looks_like_rejects_random_bytes():
    rng = random.Random(104)
    hits = sum(looks_like(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
               for _ in range(20000))
    # Random bytes starting 0x68 followed by plausible S/U or well-formed I APDUs: essentially never.
    hits_68 = sum(looks_like(b"\x68" + bytes(rng.randrange(256) for _ in range(rng.randrange(5, 300))))
                  for _ in range(20000))
    assert hits == 0 and hits_68 <= 5


def test_looks_like_accepts_iec104():
    assert looks_like(STARTDT_ACT) and looks_like(TESTFR_ACT + TESTFR_CON[:3])
    assert looks_like(apci_i(0, 0, asdu(100, ioa(0) + b"\x14", 1, cot=6)))
    assert not looks_like(apci_i(0, 0, asdu(100, ioa(0) + b"\x14\x00", 1, cot=6)))  # length mismatch
    assert not looks_like(apci_i(0, 0, asdu(24, ioa(0) + b"\x14", 1, cot=6)))  # undefined type


def _tcp_payloads(path):
    with open(path, "rb") as fh:
        magic = fh.read(4)
        fh.seek(0)
        reader = dpkt.pcapng.Reader(fh) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(fh)
        for _, buf in reader:
            ip = dpkt.ethernet.Ethernet(buf).data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP) and ip.data.data:
                yield ip.data
    return


@needs_shared
def test_looks_like_on_real_first_payloads():
    """The first payload of every IEC 104 connection in the public captures passes looks_like."""
    seen, passed = 0, 0
    for path in sorted((SHARED_PCAPS / "iec104").glob("*")):
        first = {}
        for tcp in _tcp_payloads(path):
            if 2404 in (tcp.sport, tcp.dport):
                first.setdefault((tcp.sport, tcp.dport), bytes(tcp.data))
        for key, data in first.items():
            if path.name == "iti_testdissectiec104.pcap" or data[:1] != b"\x68":
                continue  # crafted garbage / TCP keep-alive bytes
            seen += 1
            passed += looks_like(data)
    assert seen >= 30 and passed == seen


@needs_shared
def test_many_apdus_in_one_frame_from_capture():
    # automayt_iec104_sq.pcapng: one frame, four APDUs of 16 single points each (SQ=1).
    (tcp,) = list(_tcp_payloads(SHARED_PCAPS / "iec104" / "automayt_iec104_sq.pcapng"))
    ev = run((bytes(tcp.data), FROM_SERVER))
    assert ev.pdus.function.tolist() == [1, 1, 1, 1] and ev.pdus.unit.tolist() == [1054] * 4
    assert len(ev.points) == 64 and (ev.kind[:17] == np.array([KIND_PDU] + [KIND_POINT] * 16)).all()
    assert ev.pdus.seq.tolist() == [1, 2, 3, 4] and (ev.reason == REASON_NONE).all()


def test_roles_follow_the_traffic_not_the_tcp_connection():
    """A controlled station that connected out (it is the TCP client) is still the responder:
    the first APDU that proves a role (STARTDT act, an activation command, spontaneous data) decides."""
    single_cmd = asdu(45, ioa(5) + b"\x01", 1, cot=6)  # C_SC_NA_1 activation, from the controlling side
    measured = asdu(13, ioa(700) + bytes(4) + b"\x00", 1, cot=3)  # M_ME_NC_1 spontaneous
    ev = run((STARTDT_ACT, FROM_SERVER), (STARTDT_CON, FROM_CLIENT),
             (apci_i(0, 0, single_cmd), FROM_SERVER), (apci_i(0, 1, measured), FROM_CLIENT))
    pdus = ev.select(ev.kind == KIND_PDU)
    assert pdus.function.tolist() == [513, 514, 45, 13]
    assert pdus.direction.tolist() == [DIR_REQUEST, DIR_RESPONSE, DIR_REQUEST, DIR_RESPONSE]
    # Without evidence the TCP client is taken as the controlling station.
    ev = run((TESTFR_ACT, FROM_CLIENT), (TESTFR_CON, FROM_SERVER))
    assert ev.direction.tolist() == [DIR_REQUEST, DIR_RESPONSE]
    # Spontaneous data from the TCP client proves the client is the controlled station.
    ev = run((apci_i(0, 0, measured), FROM_CLIENT), (TESTFR_ACT, FROM_SERVER))
    assert ev.select(ev.kind == KIND_PDU).direction.tolist() == [DIR_RESPONSE, DIR_REQUEST]


def test_replayed_apdu_is_a_repeat_and_the_next_frame_no_gap():
    """A replayed I frame (an old N(S) again, as an adversary in the middle sends it) is reported as a
    repeat; the station's next genuine frame continues the count and is not a gap (bundled captures:
    the MITM scenario's replay used to raise a sequence gap minutes later)."""
    def i_frame(ns):  # M_ME_NC_1, one IOA (the module's doctest APDU with N(S) = ns)
        return bytes.fromhex("6812") + (ns << 1).to_bytes(2, "little") + bytes.fromhex(
            "0400" "0d01" "0300" "0a00" "b80b00" "0000c841" "00")

    order = [0, 1, 2, 1, 3, 4]
    for batched in (False, True):
        parser, out = Iec104Parser(), EventBuilder()
        chunks = [Chunk(i_frame(ns), flow=1, direction=FROM_SERVER, frame=k + 1) for k, ns in enumerate(order)]
        if batched:
            parser.feed_batch(chunks, out)
        else:
            for c in chunks:
                parser.feed(c, out)
        ev = out.build()
        pdu = ev.kind == 0
        assert ev.seq[pdu].tolist() == order
        assert ev.reason[pdu].tolist() == [REASON_NONE] * 3 + [REASON_SEQ_REPEAT] + [REASON_NONE] * 2
