"""DNP3 parser on hand-built frames (IEEE 1815-2012 byte layouts) and on bytes from real captures."""

from __future__ import annotations

import random

import pytest

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.crc import crc16_dnp
from parsers.dnp3 import MAX_LINK_FRAME, Dnp3Parser, looks_like
from parsers.dnp3_objects import FUNCTION_NAMES, function_name
from parsers.events import (
    DIR_REQUEST, DIR_RESPONSE, KIND_POINT, PROTO_DNP3, REASON_BAD_CRC, REASON_SEQ_GAP, REASON_TOO_LARGE,
    REASON_UNKNOWN_OBJECT, STATUS_MALFORMED, EventBuilder,
)
from tests.conftest import SHARED_PCAPS, needs_shared


def link_frame(ctrl: int, dst: int, src: int, user: bytes = b"") -> bytes:
    """A data-link frame (clause 9.2.4): header + CRC, user data in 16-octet blocks + CRC each."""
    h = bytes([0x05, 0x64, 5 + len(user), ctrl]) + dst.to_bytes(2, "little") + src.to_bytes(2, "little")
    out = h + crc16_dnp(h).to_bytes(2, "little")
    for i in range(0, len(user), 16):
        block = user[i:i + 16]
        out += block + crc16_dnp(block).to_bytes(2, "little")
    return out


def request(app: bytes, dst=10, src=1, tseq=0) -> bytes:
    return link_frame(0xC4, dst, src, bytes([0xC0 | tseq]) + app)


def response(app: bytes, dst=1, src=10, tseq=0) -> bytes:
    return link_frame(0x44, dst, src, bytes([0xC0 | tseq]) + app)


def run(*datas, parser=None, datagram=False, gaps=()):
    parser = parser or Dnp3Parser()
    out = EventBuilder()
    for i, d in enumerate(datas):
        parser.feed(Chunk(d, frame=i + 1, flow=1, direction=FROM_CLIENT, datagram=datagram, gap=i in gaps), out)
    return out.build(), parser


def test_function_names_cover_the_standard():
    assert all(code in FUNCTION_NAMES for code in list(range(34)) + [129, 130, 131])
    assert function_name(200) == "unknown-200"


def test_read_request_class_poll():
    # READ class 1,2,3,0 (clause 4.4.1.1 integrity poll): header-only objects, no point rows.
    b, _ = run(request(bytes([0xC3, 0x01, 60, 2, 0x06, 60, 3, 0x06, 60, 4, 0x06, 60, 1, 0x06])))
    assert b.function.tolist() == [1] and b.seq.tolist() == [3]
    assert b.direction.tolist() == [DIR_REQUEST] and b.unit.tolist() == [10] and b.peer_unit.tolist() == [1]
    assert (b.object[0], b.variation[0]) == (60, 2)
    assert not b.is_write[0] and not b.is_control[0]


def test_response_points_and_iin():
    # RESPONSE, IIN1=0x90 (restart, need time) IIN2=0x00; g30v2 (16-bit AI with flag) 0..1;
    # g1v1 packed 0..9; g20v1 (32-bit counter with flag) index-prefixed (qualifier 0x17).
    objs = (bytes([30, 2, 0x00, 0, 1]) + bytes([0x01]) + (1234).to_bytes(2, "little", signed=True)
            + bytes([0x01]) + (-5).to_bytes(2, "little", signed=True)
            + bytes([1, 1, 0x00, 0, 9]) + bytes([0b0000_0101, 0b10])
            + bytes([20, 1, 0x17, 1, 7, 0x01]) + (70000).to_bytes(4, "little"))
    b, _ = run(response(bytes([0xC5, 129, 0x90, 0x00]) + objs))
    pdu = b.pdus
    assert pdu.function.tolist() == [129] and pdu.quality.tolist() == [0x9000]
    assert pdu.direction.tolist() == [DIR_RESPONSE] and pdu.unit.tolist() == [10] and pdu.count.tolist() == [13]
    pts = b.points
    got = list(zip(pts.object.tolist(), pts.address.tolist(), pts.value.tolist(), pts.quality.tolist()))
    assert got[:2] == [(30, 0, 1234.0, 1), (30, 1, -5.0, 1)]
    assert [v for g, a, v, q in got if g == 1] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert got[-1] == (20, 7, 70000.0, 1)
    assert (pts.pdu_id == pdu.pdu_id[0]).all()


