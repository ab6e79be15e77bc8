"""The parsers' batch paths write exactly the rows of their chunk-by-chunk paths, on real captures.

For every public capture of a protocol and the bundled simulated captures, the chunks the pipeline
hands to the protocol's parser are recorded, then fed both ways -- as the pipeline batched them and
regrouped into small random batches (state carried across batch boundaries) -- and every column of
every row is compared.  The mixed capture checks the pipeline's own ordering of rows across
protocols (each parser reads its chunks together; build() puts rows back in chunk order).
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.pipeline import Pipeline, parse_file
from agent.sources import CaptureReader
from parsers.events import PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, EventBatch
from parsers.registry import Registry
from tests.batchcheck import check_same, regroup, same_rows
from tests.conftest import PROJECT_PCAPS, needs_shared, shared_pcaps

PROTOCOLS = {"modbus": PROTO_MODBUS, "dnp3": PROTO_DNP3, "iec104": PROTO_IEC104}


def batched_protocols():
    """Protocols whose parser has a batch path."""
    reg = Registry()
    return [name for name, code in PROTOCOLS.items() if hasattr(reg.parsers[code], "feed_batch")]


class _Recorder:
    def __init__(self, log):
        self.log = log

    def feed(self, chunk, out):
        self.log[-1][0].append(chunk)

    def close(self, flow, out=None):
        self.log[-1][1].append(flow)


def record(path, code):
    """[(chunks, closed flows)] per pipeline batch, for the parser of protocol ``code``."""
    log: list = []
    pipeline = Pipeline()
    factory = type(pipeline.registry.parsers[code])
    pipeline.registry.parsers = {code: _Recorder(log)}
    for batch in CaptureReader(path):
        log.append(([], []))
        pipeline.process(batch)
    log.append(([], []))
    pipeline.finish()
    return factory, log


def check_capture(path, name) -> int:
    factory, log = record(path, PROTOCOLS[name])
    batches = [chunks for chunks, _ in log]
    closes = {i: closed for i, (_, closed) in enumerate(log)}
    rows = check_same(factory, batches, closes, f"{path.name}")
    # the same chunks in small batches, closes at the end
    chunks = [c for b in batches for c in b]
    small = regroup(chunks, np.random.default_rng(len(chunks)))
    check_same(factory, small, {len(small) - 1: [f for _, cl in log for f in cl]}, f"{path.name} regrouped")
    return rows


@pytest.mark.parametrize("name", batched_protocols())
def test_bundled_captures(name):
    rows = check_capture(PROJECT_PCAPS / f"{name}.pcap", name)
    rows += check_capture(PROJECT_PCAPS / "mixed.pcap", name)
    assert rows > 3000  # the captures are not empty for this protocol (30 min of each)


@needs_shared
@pytest.mark.parametrize("name", batched_protocols())
def test_public_captures(name):
    paths = shared_pcaps(name)
    assert paths
    rows = sum(check_capture(p, name) for p in paths)
    assert rows > 0


def test_pipeline_keeps_chunk_order_across_protocols():
    """A batch with chunks of all three protocols: the same rows, in the same order, with the same
    running pdu_id, as when every chunk is fed on its own."""
    path = PROJECT_PCAPS / "mixed.pcap"
    batched = parse_file(path, Pipeline())
    one_by_one = Pipeline()
    for parser in one_by_one.registry.parsers.values():
        parser.feed_batch = None  # feed_chunks falls back to feed
    reference = parse_file(path, one_by_one)
    assert len(np.unique(reference.protocol)) == 3
    same_rows(reference, batched, "mixed.pcap")
    assert (np.diff(batched.pdu_id[batched.kind == 0]) == 1).all()
    assert isinstance(batched, EventBatch)


def _modbus_mix(rng: np.random.Generator, n: int) -> list:
    """Chunks of several Modbus/TCP connections: reads FC 1-4, writes FC 5, 6, 15, 16, 23 and their
    responses, ~5 % exception responses, and the faults the batch path must hand over to the per-ADU
    code in place: unanswered requests, responses to nobody, reused transaction ids, wrong byte
    counts, ADUs split over segments, garbage (a resync) and gaps."""
    from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk

    def adu(tid, unit, pdu):
        return int(tid).to_bytes(2, "big") + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu

    streams = {}
    for _ in range(n):
        flow = int(rng.integers(1, 5))
        tid = int(rng.integers(0, 6)) if rng.random() < 0.1 else int(rng.integers(0, 65536))
        unit = int(rng.integers(1, 3))
        fc = int(rng.choice([1, 2, 3, 4, 5, 6, 15, 16, 23]))
        addr, qty = int(rng.integers(0, 60000)), int(rng.integers(1, 20))
        regs = rng.integers(0, 65536, qty).astype(">u2").tobytes()
        bits = rng.integers(0, 256, (qty + 7) // 8).astype(np.uint8).tobytes()
        if fc <= 4:
            req = bytes([fc]) + addr.to_bytes(2, "big") + qty.to_bytes(2, "big")
            rsp = bytes([fc, len(bits)]) + bits if fc <= 2 else bytes([fc, 2 * qty]) + regs
        elif fc in (5, 6):
            req = rsp = bytes([fc]) + addr.to_bytes(2, "big") + (0xFF00 if fc == 5 else qty).to_bytes(2, "big")
        elif fc in (15, 16):
            body = bits if fc == 15 else regs
            req = bytes([fc]) + addr.to_bytes(2, "big") + qty.to_bytes(2, "big") + bytes([len(body)]) + body
            rsp = req[:5]
        else:
            waddr = int(rng.integers(0, 60000))
            req = (bytes([23]) + addr.to_bytes(2, "big") + qty.to_bytes(2, "big") + waddr.to_bytes(2, "big")
                   + qty.to_bytes(2, "big") + bytes([2 * qty]) + regs)
            rsp = bytes([23, 2 * qty]) + regs
        r = rng.random()
        if r < 0.05:
            rsp = bytes([fc | 0x80, int(rng.integers(1, 12))])
        elif r < 0.07:
            req = req[:-1] + bytes([(req[-1] + 1) & 0xFF]) if len(req) > 5 else req
            rsp = bytes([rsp[0], (rsp[1] + 2) & 0xFF]) + rsp[2:] if fc in (1, 2, 3, 4, 23) else rsp
        elif r < 0.09 and fc in (15, 16, 23):
            req = req[:5] + bytes([(req[5] + 3) & 0xFF]) + req[6:]  # byte count disagrees
        ops = [(FROM_CLIENT, adu(tid, unit, req)), (FROM_SERVER, adu(tid, unit, rsp))]
        if rng.random() < 0.03:
            ops.pop(int(rng.integers(0, 2)))  # a lost request or response
        for direction, data in ops:
            if rng.random() < 0.005:
                data = bytes(rng.integers(0, 256, int(rng.integers(1, 30))).astype(np.uint8)) + data
            streams.setdefault((flow, direction), []).append(data)
            # cut the stream bytes into chunks now and then (an ADU split over segments)
    chunks = []
    order = [(k, i) for k, parts in streams.items() for i in range(len(parts))]
    rng.shuffle(order)
    order.sort(key=lambda t: t[1])  # interleave the streams, each in its own order
    for (flow, direction), i in order:
        data = streams[(flow, direction)][i]
        cut = int(rng.integers(1, len(data))) if rng.random() < 0.05 else len(data)
        for piece in (data[:cut], data[cut:]):
            if piece:
                chunks.append(Chunk(piece, gap=bool(rng.random() < 0.003), frame=len(chunks) + 1, flow=flow,
                                    sport=40000 + flow if direction == FROM_CLIENT else 502,
                                    dport=502 if direction == FROM_CLIENT else 40000 + flow,
                                    direction=direction))
    return chunks


@pytest.mark.parametrize("seed", range(4))
def test_modbus_mix_stays_identical(seed):
    """The write and exception functions the batch path reads as arrays, mixed with every fault it
    must leave to the per-ADU code: both paths write the same rows, whatever the batching."""
    from parsers.modbus import ModbusParser

    rng = np.random.default_rng(seed)
    chunks = _modbus_mix(rng, 3000)
    rows = check_same(ModbusParser, regroup(chunks, rng, 400), {0: []}, f"seed {seed}")
    assert rows > 6000
    check_same(lambda: ModbusParser(max_pending=4), [chunks], None, f"seed {seed} all at once, small table")


def test_builder_and_batch_rows_follow_the_schema():
    """EventBuilder.pdu/.point (the per-PDU paths) and parsers.batch.rows (the batch paths) write
    the defaults of parsers.events.SCHEMA where a parser says nothing."""
    from parsers.base import Chunk
    from parsers.batch import ChunkColumns, rows
    from parsers.events import (
        CONTEXT_COLUMNS, PDU_DEFAULTS, POINT_DEFAULTS, PROTO_DNP3, SHARED_COLUMNS, EventBuilder,
    )

    chunk = Chunk(b"x", ts=7, frame=3, src=1, dst=2, sport=5, dport=6, flow=9, direction=1)
    out = EventBuilder()
    pid = out.pdu(chunk, PROTO_DNP3, function=4, unit=12, peer_unit=13, seq=2)
    out.point(chunk, PROTO_DNP3, pid, function=4, unit=12, peer_unit=13, seq=2, address=40, value=1.5)
    built = out.build()
    cols = ChunkColumns([chunk])
    columns, _ = rows(cols, np.array([0]), PROTO_DNP3, 0,
                      {"function": 4, "unit": 12, "peer_unit": 13, "seq": 2}, np.array([1]),
                      {"address": np.array([40]), "value": np.array([1.5])})
    batch = EventBatch.from_columns({k: np.asarray(v) for k, v in columns.items()})
    same_rows(built, batch, "builder vs batch rows")
    for name, default in PDU_DEFAULTS.items():
        if name not in ("unit", "peer_unit", "seq"):
            assert built[name][0] == default or (np.isnan(default) and np.isnan(built[name][0])), name
    for name, default in POINT_DEFAULTS.items():
        assert built[name][1] == default, name
    for name in SHARED_COLUMNS:
        assert built[name][1] == built[name][0], name
    for name in CONTEXT_COLUMNS:
        assert built[name][0] == getattr(chunk, name), name


def test_modbus_numpy_path_stays_identical():
    """The edge path's Modbus batch reading (NumPy framing, no Numba) writes feed's rows, on the
    bundled captures and on a generated mix with faults (where it falls back to feed)."""
    from parsers.modbus import ModbusParser

    class NumpyModbus(ModbusParser):
        feed_batch = ModbusParser.feed_batch_numpy

    for path in (PROJECT_PCAPS / "modbus.pcap", PROJECT_PCAPS / "mixed.pcap"):
        _, log = record(path, PROTO_MODBUS)
        check_same(NumpyModbus, [chunks for chunks, _ in log], {i: cl for i, (_, cl) in enumerate(log)}, path.name)
    rng = np.random.default_rng(11)
    chunks = _modbus_mix(rng, 2000)
    check_same(NumpyModbus, regroup(chunks, rng, 300), None, "mix")


def test_chunk_columns_same_from_a_chunk_table():
    """ChunkColumns lays out a ChunkTable (reassembly's array path) exactly as the same chunks as
    a list, held bytes included."""
    from parsers.base import Chunk, ChunkTable
    from parsers.batch import ChunkColumns

    rng = np.random.default_rng(3)
    chunks = [Chunk(bytes(rng.integers(0, 256, int(rng.integers(0, 30))).astype(np.uint8)), ts=i, frame=i + 1,
                    flow=int(rng.integers(1, 4)), direction=int(rng.integers(0, 2)), gap=bool(rng.random() < 0.1),
                    src=7, dst=8, sport=9, dport=502) for i in range(200)]
    table = ChunkTable.from_chunks(chunks)
    for held in (None, {}, {(1, 0): b"abc", (2, 1): b"z", (9, 0): b"never"}):
        a = ChunkColumns(chunks, None, None if held is None else dict(held))
        b = ChunkColumns(table, None, None if held is None else dict(held))
        assert a.raw == b.raw
        for name in ("start", "end", "head", "layout", "stream_first", "ts", "frame", "src", "dst", "sport", "dport",
                     "flow", "transport", "direction", "gap", "datagram"):
            assert (getattr(a, name) == getattr(b, name)).all(), name
