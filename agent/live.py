"""Live capture on Linux: an AF_PACKET socket with a TPACKET_V3 memory-mapped ring.

The kernel fills blocks of the ring with frames; each block that the kernel retires (full, or
older than ``block_timeout_ms``) becomes one :class:`~parsers.frames.FrameBatch`, so live traffic
reaches the pipeline in the same batches a capture file does.  The socket is receive-only: nothing
in otwatch ever writes to it, the capture filter runs in the kernel (classic BPF, generated below
for the ICS ports), and the kernel's own counters (``PACKET_STATISTICS``: frames seen, frames
dropped because the ring was full) are read back and accumulated so drops are never hidden.

Linux strips the outer 802.1Q tag before a frame reaches an AF_PACKET socket and reports it in the
ring header instead; the tag is put back so the decoder sees the frame as it was on the wire.

Where TPACKET_V3 is not available (old kernels, some virtual interfaces) :class:`SocketSource`
reads the same socket with ``recvmsg``; on non-Linux systems :class:`ScapySource` uses scapy's
portable sniffer.  All three yield frame batches.

Needs CAP_NET_RAW (or root); the daemon drops privileges after :meth:`open`.
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from parsers.frames import LINKTYPE_ETHERNET, FrameBatch

from .errors import InputError

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40

# struct tpacket_block_desc (linux/if_packet.h): version, offset_to_priv, then tpacket_hdr_v1:
# block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num (u64), ts_first, ts_last.
BLOCK_DESC = struct.Struct("=IIIIIIQ")
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net,
# hv1 {tp_rxhash, tp_vlan_tci, tp_vlan_tpid, padding}
PKT_HDR = struct.Struct("=IIIIIIHHIIHH")

ICS_PORTS = (502, 20000, 2404)


# -- classic BPF -------------------------------------------------------------------------------
# Opcodes (linux/filter.h)
_LD_H_ABS, _LD_B_ABS, _LDX_MSH, _LD_H_IND, _LD_B_IND = 0x28, 0x30, 0xB1, 0x48, 0x50
_JEQ, _JSET, _RET = 0x15, 0x45, 0x06


def bpf_for_ports(ports, snaplen: int = 262144, wire: bool = True) -> list[tuple[int, int, int, int]]:
    """A classic BPF program accepting IPv4/IPv6 TCP or UDP to or from any of ``ports``.

    With ``wire`` (the default) it also accepts every ARP frame and every TCP segment with SYN or RST
    set, on any port: what the wire detector (:mod:`models.wire`) needs to see ARP spoofing and port
    scans of ICS hosts on ports no ICS protocol uses.  Connection setup and reset are a few frames per
    connection, so the extra load stays small.

    IPv4 fragments after the first are dropped (they carry no ports); IPv6 with extension headers is
    not matched (rare on ICS links).  Offsets assume Ethernet, as the kernel hands frames to
    AF_PACKET with the VLAN tag already removed.

    >>> prog = bpf_for_ports([502])
    >>> len(prog), prog[-1], len(bpf_for_ports([502], wire=False))
    (27, (6, 0, 0, 0), 22)
    """
    ports = sorted(set(int(p) for p in ports))
    if not ports or len(ports) > 60:
        raise ValueError("between 1 and 60 ports")
    prog: list = []
    labels: dict[str, int] = {}
    fixups: list = []  # (index, jt label, jf label)

    def emit(code, k=0, jt=None, jf=None):
        fixups.append((len(prog), jt, jf))
        prog.append([code, 0, 0, k])

    def label(name):
        labels[name] = len(prog)

    def match_ports(load, offset, tag, miss):
        """Load the 16-bit port at ``offset`` and jump to accept on any of ``ports``, else to ``miss``."""
        emit(load, offset)
        for i, p in enumerate(ports):
            nxt = f"{tag}_{i + 1}" if i + 1 < len(ports) else miss
            emit(_JEQ, p, "accept", nxt)
            if nxt != miss:
                label(nxt)

    emit(_LD_H_ABS, 12)
    emit(_JEQ, 0x0800, "ip4", "not4")
    label("not4")
    if wire:
        emit(_JEQ, 0x0806, "accept", "not_arp")  # ARP (RFC 826)
        label("not_arp")
    emit(_JEQ, 0x86DD, "ip6", "reject")
    label("ip4")
    emit(_LD_B_ABS, 23)
    emit(_JEQ, 6, "l4_4", "udp4")
    label("udp4")
    emit(_JEQ, 17, "l4_4", "reject")
    label("l4_4")
    emit(_LD_H_ABS, 20)
    emit(_JSET, 0x1FFF, "reject", "hdr4")
    label("hdr4")
    emit(_LDX_MSH, 14)
    if wire:  # TCP flags at X+14+13: SYN (0x02) or RST (0x04) on any port; UDP has no flags there
        emit(_LD_B_ABS, 23)
        emit(_JEQ, 6, "flags4", "ports4")
        label("flags4")
        emit(_LD_B_IND, 27)
        emit(_JSET, 0x06, "accept", "ports4")
        label("ports4")
    match_ports(_LD_H_IND, 14, "s4", "d4")  # IPv4: X = header length, ports at X+14 and X+16
    label("d4")
    match_ports(_LD_H_IND, 16, "d4", "reject")
    label("ip6")
    emit(_LD_B_ABS, 20)
    emit(_JEQ, 6, "l4_6", "udp6")
    label("udp6")
    emit(_JEQ, 17, "l4_6", "reject")
    label("l4_6")
    match_ports(_LD_H_ABS, 54, "s6", "d6")  # IPv6 fixed header: ports at 54 and 56
    label("d6")
    match_ports(_LD_H_ABS, 56, "d6", "reject")
    label("accept")
    emit(_RET, snaplen)
    label("reject")
    emit(_RET, 0)
    for idx, jt, jf in fixups:
        if jt is not None:
            prog[idx][1] = labels[jt] - idx - 1
            prog[idx][2] = labels[jf] - idx - 1
            if not (0 <= prog[idx][1] < 256 and 0 <= prog[idx][2] < 256):
                raise ValueError("BPF jump out of range")
    return [tuple(i) for i in prog]


def attach_filter(sock: socket.socket, program) -> None:
    import ctypes

    raw = b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program


@dataclass
class CaptureStats:
    received: int = 0  # frames the kernel passed the filter (PACKET_STATISTICS tp_packets)
    kernel_drops: int = 0  # frames dropped because the ring was full (tp_drops)
    delivered: int = 0  # frames handed downstream in batches
    ring_freezes: int = 0  # times the ring froze (tp_freeze_q_cnt)

    def add_kernel(self, sock: socket.socket) -> None:
        """Add an AF_PACKET socket's PACKET_STATISTICS (the kernel resets them on each read)."""
        raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        # tpacket_stats_v3 on a TPACKET_V3 socket, the older two-field tpacket_stats otherwise
        packets, drops, freezes = struct.unpack("III", raw) if len(raw) == 12 else (*struct.unpack("II", raw[:8]), 0)
        self.received += packets
        self.kernel_drops += drops
        self.ring_freezes += freezes