def test_crob_direct_operate_is_control_and_write():
    crob = bytes([0x03, 0x01]) + (100).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"\x00"
    b, _ = run(request(bytes([0xC1, 0x05, 12, 1, 0x28, 1, 0]) + (3).to_bytes(2, "little") + crob))
    assert b.is_control[0] and b.is_write[0]
    pts = b.points
    assert pts.address.tolist() == [3] and pts.value.tolist() == [3.0] and pts.quality.tolist() == [0]


def test_link_only_frames_have_their_own_function_range():
    b, _ = run(link_frame(0xC9, 10, 1) + link_frame(0x0B, 1, 10))  # REQUEST_LINK_STATUS, LINK_STATUS
    assert b.function.tolist() == [1009, 1111]
    assert b.direction.tolist() == [DIR_REQUEST, DIR_RESPONSE]
    assert b.unit.tolist() == [10, 10] and b.peer_unit.tolist() == [1, 1]


def test_bad_data_crc_is_a_malformed_row_and_stream_continues():
    bad = bytearray(request(bytes([0xC0, 0x01, 60, 1, 0x06])))
    bad[-1] ^= 0xFF
    good = request(bytes([0xC1, 0x01, 60, 1, 0x06]))
    b, _ = run(bytes(bad) + good)
    assert b.status.tolist() == [STATUS_MALFORMED, 0] and b.reason.tolist()[0] == REASON_BAD_CRC
    assert b.unit.tolist() == [10, 10]


def test_split_anywhere_gives_the_same_events():
    data = request(bytes([0xC0, 0x02, 50, 1, 0x07, 1]) + bytes(6)) + response(bytes([0xC0, 129, 0, 0]))
    whole, _ = run(data)
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 3))
        parts = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
        split, _ = run(*parts)
        assert split.function.tolist() == whole.function.tolist()
        assert split.value[split.kind == KIND_POINT].tolist() == whole.value[whole.kind == KIND_POINT].tolist()


def test_multi_segment_fragment_and_sequence_errors():
    # RESPONSE with 300 x g30v4 (16-bit AI without flag), 0..299: 611 octets -> 3 segments
    app = bytes([0xC0, 129, 0, 0, 30, 4, 0x01]) + (0).to_bytes(2, "little") + (299).to_bytes(2, "little")
    app += b"".join(i.to_bytes(2, "little") for i in range(300))
    segs = [app[i:i + 249] for i in range(0, len(app), 249)]
    frames = []
    for k, s in enumerate(segs):
        th = (0x40 if k == 0 else 0) | (0x80 if k == len(segs) - 1 else 0) | k
        frames.append(link_frame(0x44, 1, 10, bytes([th]) + s))
    b, _ = run(*frames)
    assert b.pdus.function.tolist() == [129] and b.points.value.tolist() == list(map(float, range(300)))
    assert b.pdus.frame.tolist() == [len(frames)]  # attributed to the frame completing it
    # Drop the middle segment: the fragment is abandoned and counted, not emitted.
    b, _ = run(frames[0], frames[2])
    assert len(b) == 0 and b.errors[(PROTO_DNP3, REASON_SEQ_GAP)] == 1


def test_fragment_bound_is_configurable():
    frames = [link_frame(0x44, 1, 10, bytes([0x40 | k if k == 0 else k]) + bytes(249)) for k in range(12)]
    b, p = run(*frames)
    assert b.reason.tolist() == [REASON_TOO_LARGE] and b.errors[(PROTO_DNP3, REASON_TOO_LARGE)] >= 4
    # nothing buffered beyond the bound
    assert all(f[0] is None or len(f[0]) <= 2048 for st in p._streams.values() for f in st.fragments.values())


