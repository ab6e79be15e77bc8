"""TCP reassembly for the ICS flows: per-direction byte streams in sequence order.

Only flows handed to :meth:`Reassembler.process` are tracked (the registry picks ICS ports and
content-detected flows); everything else stays on the vectorised path and never gets here.  This is
the slow path: one Python step per TCP segment of an ICS flow.

Per direction, bytes are delivered in sequence order as :class:`~parsers.base.Chunk` objects:

- retransmissions and overlapping segments are trimmed to the bytes not yet delivered;
- a segment ahead of the expected sequence number waits in a small out-of-order buffer (bounded
  in segments and bytes) for the missing bytes;
- bytes that never arrive become a gap: the buffered data is released with ``chunk.gap = True``
  as soon as the peer's ACK shows the missing bytes were sent (so they were lost by the capture,
  not just reordered), when the out-of-order buffer fills, or when the flow ends;
- a flow table bounded in size (least recently used flow evicted, counted) with an idle timeout.

Which side is the client: the sender of a SYN without ACK; without a captured handshake, the side
that talks to the server port (the ICS port).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .base import FROM_CLIENT, FROM_SERVER, Chunk
from .decode import L4_TCP, L4_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Decoded
from .frames import FrameBatch

_MOD = 1 << 32
_HALF = 1 << 31


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in 32-bit sequence space (RFC 9293 §3.4), as a signed int.

    >>> seq_diff(5, 0xFFFFFFFE)
    7
    """
    d = (a - b) % _MOD
    return d - _MOD if d >= _HALF else d


@dataclass
class ReassemblyLimits:
    max_flows: int = 20000
    idle_timeout_s: float = 600.0
    ooo_segments: int = 32  # out-of-order segments held per direction before declaring a gap
    ooo_bytes: int = 256 * 1024  # ... and bytes held per direction
    total_bytes: int = 64 * 1024 * 1024  # out-of-order bytes held across all flows


@dataclass
class ReassemblyStats:
    segments: int = 0
    bytes_delivered: int = 0
    retransmitted: int = 0  # segments entirely already delivered
    overlaps: int = 0  # segments partly already delivered (trimmed)
    out_of_order: int = 0  # segments that waited for earlier bytes
    gaps: int = 0
    gap_bytes: int = 0
    flows_opened: int = 0
    flows_closed: int = 0
    flows_evicted: int = 0  # pushed out by the flow cap
    flows_expired: int = 0  # idle timeout
    truncated_segments: int = 0  # payload cut by the capture's snap length (a gap follows)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Stream:
    __slots__ = ("next_seq", "ooo", "ooo_bytes", "fin", "last_ack")

    def __init__(self):
        self.next_seq: int | None = None
        self.last_ack: int | None = None  # the ACK this side sent most recently
        self.ooo: dict[int, tuple] = {}  # seq -> (data, ts, frame)
        self.ooo_bytes = 0
        self.fin = False


class Flow:
    __slots__ = ("id", "key", "client", "server", "protocol", "transport", "streams", "last_ts", "first_ts",
                 "frames", "bytes", "closing")

    def __init__(self, fid, key, client, server, protocol, transport, ts):
        self.id = fid
        self.key = key
        self.client = client  # (ip, port)
        self.server = server
        self.protocol = protocol
        self.transport = transport
        self.streams = (_Stream(), _Stream())
        self.first_ts = ts
        self.last_ts = ts
        self.frames = 0
        self.bytes = 0
        self.closing = False


@dataclass
class StreamOutput:
    """What reassembly produced from one frame batch."""

    chunks: list = field(default_factory=list)  # Chunk, in capture order of the frames that released them
    closed: list = field(default_factory=list)  # (flow id, protocol) of flows that ended, after their chunks


