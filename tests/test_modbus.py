"""Modbus/TCP parser on hand-built ADUs (examples from MB-AP v1.1b3 §6) and on real capture bytes."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_PDU, KIND_POINT, MB_COIL, MB_DISCRETE_INPUT, MB_HOLDING_REGISTER,
    MB_INPUT_REGISTER, PROTO_MODBUS, REASON_BAD_HEADER, REASON_GAP, REASON_TOO_LARGE, REASON_TRUNCATED,
    REASON_UNKNOWN_FUNCTION, REASON_UNPAIRED, STATUS_EXCEPTION, STATUS_MALFORMED, STATUS_OK, STATUS_UNKNOWN,
    EventBuilder,
)
from parsers.modbus import MAX_ADU, ModbusParser, function_name, looks_like
from tests.conftest import SHARED_PCAPS, needs_shared


def adu(tid: int, unit: int, pdu_hex: str) -> bytes:
    pdu = bytes.fromhex(pdu_hex.replace(" ", ""))
    return tid.to_bytes(2, "big") + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu


def req(data: bytes, frame=1, flow=1, **kw) -> Chunk:
    return Chunk(data, frame=frame, flow=flow, src=0x0A000001, dst=0x0A000002, sport=40000, dport=502,
                 direction=FROM_CLIENT, **kw)


def rsp(data: bytes, frame=2, flow=1, **kw) -> Chunk:
    return Chunk(data, frame=frame, flow=flow, src=0x0A000002, dst=0x0A000001, sport=502, dport=40000,
                 direction=FROM_SERVER, **kw)


def run(*chunks, parser=None):
    parser = parser or ModbusParser()
    out = EventBuilder()
    for c in chunks:
        parser.feed(c, out)
    return out.build(), parser


def pdus(b):
    return b.select(b.kind == KIND_PDU)


def points(b):
    return b.select(b.kind == KIND_POINT)


def test_read_holding_registers_pairs_addresses():
    # MB-AP §6.3 example: read 3 registers from 108 (address 107).
    b, p = run(req(adu(1, 17, "03 006B 0003")), rsp(adu(1, 17, "03 06 022B 0000 0064")))
    pd = pdus(b)
    assert pd.direction.tolist() == [DIR_REQUEST, DIR_RESPONSE]
    assert pd.address.tolist() == [107, 107] and pd.count.tolist() == [3, 3]
    assert pd.seq.tolist() == [1, 1] and pd.unit.tolist() == [17, 17] and pd.length.tolist() == [12, 15]
    pt = points(b)
    assert pt.address.tolist() == [107, 108, 109]
    assert pt.value.tolist() == [555.0, 0.0, 100.0]
    assert set(pt.object.tolist()) == {MB_HOLDING_REGISTER}
    assert (pt.pdu_id == pd.pdu_id[1]).all() and not pt.is_write.any()
    assert p.pending_requests() == 0 and not b.errors


def test_read_coils_and_inputs_bits_lsb_first():
    # MB-AP §6.1 example: 19 coils from address 19; status CD 6B 05.
    b, _ = run(req(adu(2, 1, "01 0013 0013")), rsp(adu(2, 1, "01 03 CD 6B 05")))
    pt = points(b)
    assert pt.address.tolist() == list(range(19, 38))
    bits = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]
    assert pt.value.astype(int).tolist() == bits and set(pt.object.tolist()) == {MB_COIL}
    b, _ = run(req(adu(3, 1, "02 00C4 0016")), rsp(adu(3, 1, "02 03 AC DB 35")))
    assert points(b).object.tolist() == [MB_DISCRETE_INPUT] * 22
    b, _ = run(req(adu(4, 1, "04 0008 0001")), rsp(adu(4, 1, "04 02 000A")))
    assert points(b).object.tolist() == [MB_INPUT_REGISTER] and points(b).value.tolist() == [10.0]


def test_long_register_run_uses_all_values():
    values = list(range(1000, 1125))
    body = "".join("%04x" % v for v in values)
    b, _ = run(req(adu(5, 1, "03 0000 007D")), rsp(adu(5, 1, "03 FA " + body)))
    assert points(b).value.astype(int).tolist() == values and points(b).address.tolist() == list(range(125))


def test_writes_emit_points_with_is_write():
    chunks = [
        req(adu(1, 1, "05 00AC FF00")), rsp(adu(1, 1, "05 00AC FF00")),                  # §6.5
        req(adu(2, 1, "06 0001 0003")), rsp(adu(2, 1, "06 0001 0003")),                  # §6.6
        req(adu(3, 1, "0F 0013 000A 02 CD 01")), rsp(adu(3, 1, "0F 0013 000A")),         # §6.11
        req(adu(4, 1, "10 0001 0002 04 000A 0102")), rsp(adu(4, 1, "10 0001 0002")),     # §6.12
        req(adu(5, 1, "16 0004 00F2 0025")), rsp(adu(5, 1, "16 0004 00F2 0025")),        # §6.16
    ]
    b, p = run(*chunks)
    pd, pt = pdus(b), points(b)
    assert pd.is_write.all() and not pd.is_control.any()
    assert (pd.status == STATUS_OK).all()
    assert pd.function.tolist() == [5, 5, 6, 6, 15, 15, 16, 16, 22, 22]
    assert pt.is_write.all() and (pt.direction == DIR_REQUEST).all()
    coil = pt.select(pt.function == 5)
    assert coil.address.tolist() == [172] and coil.value.tolist() == [1.0] and coil.object[0] == MB_COIL
    multi = pt.select(pt.function == 15)
    assert multi.address.tolist() == list(range(19, 29))
    assert multi.value.astype(int).tolist() == [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    regs = pt.select(pt.function == 16)
    assert regs.address.tolist() == [1, 2] and regs.value.tolist() == [10.0, 258.0]
    mask = pt.select(pt.function == 22)
    assert mask.value.tolist() == [0x25] and mask.quality.tolist() == [0xF2]


def test_read_write_multiple_registers():
    # §6.17 example: read 6 from 3, write 3 to 14.
    b, _ = run(req(adu(1, 1, "17 0003 0006 000E 0003 06 00FF 00FF 00FF")),
               rsp(adu(1, 1, "17 0C 00FE 0ACD 0001 0003 000D 00FF")))
    pt = points(b)
    w = pt.select(pt.direction == DIR_REQUEST)
    assert w.address.tolist() == [14, 15, 16] and w.is_write.all()
    r = pt.select(pt.direction == DIR_RESPONSE)
    assert r.address.tolist() == [3, 4, 5, 6, 7, 8]
    assert r.value.astype(int).tolist() == [0xFE, 0xACD, 1, 3, 0xD, 0xFF]


def test_exception_response():
    # §7 example: FC 01 -> 0x81 with exception code 02.
    b, _ = run(req(adu(9, 1, "01 04A1 0001")), rsp(adu(9, 1, "81 02")))
    pd = pdus(b)
    assert pd.function.tolist() == [1, 1]
    assert pd.status.tolist() == [STATUS_OK, STATUS_EXCEPTION] and pd.cause.tolist() == [-1, 2]
    assert pd.address.tolist() == [0x4A1, 0x4A1] and len(points(b)) == 0


def test_diagnostics_subfunctions_and_flags():
    b, _ = run(req(adu(1, 1, "08 0000 A537")), rsp(adu(1, 1, "08 0000 A537")),
               req(adu(2, 1, "08 0001 FF00")), req(adu(3, 1, "08 0004 0000")), req(adu(4, 1, "08 000A 0000")))
    pd = pdus(b)
    assert pd.subfunction.tolist() == [0, 0, 1, 4, 10]
    assert pd.is_control.tolist() == [False, False, True, True, False]
    assert pd.is_write.tolist() == [False, False, True, True, True]


def test_device_identification_and_server_id_side_table():
    # §6.21 example shape: basic identification, 3 objects.
    objects = b"".join(bytes([i, len(s)]) + s for i, s in enumerate([b"Company", b"PROD", b"V2.11"]))
    body = "2B 0E 01 01 00 00 03" + objects.hex()
    b, p = run(req(adu(1, 5, "2B 0E 01 00")), rsp(adu(1, 5, body)),
               req(adu(2, 5, "11")), rsp(adu(2, 5, "11 04 42 FF 01 02")))
    pd = pdus(b)
    assert pd.subfunction.tolist()[:2] == [14, 14] and pd.count.tolist()[1] == 3
    entry = p.device_ids[(0x0A000002, 5)]
    assert entry["vendor_name"] == "Company" and entry["product_code"] == "PROD"
    assert entry["major_minor_revision"] == "V2.11" and entry["conformity_level"] == 1
    assert entry["server_id"] == "42ff0102" and entry["run_indicator"] is True


def test_file_records_fifo_and_event_counters():
    b, _ = run(
        req(adu(1, 1, "14 0E 06 0004 0001 0002 06 0003 0009 0002")),  # §6.14: 2 sub-requests
        rsp(adu(1, 1, "14 0C 05 06 0DFE 0020 05 06 33CD 0040")),
        req(adu(2, 1, "15 0D 06 0004 0007 0003 06AF 04BE 100D")),     # §6.15: 1 sub-request
        req(adu(3, 1, "18 04DE")), rsp(adu(3, 1, "18 0006 0002 01B8 1284")),  # §6.18
        req(adu(4, 1, "0B")), rsp(adu(4, 1, "0B FFFF 0108")),          # §6.9
    )
    pd = pdus(b)
    assert (pd.status == STATUS_OK).all(), pd.status
    assert pd.count.tolist() == [2, 2, 1, 0, 2, 0, 0x108]
    assert pd.is_write.tolist() == [False, False, True, False, False, False, False]
    assert pd.address.tolist()[3:5] == [0x4DE, 0x4DE]


def test_unknown_and_umas_function_codes_are_kept():
    b, _ = run(req(adu(1, 0, "5A 00 40 FF 00")), req(adu(2, 0, "41 0102")), req(adu(3, 0, "64")))
    pd = pdus(b)
    assert pd.function.tolist() == [90, 65, 100]
    assert (pd.status == STATUS_UNKNOWN).all()
    assert pd.subfunction.tolist() == [0x40, -1, -1] and pd.is_control.tolist() == [True, False, False]
    assert b.errors[(PROTO_MODBUS, REASON_UNKNOWN_FUNCTION)] == 3
    assert function_name(90) == "umas" and function_name(66) == "unknown-66"


def test_several_adus_in_one_chunk_and_split_across_chunks():
    stream = adu(1, 1, "03 0000 0001") + adu(2, 1, "03 0001 0001") + adu(3, 1, "01 0000 0008")
    b, _ = run(req(stream))
    assert pdus(b).seq.tolist() == [1, 2, 3]
    for cut in range(1, len(stream)):
        p = ModbusParser()
        b, _ = run(req(stream[:cut], frame=1), req(stream[cut:], frame=2), parser=p)
        assert pdus(b).seq.tolist() == [1, 2, 3]
        assert p.buffered_bytes() == 0


def test_gap_drops_partial_and_resynchronises():
    a = adu(1, 1, "03 0000 0001")
    b_ = adu(2, 1, "03 0005 0002")
    b, p = run(req(a[:5], frame=1), req(b_, frame=2, gap=True))
    assert pdus(b).seq.tolist() == [2]
    assert b.errors[(PROTO_MODBUS, REASON_GAP)] == 1


def test_garbage_is_skipped_and_counted():
    good = adu(7, 1, "03 0000 0001")
    b, p = run(req(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + good))
    assert pdus(b).seq.tolist() == [7]
    assert b.errors[(PROTO_MODBUS, REASON_BAD_HEADER)] == 1
    b, p = run(req(os.urandom(0) + b"\xff" * 500))
    assert len(b) == 0 and p.buffered_bytes() < MAX_ADU
    assert b.errors[(PROTO_MODBUS, REASON_BAD_HEADER)] >= 1


def test_buffer_bounded_by_max_adu():
    p = ModbusParser()
    out = EventBuilder()
    header = adu(1, 1, "10 0000 007B F6" + "00" * 200)[:100]  # an ADU whose rest never comes
    p.feed(req(header), out)
    assert p.buffered_bytes() == 100
    for i in range(50):
        p.feed(req(bytes(random.Random(i).getrandbits(8) for _ in range(97))), out)
        assert p.buffered_bytes() <= MAX_ADU


def test_malformed_pdus_are_rows_not_exceptions():
    b, _ = run(req(adu(1, 1, "03 00")), req(adu(2, 1, "10 0000 0002 04 0001")), req(adu(3, 1, "05 0001")))
    pd = pdus(b)
    assert pd.status.tolist() == [STATUS_MALFORMED] * 3
    assert pd.reason.tolist()[0] == REASON_TRUNCATED


def test_unpaired_responses_counted_without_points():
    b, p = run(rsp(adu(4, 1, "03 02 0001")))
    assert len(points(b)) == 0 and pdus(b).address.tolist() == [-1]
    assert b.errors[(PROTO_MODBUS, REASON_UNPAIRED)] == 1
    # Pending table bounded.
    p = ModbusParser(max_pending=8)
    out = EventBuilder()
    for tid in range(100):
        p.feed(req(adu(tid, 1, "03 0000 0001")), out)
    assert p.pending_requests() == 8
    p.close(1, out)
    assert p.pending_requests() == 0


def test_direction_from_ports_then_tcp_role():
    # On a non-standard port the TCP role decides.
    c = Chunk(adu(1, 1, "03 0000 0001"), frame=1, flow=3, sport=40000, dport=1502, direction=FROM_CLIENT)
    r = Chunk(adu(1, 1, "03 02 0007"), frame=2, flow=3, sport=1502, dport=40000, direction=FROM_SERVER)
    b, _ = run(c, r)
    assert pdus(b).direction.tolist() == [DIR_REQUEST, DIR_RESPONSE] and points(b).value.tolist() == [7.0]


def test_umas_length_255_is_framed():
    pdu = "5A 00 FE" + "54" * 251
    b, _ = run(rsp(adu(1, 0, pdu) + adu(2, 0, "5A 00 FE")))
    assert pdus(b).seq.tolist() == [1, 2]
    assert b.errors[(PROTO_MODBUS, REASON_TOO_LARGE)] == 1


# -- looks_like -----------------------------------------------------------------------------------

def test_looks_like_accepts_modbus():
    assert looks_like(adu(1, 1, "03 0000 000A"))
    assert looks_like(adu(1, 1, "03 0000 000A") + adu(2, 1, "03 0000 000A")[:5])
    assert looks_like(adu(1, 1, "83 02"))


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    bytes.fromhex("16030100c4010000c00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00",  # TLS ClientHello
    b"SSH-2.0-OpenSSH_9.6\r\n",
    bytes.fromhex("0564 0a44 0100 0300 1b2f"),  # DNP3 link header
    bytes.fromhex("680407000000"),  # IEC-104 STARTDT act
    bytes.fromhex("0300001611e00000000100c0010ac1020100c2020102"),  # TPKT/COTP (S7)
    bytes.fromhex("050000030000000048000000"),  # DCE/RPC bind header
    b"\x00" * 64,
])
def test_looks_like_rejects_common_payloads(payload):
    assert not looks_like(payload)


def test_looks_like_rarely_matches_random_bytes():
    rng = np.random.default_rng(12345)
    hits = sum(looks_like(rng.bytes(int(n))) for n in rng.integers(8, 300, size=20000))
    assert hits <= 2


# -- real capture bytes ---------------------------------------------------------------------------

@needs_shared
def test_real_capture_payloads_with_dpkt():
    """TCP payloads of a real capture, fed segment by segment without the project's pipeline."""
    dpkt = pytest.importorskip("dpkt")
    path = SHARED_PCAPS / "modbus" / "icsnpp_modbus_example.pcap"
    p, out = ModbusParser(), EventBuilder()
    with open(path, "rb") as fh:
        for i, (_ts, frame) in enumerate(dpkt.pcap.Reader(fh), start=1):
            ip = dpkt.ethernet.Ethernet(frame).data
            tcp = getattr(ip, "data", None)
            if not isinstance(tcp, dpkt.tcp.TCP) or not tcp.data:
                continue
            flow = min(tcp.sport, tcp.dport)
            p.feed(Chunk(bytes(tcp.data), frame=i, flow=flow, sport=tcp.sport, dport=tcp.dport,
                         src=int.from_bytes(ip.src, "big"), direction=FROM_CLIENT if tcp.dport == 502 else FROM_SERVER),
                   out)
    b = out.build()
    pd = pdus(b)
    # tshark: 48 Modbus PDUs, one exception (FC 3, code 2), functions 1-8,15-17,20-24,43.
    assert len(pd) == 48
    assert sorted(set(pd.function.tolist())) == [1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 17, 20, 21, 22, 23, 24, 43]
    assert pd.cause[pd.status == STATUS_EXCEPTION].tolist() == [2]
    # tshark frame 26: registers 1..8 of a FC 3 response.
    r = points(b).select(points(b).frame == 26)
    assert r.address.tolist() == list(range(1, 9))
    assert r.value.astype(int).tolist() == [170, 170, 187, 204, 61316, 58347, 40843, 58561]
    names = [e.get("vendor_name") for e in p.device_ids.values()]
    assert "Zeek Modbus Test" in names
