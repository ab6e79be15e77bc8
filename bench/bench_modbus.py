"""Modbus/TCP parser speed: PDUs/s over the pipeline's chunks of a capture, against tshark.

    python bench/bench_modbus.py [capture ...]   (default: the biggest public Modbus captures)

The chunks are collected once through the real pipeline (reader, decode, reassembly); the timed
part is only ``ModbusParser.feed`` plus ``EventBuilder.build``, repeated and the best run kept.
tshark dissects the same file in the same run (``-T fields``, Modbus fields only), wall time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.pipeline import Pipeline, parse_file  # noqa: E402
from parsers.events import KIND_PDU, PROTO_MODBUS, EventBuilder  # noqa: E402
from parsers.modbus import DEFAULT_PORTS, ModbusParser, looks_like  # noqa: E402
from parsers.registry import ProtocolSpec, Registry  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "pcaps" / "modbus"
DEFAULT = ["zeek_modbusBig.pcap", "iti_mb2.pcap", "iti_modbus_test_2.pcap"]


class _Recorder:
    protocol = PROTO_MODBUS

    def __init__(self):
        self.chunks = []

    def feed(self, chunk, out):
        self.chunks.append(chunk)

    def close(self, flow, out=None):
        self.chunks.append(("close", flow))


def chunks_of(path: Path) -> list:
    rec = _Recorder()
    spec = ProtocolSpec(PROTO_MODBUS, "modbus", DEFAULT_PORTS, (), looks_like, lambda: rec)
    parse_file(path, Pipeline(registry=Registry(specs=[spec])))
    return rec.chunks


def time_parser(chunks, repeat: int = 5) -> tuple[float, int, int]:
    best, pdus, rows = float("inf"), 0, 0
    for _ in range(repeat):
        parser, out = ModbusParser(), EventBuilder()
        t0 = time.perf_counter()
        for c in chunks:
            if isinstance(c, tuple):
                parser.close(c[1], out)
            else:
                parser.feed(c, out)
        batch = out.build()
        best = min(best, time.perf_counter() - t0)
        pdus, rows = int((batch.kind == KIND_PDU).sum()), len(batch)
    return best, pdus, rows


def time_tshark(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", "mbtcp", "-T", "fields", "-E", "occurrence=a",
                          "-e", "mbtcp.trans_id", "-e", "modbus.func_code", "-e", "modbus.regval_uint16"],
                         capture_output=True, text=True, check=True).stdout
    dt = time.perf_counter() - t0
    return dt, sum(len(line.split("\t")[0].split(",")) for line in out.splitlines() if line)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [SHARED / n for n in DEFAULT]
    print(f"{'capture':28s} {'PDUs':>6s} {'rows':>7s} {'ours PDU/s':>11s} {'tshark PDU/s':>13s} {'ratio':>6s}")
    for path in paths:
        chunks = chunks_of(path)
        dt, pdus, rows = time_parser(chunks)
        line = f"{path.name:28s} {pdus:6d} {rows:7d} {pdus / dt:11,.0f}"
        if shutil.which("tshark"):
            tdt, tpdus = time_tshark(path)
            line += f" {tpdus / tdt:13,.0f} {(pdus / dt) / (tpdus / tdt):6.1f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
