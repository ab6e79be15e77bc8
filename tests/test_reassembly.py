"""TCP reassembly: split, coalesced, retransmitted, overlapping, out-of-order and gapped segments."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

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


# -- the array path (in-order flows) against the per-segment path ------------------------------

def _chunk_tuple(c):
    return (c.data, c.gap, c.datagram, c.protocol, c.ts, c.frame, c.src, c.dst, c.sport, c.dport, c.flow,
            c.transport, c.direction)


def _both_ways(frames_batches, limits=None):
    """Feed the same frame batches to a vectorised and a per-segment reassembler; return each one's
    (chunks, closed, incidents) per batch, stats and final flow table (keys, ids, counters)."""
    results = []
    for vectorised in (False, True):
        r = Reassembler(limits, vectorised=vectorised)
        per_batch = []
        for b in frames_batches:
            d = decode(b)
            rows = np.flatnonzero((d.l4 == 6) | (d.l4 == 17))
            proto = np.ones(rows.size, np.uint8)
            out = r.process(b, d, rows, proto, (d.dport[rows] == 502) | (d.dport[rows] == 20000))
            r.expire(int(b.ts.max()), out)
            per_batch.append(([_chunk_tuple(c) for c in out.chunks], list(out.closed), list(out.overlaps_different)))
        end = r.flush_all()
        per_batch.append(([_chunk_tuple(c) for c in end.chunks], list(end.closed), []))
        table = [(k, f.id, f.client, f.frames, f.bytes, f.last_ts, f.overlaps_different,
                  [(s.next_seq, s.last_ack, s.fin, s.recent) for s in f.streams]) for k, f in r.flows.items()]
        results.append((per_batch, r.stats.as_dict(), table))
    return results


def _messy_frames(rng):
    """Several connections: mostly in order, with handshakes, closes, retransmissions (same and
    different content), overlaps, reordering, losses, UDP datagrams and mid-stream joins."""
    frames = []
    conns = []
    for c in range(6):
        cl = ("10.0.0.%d" % (10 + c), 40000 + c)
        sv = ("10.0.1.%d" % (c % 3), 502 if c % 2 else 20000)
        conns.append([cl, sv, int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32)), c % 3 == 0])
    def pkt(src, dst, seq, ack, flags, data):
        return raw(Ether() / IP(src=src[0], dst=dst[0]) / TCP(sport=src[1], dport=dst[1], seq=seq % 2**32,
                                                                 ack=ack % 2**32, flags=flags) / data)
    for step in range(600):
        c = int(rng.integers(0, len(conns)))
        cl, sv, cs, ss, fresh = conns[c]
        if fresh:  # a handshake first
            frames += [pkt(cl, sv, cs, 0, "S", b""), pkt(sv, cl, ss, cs + 1, "SA", b"")]
            cs, ss = cs + 1, ss + 1
            conns[c][4] = False
        frm_client = rng.random() < 0.5
        src, dst = (cl, sv) if frm_client else (sv, cl)
        seq, ack = (cs, ss) if frm_client else (ss, cs)
        data = bytes(rng.integers(0, 256, int(rng.integers(0, 40))).astype(np.uint8))
        r = rng.random()
        frame = pkt(src, dst, seq, ack, "PA", data)
        if r < 0.05 and data:  # retransmitted, maybe with other bytes
            frames.append(frame)
            frames.append(pkt(src, dst, seq, ack, "PA", data if rng.random() < 0.5 else bytes(reversed(data)) + b"x"))
        elif r < 0.08 and data:  # reordered with the next segment of the same stream
            nxt = bytes(rng.integers(0, 256, 10).astype(np.uint8))
            frames.append(pkt(src, dst, seq + len(data), ack, "PA", nxt))
            frames.append(frame)
            data = data + nxt
        elif r < 0.10 and data:  # lost
            pass
        elif r < 0.11:  # close, reopened later
            frames += [pkt(cl, sv, cs, ss, "FA", b""), pkt(sv, cl, ss, cs + 1, "FA", b"")]
            conns[c][4] = True
            conns[c][2], conns[c][3] = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32))
            continue
        elif r < 0.13:  # a UDP datagram
            frames.append(raw(Ether() / IP(src=src[0], dst=dst[0]) / UDP(sport=src[1], dport=dst[1]) / data))
            continue
        else:
            frames.append(frame)
        if frm_client:
            conns[c][2] = cs + len(data)
        else:
            conns[c][3] = ss + len(data)
    return frames


@pytest.mark.parametrize("seed", range(3))
def test_array_path_same_as_per_segment(seed):
    rng = np.random.default_rng(seed)
    frames = _messy_frames(rng)
    batches, lo = [], 0
    while lo < len(frames):
        k = int(rng.integers(1, 120))
        part = frames[lo: lo + k]
        batches.append(FrameBatch.from_frames(part, ts=[(lo + i) * 1000 for i in range(len(part))], first_frame=lo + 1))
        lo += k
    slow, fast = _both_ways(batches)
    assert slow[1]["overlaps_different"] > 0 and slow[1]["gaps"] > 0 and slow[1]["flows_closed"] > 0
    for i, (a, b) in enumerate(zip(slow[0], fast[0])):
        assert a == b, f"batch {i} differs"
    assert slow[1] == fast[1]
    assert slow[2] == fast[2]
    # a small flow table: evictions come out the same too
    slow, fast = _both_ways(batches, ReassemblyLimits(max_flows=3))
    assert slow == fast and slow[1]["flows_evicted"] > 0


def test_overlap_with_different_data_is_reported():
    c = ISN_C + 1
    frames = handshake() + [
        seg("c", c, ISN_S + 1, "PA", b"ABCDEFGH"),
        seg("c", c, ISN_S + 1, "PA", b"ABCDEFGH"),  # a plain retransmission: same bytes
        seg("c", c + 4, ISN_S + 1, "PA", b"EFXX1234"),  # overlaps 4 bytes, 2 of them different
        seg("c", c + 12, ISN_S + 1, "PA", b"5678"),
    ]
    r = Reassembler()
    b = FrameBatch.from_frames(frames, ts=[i * 1000 for i in range(len(frames))])
    d = decode(b)
    out = r.process(b, d, np.arange(len(b)), np.ones(len(b), np.uint8), d.dport == 502)
    assert r.stats.overlaps_different == 1 and r.stats.retransmitted == 1 and r.stats.overlaps == 1
    assert len(out.overlaps_different) == 1 and r.last_overlaps_different is out.overlaps_different
    ts, flow, src, dst, sport, dport = out.overlaps_different[0]
    assert (ts, sport, dport) == (5000, 40000, 502) and flow == next(iter(r.flows.values())).id
    assert b"".join(c.data for c in out.chunks if c.direction == FROM_CLIENT) == b"ABCDEFGH12345678"


def _events_both_ways(path):
    from agent.pipeline import Pipeline, parse_file

    out = []
    for vectorised in (False, True):
        pipeline = Pipeline()
        pipeline.reassembler.vectorised = vectorised
        out.append((parse_file(path, pipeline), pipeline.reassembler.stats.as_dict()))
    return out


def test_array_path_same_events_on_captures():
    """Every event of the bundled and public captures is the same with the array path on or off
    (the per-segment path alone), and so are the reassembly counters."""
    from tests.batchcheck import same_rows
    from tests.conftest import PROJECT_PCAPS, shared_pcaps

    paths = sorted(PROJECT_PCAPS.glob("*.pcap")) + shared_pcaps()
    for path in paths:
        (slow, slow_stats), (fast, fast_stats) = _events_both_ways(path)
        same_rows(slow, fast, path.name)
        assert slow_stats == fast_stats, path.name
