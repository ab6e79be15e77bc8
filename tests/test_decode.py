"""Vectorised L2-L4 decode, checked against scapy's dissection of the same frames."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.all import (IP, TCP, UDP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, ICMP, IPv6,
                       IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, raw)

from parsers.decode import (L4_TCP, L4_UDP, SKIP_BAD_IP, SKIP_FRAGMENT, SKIP_LINKTYPE, SKIP_NOT_IP, SKIP_OK,
                            SKIP_OTHER_L4, SKIP_TRUNC_L3, SKIP_TRUNC_L4, AddressBook, decode, format_mac)
from parsers.frames import FrameBatch

def eth(**kw):
    # explicit MACs: without them scapy resolves the destination (slow, and needs a network)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


TCP4 = IP(src="10.1.2.3", dst="10.9.8.7") / TCP(sport=40001, dport=502, seq=123456789, ack=987654321,
                                                   flags="PA") / b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01"
UDP4 = IP(src="10.1.2.4", dst="10.9.8.8") / UDP(sport=20000, dport=20000) / (b"\x05\x64" + b"z" * 10)
TCP6 = IPv6(src="fe80::1", dst="2001:db8::2") / TCP(sport=2404, dport=50000, flags="A") / b"\x68\x04\x01\x00\x02\x00"


def one(frame: bytes, linktype=1, book=None):
    return decode(FrameBatch.from_frames([frame], ts=[0], linktype=linktype), book if book is not None else AddressBook())


def l4_of(pkt):
    return pkt[TCP] if TCP in pkt else pkt[UDP]


def check(d, pkt, book, i=0):
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    l4 = l4_of(pkt)
    assert d.skip[i] == SKIP_OK
    assert book.format(d.src[i]) == str(ipaddress.ip_address(ip.src))
    assert book.format(d.dst[i]) == str(ipaddress.ip_address(ip.dst))
    assert (int(d.sport[i]), int(d.dport[i])) == (l4.sport, l4.dport)
    assert int(d.payload_len[i]) == len(raw(l4.payload))
    if TCP in pkt:
        assert d.l4[i] == L4_TCP
        assert (int(d.seq[i]), int(d.ack[i]), int(d.tcp_flags[i])) == (l4.seq, l4.ack, int(l4.flags))
    else:
        assert d.l4[i] == L4_UDP


@pytest.mark.parametrize("l3", [TCP4, UDP4, TCP6], ids=["tcp4", "udp4", "tcp6"])
@pytest.mark.parametrize("link", ["eth", "vlan", "qinq", "sll", "sll2", "raw", "null_le", "null_be", "loop",
                                  "ipv4_ipv6_lt"])
def test_link_types_and_vlans(l3, link):
    v6 = IPv6 in l3
    et = 0x86DD if v6 else 0x0800
    lt = 1
    if link == "eth":
        f = raw(eth() / l3)
    elif link == "vlan":
        f = raw(eth() / Dot1Q(vlan=100) / l3)
    elif link == "qinq":
        f = raw(eth() / Dot1AD(vlan=200) / Dot1Q(vlan=300) / l3)
    elif link == "sll":
        f, lt = raw(CookedLinux(proto=et) / l3), 113
    elif link == "sll2":
        f, lt = raw(CookedLinuxV2(proto=et) / l3), 276
    elif link == "raw":
        f, lt = raw(l3), 101
    elif link == "ipv4_ipv6_lt":
        f, lt = raw(l3), 229 if v6 else 228
    elif link in ("null_le", "null_be"):
        fam = 30 if v6 else 2
        f, lt = struct.pack("<I" if link == "null_le" else ">I", fam) + raw(l3), 0
    else:  # OpenBSD loopback: network byte order
        f, lt = struct.pack(">I", 24 if v6 else 2) + raw(l3), 108
    book = AddressBook()
    d = one(f, lt, book)
    check(d, l3, book)
    if link in ("eth", "vlan", "qinq"):
        assert format_mac(d.src_mac[0]) == "02:00:00:00:00:01" and format_mac(d.dst_mac[0]) == "02:00:00:00:00:02"
    else:
        assert d.src_mac[0] == 0 and d.dst_mac[0] == 0
    if link == "vlan":
        assert (int(d.vlan[0]), int(d.vlan_inner[0])) == (100, 0)
    if link == "qinq":
        assert (int(d.vlan[0]), int(d.vlan_inner[0])) == (200, 300)


def test_ipv4_options_and_ethernet_padding():
    pkt = IP(src="10.0.0.1", dst="10.0.0.2", options=[b"\x94\x04\x00\x00"]) / TCP(sport=1, dport=502) / b"ab"
    f = raw(eth() / pkt) + b"\x00" * 20  # trailer padding must not count as payload
    book = AddressBook()
    d = one(f, book=book)
    check(d, Ether(raw(eth() / pkt)), book)
    assert int(d.payload_len[0]) == 2


def test_ipv6_extension_headers():
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
                IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()):
        pkt = IPv6(src="::1", dst="::2") / ext / TCP(sport=5, dport=2404) / b"hello"
        book = AddressBook()
        d = one(raw(eth() / pkt), book=book)
        check(d, pkt, book)
    d = one(raw(eth() / IPv6() / IPv6ExtHdrFragment() / UDP() / b"x"))
    assert d.skip[0] == SKIP_FRAGMENT


def test_fragments_other_l4_non_ip_and_unknown_linktype():
    frames = [raw(eth() / IP(flags="MF") / UDP() / b"x"), raw(eth() / IP(frag=10) / b"yy"),
              raw(eth() / IP() / ICMP()), raw(eth(type=0x0806) / (b"\0" * 28)), raw(eth() / TCP4)]
    d = decode(FrameBatch.from_frames(frames, ts=[0] * 5))
    assert d.skip.tolist() == [SKIP_FRAGMENT, SKIP_FRAGMENT, SKIP_OTHER_L4, SKIP_NOT_IP, SKIP_OK]
    d = one(raw(eth() / TCP4), linktype=147)
    assert d.skip[0] == SKIP_LINKTYPE


def test_truncation_never_reads_past_the_frame():
    full = raw(eth() / TCP4)
    # Every prefix decodes without error; a cut in the headers is a reason, in the payload a flag.
    batch = FrameBatch.from_frames([full[:k] for k in range(len(full) + 1)], ts=[0] * (len(full) + 1))
    d = decode(batch)
    hdr_end = 14 + 20 + 20
    for k in range(len(full) + 1):
        if k < hdr_end:
            assert d.skip[k] != SKIP_OK
        else:
            assert d.skip[k] == SKIP_OK
            assert int(d.payload_len[k]) == k - hdr_end
            assert bool(d.payload_truncated[k]) == (k < len(full))
    assert d.skip[14 + 10] == SKIP_TRUNC_L3
    assert d.skip[14 + 20 + 10] == SKIP_TRUNC_L4


def test_bad_ip_headers():
    good = bytearray(raw(eth() / TCP4))
    bad_ver = bytearray(good); bad_ver[14] = 0x25
    bad_ihl = bytearray(good); bad_ihl[14] = 0x43
    short_total = bytearray(good); short_total[16:18] = (10).to_bytes(2, "big")
    d = decode(FrameBatch.from_frames([bytes(bad_ver), bytes(bad_ihl), bytes(short_total)], ts=[0, 0, 0]))
    assert d.skip.tolist() == [SKIP_BAD_IP] * 3


def test_mixed_batch_matches_per_frame_decode():
    pkts = [eth() / TCP4, eth() / Dot1Q(vlan=5) / UDP4, eth() / TCP6, eth() / IP() / ICMP()] * 50
    frames = [raw(p) for p in pkts]
    book = AddressBook()
    d = decode(FrameBatch.from_frames(frames, ts=list(range(len(frames)))), book)
    for i, p in enumerate(pkts):
        if ICMP in p:
            assert d.skip[i] == SKIP_OTHER_L4
        else:
            check(d, p, book, i)


def test_address_book_is_bounded():
    book = AddressBook(limit=4)
    ids = [book.intern(bytes([0] * 15 + [i])) for i in range(10)]
    assert len(set(ids)) == 4 and len(book) == 3 and book.overflow == 7
    assert book.format(ids[1]) == "::1" and book.format(ids[-1]) == "::"
