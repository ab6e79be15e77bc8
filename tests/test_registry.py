"""Which parser reads which flow: standard ports, configured ports, and recognition by content."""

from __future__ import annotations

import numpy as np
from scapy.all import IP, TCP, UDP, Ether, raw

from agent.pipeline import Pipeline, parse_file
from parsers.events import KIND_PDU, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS
from parsers.frames import FrameBatch
from parsers.registry import Registry
from tests.conftest import SHARED_PCAPS, needs_shared
from tests.test_dnp3 import link_frame

E = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def tcp(sport, dport, payload, seq=1, src="10.0.0.1", dst="10.0.0.2"):
    return raw(Ether(**E) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, flags="PA") / payload)


def dnp3_frame():
    """A DNP3 READ class 1 request in one link frame with valid CRCs (IEEE 1815-2012 §9.2)."""
    return link_frame(0xC4, 10, 1, b"\xc0\xc1\x01\x3c\x02\x06")


MBAP_READ = bytes.fromhex("000100000006" "01" "03" "0000" "0002")
IEC_STARTDT = bytes.fromhex("680407000000")


def run(frames):
    p = Pipeline()
    ev = p.process(FrameBatch.from_frames(frames, ts=list(range(len(frames)))))
    return p, ev


def test_standard_ports():
    _, ev = run([tcp(40000, 502, MBAP_READ), tcp(40001, 20000, dnp3_frame()), tcp(40002, 2404, IEC_STARTDT)])
    assert ev.pdus.protocol.tolist() == [PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104]


def test_other_ports_found_by_content_and_learned():
    frames = [tcp(40000, 5020, MBAP_READ), tcp(40001, 20001, dnp3_frame()), tcp(40002, 2405, IEC_STARTDT + IEC_STARTDT),
              raw(Ether(**E) / IP(src="10.0.0.3", dst="10.0.0.4") / UDP(sport=20001, dport=20001) / dnp3_frame()),
              tcp(40003, 8080, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), tcp(40004, 9999, bytes(64))]
    p, ev = run(frames)
    assert ev.pdus.protocol.tolist() == [PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104, PROTO_IEC104, PROTO_DNP3]
    assert p.registry.learned_ports == {(6, 5020): PROTO_MODBUS, (6, 20001): PROTO_DNP3, (6, 2405): PROTO_IEC104,
                                        (17, 20001): PROTO_DNP3}
    # a later flow on a learned port is assigned by the port table at once
    ev2 = p.process(FrameBatch.from_frames([tcp(41000, 5020, MBAP_READ, src="10.0.0.9")], ts=[10]))
    assert ev2.pdus.protocol.tolist() == [PROTO_MODBUS]


def test_content_detection_can_be_turned_off_and_ports_configured():
    reg = Registry(detect_by_content=False, ports={"modbus": [5020]})
    p = Pipeline(registry=reg)
    ev = p.process(FrameBatch.from_frames([tcp(40000, 5020, MBAP_READ), tcp(40000, 502, MBAP_READ, src="10.0.0.7"),
                                           tcp(40001, 20001, dnp3_frame())], ts=[0, 1, 2]))
    assert ev.pdus.protocol.tolist() == [PROTO_MODBUS]  # 502 replaced by 5020; no detection on 20001
    assert int(ev.pdus.dport[0]) == 5020


def test_learned_ports_are_capped():
    reg = Registry(max_learned_ports=2)
    p = Pipeline(registry=reg)
    frames = [tcp(40000 + i, 6000 + i, MBAP_READ) for i in range(5)]
    p.process(FrameBatch.from_frames(frames, ts=list(range(5))))
    assert len(reg.learned_ports) == 2


@needs_shared
def test_dnp3_on_20001_in_a_public_capture():
    ev = parse_file(SHARED_PCAPS / "dnp3" / "zeek_dnp3_read_p20001.pcap")
    pdus = ev.select((ev.kind == KIND_PDU) & (ev.protocol == PROTO_DNP3))
    assert len(pdus) > 0 and set(np.unique(np.minimum(pdus.sport, pdus.dport)).tolist()) == {20001}