class Reassembler:
    """Tracks TCP flows (and UDP "flows" for datagram protocols) chosen by the caller.

    ``process(batch, dec, rows, protocols)`` takes the frame indices ``rows`` to handle and, per row,
    the protocol code that the registry assigned (used only when a flow is created).
    """

    def __init__(self, limits: ReassemblyLimits | None = None):
        self.limits = limits or ReassemblyLimits()
        self.flows: OrderedDict[tuple, Flow] = OrderedDict()
        self.stats = ReassemblyStats()
        self._next_id = 1
        self._held_bytes = 0

    def __len__(self) -> int:
        return len(self.flows)

    # -- flow table ----------------------------------------------------------------------------
    def _new_flow(self, key, a, b, server_is_b, protocol, transport, ts, out: StreamOutput) -> Flow:
        while len(self.flows) >= self.limits.max_flows:
            _, old = self.flows.popitem(last=False)
            self._end(old, out)
            self.stats.flows_evicted += 1
        client, server = (a, b) if server_is_b else (b, a)
        flow = Flow(self._next_id, key, client, server, protocol, transport, ts)
        self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
        self.flows[key] = flow
        self.stats.flows_opened += 1
        return flow

    def _end(self, flow: Flow, out: StreamOutput) -> None:
        for d in (FROM_CLIENT, FROM_SERVER):
            self._flush(flow, d, out)
        out.closed.append((flow.id, flow.protocol))

    def expire(self, now_ns: int, out: StreamOutput | None = None) -> StreamOutput:
        """End flows idle for longer than the timeout (call with the newest timestamp seen)."""
        out = out if out is not None else StreamOutput()
        limit = now_ns - int(self.limits.idle_timeout_s * 1e9)
        while self.flows:
            key, flow = next(iter(self.flows.items()))
            if flow.last_ts >= limit:
                break
            del self.flows[key]
            self._end(flow, out)
            self.stats.flows_expired += 1
        return out

    def flush_all(self) -> StreamOutput:
        """End every flow (end of a capture): buffered bytes are released behind a gap."""
        out = StreamOutput()
        for flow in list(self.flows.values()):
            self._end(flow, out)
        self.flows.clear()
        return out

    # -- segments ------------------------------------------------------------------------------
    def process(self, batch: FrameBatch, dec: Decoded, rows: np.ndarray, protocols: np.ndarray,
                server_is_dst: np.ndarray) -> StreamOutput:
        out = StreamOutput()
        if rows.shape[0] == 0:
            return out
        buf = batch.buf
        # Pull the columns once as Python lists: indexing NumPy scalars per segment is slow.
        ts_l = batch.ts[rows].tolist()
        frame_l = (rows + batch.first_frame).tolist()
        src_l = dec.src[rows].tolist()
        dst_l = dec.dst[rows].tolist()
        sp_l = dec.sport[rows].tolist()
        dp_l = dec.dport[rows].tolist()
        l4_l = dec.l4[rows].tolist()
        fl_l = dec.tcp_flags[rows].tolist()
        seq_l = dec.seq[rows].tolist()
        ack_l = dec.ack[rows].tolist()
        po_l = dec.payload_off[rows].tolist()
        pl_l = dec.payload_len[rows].tolist()
        tr_l = dec.payload_truncated[rows].tolist()
        wl_l = batch.wirelen[rows].tolist()
        proto_l = protocols.tolist()
        sid_l = server_is_dst.tolist()
        make = Chunk.make
        for j in range(len(ts_l)):
            a = (src_l[j], sp_l[j])
            b = (dst_l[j], dp_l[j])
            transport = l4_l[j]
            key = (transport, a, b) if a <= b else (transport, b, a)
            flags = fl_l[j]
            ts = ts_l[j]
            syn_only = transport == L4_TCP and (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN
            flow = self.flows.get(key)
            if flow is None:
                # A bare SYN names its sender the client; otherwise trust the port-based guess.
                flow = self._new_flow(key, a, b, True if syn_only else sid_l[j], proto_l[j], transport, ts, out)
            else:
                self.flows.move_to_end(key)
            flow.last_ts = ts
            flow.frames += 1
            flow.bytes += wl_l[j]
            direction = FROM_CLIENT if a == flow.client else FROM_SERVER
            plen = pl_l[j]
            # where and when this segment was seen: copied into every chunk it releases
            meta = (ts, frame_l[j], src_l[j], dst_l[j], sp_l[j], dp_l[j])
            if transport == L4_UDP:
                if plen:
                    off = po_l[j]
                    out.chunks.append(make(buf[off: off + plen].tobytes(), False, True, flow.protocol, *meta,
                                           flow.id, transport, direction))
                    self.stats.bytes_delivered += plen
                continue
            self._tcp_segment(flow, direction, flags, seq_l[j], ack_l[j], po_l[j], plen, tr_l[j], buf, meta, out)
            if flow.closing:
                del self.flows[flow.key]
                self._end(flow, out)
                self.stats.flows_closed += 1
        return out

    def _tcp_segment(self, flow, direction, flags, seq, ack, off, plen, truncated, buf, meta, out) -> None:
        st = flow.streams[direction]
        peer = flow.streams[1 - direction]
        self.stats.segments += 1
        if flags & TCP_SYN:
            st.next_seq = (seq + 1) % _MOD
            seq = (seq + 1) % _MOD
            if st.ooo:
                self._flush(flow, direction, out)
        if flags & TCP_ACK and peer.ooo and peer.next_seq is not None and seq_diff(ack, peer.next_seq) > 0:
            # The peer's missing bytes were acknowledged, so they were sent and the capture lost
            # them: release what the peer has buffered up to this ACK behind a gap.
            self._release_upto(flow, 1 - direction, ack, out, meta)
        if flags & TCP_ACK:
            st.last_ack = ack
        if plen:
            if st.next_seq is None:
                st.next_seq = seq  # joined mid-stream
            data = buf[off : off + plen].tobytes()
            d = seq_diff(seq, st.next_seq)
            if d < 0:
                if d + plen <= 0:
                    self.stats.retransmitted += 1
                    data = b""
                else:
                    self.stats.overlaps += 1
                    data = data[-d:]
                    seq = st.next_seq
                    d = 0
            if data:
                if d == 0:
                    self._deliver(flow, direction, data, False, meta, out)
                    st.next_seq = (seq + len(data)) % _MOD
                    if truncated:
                        self.stats.truncated_segments += 1
                    if st.ooo:
                        self._drain(flow, direction, out, now=meta)
                else:
                    self._hold(flow, direction, seq, data, meta, out)
        if flags & TCP_FIN:
            st.fin = True
        if flags & TCP_RST or (st.fin and peer.fin):
            flow.closing = True

    def _hold(self, flow, direction, seq, data, meta, out) -> None:
        st = flow.streams[direction]
        self.stats.out_of_order += 1
        prev = st.ooo.get(seq)
        if prev is not None and len(prev[0]) >= len(data):
            return
        if prev is not None:
            st.ooo_bytes -= len(prev[0])
            self._held_bytes -= len(prev[0])
        st.ooo[seq] = (data, meta)
        st.ooo_bytes += len(data)
        self._held_bytes += len(data)
        peer_ack = flow.streams[1 - direction].last_ack
        if peer_ack is not None and seq_diff(peer_ack, seq) >= 0:
            # The peer already acknowledged bytes up to here: the hole was lost by the capture.
            self._release_upto(flow, direction, peer_ack, out, meta)
            return
        lim = self.limits
        if len(st.ooo) > lim.ooo_segments or st.ooo_bytes > lim.ooo_bytes or self._held_bytes > lim.total_bytes:
            # Waited long enough: the missing bytes are not coming.  Skip to the first held segment.
            first = min(st.ooo, key=lambda s: seq_diff(s, st.next_seq))
            self._release_upto(flow, direction, first, out, meta)
            self._drain(flow, direction, out, now=meta)

    def _release_upto(self, flow, direction, upto, out, now=None) -> None:
        """Declare the bytes before ``upto`` (or before the first held segment) missing."""
        st = flow.streams[direction]
        if not st.ooo:
            return
        first = min(st.ooo, key=lambda s: seq_diff(s, st.next_seq))
        if seq_diff(first, st.next_seq) <= 0:
            self._drain(flow, direction, out, now=now)
            return
        if seq_diff(upto, first) < 0:
            return  # the ACK does not reach the held data: nothing proven lost yet
        missing = seq_diff(first, st.next_seq)
        self.stats.gaps += 1
        self.stats.gap_bytes += missing
        st.next_seq = first
        self._drain(flow, direction, out, gap=True, now=now)

    def _drain(self, flow, direction, out, gap: bool = False, now=None) -> None:
        """Deliver held segments that are now in order.  ``now`` is the context of the segment
        that released them: its time and frame are when the bytes became readable."""
        st = flow.streams[direction]
        while st.ooo:
            # next segment that starts at or before the expected sequence number
            best = None
            for s in st.ooo:
                if seq_diff(s, st.next_seq) <= 0:
                    best = s
                    break
            if best is None:
                return
            data, meta = st.ooo.pop(best)
            st.ooo_bytes -= len(data)
            self._held_bytes -= len(data)
            d = seq_diff(best, st.next_seq)
            if d + len(data) <= 0:
                self.stats.retransmitted += 1
                continue
            if d < 0:
                data = data[-d:]
                self.stats.overlaps += 1
            if now is not None:
                meta = (now[0], now[1]) + meta[2:]
            self._deliver(flow, direction, data, gap, meta, out)
            gap = False
            st.next_seq = (st.next_seq + len(data)) % _MOD

    def _flush(self, flow, direction, out) -> None:
        """Release everything held for a direction (flow ends): each hole becomes a gap."""
        st = flow.streams[direction]
        while st.ooo:
            first = min(st.ooo, key=lambda s: seq_diff(s, st.next_seq))
            missing = seq_diff(first, st.next_seq)
            if missing > 0:
                self.stats.gaps += 1
                self.stats.gap_bytes += missing
                st.next_seq = first
            self._drain(flow, direction, out, gap=missing > 0)

    def _deliver(self, flow, direction, data, gap, meta, out) -> None:
        out.chunks.append(Chunk.make(data, gap, False, flow.protocol, *meta, flow.id, flow.transport, direction))
        self.stats.bytes_delivered += len(data)
