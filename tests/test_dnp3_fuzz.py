"""The DNP3 parser never raises and never holds unbounded memory, whatever the bytes, and its batch
path (feed_batch) writes exactly the rows of feed.

Default: a few hundred examples per property.  Long run: OTWATCH_FUZZ_EXAMPLES=100000 (the
``slow`` tests read it; ``pytest -m slow tests/test_dnp3_fuzz.py``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.crc import crc16_dnp
from parsers.dnp3 import MAX_FRAGMENTS_PER_STREAM, MAX_LINK_FRAME, Dnp3Parser
from parsers.dnp3_objects import OBJECTS, PACKED_BITS
from parsers.events import PROTO_DNP3, EventBuilder
from tests.batchcheck import check_same

LONG = int(os.environ.get("OTWATCH_FUZZ_EXAMPLES", "0"))
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=max(LONG, 1), deadline=None, suppress_health_check=list(HealthCheck))


def link_frame(ctrl: int, dst: int, src: int, user: bytes) -> bytes:
    h = bytes([0x05, 0x64, 5 + len(user), ctrl]) + dst.to_bytes(2, "little") + src.to_bytes(2, "little")
    out = h + crc16_dnp(h).to_bytes(2, "little")
    for i in range(0, len(user), 16):
        out += user[i:i + 16] + crc16_dnp(user[i:i + 16]).to_bytes(2, "little")
    return out


# Valid-looking application fragments: a real header and object headers with arbitrary
# qualifiers, counts and ranges (huge ranges included), then arbitrary object bytes.
groups = st.sampled_from([0, 1, 2, 3, 4, 10, 12, 20, 21, 22, 30, 32, 40, 41, 50, 51, 52, 60, 70, 80,
                          110, 112, 120, 200])
object_header = st.tuples(groups, st.integers(0, 255), st.sampled_from(
    [0x00, 0x01, 0x02, 0x06, 0x07, 0x08, 0x17, 0x28, 0x39, 0x5B, 0x0B, 0x19, 0xFF]), st.binary(max_size=8))
app_fragment = st.builds(
    lambda ac, fc, iin, headers, tail: bytes([ac, fc]) + (iin if fc >= 129 else b"")
    + b"".join(bytes(h[:3]) + h[3] for h in headers) + tail,
    st.integers(0, 255), st.sampled_from(list(range(34)) + [129, 130, 131, 77]), st.binary(min_size=2, max_size=2),
    st.lists(object_header, max_size=4), st.binary(max_size=64))


@st.composite
def well_formed_objects(draw) -> bytes:
    """Object headers that are right for their objects (Annex A sizes; prefixes and ranges of table
    4-5/4-6) over random object bytes: what the batch path decodes itself."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        group, variation = draw(st.sampled_from(sorted(OBJECTS) + sorted(PACKED_BITS) + [(60, 1), (110, 3)]))
        n = draw(st.integers(0, 40))
        prefix = draw(st.sampled_from([0, 1, 2])) if (group, variation) not in PACKED_BITS else 0
        start = draw(st.integers(0, 200))
        ranges = {0x00: bytes([start, start + n - 1]) if n else None,
                  0x01: start.to_bytes(2, "little") + (start + n - 1).to_bytes(2, "little") if n else None,
                  0x07: bytes([n]), 0x08: n.to_bytes(2, "little")}
        code = draw(st.sampled_from([c for c, r in ranges.items() if r is not None and (prefix == 0 or c >= 7)]))
        if (group, variation) in PACKED_BITS:
            size = (n * PACKED_BITS[(group, variation)] + 7) // 8
        else:
            size = n * ((prefix and 1 << (prefix - 1)) + (OBJECTS[(group, variation)].size
                                                          if (group, variation) in OBJECTS else variation))
            if group == 60:
                size = 0
        out += bytes([group, variation, prefix << 4 | code]) + ranges[code] + draw(st.binary(min_size=size,
                                                                                              max_size=size))
    return out


