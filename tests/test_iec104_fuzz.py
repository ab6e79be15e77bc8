"""The IEC 104 parser never raises, accounts for every input octet, and keeps its buffers bounded.

Inputs: random bytes, and streams of valid APDUs (every standard type id, SQ=0 and SQ=1) mutated by
truncation, wrong length octets, wrong object counts, unknown types and inserted garbage; fed whole,
split at random points, with gaps, and as datagrams.

Octet accounting for a stream fed without gaps: every octet is in a PDU row (``length``), still held
for the next chunk, or in a run skipped as garbage (each run counted as ``resync``).  So with no
resync count, PDU lengths plus held octets equal the input exactly.

The batch path (``feed_batch``) must write exactly the rows of ``feed`` on the same chunks: every
property also feeds them both ways, two chunks at a time and all at once (``check``), with the
chunks' directions alternating so that both streams of a connection and the role proof are read.

Default: a few hundred examples.  Long run: ``OTWATCH_FUZZ_EXAMPLES=100000 pytest -m slow ...``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk
from parsers.events import KIND_PDU, PROTO_IEC104, REASON_GAP, REASON_RESYNC, REASON_TRUNCATED, EventBuilder
from parsers.iec104 import MAX_APDU, Iec104Parser, looks_like
from parsers.iec104_types import ELEMENTS, TYPE_NAMES
from tests.batchcheck import check_same

LONG = os.environ.get("OTWATCH_FUZZ_EXAMPLES")
DEFAULT = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG_SETTINGS = settings(max_examples=int(LONG or 0) or 1, deadline=None,
                         suppress_health_check=list(HealthCheck))
slow = pytest.mark.slow
needs_long = pytest.mark.skipif(not LONG, reason="set OTWATCH_FUZZ_EXAMPLES for the long fuzz run")

U_FRAMES = [bytes([0x68, 4, c, 0, 0, 0]) for c in (0x07, 0x0B, 0x13, 0x23, 0x43, 0x83)]
TYPE_IDS = sorted(TYPE_NAMES) + [0, 22, 24, 26, 42, 99, 200, 255]


@st.composite
def apdu(draw):
    """One well-formed APDU (I with a random but correctly sized ASDU, S, or U)."""
    kind = draw(st.sampled_from("IIIISU"))
    if kind == "U":
        return draw(st.sampled_from(U_FRAMES))
    nr = draw(st.integers(0, 32767))
    if kind == "S":
        return bytes([0x68, 4, 1, 0]) + (nr << 1).to_bytes(2, "little")
    type_id = draw(st.sampled_from(TYPE_IDS))
    size = ELEMENTS[type_id].size if type_id in ELEMENTS else draw(st.integers(0, 12))
    sq = draw(st.integers(0, 1))
    n = draw(st.integers(1, 127))
    per = size if sq else 3 + size
    n = max(1, min(n, (243 - (3 if sq else 0)) // max(per, 1)))
    body = draw(st.binary(min_size=(3 if sq else 0) + n * per, max_size=(3 if sq else 0) + n * per))
    asdu = bytes([type_id, (sq << 7) | n]) + draw(st.binary(min_size=4, max_size=4)) + body
    ns = draw(st.integers(0, 32767))
    control = (ns << 1).to_bytes(2, "little") + (nr << 1).to_bytes(2, "little")
    return bytes([0x68, 4 + len(asdu)]) + control + asdu


@st.composite
def mutated(draw, parts):
    """Apply one of the mutations the parser must survive to an APDU."""
    how = draw(st.sampled_from(["none", "none", "truncate", "length", "count", "type", "garbage", "flip"]))
    b = bytearray(parts)
    if how == "truncate":
        b = b[:draw(st.integers(0, len(b)))]
    elif how == "length" and len(b) > 1:
        b[1] = draw(st.integers(0, 255))
    elif how == "count" and len(b) > 7:
        b[7] = draw(st.integers(0, 255))
    elif how == "type" and len(b) > 6:
        b[6] = draw(st.integers(0, 255))
    elif how == "garbage":
        b[draw(st.integers(0, len(b))):0] = draw(st.binary(min_size=1, max_size=40))
    elif how == "flip" and b:
        i = draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(b)


@st.composite
def stream(draw):
    pieces = [draw(mutated(draw(apdu()))) for _ in range(draw(st.integers(1, 8)))]
    return b"".join(pieces)


def _split(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return [p for p in out if p] or [b""]


def _feed(chunks, gaps=None, datagram=False, direction=FROM_SERVER):
    parser, out = Iec104Parser(), EventBuilder()
    peak = 0
    for i, data in enumerate(chunks):
        gap = bool(gaps and gaps[i])
        parser.feed(Chunk(data, gap=gap, datagram=datagram, flow=3, direction=direction, frame=i + 1), out)
        peak = max(peak, parser.buffered())
    return parser, out.build(), peak


def check(chunks, gaps=None, datagram=False, first=FROM_SERVER, alternate=True):
    """``feed`` and ``feed_batch`` write the same rows and count the same errors, whatever the
    grouping: chunk i goes one way or the other (alternating when ``alternate``)."""
    made = [Chunk(data, gap=bool(gaps and gaps[i]), datagram=datagram, flow=3, frame=i + 1,
                  direction=(first ^ (i & 1)) if alternate else first, sport=2404 if first else 40000,
                  dport=40000 if first else 2404)
            for i, data in enumerate(chunks)]
    for size in (2, max(len(made), 1)):
        groups = [made[i: i + size] for i in range(0, len(made), size)] or [[]]
        check_same(Iec104Parser, groups, {len(groups) - 1: [3]})


def _check_accounting(data: bytes, parser, ev, peak):
    assert peak <= MAX_APDU  # one stream never holds more than one APDU's worth of octets
    pdu_octets = int(ev.length[ev.kind == KIND_PDU].sum())
    held = parser.buffered()
    resyncs = ev.errors.get((PROTO_IEC104, REASON_RESYNC), 0)
    if resyncs:
        assert pdu_octets + held < len(data)
    else:
        assert pdu_octets + held == len(data)
    if data and not len(ev) and not ev.errors:
        assert held == len(data)  # nothing reported means everything is still waiting
    assert ((ev.kind == KIND_PDU) | (ev.pdu_id >= 0)).all()


def _random_bytes_body(data):
    parser, ev, peak = _feed([data])
    _check_accounting(data, parser, ev, peak)
    looks_like(data)
    check([data], first=FROM_CLIENT)


def _stream_body(draw, data):
    chunks = _split(draw, data)
    parser, ev, peak = _feed(chunks)
    _check_accounting(data, parser, ev, peak)
    whole_parser, whole, _ = _feed([data])
    # Splitting never changes what a gap-free stream decodes to.
    assert whole.function.tolist() == ev.function.tolist()
    assert whole.address.tolist() == ev.address.tolist()
    looks_like(data)
    check(chunks, alternate=False)
    check(chunks)


def _gaps_body(draw, data):
    chunks = _split(draw, data)
    gaps = draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    parser, ev, peak = _feed(chunks, gaps)
    assert peak <= MAX_APDU
    assert int(ev.length[ev.kind == KIND_PDU].sum()) + parser.buffered() <= len(data)
    if any(gaps[1:]) and not len(ev) and not ev.errors:
        assert parser.buffered() <= len(chunks[-1])
    check(chunks, gaps, alternate=False)
    check(chunks, gaps, first=FROM_CLIENT)


def _datagram_body(draw, data):
    parser, ev, _ = _feed([data], datagram=True, direction=FROM_CLIENT)
    assert parser.buffered() == 0  # a datagram is complete: nothing is kept
    pdu_octets = int(ev.length[ev.kind == KIND_PDU].sum())
    if pdu_octets < len(data):  # the rest was garbage or a cut APDU, and was counted
        counted = sum(ev.errors.get((PROTO_IEC104, r), 0) for r in (REASON_RESYNC, REASON_TRUNCATED))
        assert counted
    check(_split(draw, data), datagram=True, first=FROM_CLIENT)


@DEFAULT
@given(st.binary(max_size=600))
def test_random_bytes(data):
    _random_bytes_body(data)


@DEFAULT
@given(st.data(), stream())
def test_mutated_streams_split_anywhere(draw_data, data):
    _stream_body(draw_data.draw, data)


@DEFAULT
@given(st.data(), stream())
def test_mutated_streams_with_gaps(draw_data, data):
    _gaps_body(draw_data.draw, data)


@DEFAULT
@given(st.data(), stream())
def test_mutated_streams_as_datagrams(draw_data, data):
    _datagram_body(draw_data.draw, data)


def test_gap_with_pending_is_counted():
    parser, ev, _ = _feed([bytes([0x68, 20, 0, 0]), b"\x68\x04\x07\x00\x00\x00"], gaps=[False, True])
    assert ev.errors.get((PROTO_IEC104, REASON_GAP)) == 1 and ev.function.tolist() == [513]


@slow
@needs_long
@LONG_SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes_long(data):
    _random_bytes_body(data)


@slow
@needs_long
@LONG_SETTINGS
@given(st.data(), stream())
def test_mutated_streams_long(draw_data, data):
    _stream_body(draw_data.draw, data)
    _gaps_body(draw_data.draw, data)
    _datagram_body(draw_data.draw, data)