def test_unknown_object_is_flagged():
    b, _ = run(response(bytes([0xC0, 129, 0, 0, 200, 1, 0x00, 0, 3, 1, 2, 3])))
    assert b.reason.tolist() == [REASON_UNKNOWN_OBJECT] and b.status.tolist() == [STATUS_MALFORMED]


def test_device_attributes_side_table():
    name = b"ACME RTU"
    objs = bytes([0, 252, 0x00, 0, 0, 1, len(name)]) + name + bytes([0, 240, 0x00, 0, 0, 2, 2, 0x00, 0x08])
    _, p = run(response(bytes([0xC0, 129, 0, 0]) + objs))
    assert p.device_attributes == {(0, 10): {"device_manufacturer_name": "ACME RTU", "max_tx_fragment_size": 2048}}


def test_gap_drops_partial_data_and_resynchronises():
    good = request(bytes([0xC0, 0x01, 60, 1, 0x06]))
    b, p = run(good[:7], good, gaps={1})
    assert b.function.tolist() == [1]
    b, p = run(b"\x00garbage" + good)
    assert b.function.tolist() == [1]
    assert all(len(st.buf) < MAX_LINK_FRAME for st in p._streams.values())


def test_udp_datagrams():
    b, _ = run(request(bytes([0xC0, 0x14, 60, 2, 0x06])), datagram=True)
    assert b.function.tolist() == [20]


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    bytes.fromhex("160301020001000200") + bytes(40),  # TLS ClientHello start
    b"\x05\x64\x05\xc9\x03\x00\x04\x00\x00\x00",  # DNP3-looking, bad CRC
    b"SSH-2.0-OpenSSH_9.0\r\n",
])
def test_looks_like_rejects_other_payloads(payload):
    assert not looks_like(payload)


def test_looks_like_random_bytes_rarely_match():
    rng = random.Random(7)
    hits = sum(looks_like(b"\x05\x64" + rng.randbytes(30)) for _ in range(20000))
    assert hits <= 2  # 1 in 65,536 per try even with the start octets given
    assert looks_like(request(bytes([0xC0, 0x01, 60, 1, 0x06])))


@needs_shared
def test_real_capture_bytes_fed_one_byte_at_a_time():
    # Every TCP payload of a real capture, concatenated per direction, fed in 1-byte chunks.
    from agent.pipeline import parse_file

    path = SHARED_PCAPS / "dnp3/digitalbond_dnp3_test_data_part2.pcap"
    ref = parse_file(path)
    ref = ref.select(ref.protocol == PROTO_DNP3)
    import dpkt

    streams: dict = {}
    with open(path, "rb") as fh:
        for _, buf in dpkt.pcap.Reader(fh):
            tcp = dpkt.ethernet.Ethernet(buf).data.data
            if isinstance(tcp, dpkt.tcp.TCP) and tcp.data:
                streams.setdefault(tcp.dport == 20000, []).append(bytes(tcp.data))
    p, out = Dnp3Parser(), EventBuilder()
    for to_server, parts in streams.items():
        data = b"".join(parts)
        for i in range(len(data)):
            p.feed(Chunk(data[i:i + 1], flow=1, direction=FROM_CLIENT if to_server else FROM_SERVER), out)
    b = out.build()
    assert sorted(b.function.tolist()) == sorted(ref.function.tolist())
    assert len(b.points) == len(ref.points)


@needs_shared
def test_fragment_bound_on_real_oversized_capture():
    from agent.pipeline import parse_file

    ev = parse_file(SHARED_PCAPS / "dnp3/suricata_dnp3_max_points.pcap")
    ev = ev.select(ev.protocol == PROTO_DNP3)
    assert ev.reason.tolist() == [REASON_TOO_LARGE] and len(ev.points) == 0

