"""Vectorised L2-L4 decoding of a frame batch into per-frame columns.

Every header field is read for all frames at once by gathering bytes at computed offsets
(``np.take`` with clipping, then a validity mask from the captured length), so the common path has
no per-frame Python.  Frames that leave the common path get a ``skip`` reason instead of columns:

- link layers: Ethernet with up to two VLAN tags (802.1Q 0x8100, 802.1ad 0x88a8, 0x9100), Linux
  cooked v1 (SLL) and v2 (SLL2), raw IP, BSD/OpenBSD loopback;
- IPv4 with options (IHL), fragments flagged (not reassembled: counted as ``ip_fragment``);
- IPv6 fixed header plus up to three hop-by-hop/routing/destination-options extension headers;
- TCP (data offset, flags, seq/ack) and UDP;
- ARP (RFC 826, Ethernet/IPv4): opcode and sender/target addresses in the ``arp_*`` columns.  ARP
  frames still count as ``not_ip``: they carry no L4 columns, only what the wire detector reads.

The L4 payload length comes from the IP total length, not from the captured length: Ethernet pads
short frames to 60 bytes and that padding must not reach a protocol parser.  A payload cut short by
the capture's snap length is marked ``payload_truncated``.

IPv6 addresses do not fit the uint32 ``src``/``dst`` columns; they are interned in an
:class:`AddressBook` that hands out ids from 240.0.0.0/5 (reserved "class E" space no real IPv4
host uses) and turns them back into text at the edges.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from .frames import (LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
                     LINKTYPE_LOOP, LINKTYPE_NULL, LINKTYPE_RAW, FrameBatch)

L3_NONE, L3_IPV4, L3_IPV6 = 0, 4, 6
L4_NONE, L4_TCP, L4_UDP = 0, 6, 17

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

ETH_IPV4, ETH_IPV6, ETH_VLAN, ETH_QINQ, ETH_VLAN_9100 = 0x0800, 0x86DD, 0x8100, 0x88A8, 0x9100
ETH_ARP = 0x0806
ARP_REQUEST, ARP_REPLY = 1, 2

# Why a frame has no L4 columns.  Not all are errors: ARP on a SPAN port is normal ("not_ip").
SKIP_NAMES = {
    0: "ok",
    1: "unsupported_linktype",
    2: "not_ip",
    3: "truncated_l2",
    4: "truncated_l3",
    5: "bad_ip_header",
    6: "ip_fragment",
    7: "other_l4",
    8: "truncated_l4",
    9: "bad_tcp_header",
    10: "ipv6_extension",
}
(SKIP_OK, SKIP_LINKTYPE, SKIP_NOT_IP, SKIP_TRUNC_L2, SKIP_TRUNC_L3, SKIP_BAD_IP, SKIP_FRAGMENT, SKIP_OTHER_L4,
 SKIP_TRUNC_L4, SKIP_BAD_TCP, SKIP_IPV6_EXT) = range(11)
# Skip reasons that mean something is wrong with the frame (the rest are just "not for us").
SKIP_ERRORS = frozenset({SKIP_TRUNC_L2, SKIP_TRUNC_L3, SKIP_BAD_IP, SKIP_TRUNC_L4, SKIP_BAD_TCP})

_V6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options (RFC 8200 §4)
_V6_FRAGMENT = 44


class AddressBook:
    """Interns IPv6 addresses as uint32 ids in 240.0.0.0/5 so all address columns stay uint32.

    >>> book = AddressBook()
    >>> i = book.intern(bytes.fromhex("fe800000000000000000000000000001"))
    >>> book.format(i), book.format(0x0A000001)
    ('fe80::1', '10.0.0.1')
    """

    BASE = 0xF0000000

    def __init__(self, limit: int = 1 << 16):
        self._ids: dict[bytes, int] = {}
        self._addrs: list[bytes] = []
        # Bounded under a flood of spoofed IPv6 sources: past ``limit`` distinct addresses every
        # new one shares the last id (formatted as "::") and is counted in ``overflow``.
        self.limit = max(int(limit), 1)
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._addrs)

    def intern(self, addr16: bytes) -> int:
        i = self._ids.get(addr16)
        if i is None:
            if len(self._addrs) >= self.limit - 1:
                self.overflow += 1
                return self.BASE + self.limit - 1
            i = self.BASE + len(self._addrs)
            self._ids[addr16] = i
            self._addrs.append(addr16)
        return i

    def format(self, addr: int) -> str:
        addr = int(addr)
        if self.BASE <= addr < self.BASE + len(self._addrs):
            return str(ipaddress.IPv6Address(self._addrs[addr - self.BASE]))
        if addr == self.BASE + self.limit - 1:
            return "::"  # the shared id of addresses beyond the cap
        return str(ipaddress.IPv4Address(addr))


def format_ipv4(addr: int) -> str:
    return str(ipaddress.IPv4Address(int(addr)))


def format_mac(mac: int) -> str:
    """>>> format_mac(0x020000000001)
    '02:00:00:00:00:01'
    """
    return ":".join(f"{b:02x}" for b in int(mac).to_bytes(6, "big"))


@dataclass
class Decoded:
    """Per-frame L2-L4 columns, all the length of the frame batch."""

    src_mac: np.ndarray  # uint64 Ethernet source address (0 when the link layer has none)
    dst_mac: np.ndarray  # uint64 Ethernet destination address
    vlan: np.ndarray  # uint16 outer VLAN id (0 = untagged)
    vlan_inner: np.ndarray  # uint16 inner VLAN id of QinQ (0 = none)
    l3: np.ndarray  # uint8 L3_NONE / L3_IPV4 / L3_IPV6
    src: np.ndarray  # uint32
    dst: np.ndarray  # uint32
    l4: np.ndarray  # uint8 L4_NONE / L4_TCP / L4_UDP (0 when skipped)
    sport: np.ndarray  # uint16
    dport: np.ndarray  # uint16
    tcp_flags: np.ndarray  # uint8
    seq: np.ndarray  # uint32
    ack: np.ndarray  # uint32
    payload_off: np.ndarray  # int64 absolute offset in the batch buffer
    payload_len: np.ndarray  # int64 bytes of L4 payload actually captured
    payload_truncated: np.ndarray  # bool: the capture cut the payload short (snap length)
    skip: np.ndarray  # uint8 SKIP_* reason (SKIP_OK for decoded TCP/UDP frames)
    # Read for the wire detector (spoofing, relays, scans); 0 where the frame has no such field.
    ttl: np.ndarray = None  # uint8 IPv4 TTL / IPv6 hop limit
    ip_id: np.ndarray = None  # uint16 IPv4 identification (0 for IPv6)
    arp_op: np.ndarray = None  # uint16 ARP opcode (1 request, 2 reply; 0 = not an Ethernet/IPv4 ARP frame)
    arp_sha: np.ndarray = None  # uint64 ARP sender hardware address
    arp_spa: np.ndarray = None  # uint32 ARP sender IPv4 address
    arp_tha: np.ndarray = None  # uint64 ARP target hardware address
    arp_tpa: np.ndarray = None  # uint32 ARP target IPv4 address

    def __post_init__(self):
        n = self.skip.shape[0]
        for name, dtype in (("ttl", np.uint8), ("ip_id", np.uint16), ("arp_op", np.uint16), ("arp_sha", np.uint64),
                            ("arp_spa", np.uint32), ("arp_tha", np.uint64), ("arp_tpa", np.uint32)):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n, dtype))

    def __len__(self) -> int:
        return int(self.skip.shape[0])

    def skip_counts(self) -> dict[str, int]:
        vals, counts = np.unique(self.skip, return_counts=True)
        return {SKIP_NAMES[int(v)]: int(c) for v, c in zip(vals, counts) if v != SKIP_OK}


class _Gather:
    """Reads big-endian fields at per-frame offsets, clipped to the buffer."""

    __slots__ = ("buf",)

    def __init__(self, buf: np.ndarray):
        self.buf = buf

    def u8(self, idx):
        if self.buf.shape[0] == 0:
            return np.zeros(np.shape(idx), dtype=np.uint32)
        return np.take(self.buf, idx, mode="clip").astype(np.uint32)

    def u16(self, idx):
        return (self.u8(idx) << 8) | self.u8(idx + 1)

    def u32(self, idx):
        return (self.u16(idx) << 16) | self.u16(idx + 2)


def decode(batch: FrameBatch, book: AddressBook | None = None) -> Decoded:
    """Decode L2-L4 for every frame of ``batch``.

    >>> from scapy.all import Ether, Dot1Q, IP, TCP, raw
    >>> f = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")/Dot1Q(vlan=7)/IP(src="10.0.0.1", dst="10.0.0.2")/TCP(sport=1234, dport=502)/b"abc")
    >>> d = decode(FrameBatch.from_frames([f], ts=[0]))
    >>> int(d.vlan[0]), format_ipv4(d.dst[0]), int(d.dport[0]), int(d.payload_len[0])
    (7, '10.0.0.2', 502, 3)
    """
    book = book if book is not None else AddressBook()
    n = len(batch)
    g = _Gather(batch.buf)
    off = batch.offset.astype(np.int64)
    end = off + batch.caplen.astype(np.int64)  # one past the last captured byte of each frame
    lt = batch.linktype
    skip = np.zeros(n, dtype=np.uint8)
    ethertype = np.zeros(n, dtype=np.uint32)
    l3off = off.copy()
    vlan = np.zeros(n, dtype=np.uint16)
    vlan_inner = np.zeros(n, dtype=np.uint16)

    # --- link layer ------------------------------------------------------------------------
    is_eth = lt == LINKTYPE_ETHERNET
    is_sll = lt == LINKTYPE_LINUX_SLL
    is_sll2 = lt == LINKTYPE_LINUX_SLL2
    is_raw = (lt == LINKTYPE_RAW) | (lt == LINKTYPE_IPV4) | (lt == LINKTYPE_IPV6)
    is_null = (lt == LINKTYPE_NULL) | (lt == LINKTYPE_LOOP)
    known = is_eth | is_sll | is_sll2 | is_raw | is_null
    skip[~known] = SKIP_LINKTYPE

    src_mac = np.zeros(n, dtype=np.uint64)
    dst_mac = np.zeros(n, dtype=np.uint64)
    if is_eth.any():
        o = off[is_eth]
        dst_mac[is_eth] = (g.u16(o).astype(np.uint64) << np.uint64(32)) | g.u32(o + 2).astype(np.uint64)
        src_mac[is_eth] = (g.u16(o + 6).astype(np.uint64) << np.uint64(32)) | g.u32(o + 8).astype(np.uint64)
    ethertype[is_eth] = g.u16(off[is_eth] + 12)
    l3off[is_eth] = off[is_eth] + 14
    ethertype[is_sll] = g.u16(off[is_sll] + 14)  # SLL: protocol type at 14 (network order)
    l3off[is_sll] = off[is_sll] + 16
    ethertype[is_sll2] = g.u16(off[is_sll2])  # SLL2: protocol type first
    l3off[is_sll2] = off[is_sll2] + 20
    link_hdr_end = l3off.copy()

    # VLAN tags (Ethernet and cooked captures): up to two, outer first.
    for depth in range(2):
        tagged = known & ((ethertype == ETH_VLAN) | (ethertype == ETH_QINQ) | (ethertype == ETH_VLAN_9100))
        if not tagged.any():
            break
        vid = (g.u16(l3off[tagged]) & 0x0FFF).astype(np.uint16)
        if depth == 0:
            vlan[tagged] = vid
        else:
            vlan_inner[tagged] = vid
        ethertype[tagged] = g.u16(l3off[tagged] + 2)
        l3off[tagged] += 4
        link_hdr_end[tagged] = l3off[tagged]

    # Loopback: 4-byte address family.  NULL is in the writer's byte order, so accept both.
    if is_null.any():
        fam_be = g.u32(off[is_null])
        fam_le = ((fam_be & 0xFF) << 24) | ((fam_be & 0xFF00) << 8) | ((fam_be >> 8) & 0xFF00) | (fam_be >> 24)
        fam = np.where(fam_be < 256, fam_be, fam_le)
        et = np.where(fam == 2, ETH_IPV4, np.where(np.isin(fam, (24, 28, 30)), ETH_IPV6, 0))
        ethertype[is_null] = et
        l3off[is_null] = off[is_null] + 4
        link_hdr_end[is_null] = l3off[is_null]

    trunc_l2 = known & (link_hdr_end > end)
    skip[trunc_l2] = SKIP_TRUNC_L2

    first = g.u8(l3off)
    version = first >> 4
    raw_v = np.where(is_raw, version, 0)
    ethertype[is_raw & (raw_v == 4)] = ETH_IPV4
    ethertype[is_raw & (raw_v == 6)] = ETH_IPV6
    live = skip == SKIP_OK
    is4 = live & (ethertype == ETH_IPV4)
    is6 = live & (ethertype == ETH_IPV6)
    skip[live & ~is4 & ~is6] = SKIP_NOT_IP

    # --- ARP (RFC 826): Ethernet (htype 1, hlen 6) / IPv4 (ptype 0x0800, plen 4) only ----------
    arp_op = np.zeros(n, dtype=np.uint16)
    arp_sha = np.zeros(n, dtype=np.uint64)
    arp_spa = np.zeros(n, dtype=np.uint32)
    arp_tha = np.zeros(n, dtype=np.uint64)
    arp_tpa = np.zeros(n, dtype=np.uint32)
    is_arp = live & (ethertype == ETH_ARP) & (l3off + 28 <= end)
    if is_arp.any():
        o = l3off[is_arp]
        ok_arp = (g.u16(o) == 1) & (g.u16(o + 2) == ETH_IPV4) & (g.u8(o + 4) == 6) & (g.u8(o + 5) == 4)
        rows = np.flatnonzero(is_arp)[ok_arp]
        o = o[ok_arp]
        arp_op[rows] = g.u16(o + 6)
        arp_sha[rows] = (g.u16(o + 8).astype(np.uint64) << np.uint64(32)) | g.u32(o + 10).astype(np.uint64)
        arp_spa[rows] = g.u32(o + 14)
        arp_tha[rows] = (g.u16(o + 18).astype(np.uint64) << np.uint64(32)) | g.u32(o + 20).astype(np.uint64)
        arp_tpa[rows] = g.u32(o + 24)

    l3 = np.zeros(n, dtype=np.uint8)
    src = np.zeros(n, dtype=np.uint32)
    dst = np.zeros(n, dtype=np.uint32)
    proto = np.zeros(n, dtype=np.uint32)
    l4off = np.zeros(n, dtype=np.int64)
    l3end = np.zeros(n, dtype=np.int64)  # end of the IP datagram per its own length field
    ttl = np.zeros(n, dtype=np.uint8)
    ip_id = np.zeros(n, dtype=np.uint16)

    # --- IPv4 (RFC 791 §3.1) -----------------------------------------------------------------
    if is4.any():
        o = l3off[is4]
        ihl = (first[is4] & 0x0F).astype(np.int64) * 4
        total = g.u16(o + 2).astype(np.int64)
        frag = g.u16(o + 6)
        s4 = np.zeros(o.shape[0], dtype=np.uint8)
        s4[o + 20 > end[is4]] = SKIP_TRUNC_L3
        s4[(s4 == 0) & ((version[is4] != 4) | (ihl < 20) | (total < ihl))] = SKIP_BAD_IP
        s4[(s4 == 0) & (o + ihl > end[is4])] = SKIP_TRUNC_L3
        s4[(s4 == 0) & (((frag & 0x2000) != 0) | ((frag & 0x1FFF) != 0))] = SKIP_FRAGMENT
        skip[is4] = s4
        l3[is4] = L3_IPV4
        src[is4] = g.u32(o + 12)
        dst[is4] = g.u32(o + 16)
        proto[is4] = g.u8(o + 9)
        ttl[is4] = g.u8(o + 8)
        ip_id[is4] = g.u16(o + 4)
        l4off[is4] = o + ihl
        l3end[is4] = o + total

    # --- IPv6 (RFC 8200 §3, §4) ----------------------------------------------------------------
    if is6.any():
        o = l3off[is6]
        s6 = np.zeros(o.shape[0], dtype=np.uint8)
        s6[o + 40 > end[is6]] = SKIP_TRUNC_L3
        s6[(s6 == 0) & (version[is6] != 6)] = SKIP_BAD_IP
        plen = g.u16(o + 4).astype(np.int64)
        nh = g.u8(o + 6)
        nxt = o + 40
        for _ in range(3):  # walk the common extension headers, vectorised
            ext = (s6 == 0) & np.isin(nh, _V6_EXT)
            if not ext.any():
                break
            s6[ext & (nxt + 8 > end[is6])] = SKIP_TRUNC_L3
            ext &= s6 == 0
            hdr_len = (g.u8(nxt[ext] + 1).astype(np.int64) + 1) * 8
            nh[ext] = g.u8(nxt[ext])
            nxt[ext] += hdr_len
        s6[(s6 == 0) & (nh == _V6_FRAGMENT)] = SKIP_FRAGMENT
        s6[(s6 == 0) & np.isin(nh, _V6_EXT)] = SKIP_IPV6_EXT
        s6[(s6 == 0) & (plen == 0)] = SKIP_IPV6_EXT  # jumbogram (RFC 2675): not on ICS links
        skip[is6] = s6
        l3[is6] = L3_IPV6
        proto[is6] = nh
        ttl[is6] = g.u8(o + 7)
        l4off[is6] = nxt
        l3end[is6] = o + 40 + plen
        # Intern addresses: a short Python loop over IPv6 frames only (rare on ICS segments).
        idx6 = np.flatnonzero(is6)
        buf = batch.buf
        for j, i in enumerate(idx6):
            if s6[j] == SKIP_TRUNC_L3:
                continue
            a = int(o[j])
            src[i] = book.intern(buf[a + 8 : a + 24].tobytes())
            dst[i] = book.intern(buf[a + 24 : a + 40].tobytes())

    # --- TCP (RFC 9293 §3.1) / UDP (RFC 768) ---------------------------------------------------
    live = skip == SKIP_OK
    is_tcp = live & (proto == L4_TCP)
    is_udp = live & (proto == L4_UDP)
    skip[live & ~is_tcp & ~is_udp] = SKIP_OTHER_L4
    data_end = np.minimum(l3end, end)  # what was captured of the datagram

    sport = np.zeros(n, dtype=np.uint16)
    dport = np.zeros(n, dtype=np.uint16)
    flags = np.zeros(n, dtype=np.uint8)
    seq = np.zeros(n, dtype=np.uint32)
    ack = np.zeros(n, dtype=np.uint32)
    poff = np.zeros(n, dtype=np.int64)
    plen = np.zeros(n, dtype=np.int64)
    l4 = np.zeros(n, dtype=np.uint8)

    if is_tcp.any():
        o = l4off[is_tcp]
        st = np.zeros(o.shape[0], dtype=np.uint8)
        st[o + 20 > data_end[is_tcp]] = SKIP_TRUNC_L4
        doff = (g.u8(o + 12) >> 4).astype(np.int64) * 4
        st[(st == 0) & (doff < 20)] = SKIP_BAD_TCP
        st[(st == 0) & (o + doff > l3end[is_tcp])] = SKIP_BAD_TCP
        st[(st == 0) & (o + doff > data_end[is_tcp])] = SKIP_TRUNC_L4
        skip[is_tcp] = st
        sport[is_tcp] = g.u16(o)
        dport[is_tcp] = g.u16(o + 2)
        seq[is_tcp] = g.u32(o + 4)
        ack[is_tcp] = g.u32(o + 8)
        flags[is_tcp] = g.u8(o + 13)
        poff[is_tcp] = o + doff
        l4[is_tcp] = L4_TCP
    if is_udp.any():
        o = l4off[is_udp]
        su = np.zeros(o.shape[0], dtype=np.uint8)
        su[o + 8 > data_end[is_udp]] = SKIP_TRUNC_L4
        ulen = g.u16(o + 4).astype(np.int64)
        su[(su == 0) & (ulen < 8)] = SKIP_BAD_TCP
        skip[is_udp] = su
        sport[is_udp] = g.u16(o)
        dport[is_udp] = g.u16(o + 2)
        poff[is_udp] = o + 8
        # UDP length bounds the payload too (RFC 768), whichever is shorter.
        l3end[is_udp] = np.minimum(l3end[is_udp], o + np.maximum(ulen, 8))
        l4[is_udp] = L4_UDP

    ok = skip == SKIP_OK
    plen[ok] = np.maximum(np.minimum(l3end[ok], end[ok]) - poff[ok], 0)
    truncated = ok & (l3end > end)
    l4[~ok] = L4_NONE
    return Decoded(src_mac=src_mac, dst_mac=dst_mac, vlan=vlan, vlan_inner=vlan_inner, l3=l3, src=src, dst=dst, l4=l4, sport=sport, dport=dport,
                   tcp_flags=flags, seq=seq, ack=ack, payload_off=poff, payload_len=plen,
                   payload_truncated=truncated, skip=skip, ttl=ttl, ip_id=ip_id, arp_op=arp_op, arp_sha=arp_sha,
                   arp_spa=arp_spa, arp_tha=arp_tha, arp_tpa=arp_tpa)
