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

from typing import Protocol

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
    (``feed_batch``) and ``batch_path`` is on, else one by one.  ``tags`` (or None) are the chunks'
    order tags in ``out``."""
    batch = getattr(parser, "feed_batch", None) if batch_path else None
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