@st.composite
def streams_of_segments(draw) -> list[Chunk]:
    """Chunks of two flows, both directions: fragments cut into segments of any size (some lost),
    their frames cut over chunks, now and then a gap."""
    chunks = []
    for _ in range(draw(st.integers(1, 12))):
        flow, direction = draw(st.sampled_from([1, 2])), draw(st.sampled_from([FROM_CLIENT, FROM_SERVER]))
        fc = draw(st.sampled_from([0, 1, 2, 5, 20, 129, 130]))
        app = bytes([draw(st.integers(0, 255)), fc]) + (b"\x00\x00" if fc >= 129 else b"") + draw(well_formed_objects())
        size = draw(st.integers(1, 249))
        parts = [app[i:i + size] for i in range(0, len(app), size)]
        tseq = draw(st.integers(0, 63))
        ctrl = draw(st.sampled_from([0xC4, 0x44, 0xC0, 0xC9, 0x0B]))
        src, dst = draw(st.sampled_from([(1, 10), (2, 10), (10, 1)]))
        for k, part in enumerate(parts):
            if draw(st.integers(0, 14)) == 0:
                continue  # lost segment
            th = (0x40 if k == 0 else 0) | (0x80 if k == len(parts) - 1 else 0) | ((tseq + k) & 63)
            data = link_frame(ctrl, dst, src, bytes([th]) + part)
            cut = draw(st.integers(0, len(data)))
            for piece in (data[:cut], data[cut:]):
                if piece:
                    chunks.append(Chunk(piece, frame=len(chunks) + 1, flow=flow, direction=direction,
                                        gap=draw(st.integers(0, 19)) == 0))
    return chunks


def _segments_in_batches(chunks, sizes):
    groups, i = [], 0
    for size in sizes or [len(chunks)]:
        groups.append(chunks[i:i + size])
        i += size
    if i < len(chunks):
        groups.append(chunks[i:])
    for max_fragment in (2048, 200):  # 200: fragments refused as too large, mid-way
        check_same(lambda: Dnp3Parser(max_fragment=max_fragment), groups, {len(groups) - 1: [1, 2]})


def segments(app: bytes, tseq: int) -> list[bytes]:
    parts = [app[i:i + 249] for i in range(0, len(app), 249)] or [b""]
    return [bytes([(0x40 if k == 0 else 0) | (0x80 if k == len(parts) - 1 else 0) | ((tseq + k) & 63)]) + p
            for k, p in enumerate(parts)]


@st.composite
def mutated_stream(draw):
    """Real frames, then damage: flipped bytes (bad CRCs), truncation, bogus LEN, dropped segments."""
    frames = []
    for _ in range(draw(st.integers(1, 4))):
        ctrl = draw(st.sampled_from([0xC4, 0x44, 0xC0, 0xC9, 0x0B, 0x00, 0xF3]))
        for seg in segments(draw(app_fragment), draw(st.integers(0, 63))):
            if draw(st.integers(0, 9)) == 0:
                continue  # lost segment -> sequence error
            frames.append(link_frame(ctrl, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), seg))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) and data:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def make_chunks(data: bytes, cuts: list[int], gaps: set[int], datagram: bool) -> list[Chunk]:
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [Chunk(data[a:b], frame=i + 1, flow=1, direction=FROM_CLIENT if i % 3 else FROM_SERVER, gap=i in gaps,
                  datagram=datagram) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def feed_all(data: bytes, cuts: list[int], gaps: set[int], datagram: bool) -> tuple[Dnp3Parser, EventBuilder]:
    parser, out = Dnp3Parser(), EventBuilder()
    for chunk in make_chunks(data, cuts, gaps, datagram):
        parser.feed(chunk, out)
        check_bounded(parser)
    return parser, out


def same_in_batches(data: bytes, cuts: list[int], gaps: set[int], datagram: bool) -> None:
    """The batch path (feed_batch) reads the same chunks, two at a time and all at once, into the
    same rows and errors as feed; its state stays as bounded."""
    chunks = make_chunks(data, cuts, gaps, datagram)
    for size in (2, max(len(chunks), 1)):
        groups = [chunks[i: i + size] for i in range(0, len(chunks), size)] or [[]]
        check_same(Dnp3Parser, groups, {len(groups) - 1: [1]})
    parser = Dnp3Parser()
    parser.feed_batch(chunks, EventBuilder())
    check_bounded(parser)


def check_bounded(parser: Dnp3Parser) -> None:
    for stream in parser._streams.values():
        assert len(stream.buf) < MAX_LINK_FRAME
        assert len(stream.fragments) <= MAX_FRAGMENTS_PER_STREAM
        for buf, _seq in stream.fragments.values():
            assert buf is None or len(buf) <= parser.max_fragment


def accounted(data: bytes, out: EventBuilder) -> None:
    batch = out.build()
    assert (batch.protocol == PROTO_DNP3).all()
    if len(data) >= 10:  # every non-trivial input comes back as rows or counted errors
        assert len(batch) or batch.errors or data.startswith(b"\x05\x64")


def _random_bytes(data, cuts, gaps, datagram):
    _, out = feed_all(data, cuts, set(gaps), datagram)
    accounted(data, out)
    same_in_batches(data, cuts, set(gaps), datagram)


def _mutated(data, cuts, gaps, datagram):
    parser, out = feed_all(data, cuts, set(gaps), datagram)
    accounted(data, out)
    parser.close(1)
    assert not parser._streams
    same_in_batches(data, cuts, set(gaps), datagram)


random_args = (st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=8),
               st.lists(st.integers(0, 8), max_size=3), st.booleans())
