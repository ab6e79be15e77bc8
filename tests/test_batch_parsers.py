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
