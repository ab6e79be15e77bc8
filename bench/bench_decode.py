"""Read + L2-L4 decode throughput: otwatch against scapy, dpkt and tshark, in the same run.

    python bench/bench_decode.py [--frames 1000000] [--json]

Writes a generated capture (Ethernet, some 802.1Q, IPv4 TCP Modbus/IEC-104 and UDP DNP3 frames with
realistic sizes) to a temporary directory, then times on one core:

- otwatch: ``CaptureReader`` + ``parsers.decode.decode`` (addresses, ports, flags, seq/ack, payload);
- scapy: ``PcapReader`` and access to IP/TCP/UDP fields (run on a slice, it is slow);
- dpkt: ``pcap.Reader`` + ``ethernet.Ethernet`` and the same fields;
- tshark: ``tshark -T fields`` with the same fields (one process; includes its start-up).

Each tool reads the same frames and must find the same number of TCP/UDP packets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.sources import CaptureReader  # noqa: E402
from parsers.decode import L4_TCP, L4_UDP, AddressBook, decode  # noqa: E402


def _templates():
    from scapy.all import IP, TCP, UDP, Dot1Q, Ether, raw

    e = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    mb_req = bytes.fromhex("000100000006010300000010")
    mb_rsp = bytes.fromhex("000100000023010320") + bytes(32)
    iec = bytes.fromhex("680e0000000064010600010000000014")
    dnp = bytes.fromhex("056405c901000a00") + b"\x00\x00" + bytes(10)
    return [
        raw(Ether(**e) / IP(src="10.0.0.10", dst="10.0.0.20") / TCP(sport=40000, dport=502, flags="PA") / mb_req),
        raw(Ether(**e) / IP(src="10.0.0.20", dst="10.0.0.10") / TCP(sport=502, dport=40000, flags="PA") / mb_rsp),
        raw(Ether(**e) / IP(src="10.0.0.20", dst="10.0.0.10") / TCP(sport=502, dport=40000, flags="A")),
        raw(Ether(**e) / Dot1Q(vlan=10) / IP(src="10.0.1.10", dst="10.0.1.30") / TCP(sport=40001, dport=2404,
                                                                                      flags="PA") / iec),
        raw(Ether(**e) / IP(src="10.0.2.10", dst="10.0.2.40") / UDP(sport=20000, dport=20000) / dnp),
    ]


def write_capture(path: Path, n: int) -> None:
    tpl = _templates()
    recs = []
    for k, f in enumerate(tpl):
        recs.append(struct.pack("<IIII", 0, 0, len(f), len(f)) + f)
    # the templates repeated in turn, assembled with array indexing; timestamps patched in after
    order = np.resize(np.arange(len(tpl)), n)
    lens = np.array([len(r) for r in recs])[order]
    offs = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    body = np.frombuffer(b"".join(recs[i] for i in range(len(tpl))), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in recs])[:-1]])
    out = np.empty(int(lens.sum()), dtype=np.uint8)
    for k in range(len(tpl)):
        idx = np.flatnonzero(order == k)
        L = len(recs[k])
        dst = (offs[idx][:, None] + np.arange(L)).ravel()
        out[dst] = np.tile(body[starts[k]:starts[k] + L], idx.shape[0])
    # Real TCP: each template is its own flow direction, so its sequence number advances by its
    # payload length (constant seq numbers would make tshark analyse a million retransmissions).
    for k, f in enumerate(tpl):
        ip = 18 if f[12:14] == b"\x81\x00" else 14
        if f[ip + 9] != 6:  # not TCP
            continue
        idx = np.flatnonzero(order == k)
        plen = len(f) - ip - 20 - 20
        seq = (np.arange(idx.shape[0], dtype=np.int64) * plen % 2**32).astype(">u4").view(np.uint8).reshape(-1, 4)
        for j in range(4):
            out[offs[idx] + 16 + ip + 20 + 4 + j] = seq[:, j]
    ts_us = 1_700_000_000_000_000 + np.arange(n, dtype=np.int64) * 1000
    sec = (ts_us // 1_000_000).astype("<u4")
    usec = (ts_us % 1_000_000).astype("<u4")
    for k, arr in ((0, sec), (4, usec)):
        b = arr.view(np.uint8).reshape(-1, 4)
        for j in range(4):
            out[offs + k + j] = b[:, j]
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        fh.write(out.tobytes())


def bench_otwatch(path: Path) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    frames = l4 = 0
    book = AddressBook()
    for batch in CaptureReader(path):
        d = decode(batch, book)
        frames += len(batch)
        l4 += int(np.count_nonzero((d.l4 == L4_TCP) | (d.l4 == L4_UDP)))
    return frames, l4, time.perf_counter() - t0


def bench_dpkt(path: Path, limit: int) -> tuple[int, int, float]:
    import dpkt

    t0 = time.perf_counter()
    frames = l4 = 0
    with open(path, "rb") as fh:
        for _ts, buf in dpkt.pcap.Reader(fh):
            frames += 1
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP):
                seg = ip.data
                if isinstance(seg, (dpkt.tcp.TCP, dpkt.udp.UDP)):
                    _ = (ip.src, ip.dst, seg.sport, seg.dport, len(seg.data))
                    l4 += 1
            if frames >= limit:
                break
    return frames, l4, time.perf_counter() - t0


def bench_scapy(path: Path, limit: int) -> tuple[int, int, float]:
    from scapy.all import IP, TCP, UDP, PcapReader

    t0 = time.perf_counter()
    frames = l4 = 0
    with PcapReader(str(path)) as rd:
        for pkt in rd:
            frames += 1
            if IP in pkt:
                ip = pkt[IP]
                seg = pkt[TCP] if TCP in pkt else pkt[UDP] if UDP in pkt else None
                if seg is not None:
                    _ = (ip.src, ip.dst, seg.sport, seg.dport, len(seg.payload))
                    l4 += 1
            if frames >= limit:
                break
    return frames, l4, time.perf_counter() - t0


def bench_tshark(path: Path) -> tuple[int, int, float] | None:
    if not shutil.which("tshark"):
        return None
    cmd = ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.srcport",
           "-e", "tcp.dstport", "-e", "udp.srcport", "-e", "tcp.len", "-d", "udp.port==20000,data",
           "-d", "tcp.port==502,data", "-d", "tcp.port==2404,data"]
    t0 = time.perf_counter()
    frames = l4 = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        for line in proc.stdout:
            frames += 1
            parts = line.split("\t")
            if parts[2] or parts[4]:
                l4 += 1
    return frames, l4, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--scapy-frames", type=int, default=30_000, help="scapy is timed on this many frames")
    ap.add_argument("--dpkt-frames", type=int, default=300_000, help="dpkt is timed on this many frames")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as on a small box
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        write_capture(path, args.frames)
        bench_otwatch(path)  # warm the file cache and the compiled record scanner
        results = {"otwatch": bench_otwatch(path), "dpkt": bench_dpkt(path, args.dpkt_frames),
                   "scapy": bench_scapy(path, args.scapy_frames)}
        ts = bench_tshark(path)
        if ts:
            results["tshark -T fields"] = ts
        size = path.stat().st_size
    rate = {k: v[0] / v[2] for k, v in results.items()}
    ours = rate["otwatch"]
    rows = [{"tool": k, "frames": v[0], "l4_packets": v[1], "seconds": round(v[2], 3), "frames_per_s": round(rate[k]),
             "otwatch_speedup": round(ours / rate[k], 1)} for k, v in results.items()]
    for k, v in results.items():  # every template frame is TCP or UDP: each tool must see them all
        assert v[1] == v[0], f"{k} decoded {v[1]} of {v[0]} frames as TCP/UDP"
    if args.json:
        print(json.dumps({"capture_bytes": size, "results": rows}))
        return 0
    print(f"read + L2-L4 decode, {args.frames:,} frames ({size / 1e6:.0f} MB), one core")
    print(f"{'tool':<18}{'frames':>11}{'seconds':>10}{'frames/s':>14}{'otwatch is':>12}")
    for r in rows:
        print(f"{r['tool']:<18}{r['frames']:>11,}{r['seconds']:>10.3f}{r['frames_per_s']:>14,}"
              f"{r['otwatch_speedup']:>11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
