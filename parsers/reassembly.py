"""TCP reassembly for the ICS flows: per-direction byte streams in sequence order.

Only flows handed to :meth:`Reassembler.process` are tracked (the registry picks ICS ports and
content-detected flows); everything else stays on the vectorised path and never gets here.

Two paths, same result.  The flows of a batch whose segments are all in order -- no SYN, FIN or
RST, each payload starting exactly where the stream's previous one ended, nothing held out of order
-- are read as arrays (``_Plan``): sort by flow and direction, check contiguity, gather the
payloads (one chunk per segment, as the per-segment path delivers them).  Every other flow
(retransmissions, overlaps, out-of-order or gapped segments, handshakes and closes) goes through
the per-segment Python path in capture order; the chunks of both are merged back in capture order.

Per direction, bytes are delivered in sequence order as :class:`~parsers.base.Chunk` objects:

- retransmissions and overlapping segments are trimmed to the bytes not yet delivered;
- a segment ahead of the expected sequence number waits in a small out-of-order buffer (bounded
  in segments and bytes) for the missing bytes;
- bytes that never arrive become a gap: the buffered data is released with ``chunk.gap = True``
  as soon as the peer's ACK shows the missing bytes were sent (so they were lost by the capture,
  not just reordered), when the out-of-order buffer fills, or when the flow ends;
- a flow table bounded in size (least recently used flow evicted, counted) with an idle timeout;
- bytes sent again with content different from the first copy (an overlap or retransmission that
  disagrees with what was delivered: evasion or injection, Suricata's
  ``reassembly_overlap_different_data``) are counted (``stats.overlaps_different``, per flow
  ``Flow.overlaps_different``) and listed per batch (``StreamOutput.overlaps_different``, also
  ``Reassembler.last_overlaps_different``).  The check compares with the last
  ``ReassemblyLimits.overlap_check_bytes`` bytes delivered per direction (the last segment), which
  covers the usual retransmission of the latest segment.

Which side is the client: the sender of a SYN without ACK; without a captured handshake, the side
that talks to the server port (the ICS port).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .base import FROM_CLIENT, FROM_SERVER, Chunk, ChunkTable
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
    overlap_check_bytes: int = 1024  # last bytes delivered per direction, to compare resent bytes with


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
    overlaps_different: int = 0  # segments resending bytes that differ from those delivered first

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Stream:
    __slots__ = ("next_seq", "ooo", "ooo_bytes", "fin", "last_ack", "recent")

    def __init__(self):
        self.next_seq: int | None = None
        self.last_ack: int | None = None  # the ACK this side sent most recently
        self.ooo: dict[int, tuple] = {}  # seq -> (data, ts, frame)
        self.ooo_bytes = 0
        self.fin = False
        self.recent = b""  # the last bytes delivered (ending at next_seq): the overlap content check


class Flow:
    __slots__ = ("id", "key", "client", "server", "protocol", "transport", "streams", "last_ts", "first_ts",
                 "frames", "bytes", "closing", "overlaps_different")

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
        self.overlaps_different = 0  # segments whose resent bytes differed from the first copy


@dataclass
class StreamOutput:
    """What reassembly produced from one frame batch."""

    chunks: list = field(default_factory=list)  # Chunk, in capture order of the frames that released them
    closed: list = field(default_factory=list)  # (flow id, protocol) of flows that ended, after their chunks
    #: (ts, flow id, src, dst, sport, dport) of each segment whose resent bytes differed from the first copy
    overlaps_different: list = field(default_factory=list)


class Reassembler:
    """Tracks TCP flows (and UDP "flows" for datagram protocols) chosen by the caller.

    ``process(batch, dec, rows, protocols)`` takes the frame indices ``rows`` to handle and, per row,
    the protocol code that the registry assigned (used only when a flow is created).
    """

    def __init__(self, limits: ReassemblyLimits | None = None, vectorised: bool = True):
        self.limits = limits or ReassemblyLimits()
        #: in-order flows read as arrays (False: every segment through the per-segment path; tests
        #: compare the two)
        self.vectorised = vectorised
        self.flows: OrderedDict[tuple, Flow] = OrderedDict()
        self.stats = ReassemblyStats()
        self._next_id = 1
        self._held_bytes = 0
        #: the overlap-with-different-data incidents of the last ``process`` call (see StreamOutput)
        self.last_overlaps_different: list = []

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
        if isinstance(out.chunks, ChunkTable):  # the array path's chunks: the released ones join after them
            more = self.expire(now_ns)
            if more.chunks:
                out.chunks = ChunkTable.join([out.chunks, more.chunks])
            out.closed += more.closed
            out.overlaps_different += more.overlaps_different
            return out
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
        self.last_overlaps_different = out.overlaps_different
        if rows.shape[0] == 0:
            return out
        plan = _Plan(self, batch, dec, rows, protocols, server_is_dst) if self.vectorised else None
        if plan is None or plan.slow_rows is None:  # nothing reads as arrays: every segment one by one
            self._segments(batch, dec, rows, protocols, server_is_dst, out)
            return out
        plan.open_flows()
        slow = plan.slow_rows
        marks = None
        if slow.size:
            marks = []
            self._segments(batch, dec, rows[slow], protocols[slow], server_is_dst[slow], out, marks)
        plan.deliver(out, slow, marks)
        return out

    def _segments(self, batch, dec, rows, protocols, server_is_dst, out, marks=None) -> None:
        """The per-segment path over frames ``rows``, in order; ``marks`` (when given) gets the
        number of chunks in ``out`` after each segment."""
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
            if marks is not None and j:
                marks.append(len(out.chunks))
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
        if marks is not None and ts_l:
            marks.append(len(out.chunks))

    def _tcp_segment(self, flow, direction, flags, seq, ack, off, plen, truncated, buf, meta, out) -> None:
        st = flow.streams[direction]
        peer = flow.streams[1 - direction]
        self.stats.segments += 1
        if flags & TCP_SYN:
            st.next_seq = (seq + 1) % _MOD
            st.recent = b""
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
                self._check_resent(flow, st, d, data, meta, out)
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

    def _check_resent(self, flow, st, d, data, meta, out) -> None:
        """Bytes sent again (``data`` starts ``-d`` bytes before ``st.next_seq``): count them when
        they differ from the bytes delivered first (as far as ``st.recent`` remembers them)."""
        recent = st.recent
        lo = max(d, -len(recent))  # the overlap, relative to next_seq
        hi = min(d + len(data), 0)
        if lo >= hi:
            return
        if data[lo - d: hi - d] != recent[len(recent) + lo: len(recent) + hi]:
            self.stats.overlaps_different += 1
            flow.overlaps_different += 1
            out.overlaps_different.append((meta[0], flow.id) + tuple(meta[2:6]))

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
        st.recent = b""  # what it remembered no longer ends at next_seq
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
                st.recent = b""
            self._drain(flow, direction, out, gap=missing > 0)

    def _deliver(self, flow, direction, data, gap, meta, out) -> None:
        out.chunks.append(Chunk.make(data, gap, False, flow.protocol, *meta, flow.id, flow.transport, direction))
        self.stats.bytes_delivered += len(data)
        keep = self.limits.overlap_check_bytes
        flow.streams[direction].recent = data if len(data) <= keep else data[-keep:]


class _Plan:
    """Which flows of one batch read as arrays, and their chunks (see the module docstring).

    A flow reads as arrays when none of its segments in the batch carries SYN, FIN or RST, nothing
    is held out of order in either direction, and each direction's payloads follow one another
    exactly (the first where the stream stands).  The rest of the batch -- ``slow_rows``, positions
    in ``rows`` -- goes through the per-segment path.  ``slow_rows`` is None when the whole batch
    must (so flow ids and evictions come out in the same order): a new flow that does not read as
    arrays, a flow table about to evict, or a flow that closes (and might reopen under a new id)
    while new flows open.
    """

    def __init__(self, r: Reassembler, batch, dec, rows, protocols, server_is_dst):
        self.r, self.batch, self.dec, self.rows, self.protocols = r, batch, dec, rows, protocols
        self.slow_rows = None
        n = rows.shape[0]
        l4 = dec.l4[rows]
        a = (dec.src[rows].astype(np.uint64) << np.uint64(16)) | dec.sport[rows]
        b = (dec.dst[rows].astype(np.uint64) << np.uint64(16)) | dec.dport[rows]
        # the flow key (transport, lower end, higher end) as one integer: each end (48 bits) by its
        # rank among the batch's ends (a sort of a structured array would be several times slower)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        ends, rank = np.unique(np.r_[lo, hi], return_inverse=True)
        rank = rank.reshape(-1).astype(np.int64)
        combined = (rank[:n] * ends.shape[0] + rank[n:]) * 2 + (l4 == L4_UDP)
        _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        nf = first.shape[0]
        flags = dec.tcp_flags[rows]
        tcp = l4 == L4_TCP
        special = tcp & ((flags & (TCP_SYN | TCP_FIN | TCP_RST)) != 0)
        closing = tcp & ((flags & (TCP_FIN | TCP_RST)) != 0)
        flow_special = np.bincount(inverse, weights=special, minlength=nf) > 0
        flow_closing = np.bincount(inverse, weights=closing, minlength=nf) > 0
        # each flow's Python key, and its Flow when the table has it
        pykeys = [(t, (x >> 16, x & 0xFFFF), (y >> 16, y & 0xFFFF))
                  for t, x, y in zip(l4[first].tolist(), lo[first].tolist(), hi[first].tolist())]
        flows = [r.flows.get(k) for k in pykeys]
        known = np.fromiter((f is not None for f in flows), dtype=bool, count=nf)
        held = np.fromiter((f is not None and bool(f.streams[0].ooo or f.streams[1].ooo) for f in flows),
                           dtype=bool, count=nf)
        # each flow's client: the table's, else (no SYN here) the port-based guess of its first segment
        client = np.where(server_is_dst[first], a[first], b[first])
        for i in np.flatnonzero(known).tolist():
            c = flows[i].client
            client[i] = (c[0] << 16) | c[1]
        direction = (a != client[inverse]).astype(np.uint8)  # FROM_CLIENT 0, FROM_SERVER 1
        # each stream's payloads in order, each starting where the previous one ended
        plen = dec.payload_len[rows].astype(np.int64)
        seq = dec.seq[rows].astype(np.int64)
        stream = inverse.astype(np.int64) * 2 + direction
        p_idx = np.flatnonzero(tcp & (plen > 0))
        order = np.argsort(stream[p_idx], kind="stable")
        p_idx = p_idx[order]
        p_stream = stream[p_idx]
        starts = np.r_[True, p_stream[1:] != p_stream[:-1]] if p_idx.size else np.zeros(0, bool)
        expect = np.empty(p_idx.size, np.int64)
        expect[1:] = (seq[p_idx[:-1]] + plen[p_idx[:-1]]) & 0xFFFFFFFF
        first_p = np.flatnonzero(starts)
        # where each stream stands: its next_seq, or (joined mid-stream) its first payload's seq
        stand = seq[p_idx[first_p]]
        for j, s in enumerate(p_stream[first_p].tolist()):
            f = flows[s >> 1]
            if f is not None and f.streams[s & 1].next_seq is not None:
                stand[j] = f.streams[s & 1].next_seq
        expect[first_p] = stand
        flow_broken = np.zeros(nf, bool)
        flow_broken[p_stream[seq[p_idx] != expect] >> 1] = True
        fast_flow = ~(flow_special | held | flow_broken)
        new = ~known
        if (new & ~fast_flow).any() or len(r.flows) + int(np.count_nonzero(new)) > r.limits.max_flows:
            return
        if (flow_closing & ~fast_flow).any() and (new.any() or len(r.flows) >= r.limits.max_flows):
            return
        self.pykeys, self.flows, self.first, self.inverse = pykeys, flows, first, inverse
        self.new, self.fast_flow, self.direction, self.client = new, fast_flow, direction, client
        self.a, self.b, self.plen, self.seq, self.tcp = a, b, plen, seq, tcp
        self.p_idx, self.p_stream, self.starts = p_idx, p_stream, starts
        self.fast_row = fast_flow[inverse]
        self.slow_rows = np.flatnonzero(~self.fast_row)

    def open_flows(self) -> None:
        """Create the batch's new flows (all read as arrays) in order of their first segment."""
        r, rows = self.r, self.rows
        new = np.flatnonzero(self.new)
        for i in new[np.argsort(self.first[new])].tolist():
            j = int(self.first[i])
            a, b = int(self.a[j]), int(self.b[j])
            self.flows[i] = r._new_flow(self.pykeys[i], (a >> 16, a & 0xFFFF), (b >> 16, b & 0xFFFF),
                                        int(self.client[i]) == a, int(self.protocols[j]), int(self.dec.l4[rows[j]]),
                                        int(self.batch.ts[rows[j]]), None)

    def deliver(self, out: StreamOutput, slow: np.ndarray, marks) -> None:
        """Chunks of the array flows, merged in capture order with those the per-segment path
        wrote (``marks``: chunk count after each of its segments); flow and stream state; LRU order."""
        r, batch, dec, rows, flows = self.r, self.batch, self.dec, self.rows, self.flows
        fast, inverse, pl = self.fast_row, self.inverse, self.plen
        n, nf = rows.shape[0], len(flows)
        f_rows = np.flatnonzero(fast)
        frames = np.bincount(inverse[f_rows], minlength=nf)
        nbytes = np.bincount(inverse[f_rows], weights=batch.wirelen[rows[f_rows]], minlength=nf)
        last_row = np.zeros(nf, np.int64)
        last_row[inverse] = np.arange(n)  # the last write wins: each flow's last segment
        ts = batch.ts[rows]
        for i in np.flatnonzero(self.fast_flow).tolist():
            f = flows[i]
            f.frames += int(frames[i])
            f.bytes += int(nbytes[i])
            f.last_ts = int(ts[last_row[i]])
        tcp_fast = self.tcp & fast
        r.stats.segments += int(np.count_nonzero(tcp_fast))
        # the last ACK each direction sent
        acks = np.flatnonzero(tcp_fast & ((dec.tcp_flags[rows] & TCP_ACK) != 0))
        if acks.size:
            last = np.full(2 * nf, -1, np.int64)
            last[inverse[acks].astype(np.int64) * 2 + self.direction[acks]] = acks
            ack = dec.ack[rows]
            for s in np.flatnonzero(last >= 0).tolist():
                flows[s >> 1].streams[s & 1].last_ack = int(ack[last[s]])
        # where each stream stands now, and its last bytes
        buf = batch.buf
        keep = r.limits.overlap_check_bytes
        if self.p_idx.size:
            ends = np.r_[self.starts[1:], True] & fast[self.p_idx]
            for row, s in zip(self.p_idx[ends].tolist(), self.p_stream[ends].tolist()):
                st = flows[s >> 1].streams[s & 1]
                k = int(pl[row])
                st.next_seq = (int(self.seq[row]) + k) & 0xFFFFFFFF
                o = int(dec.payload_off[rows[row]])
                st.recent = buf[o + max(0, k - keep): o + k].tobytes()
        # one chunk per payload segment of an array flow (TCP and UDP), as columns over the frame buffer
        deliver = np.flatnonzero(fast & (pl > 0))
        d_rows = rows[deliver]
        r.stats.bytes_delivered += int(pl[deliver].sum())
        r.stats.truncated_segments += int(np.count_nonzero(dec.payload_truncated[d_rows] & self.tcp[deliver]))
        start = dec.payload_off[d_rows].astype(np.int64)
        fl = inverse[deliver]
        ids = np.fromiter((f.id for f in flows), dtype=np.int64, count=nf)
        protos = np.fromiter((f.protocol for f in flows), dtype=np.int64, count=nf)
        l4 = dec.l4[d_rows]
        table = ChunkTable(buf, start, start + pl[deliver], ts=batch.ts[d_rows], frame=d_rows + batch.first_frame,
                           src=dec.src[d_rows], dst=dec.dst[d_rows], sport=dec.sport[d_rows], dport=dec.dport[d_rows],
                           flow=ids[fl], transport=l4, direction=self.direction[deliver],
                           gap=np.zeros(deliver.size, bool), datagram=l4 == L4_UDP, protocol=protos[fl])
        if not slow.size:
            out.chunks = table
        elif deliver.size:
            # capture order: a per-segment chunk sits at the row that released it
            per_slow = np.diff(np.r_[0, np.asarray(marks, np.int64)])
            order = np.argsort(np.r_[np.repeat(slow, per_slow), deliver], kind="stable")
            out.chunks = ChunkTable.join([out.chunks, table]).take(order)
        # least recently used order: the flows of this batch move to the end by their last segment
        table = r.flows
        for i in np.argsort(last_row).tolist():
            key = self.pykeys[i]
            if key in table:
                table.move_to_end(key)
