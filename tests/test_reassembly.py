"""TCP reassembly: split, coalesced, retransmitted, overlapping, out-of-order and gapped segments."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, raw

from parsers.base import FROM_CLIENT, FROM_SERVER
from parsers.decode import decode
from parsers.frames import FrameBatch
from parsers.reassembly import Reassembler, ReassemblyLimits, seq_diff

CLIENT, SERVER = ("10.0.0.10", 40000), ("10.0.0.20", 502)
ISN_C, ISN_S = 0xFFFFFF00, 1000  # client ISN near the wrap, to exercise sequence arithmetic


def seg(frm, seq, ack=0, flags="A", data=b""):
    (sip, sp), (dip, dp) = (CLIENT, SERVER) if frm == "c" else (SERVER, CLIENT)
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    return raw(e / IP(src=sip, dst=dip) / TCP(sport=sp, dport=dp, seq=seq % 2**32, ack=ack % 2**32, flags=flags) / data)


def handshake():
    return [seg("c", ISN_C, 0, "S"), seg("s", ISN_S, ISN_C + 1, "SA"), seg("c", ISN_C + 1, ISN_S + 1, "A")]


def run(frames, limits=None, batch_size=None):
    """Feed frames through decode + reassembly; return {(direction): [(bytes, gap, frame)]} and stats."""
    r = Reassembler(limits)
    chunks = []
    batch_size = batch_size or len(frames)
    for start in range(0, len(frames), batch_size):
        part = frames[start:start + batch_size]
        b = FrameBatch.from_frames(part, ts=[(start + i) * 1_000_000 for i in range(len(part))],
                                   first_frame=start + 1)
        d = decode(b)
        rows = np.arange(len(b))
        out = r.process(b, d, rows, np.ones(len(b), np.uint8), d.dport == 502)
        chunks += out.chunks
    chunks += r.flush_all().chunks
    by_dir = {FROM_CLIENT: [], FROM_SERVER: []}
    for c in chunks:
        by_dir[c.direction].append((c.data, c.gap, c.frame))
    return by_dir, r.stats


def stream(parts):
    return b"".join(p[0] for p in parts)


def test_in_order_split_and_coalesced_pdus():
    req1, req2 = b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x02", b"\x00\x02\x00\x00\x00\x06\x01\x03\x00\x10\x00\x01"
    c = ISN_C + 1
    frames = handshake() + [
        seg("c", c, ISN_S + 1, "PA", req1 + req2),  # two PDUs in one segment
        seg("s", ISN_S + 1, c + 24, "PA", b"\x00\x01\x00\x00\x00\x07"),  # a response split in two
        seg("s", ISN_S + 7, c + 24, "PA", b"\x01\x03\x04\x00\x0a\x00\x0b"),
    ]
    got, st = run(frames)
    assert stream(got[FROM_CLIENT]) == req1 + req2
    assert stream(got[FROM_SERVER]) == b"\x00\x01\x00\x00\x00\x07\x01\x03\x04\x00\x0a\x00\x0b"
    assert [g for _, g, _ in got[FROM_SERVER]] == [False, False]
    assert [f for _, _, f in got[FROM_SERVER]] == [5, 6]  # each chunk carries the frame that brought it
    assert st.gaps == 0 and st.retransmitted == 0


def test_retransmission_and_overlap_are_trimmed():
    c = ISN_C + 1
    frames = handshake() + [
        seg("c", c, ISN_S + 1, "PA", b"abcdef"),
        seg("c", c, ISN_S + 1, "PA", b"abcdef"),  # exact retransmission
        seg("c", c + 3, ISN_S + 1, "PA", b"defghi"),  # overlap: only "ghi" is new
        seg("c", c + 9, ISN_S + 1, "PA", b"jk"),
    ]
    got, st = run(frames)
    assert stream(got[FROM_CLIENT]) == b"abcdefghijk"
    assert st.retransmitted == 1 and st.overlaps == 1 and st.gaps == 0


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_out_of_order_is_put_back_in_order(batch_size):
    c = ISN_C + 1
    frames = handshake() + [
        seg("c", c + 4, ISN_S + 1, "PA", b"4567"),
        seg("c", c + 8, ISN_S + 1, "PA", b"89"),
        seg("c", c, ISN_S + 1, "PA", b"0123"),
    ]
    got, st = run(frames, batch_size=batch_size)
    assert stream(got[FROM_CLIENT]) == b"0123456789"
    assert not any(g for _, g, _ in got[FROM_CLIENT])
    assert st.out_of_order == 2 and st.gaps == 0


def test_gap_proved_by_peer_ack_is_released_at_once():
    c = ISN_C + 1
    frames = handshake() + [
        seg("c", c, ISN_S + 1, "PA", b"AAAA"),
        # segment "BBBB" at c+4 lost by the capture; the server acknowledges it anyway
        seg("s", ISN_S + 1, c + 8, "A"),
        seg("c", c + 8, ISN_S + 1, "PA", b"CCCC"),
        seg("c", c + 12, ISN_S + 1, "PA", b"DDDD"),
    ]
    got, st = run(frames)
    parts = got[FROM_CLIENT]
    assert [(d, g) for d, g, _ in parts] == [(b"AAAA", False), (b"CCCC", True), (b"DDDD", False)]
    # released when "CCCC" arrived (frame 6), not at the end of the capture
    assert parts[1][2] == 6
    assert st.gaps == 1 and st.gap_bytes == 4


def test_gap_without_ack_is_released_when_the_window_fills():
    c = ISN_C + 1
    lim = ReassemblyLimits(ooo_segments=3)
    frames = handshake() + [seg("c", c, 0, "PA", b"xx")] + [
        seg("c", c + 10 + 2 * i, 0, "PA", bytes([65 + i]) * 2) for i in range(6)]
    got, st = run(frames, limits=lim)
    parts = got[FROM_CLIENT]
    assert stream(parts) == b"xx" + b"AABBCCDDEEFF"
    assert [g for _, g, _ in parts].count(True) == 1 and parts[1][1] is True
    assert st.gaps == 1 and st.gap_bytes == 8
    # released when the 4th out-of-order segment arrived, not at the end
    assert parts[1][2] == 4 + 4


def test_gap_at_end_of_capture_is_flushed():
    c = ISN_C + 1
    frames = handshake() + [seg("c", c, 0, "PA", b"ab"), seg("c", c + 5, 0, "PA", b"fg")]
    got, st = run(frames)
    assert [(d, g) for d, g, _ in got[FROM_CLIENT]] == [(b"ab", False), (b"fg", True)]


def test_mid_stream_join_and_direction_by_server_port():
    frames = [seg("s", 5000, 77, "PA", b"resp"), seg("c", 77, 5004, "PA", b"req")]
    got, _ = run(frames)
    assert stream(got[FROM_SERVER]) == b"resp" and stream(got[FROM_CLIENT]) == b"req"


def test_flow_cap_evicts_least_recently_used_and_counts():
    frames = []
    for i in range(5):
        (ip, _), srv = CLIENT, SERVER
        e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        frames.append(raw(e / IP(src=ip, dst=srv[0]) / TCP(sport=41000 + i, dport=502, flags="PA") / b"z"))
    r = Reassembler(ReassemblyLimits(max_flows=3))
    b = FrameBatch.from_frames(frames, ts=list(range(5)))
    d = decode(b)
    out = r.process(b, d, np.arange(5), np.ones(5, np.uint8), d.dport == 502)
    assert len(r) == 3 and r.stats.flows_evicted == 2
    assert len(out.closed) == 2 and len(out.chunks) == 5


def test_fin_closes_and_idle_flows_expire():
    c = ISN_C + 1
    frames = handshake() + [seg("c", c, ISN_S + 1, "FA"), seg("s", ISN_S + 1, c + 1, "FA")]
    r = Reassembler(ReassemblyLimits(idle_timeout_s=10))
    b = FrameBatch.from_frames(frames, ts=[0] * len(frames))
    d = decode(b)
    out = r.process(b, d, np.arange(len(b)), np.ones(len(b), np.uint8), d.dport == 502)
    assert len(r) == 0 and r.stats.flows_closed == 1 and len(out.closed) == 1
    b = FrameBatch.from_frames([seg("c", 1, 0, "PA", b"x")], ts=[0])
    d = decode(b)
    r.process(b, d, np.arange(1), np.ones(1, np.uint8), d.dport == 502)
    assert len(r) == 1
    out = r.expire(11 * 10**9)
    assert len(r) == 0 and r.stats.flows_expired == 1 and len(out.closed) == 1


def test_memory_bound_per_direction():
    c = ISN_C + 1
    lim = ReassemblyLimits(ooo_bytes=1000, ooo_segments=1000)
    frames = handshake() + [seg("c", c + 100 + 100 * i, 0, "PA", b"q" * 100) for i in range(30)]
    r = Reassembler(lim)
    b = FrameBatch.from_frames(frames, ts=[0] * len(frames))
    d = decode(b)
    r.process(b, d, np.arange(len(b)), np.ones(len(b), np.uint8), d.dport == 502)
    held = max(s.ooo_bytes for f in r.flows.values() for s in f.streams)
    assert held <= 1000 and r.stats.gaps >= 1


def test_seq_diff_wraps():
    assert seq_diff(0, 2**32 - 1) == 1 and seq_diff(2**32 - 1, 0) == -1