def _set_promisc(sock: socket.socket, iface: str) -> None:
    idx = socket.if_nametoindex(iface)
    mreq = struct.pack("iHH8s", idx, PACKET_MR_PROMISC, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)


def _check_iface(iface: str) -> None:
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise InputError(f"interface {iface!r} does not exist") from None


class RingSource:
    """TPACKET_V3 ring on one interface; iterate for frame batches, one per retired block."""

    def __init__(self, iface: str, ports=ICS_PORTS, snaplen: int = 65535, block_size: int = 1 << 20,
                 block_count: int = 32, block_timeout_ms: int = 100, promisc: bool = True):
        self.iface = iface
        self.ports = tuple(ports) if ports else ()
        self.snaplen = snaplen
        self.block_size = block_size
        self.block_count = block_count
        self.block_timeout_ms = block_timeout_ms
        self.promisc = promisc
        self.stats = CaptureStats()
        self.sock: socket.socket | None = None
        self.ring: mmap.mmap | None = None
        self._next_block = 0
        self._frames = 0
        self._stop = False

    def open(self) -> "RingSource":
        _check_iface(self.iface)
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing yet
        except PermissionError:
            raise InputError("capturing needs CAP_NET_RAW (run as root or with the capability)") from None
        try:
            if self.ports:
                attach_filter(sock, bpf_for_ports(self.ports, self.snaplen))
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frame_size = 1 << 11
            req = struct.pack("IIIIIII", self.block_size, self.block_count,
                              frame_size, self.block_size * self.block_count // frame_size,
                              self.block_timeout_ms, 0, 0)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.ring = mmap.mmap(sock.fileno(), self.block_size * self.block_count, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            sock.bind((self.iface, ETH_P_ALL))
            if self.promisc:
                _set_promisc(sock, self.iface)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        return self

    def read_stats(self) -> CaptureStats:
        """Add the kernel's counters since the last read (reading resets them)."""
        if self.sock is not None:
            self.stats.add_kernel(self.sock)
        return self.stats

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        if self.sock is not None:
            self.read_stats()
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            self.sock.close()
            self.sock = None

    def poll(self, timeout_s: float = 0.2) -> FrameBatch | None:
        """The next retired block as a batch, or None when none arrived within the timeout."""
        ring = self.ring
        off = self._next_block * self.block_size
        status = struct.unpack_from("=I", ring, off + 8)[0]
        if not status & TP_STATUS_USER:
            r, _, _ = select.select([self.sock], [], [], timeout_s)
            status = struct.unpack_from("=I", ring, off + 8)[0]
            if not status & TP_STATUS_USER:
                return None
        _v, _p, _st, num, first, blk_len, _seq = BLOCK_DESC.unpack_from(ring, off)
        # Copy the block out and give it back to the kernel at once: the batch outlives the ring slot.
        data = bytearray(ring[off: off + blk_len])
        struct.pack_into("=I", ring, off + 8, TP_STATUS_KERNEL)
        self._next_block = (self._next_block + 1) % self.block_count
        return self._block_batch(data, num, first)

    def _block_batch(self, data: bytearray, num: int, first: int) -> FrameBatch:
        offs, caps, wires, ts = [], [], [], []
        extra = []  # frames rebuilt with their VLAN tag put back
        extra_len = len(data)
        pos = first
        for _ in range(num):
            nxt, sec, nsec, snap, wire, st, mac, _net, _hash, tci, tpid, _pad = PKT_HDR.unpack_from(data, pos)
            start = pos + mac
            if st & TP_STATUS_VLAN_VALID and snap >= 12:
                tpid = tpid if st & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
                frame = bytes(data[start: start + 12]) + struct.pack(">HH", tpid, tci) + bytes(
                    data[start + 12: start + snap])
                offs.append(extra_len)
                extra.append(frame)
                extra_len += len(frame)
                caps.append(len(frame))
                wires.append(wire + 4)
            else:
                offs.append(start)
                caps.append(snap)
                wires.append(wire)
            ts.append(sec * 1_000_000_000 + nsec)
            if not nxt:
                break
            pos += nxt
        if extra:
            data += b"".join(extra)
        n = len(offs)
        batch = FrameBatch(buf=np.frombuffer(bytes(data), dtype=np.uint8), ts=np.asarray(ts, dtype=np.int64),
                           offset=np.asarray(offs, dtype=np.int64), caplen=np.asarray(caps, dtype=np.uint32),
                           wirelen=np.asarray(wires, dtype=np.uint32),
                           linktype=np.full(n, LINKTYPE_ETHERNET, dtype=np.uint16),
                           iface=np.zeros(n, dtype=np.uint16), first_frame=self._frames + 1)
        self._frames += n
        self.stats.delivered += n
        return batch

    def __iter__(self):
        if self.sock is None:
            self.open()
        while not self._stop:
            batch = self.poll()
            if batch is not None and len(batch):
                yield batch

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


class SocketSource(RingSource):
    """The same AF_PACKET socket without the ring: ``recvmsg`` per frame, batched by time and count."""

    def __init__(self, iface: str, ports=ICS_PORTS, snaplen: int = 65535, batch_frames: int = 4096,
                 batch_timeout_s: float = 0.1, promisc: bool = True):
        super().__init__(iface, ports=ports, snaplen=snaplen, promisc=promisc)
        self.batch_frames = batch_frames
        self.batch_timeout_s = batch_timeout_s

    def open(self) -> "SocketSource":
        _check_iface(self.iface)
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise InputError("capturing needs CAP_NET_RAW (run as root or with the capability)") from None
        if self.ports:
            attach_filter(sock, bpf_for_ports(self.ports, self.snaplen))
        sock.bind((self.iface, ETH_P_ALL))
        if self.promisc:
            _set_promisc(sock, self.iface)
        sock.setblocking(False)
        self.sock = sock
        return self

    def poll(self, timeout_s: float = 0.2) -> FrameBatch | None:
        frames, ts = [], []
        deadline = time.monotonic() + self.batch_timeout_s
        while len(frames) < self.batch_frames:
            try:
                data, _addr = self.sock.recvfrom(self.snaplen)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    break
                continue
            frames.append(data)
            ts.append(time.time_ns())
        if not frames:
            return None
        batch = FrameBatch.from_frames(frames, ts=ts, first_frame=self._frames + 1)
        self._frames += len(frames)
        self.stats.delivered += len(frames)
        return batch


class ScapySource:
    """Portable fallback (non-Linux): scapy's sniffer socket, batched.  Slower; same frame batches out.

    The port filter runs in the kernel when scapy can compile it (it needs tcpdump for that);
    otherwise frames are filtered here, after decoding the batch.
    """

    def __init__(self, iface: str, ports=ICS_PORTS, batch_timeout_s: float = 0.1, **_):
        self.iface = iface
        self.ports = tuple(ports) if ports else ()
        self.batch_timeout_s = batch_timeout_s
        self.stats = CaptureStats()
        self.sock = None
        self._stop = False
        self._frames = 0
        self._filter_here = False

    def open(self) -> "ScapySource":
        from scapy.all import conf

        _check_iface(self.iface)
        # as bpf_for_ports: ARP and TCP SYN/RST on any port for the wire detector, then the ICS ports
        flt = ("arp or (tcp[tcpflags] & (tcp-syn|tcp-rst) != 0) or "
               + " or ".join(f"port {p}" for p in self.ports)) if self.ports else None
        try:
            self.sock = conf.L2listen(iface=self.iface, filter=flt)
        except PermissionError:
            raise InputError("capturing needs CAP_NET_RAW (run as root or with the capability)") from None
        except Exception:  # no filter compiler (tcpdump) here: filter after decoding instead
            self.sock = conf.L2listen(iface=self.iface)
            self._filter_here = bool(self.ports)
        return self

    def read_stats(self) -> CaptureStats:
        """On Linux scapy's socket is AF_PACKET too: read its kernel counters the same way."""
        inner = getattr(self.sock, "ins", None)
        if isinstance(inner, socket.socket) and getattr(socket, "AF_PACKET", None) == inner.family:
            self.stats.add_kernel(inner)
        return self.stats

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        if self.sock is not None:
            self.read_stats()
            self.sock.close()
            self.sock = None

    def poll(self, timeout_s: float = 0.2) -> FrameBatch | None:
        from scapy.all import raw

        frames, ts = [], []
        deadline = time.monotonic() + min(timeout_s, self.batch_timeout_s)
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                break
            p = self.sock.recv()
            if p is not None:
                frames.append(raw(p))
                ts.append(int(float(p.time) * 1e9))
        if self._filter_here and frames:
            from parsers.decode import decode

            d = decode(FrameBatch.from_frames(frames, ts=ts))
            wire = (d.arp_op != 0) | ((d.l4 == 6) & ((d.tcp_flags & 0x06) != 0))
            keep = np.flatnonzero(wire | ((d.l4 != 0) & (np.isin(d.sport, self.ports) | np.isin(d.dport, self.ports))))
            frames = [frames[i] for i in keep]
            ts = [ts[i] for i in keep]
        if not frames:
            return None
        batch = FrameBatch.from_frames(frames, ts=ts, first_frame=self._frames + 1)
        self._frames += len(frames)
        self.stats.delivered += len(frames)
        return batch

    def __iter__(self):
        if self.sock is None:
            self.open()
        while not self._stop:
            batch = self.poll()
            if batch is not None:
                yield batch


def open_live(iface: str, ports=ICS_PORTS, **kw):
    """The best source this system offers: TPACKET_V3 ring, plain AF_PACKET socket, or scapy."""
    if not hasattr(socket, "AF_PACKET"):
        return ScapySource(iface, ports=ports, **kw).open()
    try:
        return RingSource(iface, ports=ports, **kw).open()
    except InputError:
        raise
    except OSError:
        return SocketSource(iface, ports=ports).open()


__all__ = ["RingSource", "SocketSource", "ScapySource", "open_live", "bpf_for_ports", "CaptureStats"]