mutated_args = (mutated_stream(), st.lists(st.integers(0, 4096), max_size=8),
                st.lists(st.integers(0, 8), max_size=2), st.booleans())


@FAST
@given(*random_args)
def test_random_bytes(data, cuts, gaps, datagram):
    _random_bytes(data, cuts, gaps, datagram)


@FAST
@given(*mutated_args)
def test_mutated_valid_pdus(data, cuts, gaps, datagram):
    _mutated(data, cuts, gaps, datagram)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set OTWATCH_FUZZ_EXAMPLES for the long run")
@SLOW
@given(*random_args)
def test_random_bytes_long(data, cuts, gaps, datagram):
    _random_bytes(data, cuts, gaps, datagram)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set OTWATCH_FUZZ_EXAMPLES for the long run")
@SLOW
@given(*mutated_args)
def test_mutated_valid_pdus_long(data, cuts, gaps, datagram):
    _mutated(data, cuts, gaps, datagram)


segment_args = (streams_of_segments(), st.lists(st.integers(1, 30), max_size=4))


@FAST
@given(*segment_args)
def test_segments_of_two_flows_in_batches(chunks, sizes):
    _segments_in_batches(chunks, sizes)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set OTWATCH_FUZZ_EXAMPLES for the long run")
@SLOW
@given(*segment_args)
def test_segments_of_two_flows_in_batches_long(chunks, sizes):
    _segments_in_batches(chunks, sizes)


def test_batch_reads_packed_points_past_its_first_reserve():
    # one frame with ~1,900 packed binary inputs (g1v1): more points than frames can reserve
    data = link_frame(0x44, 1, 10, bytes([0xC0, 0xC0, 129, 0, 0, 1, 1, 0x08]) + (1900).to_bytes(2, "little")
                      + bytes(range(238)))
    chunks = make_chunks(data, [], set(), False)
    assert check_same(Dnp3Parser, [chunks]) == 1901


def test_huge_counts_do_not_allocate():
    # g1v1 0..0xFFFFFFFE (4-octet start/stop) and g30v1 count 2^32-1: no huge lists, just truncation.
    for objs in (bytes([1, 1, 0x02]) + (0).to_bytes(4, "little") + (0xFFFFFFFE).to_bytes(4, "little") + b"\xff",
                 bytes([30, 1, 0x09]) + (0xFFFFFFFF).to_bytes(4, "little") + bytes(5)):
        data = link_frame(0x44, 1, 10, bytes([0xC0, 0xC0, 129, 0, 0]) + objs)
        parser, out = feed_all(data, [], set(), False)
        b = out.build()
        assert b.pdus.status.tolist() == [2] and len(b.points) <= 8
