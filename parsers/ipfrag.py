"""IPv4 fragment reassembly (RFC 791 §3.2, RFC 815), so a Modbus write split into fragments is seen
like the same write sent whole -- fragmenting must not be a way around the detectors.

Fragments are rare on an OT network, so this is plain Python per fragment, bounded like a host's
reassembly queue: a datagram waits at most ``timeout_s`` (capture time) for its missing pieces,
grows to at most 65,535 bytes, at most ``max_pending`` datagrams and ``max_bytes`` buffered bytes
are kept (the oldest dropped first).  Overlaps are resolved *first wins* (the bytes already
received are kept) and counted; a fragment that is not the last but carries fewer than
``tiny_bytes`` bytes (RFC 1858: header splitting) is counted as tiny.  Both are the evasion
signatures an IDS alerts on; the counts are in :class:`FragStats` (the pipeline reports them as
``ip/fragment_overlap`` and ``ip/tiny_fragment`` errors).  IPv6 fragments are not reassembled.

A whole datagram comes back as a frame of its own: the first fragment's link-layer header, the IP
header with the fragment fields cleared and the total length set, then the data.

>>> import struct
>>> def frag(off8, mf, data):
...     ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(data), 7, (0x2000 if mf else 0) | off8, 64, 17, 0,
...                      bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
...     return bytes(12) + bytes([8, 0]) + ip + data
>>> d = Defragmenter()
>>> d.add(frag(0, True, b"A" * 16), 1, 0) is None
True
>>> whole = d.add(frag(2, False, b"B" * 4), 1, 5)
>>> len(whole[0]) - 14 - 20, whole[0][-4:], d.stats.datagrams
(20, b'BBBB', 1)
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .frames import (LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_LOOP,
                     LINKTYPE_NULL, LINKTYPE_RAW, FrameBatch)

MAX_DATAGRAM = 65535
NS = 1_000_000_000


@dataclass
class FragLimits:
    timeout_s: float = 30.0  # Linux's ipfrag_time
    max_pending: int = 1024  # datagrams being reassembled at once
    max_bytes: int = 4 << 20  # bytes buffered over all of them
    tiny_bytes: int = 64  # a non-last fragment carrying less is "tiny"


@dataclass
class FragStats:
    fragments: int = 0
    datagrams: int = 0  # reassembled and handed on
    overlaps: int = 0  # fragments overlapping bytes already received (first wins)
    tiny: int = 0
    timeouts: int = 0  # datagrams dropped incomplete after timeout_s
    dropped: int = 0  # datagrams dropped for the memory limits or an impossible length
    pending: int = field(default=0)


class _Datagram:
    __slots__ = ("first_ts", "head", "ip", "data", "have", "total", "size")

    def __init__(self, ts: int):
        self.first_ts = ts
        self.head = b""  # link-layer header of the offset-0 fragment
        self.ip = b""  # its IP header
        self.data = bytearray()
        self.have: list[tuple[int, int]] = []  # byte ranges received
        self.total = -1  # data length, known once the last fragment came
        self.size = 0


def _l3_offset(frame: bytes, linktype: int) -> int:
    """Where the IP header starts, or -1."""
    if linktype == LINKTYPE_ETHERNET:
        pos, etype = 12, None
        while pos + 2 <= len(frame):
            etype = struct.unpack_from(">H", frame, pos)[0]
            if etype in (0x8100, 0x88A8, 0x9100):
                pos += 4
                continue
            break
        return pos + 2 if etype == 0x0800 else -1
    return {LINKTYPE_RAW: 0, LINKTYPE_IPV4: 0, LINKTYPE_LINUX_SLL: 16, LINKTYPE_LINUX_SLL2: 20, LINKTYPE_NULL: 4,
            LINKTYPE_LOOP: 4}.get(linktype, -1)


class Defragmenter:
    def __init__(self, limits: FragLimits | None = None):
        self.limits = limits or FragLimits()
        self.stats = FragStats()
        self._pending: OrderedDict = OrderedDict()  # (src, dst, proto, id) -> _Datagram
        self._bytes = 0

    def process(self, batch: FrameBatch, rows: np.ndarray) -> FrameBatch | None:
        """Take the IPv4 fragments at ``rows`` of ``batch``; the datagrams they complete, as a batch."""
        frames, ts, lts = [], [], []
        buf = batch.buf
        for i in rows.tolist():
            o = int(batch.offset[i])
            frame = bytes(buf[o: o + int(batch.caplen[i])])
            whole = self.add(frame, int(batch.linktype[i]), int(batch.ts[i]))
            if whole is not None:
                frames.append(whole[0])
                ts.append(int(batch.ts[i]))
                lts.append(int(batch.linktype[i]))
        if len(batch):
            self.expire(int(batch.ts.max()))
        if not frames:
            return None
        return FrameBatch.from_frames(frames, ts, linktype=np.asarray(lts, dtype=np.uint16),
                                      first_frame=batch.first_frame)

    def add(self, frame: bytes, linktype: int, ts: int) -> tuple[bytes] | None:
        """One fragment; the whole datagram's frame (in a 1-tuple) when this one completed it."""
        st, lim = self.stats, self.limits
        l3 = _l3_offset(frame, linktype)
        if l3 < 0 or l3 + 20 > len(frame):
            return None
        ihl = (frame[l3] & 0x0F) * 4
        total, ident, fo, _ttl, proto = struct.unpack_from(">HHHBB", frame, l3 + 2)
        if ihl < 20 or total < ihl or l3 + total > len(frame):
            return None  # cut short by the snap length: nothing reliable to reassemble
        st.fragments += 1
        start, more = (fo & 0x1FFF) * 8, bool(fo & 0x2000)
        data = frame[l3 + ihl: l3 + total]
        end = start + len(data)
        key = (frame[l3 + 12: l3 + 16], frame[l3 + 16: l3 + 20], proto, ident)
        if more and len(data) < lim.tiny_bytes:
            st.tiny += 1
        if end > MAX_DATAGRAM - ihl:
            self._drop(key)
            st.dropped += 1
            return None
        d = self._pending.get(key)
        if d is None:
            d = self._pending[key] = _Datagram(ts)
        if start == 0 and not d.ip:
            d.head, d.ip = frame[:l3], frame[l3: l3 + ihl]
        if not more:
            if d.total >= 0 and d.total != end:
                st.overlaps += 1  # two different ends: keep the first
            elif d.total < 0:
                d.total = end
        if len(d.data) < end:
            grow = end - len(d.data)
            d.data.extend(bytes(grow))
            d.size += grow
            self._bytes += grow
        # first wins: write only the parts of [start, end) not received yet
        pieces = [(start, end)]
        for a, b in d.have:
            nxt = []
            for s, e in pieces:
                if b <= s or e <= a:
                    nxt.append((s, e))
                    continue
                st.overlaps += d.data[max(a, s): min(b, e)] != data[max(a, s) - start: min(b, e) - start]
                if s < a:
                    nxt.append((s, a))
                if b < e:
                    nxt.append((b, e))
            pieces = nxt
        for s, e in pieces:
            d.data[s:e] = data[s - start: e - start]
            d.have.append((s, e))
        self._pending.move_to_end(key)
        self._enforce()
        if key not in self._pending or d.total < 0 or not d.ip:
            return None
        covered = sum(e - s for s, e in d.have if e <= d.total)
        if covered < d.total:
            return None
        del self._pending[key]
        self._bytes -= d.size
        st.datagrams += 1
        ip = bytearray(d.ip)
        struct.pack_into(">H", ip, 2, len(ip) + d.total)
        struct.pack_into(">H", ip, 6, 0)
        struct.pack_into(">H", ip, 10, 0)
        struct.pack_into(">H", ip, 10, _checksum(bytes(ip)))
        return (d.head + bytes(ip) + bytes(d.data[:d.total]),)

    def expire(self, now_ns: int) -> None:
        horizon = now_ns - int(self.limits.timeout_s * NS)
        while self._pending:
            key, d = next(iter(self._pending.items()))
            if d.first_ts >= horizon:
                break
            self._drop(key)
            self.stats.timeouts += 1
        self.stats.pending = len(self._pending)

    def _enforce(self) -> None:
        lim = self.limits
        while self._pending and (len(self._pending) > lim.max_pending or self._bytes > lim.max_bytes):
            self._drop(next(iter(self._pending)))
            self.stats.dropped += 1
        self.stats.pending = len(self._pending)

    def _drop(self, key) -> None:
        d = self._pending.pop(key, None)
        if d is not None:
            self._bytes -= d.size


def _checksum(header: bytes) -> int:
    """RFC 1071 ones' complement sum."""
    s = sum(struct.unpack(f">{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
