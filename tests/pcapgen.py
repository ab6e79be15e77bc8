"""Writers for the capture variants the tests need (byte orders, resolutions, pcapng options).

scapy writes little-endian microsecond pcap and a basic pcapng; public captures also come
big-endian, with nanosecond magic, with several pcapng interfaces of different link types and
timestamp resolutions, and with simple/obsolete packet blocks.  These few functions write them.
"""

from __future__ import annotations

import struct


def write_pcap(path, frames, ts_ns, linktype=1, byteorder="<", nanos=False, snaplen=65535):
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    with open(path, "wb") as fh:
        fh.write(struct.pack(byteorder + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        for f, t in zip(frames, ts_ns):
            sec, rem = divmod(int(t), 1_000_000_000)
            frac = rem if nanos else rem // 1000
            fh.write(struct.pack(byteorder + "IIII", sec, frac, len(f), len(f)))
            fh.write(f)


def _block(bo, btype, body):
    pad = (-len(body)) % 4
    total = 12 + len(body) + pad
    return struct.pack(bo + "II", btype, total) + body + b"\0" * pad + struct.pack(bo + "I", total)


def _opt(bo, code, value):
    pad = (-len(value)) % 4
    return struct.pack(bo + "HH", code, len(value)) + value + b"\0" * pad


def pcapng_section(interfaces, packets, bo="<"):
    """``interfaces``: list of (linktype, tsresol byte or None, tsoffset s or None).
    ``packets``: list of (kind, iface, ticks, data) with kind 'epb', 'spb' or 'pb'."""
    out = _block(bo, 0x0A0D0D0A, struct.pack(bo + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    for linktype, tsresol, tsoffset in interfaces:
        opts = b""
        if tsresol is not None:
            opts += _opt(bo, 9, bytes([tsresol]))
        if tsoffset is not None:
            opts += _opt(bo, 14, struct.pack(bo + "q", tsoffset))
        if opts:
            opts += _opt(bo, 0, b"")
        out += _block(bo, 1, struct.pack(bo + "HHI", linktype, 0, 0) + opts)
    for kind, iface, ticks, data in packets:
        hi, lo = ticks >> 32, ticks & 0xFFFFFFFF
        if kind == "epb":
            out += _block(bo, 6, struct.pack(bo + "IIIII", iface, hi, lo, len(data), len(data)) + data)
        elif kind == "spb":
            out += _block(bo, 3, struct.pack(bo + "I", len(data)) + data)
        elif kind == "pb":
            out += _block(bo, 2, struct.pack(bo + "HHIIII", iface, 0, hi, lo, len(data), len(data)) + data)
    return out
