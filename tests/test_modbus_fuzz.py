"""The Modbus parser never raises, accounts for every input, and keeps bounded state.

Default: a few hundred examples per property.  Long run: ``OTWATCH_FUZZ_EXAMPLES=100000 pytest -m slow
tests/test_modbus_fuzz.py`` runs the same properties with that many examples.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.events import EventBuilder
from parsers.modbus import MAX_ADU, ModbusParser
from tests.batchcheck import check_same

LONG = int(os.environ.get("OTWATCH_FUZZ_EXAMPLES", "0") or 0)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=max(LONG, 1), deadline=None, suppress_health_check=list(HealthCheck))

# Valid request/response PDUs (function code + data) of every public function code, MB-AP §6.
VALID_PDUS = [bytes.fromhex(h) for h in (
    "01 0013 0013", "01 03 CD6B05", "02 00C4 0016", "02 03 ACDB35", "03 006B 0003", "03 06 022B00000064",
    "04 0008 0001", "04 02 000A", "05 00AC FF00", "06 0001 0003", "07", "07 6D", "08 0000 A537",
    "08 0001 FF00", "08 0004 0000", "0B", "0B FFFF 0108", "0C", "0C 08 0000 0108 0121 2000",
    "0F 0013 000A 02 CD01", "0F 0013 000A", "10 0001 0002 04 000A 0102", "10 0001 0002", "11",
    "11 04 42FF0102", "14 0E 06000400010002 06000300090002", "14 0C 05060DFE0020 050633CD0040",
    "15 0D 06 0004 0007 0003 06AF04BE100D", "16 0004 00F2 0025", "17 0003 0006 000E 0003 06 00FF00FF00FF",
    "17 0C 00FE0ACD00010003000D00FF", "18 04DE", "18 0006 0002 01B8 1284", "2B 0E 01 00",
    "2B 0E 01 01 00 00 02 00 03 414243 01 02 5859", "2B 0D 0001", "81 02", "90 04", "5A 00 40",
    "41 0102", "64",
)]


def adu(tid: int, unit: int, pdu: bytes, length: int | None = None) -> bytes:
    length = len(pdu) + 1 if length is None else length
    return tid.to_bytes(2, "big") + b"\x00\x00" + (length & 0xFFFF).to_bytes(2, "big") + bytes([unit]) + pdu


@st.composite
def mutated_stream(draw):
    """A byte stream of valid and broken ADUs back to back."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        pdu = bytearray(draw(st.sampled_from(VALID_PDUS)))
        kind = draw(st.sampled_from(["ok", "truncate", "length", "count", "flip", "range", "junk"]))
        length = None
        if kind == "truncate":
            del pdu[draw(st.integers(0, len(pdu))):]
        elif kind == "length":
            length = draw(st.sampled_from([0, 1, len(pdu) + 2, 253, 254, 255, 300, 0xFFFF]))
        elif kind == "count" and len(pdu) > 1:
            pdu[draw(st.integers(1, len(pdu) - 1))] = draw(st.integers(0, 255))
        elif kind == "flip":
            i = draw(st.integers(0, len(pdu) - 1))
            pdu[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "range" and len(pdu) >= 5:
            pdu[3:5] = b"\xff\xff"  # a huge quantity
        data = adu(draw(st.integers(0, 3)), draw(st.integers(0, 255)), bytes(pdu), length)
        if kind == "junk":
            data = draw(st.binary(max_size=40)) + data
        parts.append(data)
    return b"".join(parts)


def _chunks(data: bytes, cuts: list[int], gaps: list[bool], datagram: bool, server_first: bool) -> list:
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        toward_server = (i % 2 == 0) != server_first
        chunks.append(Chunk(data[a:b], gap=gaps[i % len(gaps)] if gaps else False, datagram=datagram,
                            frame=i + 1, flow=7, sport=40000 if toward_server else 502,
                            dport=502 if toward_server else 40000,
                            direction=FROM_CLIENT if toward_server else FROM_SERVER))
    return chunks


def _feed_all(data: bytes, cuts: list[int], gaps: list[bool], datagram: bool, server_first: bool):
    parser, out = ModbusParser(max_pending=16), EventBuilder()
    chunks = _chunks(data, cuts, gaps, datagram, server_first)
    for chunk in chunks:
        parser.feed(chunk, out)
        # Bounded state: at most one partial ADU per stream direction, a bounded pending table.
        assert parser.buffered_bytes() <= 2 * MAX_ADU
        assert parser.pending_requests() <= 16
    parser.close(7, out)
    assert parser.buffered_bytes() == 0 and parser.pending_requests() == 0
    return out.build()


class _NumpyModbus(ModbusParser):
    feed_batch = ModbusParser.feed_batch_numpy


def check(data, cuts, gaps, datagram, server_first):
    batch = _feed_all(data, cuts, gaps, datagram, server_first)
    # The batch path reads the same chunks, two at a time and all at once, into the same rows.
    chunks = _chunks(data, cuts, gaps, datagram, server_first)
    for size in (2, max(len(chunks), 1)):
        groups = [chunks[i: i + size] for i in range(0, len(chunks), size)] or [[]]
        check_same(lambda: ModbusParser(max_pending=16), groups, {len(groups) - 1: [7]})
        check_same(lambda: _NumpyModbus(max_pending=16), groups, {len(groups) - 1: [7]})  # the edge path
    if data:
        # Every input comes back as events or as counted errors.
        assert len(batch) + sum(batch.errors.values()) > 0
    assert (batch.length[batch.kind == 0] <= MAX_ADU).all()


cut_lists = st.lists(st.integers(0, 2000), max_size=8)
gap_lists = st.lists(st.booleans(), max_size=4)


@FAST
@given(st.binary(max_size=600), cut_lists, gap_lists, st.booleans(), st.booleans())
def test_random_bytes(data, cuts, gaps, datagram, server_first):
    check(data, cuts, gaps, datagram, server_first)


@FAST
@given(mutated_stream(), cut_lists, gap_lists, st.booleans(), st.booleans())
def test_mutated_pdus(data, cuts, gaps, datagram, server_first):
    check(data, cuts, gaps, datagram, server_first)


def _one_direction(parts):
    parser, out = ModbusParser(), EventBuilder()
    for part in parts:
        parser.feed(Chunk(part, flow=1, sport=40000, dport=502), out)
    b = out.build()
    return b.function.tolist(), b.address.tolist(), b.value[b.kind == 1].tolist()


@FAST
@given(st.lists(st.sampled_from(VALID_PDUS), min_size=1, max_size=8), st.lists(st.integers(0, 400), max_size=5))
def test_split_anywhere_gives_same_events(pdus, cuts):
    """Without gaps, where a well-formed stream is cut does not change what is parsed."""
    data = b"".join(adu(i, 1, p) for i, p in enumerate(pdus))
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    assert _one_direction(parts) == _one_direction([data])


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set OTWATCH_FUZZ_EXAMPLES for the long run")
@SLOW
@given(st.one_of(st.binary(max_size=2000), mutated_stream()), cut_lists, gap_lists, st.booleans(), st.booleans())
def test_long_run(data, cuts, gaps, datagram, server_first):
    check(data, cuts, gaps, datagram, server_first)
