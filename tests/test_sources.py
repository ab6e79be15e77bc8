"""Capture reading: every pcap/pcapng variant we claim, garbage, truncation, and the public captures."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, raw

from agent.sources import CaptureError, CaptureReader, read_capture
from tests.conftest import manifest_rows, needs_shared, SHARED_PCAPS
from tests.pcapgen import pcapng_section, write_pcap

FRAMES = [raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000 + i, dport=502) / (b"x" * i))
          for i in range(5)]
TS = [1_700_000_000_123_456_789 + i * 1_000_000_007 for i in range(5)]


def _frames(batch):
    return [batch.frame(i) for i in range(len(batch))]


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("nanos", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path, byteorder, nanos):
    p = tmp_path / "x.pcap"
    write_pcap(p, FRAMES, TS, byteorder=byteorder, nanos=nanos)
    b = read_capture(p)
    assert _frames(b) == FRAMES
    expect = TS if nanos else [t // 1000 * 1000 for t in TS]
    assert b.ts.tolist() == expect
    assert b.caplen.tolist() == [len(f) for f in FRAMES]
    assert b.frame_number.tolist() == [1, 2, 3, 4, 5]


def test_gzip_and_small_blocks_give_same_frames(tmp_path):
    p = tmp_path / "x.pcap"
    write_pcap(p, FRAMES * 50, TS * 50)
    gz = tmp_path / "x.pcap.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    whole = _frames(read_capture(p))
    # a block smaller than most records forces records to straddle block boundaries
    reader = CaptureReader(gz, block_size=100)
    parts = [f for b in reader for f in _frames(b)]
    assert parts == whole and len(whole) == 250
    assert reader.compressed and reader.truncated == 0


def test_pcap_truncated_mid_record_keeps_frames_before(tmp_path):
    p = tmp_path / "x.pcap"
    write_pcap(p, FRAMES, TS)
    data = p.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-3])
    reader = CaptureReader(cut)
    got = [f for b in reader for f in _frames(b)]
    assert got == FRAMES[:4]
    assert reader.truncated == 16 + len(FRAMES[4]) - 3


def test_corrupt_record_length_stops_with_reason(tmp_path):
    p = tmp_path / "x.pcap"
    write_pcap(p, FRAMES, TS)
    data = bytearray(p.read_bytes())
    second = 24 + 16 + len(FRAMES[0])
    data[second + 8: second + 12] = (10_000_000).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    reader = CaptureReader(p)
    got = [f for b in reader for f in _frames(b)]
    assert got == FRAMES[:1]
    assert "corrupt record header" in reader.corrupt


@pytest.mark.parametrize("content", [b"", b"\x00", b"hello world, not a capture", b"\x1f\x8b\x08\x00garbage"])
def test_garbage_files_raise_capture_error(tmp_path, content):
    p = tmp_path / "bad.pcap"
    p.write_bytes(content)
    with pytest.raises(CaptureError):
        list(CaptureReader(p))


def test_missing_file(tmp_path):
    with pytest.raises(CaptureError, match="no such file"):
        list(CaptureReader(tmp_path / "nope.pcap"))


@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_interfaces_resolutions_and_block_kinds(tmp_path, bo):
    eth = FRAMES[1]
    rawip = FRAMES[2][14:]
    # iface 0: Ethernet, microseconds (default); iface 1: raw IP, nanoseconds; iface 2: 2^-10 s units
    # with a 100 s offset.
    ifaces = [(1, None, None), (101, 9, None), (1, 0x80 | 10, 100)]
    pkts = [("epb", 0, 1_700_000_000_000_001, eth), ("epb", 1, 1_700_000_000_000_000_123, rawip),
            ("pb", 2, 5 * 1024 + 512, eth), ("spb", 0, 0, FRAMES[3])]
    p = tmp_path / "x.pcapng"
    p.write_bytes(pcapng_section(ifaces, pkts, bo) + pcapng_section([(113, None, None)], [], bo))
    b = read_capture(p)
    assert _frames(b) == [eth, rawip, eth, FRAMES[3]]
    assert b.linktype.tolist() == [1, 101, 1, 1]
    assert b.iface.tolist() == [0, 1, 2, 0]
    assert b.ts[0] == 1_700_000_000_000_001_000
    assert b.ts[1] == 1_700_000_000_000_000_123
    assert b.ts[2] == 105_500_000_000  # 5.5 s of 2^-10 units + 100 s offset


def test_pcapng_truncated_block(tmp_path):
    pkts = [("epb", 0, i, f) for i, f in enumerate(FRAMES)]
    data = pcapng_section([(1, None, None)], pkts)
    p = tmp_path / "x.pcapng"
    p.write_bytes(data[:-10])
    reader = CaptureReader(p)
    got = [f for b in reader for f in _frames(b)]
    assert got == FRAMES[:4] and reader.truncated > 0


@needs_shared
@pytest.mark.parametrize("row", manifest_rows(), ids=lambda r: r["file"])
def test_every_shared_capture_reads_with_manifest_count(row):
    reader = CaptureReader(SHARED_PCAPS / row["file"])
    n = sum(len(b) for b in reader)
    assert n == int(row["packets"])
    assert reader.truncated == 0 and reader.corrupt is None
    assert reader.format == row["file_format"]
    assert not reader.unsupported_linktypes


def test_numba_and_python_scanners_agree(tmp_path):
    from agent.sources import _scan_pcap_records, _scan_pcap_records_fast

    p = tmp_path / "x.pcap"
    write_pcap(p, FRAMES * 3, TS * 3)
    buf = np.frombuffer(p.read_bytes()[24:-5], dtype=np.uint8)
    a = _scan_pcap_records(buf, 0, False, 262144)
    b = _scan_pcap_records_fast(buf, 0, False, 262144)
    assert a[0].tolist() == b[0].tolist() and a[1:] == b[1:]
    assert len(a[0]) == 14
