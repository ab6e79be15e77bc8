"""TCP sessions as a capture point on the plant LAN would see them.

:class:`Capture` collects frames with their timestamp and the attack they belong to (``tag``);
:class:`TcpConnection` keeps sequence/acknowledgement numbers for one connection (RFC 9293): a
three-way handshake with an MSS option, data segments that carry PSH|ACK, delayed pure ACKs like a
real stack (the receiver acknowledges at the latest after its delayed-ACK time, earlier when it
has data of its own to send), keep-alive probes (RFC 9293 3.8.4: one octet below SND.NXT), and an
orderly FIN close.  Times are float seconds since the start of the capture; frames are stored
with integer microseconds since the epoch so the file is byte-identical for a given seed.
"""

from __future__ import annotations

import contextlib
import random
import struct

from .wire import ACK, FIN, PSH, RST, SYN, Host, tcp_frame

MSS_OPTION = struct.pack("!BBH", 2, 4, 1460)  # RFC 9293 3.2: kind 2, length 4


class Capture:
    """Frames in generation order; sorted by time when written."""

    def __init__(self, start_us: int, duration: float):
        self.start_us = start_us
        self.duration = duration
        self.records: list[tuple[int, int, bytes, object, str, str]] = []
        self.tag = None

    def add(self, t: float, ts_us: int, frame: bytes, src: str, dst: str) -> None:
        if t > self.duration or t < 0:
            return  # outside the capture window: the capture simply did not see it
        self.records.append((ts_us, len(self.records), frame, self.tag, src, dst))

    @contextlib.contextmanager
    def tagged(self, tag):
        old, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = old

    def sorted_records(self):
        return sorted(self.records, key=lambda r: (r[0], r[1]))


class _Side:
    def __init__(self, host: Host, port: int, isn: int):
        self.host, self.port = host, port
        self.nxt = isn  # next sequence number this side sends
        self.ack_due: float | None = None  # when this side's delayed ACK fires
        self.ack_delay = 0.04
        self.src_mac: bytes | None = None  # set while a man in the middle relays this side's frames


class TcpConnection:
    """One TCP connection between ``client`` (index 0) and ``server`` (index 1)."""

    def __init__(self, cap: Capture, client: Host, server: Host, sport: int, dport: int, rng: random.Random,
                 client_ack_delay: float = 0.04, server_ack_delay: float = 0.02, rtt: float = 0.0004):
        self.cap = cap
        self.rng = rng
        self.sides = (_Side(client, sport, rng.getrandbits(32)), _Side(server, dport, rng.getrandbits(32)))
        self.sides[0].ack_delay, self.sides[1].ack_delay = client_ack_delay, server_ack_delay
        self.rtt = rtt
        self.last_us = -1
        self.t_last = -1.0
        self.open = False

    @property
    def client(self) -> Host:
        return self.sides[0].host

    @property
    def server(self) -> Host:
        return self.sides[1].host

    # -- raw emission ------------------------------------------------------------------------------
    def _emit(self, t: float, frm: int, flags: int, payload: bytes = b"", seq: int | None = None,
              options: bytes = b"") -> float:
        self._flush_before(t)
        s, o = self.sides[frm], self.sides[1 - frm]
        us = max(self.cap.start_us + int(round(t * 1e6)), self.last_us + 1)
        t = max(t, (us - self.cap.start_us) / 1e6)
        self.last_us, self.t_last = us, t
        frame = tcp_frame(s.host, o.host, s.port, o.port, s.nxt if seq is None else seq, o.nxt, flags,
                          s.host.next_ip_id(), payload, options=options, src_mac=s.src_mac)
        self.cap.add(t, us, frame, s.host.ip, o.host.ip)
        if seq is None:
            s.nxt = (s.nxt + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        if flags & ACK:
            s.ack_due = None  # this segment acknowledges everything received so far
        if payload or flags & FIN:
            if o.ack_due is None:
                o.ack_due = t + o.ack_delay * (0.8 + 0.4 * self.rng.random())
        return t

    def _flush_before(self, t: float) -> None:
        """Emit delayed ACKs that fire before ``t`` (in time order)."""
        while True:
            due = [(s.ack_due, i) for i, s in enumerate(self.sides) if s.ack_due is not None and s.ack_due < t]
            if not due:
                return
            when, i = min(due)
            self.sides[i].ack_due = None
            self._emit(when, i, ACK)

    def flush(self) -> float:
        """Emit every pending delayed ACK now; returns the time of the last frame."""
        self._flush_before(float("inf"))
        return self.t_last

    # -- connection life --------------------------------------------------------------------------
    def connect(self, t: float, refuse: bool = False) -> float:
        """Three-way handshake (RFC 9293 3.5); ``refuse``: the port is closed, RST|ACK comes back."""
        self._emit(t, 0, SYN, options=MSS_OPTION)
        if refuse:
            self.sides[0].ack_due = None
            return self._emit(t + self.rtt, 1, RST | ACK, seq=0)
        self._emit(t + self.rtt, 1, SYN | ACK, options=MSS_OPTION)
        self.open = True
        return self._emit(t + self.rtt + 0.00005, 0, ACK)

    def half_open_probe(self, t: float) -> float:
        """A SYN scan probe to an open port: SYN, SYN|ACK, then the scanner's RST."""
        self._emit(t, 0, SYN, options=MSS_OPTION)
        self._emit(t + self.rtt, 1, SYN | ACK, options=MSS_OPTION)
        self.sides[0].ack_due = self.sides[1].ack_due = None
        return self._emit(t + self.rtt + 0.00004, 0, RST)

    def send(self, t: float, frm: int, payload: bytes) -> float:
        return self._emit(t, frm, PSH | ACK, payload)

    def send_split(self, t: float, frm: int, payload: bytes, cut: int, gap: float = 0.0004) -> float:
        """One PDU over two segments (a stack that writes header and body separately)."""
        self._emit(t, frm, ACK, payload[:cut])
        return self._emit(t + gap, frm, PSH | ACK, payload[cut:])

    def keepalive(self, t: float, frm: int) -> float:
        """TCP keep-alive probe (seq = SND.NXT - 1, no data) and the peer's ACK."""
        self.flush()
        s = self.sides[frm]
        self._emit(t, frm, ACK, seq=(s.nxt - 1) & 0xFFFFFFFF)
        return self._emit(t + self.rtt, 1 - frm, ACK)

    def close(self, t: float, frm: int = 0) -> float:
        """Orderly release (RFC 9293 3.6): FIN|ACK, FIN|ACK, ACK."""
        self.flush()
        self._emit(t, frm, FIN | ACK)
        self.sides[1 - frm].ack_due = None
        self._emit(t + self.rtt + 0.0001, 1 - frm, FIN | ACK)
        self.sides[frm].ack_due = None
        self.open = False
        return self._emit(t + 2 * self.rtt + 0.0001, frm, ACK)

    def exchange(self, t: float, request: bytes, response: bytes | None, latency: float,
                 split_at: int = 0, frm: int = 0) -> float:
        """Request from ``frm`` at ``t``, the peer's response ``latency`` later (optionally split)."""
        self.send(t, frm, request)
        if response is None:
            return self.t_last
        if split_at:
            return self.send_split(t + latency, 1 - frm, response, split_at)
        return self.send(t + latency, 1 - frm, response)
