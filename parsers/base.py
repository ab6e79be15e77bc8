"""What reassembly hands to a protocol parser, and the interface every protocol parser implements.

Reassembly (``parsers.reassembly``) turns TCP segments into ordered byte runs per flow direction
and passes UDP datagrams through whole.  Each run arrives as a :class:`Chunk`.  A parser keeps
whatever it needs per stream (a partial PDU left at the end of a chunk, requests waiting for their
response) keyed by ``(chunk.flow, chunk.direction)`` and forgets it when told the flow closed.

A parser never raises on bad bytes: it emits a malformed row or counts an error reason in the
:class:`~parsers.events.EventBuilder` and, after a gap or garbage, resynchronises on the next
plausible header.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Protocol

import numpy as np

from .events import EventBuilder, StreamContext

# Direction of a chunk relative to the TCP connection (not the protocol's own notion of it).
FROM_CLIENT, FROM_SERVER = 0, 1


class Chunk(StreamContext):
    """A run of in-order stream bytes (TCP) or one whole datagram (UDP).

    ``direction`` is FROM_CLIENT (the connection initiator, or the side talking to the server
    port when the handshake was not captured) or FROM_SERVER.  ``gap`` is True when bytes are
    missing right before ``data`` (lost or uncaptured segments): a parser drops any partial PDU it
    held and resynchronises.  ``datagram`` is True for UDP: the data is complete on its own.
    """

    __slots__ = ("data", "gap", "datagram", "protocol")

    def __init__(self, data: bytes, *, gap: bool = False, datagram: bool = False, protocol: int = 0, **ctx):
        super().__init__(**ctx)
        self.data = data
        self.gap = gap
        self.datagram = datagram
        self.protocol = protocol  # PROTO_* the flow was assigned to

    @classmethod
    def make(cls, data, gap, datagram, protocol, ts, frame, src, dst, sport, dport, flow, transport, direction):
        """Positional constructor for the reassembly hot path (no keyword handling)."""
        c = object.__new__(cls)
        c.data, c.gap, c.datagram, c.protocol = data, gap, datagram, protocol
        c.ts, c.frame, c.src, c.dst, c.sport, c.dport = ts, frame, src, dst, sport, dport
        c.flow, c.transport, c.direction = flow, transport, direction
        return c


class StreamParser(Protocol):
    #: PROTO_* code of the protocol this parser reads
    protocol: int

    def feed(self, chunk: Chunk, out: EventBuilder) -> None:
        """Parse the bytes of one chunk, appending PDU and point rows to ``out``."""

    # Optional: ``feed_batch(chunks, out, tags=None)`` reads a list of chunks at once, writing the
    # same rows as ``feed`` on each in turn (see parsers.batch); ``feed_chunks`` uses it when present.

    def close(self, flow: int, out: EventBuilder | None = None) -> None:
        """Forget all state kept for ``flow`` (it ended or was evicted); count what was left
        unfinished (a partial PDU, an unanswered request) into ``out``."""


def feed_chunks(parser, chunks: list, out: EventBuilder, tags=None, batch_path: bool = True) -> None:
    """Hand ``chunks`` (in order) to ``parser``: all at once where it has a batch path
    (``feed_batch``; with ``batch_path`` off, ``feed_batch_numpy``: no Numba), else one by one.  ``tags`` (or None) are the chunks'
    order tags in ``out``."""
    # without the compiled paths a parser may still have a pure-NumPy one (feed_batch_numpy)
    batch = getattr(parser, "feed_batch" if batch_path else "feed_batch_numpy", None)
    if batch is not None:
        batch(chunks, out, tags)
        return
    feed = parser.feed
    if tags is None:
        for chunk in chunks:
            feed(chunk, out)
        return
    for chunk, tag in zip(chunks, tags):
        out.set_tag(tag)
        feed(chunk, out)


#: what a chunk carries besides its bytes, with the dtype of the column a ChunkTable keeps it in
CHUNK_FIELDS = (("ts", np.int64), ("frame", np.int64), ("src", np.uint32), ("dst", np.uint32), ("sport", np.uint16),
                ("dport", np.uint16), ("flow", np.uint32), ("transport", np.uint8), ("direction", np.uint8),
                ("gap", bool), ("datagram", bool), ("protocol", np.int64))


class ChunkTable:
    """Chunks as columns, as reassembly's array path delivers them: chunk ``i`` is the bytes
    ``data[start[i]:end[i]]`` (``data`` a uint8 array, e.g. the frame batch's buffer: no copy) with
    the context of column ``name[i]`` for each of CHUNK_FIELDS.  It reads as a sequence of
    :class:`Chunk` (made when an item is read), so code written for a list of chunks keeps working;
    the batch paths (``parsers.batch.ChunkColumns``) read the columns instead.

    >>> t = ChunkTable.from_chunks([Chunk(b"ab", ts=5, flow=1), Chunk(b"cde", ts=6, flow=2, direction=1)])
    >>> len(t), t[1].data, t.take(np.array([1])).ts.tolist(), [c.data for c in t]
    (2, b'cde', [6], [b'ab', b'cde'])
    """

    __slots__ = ("data", "start", "end") + tuple(name for name, _ in CHUNK_FIELDS)

    def __init__(self, data: np.ndarray, start: np.ndarray, end: np.ndarray, **columns):
        self.data, self.start, self.end = data, start, end
        for name, dtype in CHUNK_FIELDS:
            setattr(self, name, np.asarray(columns[name], dtype=dtype))

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def __getitem__(self, i: int) -> Chunk:
        i = int(i)
        s, e = int(self.start[i]), int(self.end[i])
        return Chunk.make(self.data[s:e].tobytes(), bool(self.gap[i]), bool(self.datagram[i]), int(self.protocol[i]),
                          int(self.ts[i]), int(self.frame[i]), int(self.src[i]), int(self.dst[i]), int(self.sport[i]),
                          int(self.dport[i]), int(self.flow[i]), int(self.transport[i]), int(self.direction[i]))

    def __iter__(self):
        mv = memoryview(self.data)
        make = Chunk.make
        cols = [getattr(self, name).tolist() for name in ("gap", "datagram", "protocol", "ts", "frame", "src", "dst",
                                                          "sport", "dport", "flow", "transport", "direction")]
        for s, e, *rest in zip(self.start.tolist(), self.end.tolist(), *cols):
            yield make(bytes(mv[s:e]), *rest)

    def joined(self, order=None) -> np.ndarray:
        """The chunks' bytes one after another (in ``order`` when given), gathered as one array."""
        start, end = (self.start, self.end) if order is None else (self.start[order], self.end[order])
        lens = end - start
        total = int(lens.sum())
        if not total:
            return np.zeros(0, np.uint8)
        small = np.int32 if max(total, self.data.shape[0]) < 2**31 else np.int64  # halves the index
        index = np.repeat((start - (np.cumsum(lens) - lens)).astype(small), lens)
        index += np.arange(total, dtype=small)
        return self.data[index]

    def take(self, idx) -> "ChunkTable":
        """The chunks at ``idx``, in that order (sharing ``data``)."""
        return ChunkTable(self.data, self.start[idx], self.end[idx],
                          **{name: getattr(self, name)[idx] for name, _ in CHUNK_FIELDS})

    @classmethod
    def from_chunks(cls, chunks) -> "ChunkTable":
        n = len(chunks)
        datas = [c.data for c in chunks]
        lens = np.fromiter(map(len, datas), dtype=np.int64, count=n)
        end = np.cumsum(lens)
        data = np.frombuffer(b"".join(datas), dtype=np.uint8) if n else np.zeros(0, np.uint8)
        return cls(data, end - lens, end, **{name: np.fromiter(map(attrgetter(name), chunks), dtype=dtype, count=n)
                                            for name, dtype in CHUNK_FIELDS})

    @classmethod
    def join(cls, tables) -> "ChunkTable":
        """The chunks of ``tables`` (ChunkTables or lists of chunks) one after another."""
        tables = [t if isinstance(t, ChunkTable) else cls.from_chunks(t) for t in tables]
        if len(tables) == 1:
            return tables[0]
        shift = np.cumsum([0] + [t.data.shape[0] for t in tables[:-1]])
        return cls(np.concatenate([t.data for t in tables]), np.concatenate([t.start + d for t, d in zip(tables, shift)]),
                   np.concatenate([t.end + d for t, d in zip(tables, shift)]),
                   **{name: np.concatenate([getattr(t, name) for t in tables]) for name, _ in CHUNK_FIELDS})


def chunk_protocols(chunks) -> np.ndarray:
    """The protocol code of each chunk of a list or ChunkTable."""
    if isinstance(chunks, ChunkTable):
        return chunks.protocol
    return np.fromiter(map(attrgetter("protocol"), chunks), dtype=np.int64, count=len(chunks))


def select_chunks(chunks, idx: np.ndarray):
    """The chunks at ``idx`` of a list or ChunkTable (of the same kind)."""
    if isinstance(chunks, ChunkTable):
        return chunks.take(idx)
    return [chunks[i] for i in idx.tolist()]
