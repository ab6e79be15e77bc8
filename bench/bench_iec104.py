"""Time the IEC 104 parser on the pipeline's chunks of a capture, and tshark on the same file.

    python bench/bench_iec104.py [capture ...] [--seconds 3]

Without arguments the capture with the most IEC 104 PDUs among ../shared/pcaps/iec104 and
pcaps/*.pcap is used.  The chunks the pipeline hands to the IEC 104 parser are recorded once, then
fed to fresh parsers repeatedly for ``--seconds``; tshark dissects the same file with ``-T fields``
(its start-up time is included, and dominates on small captures: the per-PDU ratio is then an
upper bound of tshark's cost).  A synthetic stream of typical traffic (spontaneous floats, S acks,
interrogation bursts of SQ=1 single points) shows throughput at scale.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.pipeline import Pipeline, parse_file  # noqa: E402
from parsers.base import FROM_CLIENT, FROM_SERVER, Chunk  # noqa: E402
from parsers.events import KIND_PDU, PROTO_IEC104, EventBuilder  # noqa: E402
from parsers.iec104 import Iec104Parser  # noqa: E402


class _Recorder:
    protocol = PROTO_IEC104

    def __init__(self):
        self.chunks = []

    def feed(self, chunk, out):
        self.chunks.append(chunk)

    def close(self, flow, out=None):  # the pipeline passes its builder
        pass


def pipeline_chunks(path: Path) -> list:
    p = Pipeline()
    rec = _Recorder()
    p.registry.parsers[PROTO_IEC104] = rec
    parse_file(path, p)
    return rec.chunks


def time_parser(chunks: list, seconds: float) -> tuple[int, int, float]:
    """Feed the chunks to fresh parsers until ``seconds`` passed; returns (PDUs, points, elapsed)."""
    pdus = points = 0
    t0 = time.perf_counter()
    while True:
        parser, out = Iec104Parser(), EventBuilder()
        for c in chunks:
            parser.feed(c, out)
        ev = out.build()
        n = int((ev.kind == KIND_PDU).sum())
        pdus += n
        points += len(ev) - n
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or n == 0:
            return pdus, points, elapsed


def time_tshark(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", "iec60870_104", "-T", "fields",
                          "-E", "occurrence=a", "-e", "iec60870_104.apdulen"],
                         check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - t0
    return sum(len(line.split(",")) for line in out.splitlines() if line), elapsed


def synthetic_chunks(n_chunks: int = 2000) -> list:
    floats = b"".join((1300 + i).to_bytes(3, "little") + b"\x00\x00\xc8\x41\x00" for i in range(8))
    spont = bytes([0x68, 4 + 6 + len(floats), 0, 0, 0, 0, 13, 8, 3, 0, 1, 0]) + floats
    gi = bytes([0x68, 4 + 6 + 3 + 64, 0, 0, 0, 0, 1, 0x80 | 64, 20, 0, 1, 0, 0, 0, 0]) + bytes(64)
    s_ack = bytes.fromhex("680401000200")
    server = (spont * 4 + gi) * 3
    return [Chunk(server if i % 2 == 0 else s_ack, flow=1 + (i // 50), direction=FROM_SERVER if i % 2 == 0
                  else FROM_CLIENT, frame=i + 1) for i in range(n_chunks)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("captures", nargs="*", type=Path)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    captures = args.captures
    if not captures:
        candidates = sorted((ROOT.parent / "shared" / "pcaps" / "iec104").glob("*")) + sorted(
            (ROOT / "pcaps").glob("*.pcap"))
        counted = [(len(pipeline_chunks(c)), c) for c in candidates]
        captures = [max(counted)[1]] if counted else []
    for path in captures:
        chunks = pipeline_chunks(path)
        pdus, points, elapsed = time_parser(chunks, args.seconds)
        ours = pdus / elapsed if elapsed else 0.0
        t_pdus, t_elapsed = time_tshark(path)
        theirs = t_pdus / t_elapsed if t_elapsed else 0.0
        print(f"{path.name}: {len(chunks)} chunks; otwatch {ours:,.0f} PDUs/s"
              f" ({points / elapsed:,.0f} points/s);"
              f" tshark {t_pdus} PDUs in {t_elapsed:.2f}s = {theirs:,.0f} PDUs/s;"
              f" ratio {ours / max(theirs, 1e-9):.0f}x")
    chunks = synthetic_chunks()
    pdus, points, elapsed = time_parser(chunks, args.seconds)
    print(f"synthetic (floats SQ=0, GI SQ=1 x64, S acks): {pdus / elapsed:,.0f} PDUs/s, "
          f"{points / elapsed:,.0f} points/s, {(pdus + points) / elapsed:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
