"""Time the DNP3 parser on the pipeline's chunks of a capture, and tshark on the same file.

    python bench/bench_dnp3.py [capture ...] [--seconds 3]

Without arguments the DNP3 capture with the most frames in ../shared/pcaps/MANIFEST.tsv is used
(plus pcaps/*.pcap).  The chunks the pipeline hands to the DNP3 parser are recorded once, then fed
to fresh parsers repeatedly for ``--seconds``; tshark dissects the same file with ``-T fields``
(start-up included; on small captures that dominates, so the ratio is an upper bound of tshark's
per-PDU cost).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.pipeline import Pipeline, parse_file  # noqa: E402
from parsers.dnp3 import Dnp3Parser  # noqa: E402
from parsers.events import KIND_PDU, PROTO_DNP3, EventBuilder  # noqa: E402
from parsers.registry import Registry, default_specs  # noqa: E402

SHARED = ROOT.parent / "shared" / "pcaps"


class _Recorder(Dnp3Parser):
    chunks: list = []

    def feed(self, chunk, out):
        _Recorder.chunks.append(chunk)
        super().feed(chunk, out)


def record_chunks(path: Path) -> list:
    _Recorder.chunks = []
    specs = [dataclasses.replace(s, parser_factory=_Recorder) if s.code == PROTO_DNP3 else s
             for s in default_specs()]
    parse_file(path, Pipeline(registry=Registry(specs)))
    return list(_Recorder.chunks)


def time_ours(chunks: list, seconds: float) -> tuple[float, int]:
    rounds = pdus = 0
    t0 = time.perf_counter()
    while True:
        parser, out = Dnp3Parser(), EventBuilder()
        for c in chunks:
            parser.feed(c, out)
        b = out.build()
        pdus += int((b.kind == KIND_PDU).sum())
        rounds += 1
        if time.perf_counter() - t0 >= seconds:
            break
    return time.perf_counter() - t0, pdus


def time_tshark(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-d", "tcp.port==20001,dnp3", "-Y", "dnp3",
                          "-T", "fields", "-e", "dnp3.ctl"], capture_output=True, text=True, check=True).stdout
    n = sum(len(line.split(",")) for line in out.splitlines() if line)
    return time.perf_counter() - t0, n


def default_capture() -> Path:
    rows = [r for r in csv.DictReader(open(SHARED / "MANIFEST.tsv"), delimiter="\t") if r["protocol"] == "dnp3"]
    return SHARED / max(rows, key=lambda r: int(r["tshark_dnp3_frames"] or 0))["file"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("captures", nargs="*", type=Path)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    for path in args.captures or [default_capture(), *sorted((ROOT / "pcaps").glob("*.pcap"))]:
        chunks = record_chunks(path)
        if not chunks:
            continue
        secs, pdus = time_ours(chunks, args.seconds)
        ts_secs, ts_frames = time_tshark(path)
        ours_rate = pdus / secs
        ts_rate = ts_frames / ts_secs
        print(f"{path.name}: {len(chunks)} chunks; otwatch {ours_rate:,.0f} PDUs/s; "
              f"tshark {ts_rate:,.0f} link frames/s ({ts_secs:.2f} s incl. start-up); "
              f"ratio {ours_rate / ts_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
