"""The pipeline: frame batch -> decode -> protocol assignment -> reassembly -> parsers -> event batch.

One direction, plain function calls on batches.  The pipeline owns the per-run state (address book,
flow table, parser state) and the counters every front end (replay summary, metrics, the daemon)
reads.  Nothing here knows whether frames came from a file or an interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from parsers.base import chunk_protocols, feed_chunks, select_chunks
from parsers.decode import L3_IPV4, SKIP_ERRORS, SKIP_FRAGMENT, SKIP_NAMES, AddressBook, decode
from parsers.events import PROTOCOL_NAMES, REASON_NAMES, EventBatch, EventBuilder, KIND_PDU
from parsers.frames import FrameBatch
from parsers.ipfrag import Defragmenter
from parsers.reassembly import Reassembler, ReassemblyLimits
from parsers.registry import Registry


@dataclass
class PipelineStats:
    frames: int = 0
    bytes: int = 0
    frames_by_protocol: dict = field(default_factory=dict)  # name -> frames of flows of that protocol
    bytes_by_protocol: dict = field(default_factory=dict)
    pdus_by_protocol: dict = field(default_factory=dict)
    points_by_protocol: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # decode skip reason -> frames
    parse_errors: dict = field(default_factory=dict)  # "protocol/reason" -> count
    batches: int = 0
    busy_s: float = 0.0
    first_ts: int | None = None
    last_ts: int | None = None

    def _add(self, d: dict, key, n: int) -> None:
        if n:
            d[key] = d.get(key, 0) + int(n)


class Pipeline:
    """Run frame batches through decoding, reassembly and the protocol parsers.

    >>> from scapy.all import Ether, IP, TCP, raw
    >>> mbap = bytes.fromhex("000100000006" "01" "03" "0000" "0002")
    >>> e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    >>> f = raw(e/IP(src="10.0.0.1", dst="10.0.0.2")/TCP(sport=40000, dport=502, flags="PA")/mbap)
    >>> p = Pipeline()
    >>> ev = p.process(FrameBatch.from_frames([f], ts=[1_000_000_000]))
    >>> int(ev.function[0]), int(ev.unit[0]), p.stats.frames_by_protocol
    (3, 1, {'modbus': 1})
    """

    def __init__(self, registry: Registry | None = None, limits: ReassemblyLimits | None = None,
                 compiled: bool = True):
        self.book = AddressBook()
        self.registry = registry if registry is not None else Registry()
        self.reassembler = Reassembler(limits)
        #: IPv4 fragments put back together (a fragmented write must raise what the whole one does)
        self.defrag = Defragmenter()
        self.builder = EventBuilder()
        #: parsers read each batch's chunks through their batch paths (``feed_batch``: compiled with
        #: Numba, several times faster; Numba and LLVM add ~160 MB of resident memory); False feeds
        #: chunks one by one (``feed``) and never loads Numba -- the edge agent's default.
        self.compiled = compiled
        self.stats = PipelineStats()
        #: called with (batch, decoded, protocol per frame) for every batch: the asset inventory
        #: and the metrics read whole-frame facts (MACs, non-ICS talkers) here, not from events.
        self.frame_observers: list = []

    def process(self, batch: FrameBatch) -> EventBatch:
        t0 = time.perf_counter()
        st = self.stats
        n = len(batch)
        st.batches += 1
        if n == 0:
            return EventBatch.empty()
        st.frames += n
        st.bytes += int(batch.wirelen.sum(dtype=np.int64))
        if st.first_ts is None:
            st.first_ts = int(batch.ts[0])
        st.last_ts = int(batch.ts[-1])

        dec = decode(batch, self.book)
        vals, counts = np.unique(dec.skip, return_counts=True)
        for v, c in zip(vals.tolist(), counts.tolist()):
            if v:
                st._add(st.skipped, SKIP_NAMES[v], c)

        proto, server_is_dst = self.registry.classify(batch, dec)
        frames_per = np.bincount(proto, minlength=4)
        bytes_per = np.bincount(proto, weights=batch.wirelen, minlength=4)
        for code in range(1, len(frames_per)):
            name = PROTOCOL_NAMES.get(code, f"unknown-{code}")
            st._add(st.frames_by_protocol, name, frames_per[code])
            st._add(st.bytes_by_protocol, name, bytes_per[code])

        for observe in self.frame_observers:
            observe(batch, dec, proto)
        rows = np.flatnonzero(proto)
        out = self.reassembler.process(batch, dec, rows, proto[rows], server_is_dst[rows])
        self.reassembler.expire(int(batch.ts.max()), out)
        events = self._parse(out)
        frag_rows = np.flatnonzero((dec.skip == SKIP_FRAGMENT) & (dec.l3 == L3_IPV4))
        if frag_rows.size:
            whole = self.defrag.process(batch, frag_rows)
            if whole is not None:  # the datagrams it completed, through the same steps
                events = EventBatch.concat([events, self.process(whole)])
                st.frames -= len(whole)  # already counted as their fragments
                st.bytes -= int(whole.wirelen.sum(dtype=np.int64))
                st.batches -= 1
        st.busy_s += time.perf_counter() - t0
        return events

    def finish(self) -> EventBatch:
        """End of input: release every flow's buffered bytes and parse them."""
        return self._parse(self.reassembler.flush_all())

    def _parse(self, out) -> EventBatch:
        parsers = self.registry.parsers
        builder = self.builder
        chunks = out.chunks
        if chunks:
            # Each parser reads all of its chunks at once; with several protocols in the batch the
            # rows are tagged with their chunk's place and put back in chunk order by build().
            protocol = chunk_protocols(chunks)
            codes = np.unique(protocol).tolist()
            for code in codes:
                parser = parsers.get(code)
                if parser is None:
                    continue
                if len(codes) == 1:
                    feed_chunks(parser, chunks, builder, None, self.compiled)
                else:
                    tags = np.flatnonzero(protocol == code)
                    feed_chunks(parser, select_chunks(chunks, tags), builder, tags, self.compiled)
        for flow_id, code in out.closed:
            parser = parsers.get(code)
            if parser is not None:
                parser.close(flow_id, builder)
        events = builder.build()
        self._count(events)
        return events

    def _count(self, events: EventBatch) -> None:
        st = self.stats
        if len(events):
            is_pdu = events.kind == KIND_PDU
            for code, name in PROTOCOL_NAMES.items():
                if code:
                    m = events.protocol == code
                    st._add(st.pdus_by_protocol, name, np.count_nonzero(m & is_pdu))
                    st._add(st.points_by_protocol, name, np.count_nonzero(m & ~is_pdu))
        for (code, reason), n in events.errors.items():
            st._add(st.parse_errors, f"{PROTOCOL_NAMES.get(code, code)}/{REASON_NAMES.get(reason, reason)}", n)

    def error_summary(self) -> dict:
        """Everything that went wrong, by reason: decode skips that are errors, parse errors, gaps."""
        st = self.stats
        errors = {f"decode/{k}": v for k, v in st.skipped.items() if _skip_code(k) in SKIP_ERRORS}
        errors.update(st.parse_errors)
        rs = self.reassembler.stats
        if rs.gaps:
            errors["tcp/gap"] = rs.gaps
        if rs.flows_evicted:
            errors["tcp/flow_evicted"] = rs.flows_evicted
        fs = self.defrag.stats
        for name, n in (("fragment_overlap", fs.overlaps), ("tiny_fragment", fs.tiny),
                        ("fragment_timeout", fs.timeouts), ("fragment_dropped", fs.dropped)):
            if n:
                errors[f"ip/{name}"] = n
        return errors


def _skip_code(name: str) -> int:
    return next(k for k, v in SKIP_NAMES.items() if v == name)


def parse_file(path, pipeline: Pipeline | None = None) -> EventBatch:
    """Parse a whole capture file into one event batch (tests, ``otwatch parse``)."""
    from .sources import CaptureReader

    pipeline = pipeline or Pipeline()
    parts = [pipeline.process(b) for b in CaptureReader(path)]
    parts.append(pipeline.finish())
    return EventBatch.concat(parts)
