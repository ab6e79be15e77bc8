"""End-to-end speed on a realistic traffic mix: ``otwatch replay --json`` against tshark, same run.

    python bench/bench_e2e.py [--scale 1.0] [--protocols modbus,dnp3,iec104] [--learn 600s]
                              [--workdir DIR] [--seed 7] [--json] [--no-process] [--no-tshark]
                              [--root CHECKOUT] [--edge]

Generates three mid-stream captures (no handshakes; one PDU per frame; several connections
interleaved; frames over one hour of capture time), cached in ``--workdir`` by scale and seed:

- ``modbus``: 1 M frames (x ``--scale``): FC 3 reads of 17 holding registers, FC 6 and FC 16 writes
  (17 registers), about 3 % exception responses;
- ``dnp3``: 500 k frames: class 1/2/3 event polls with event responses (binary events with time,
  analog events), confirms, integrity polls (class 0) answered by a response of several link frames,
  and multi-fragment responses (FIR .. FIN over two or three application fragments, each confirmed);
- ``iec104``: 500 k frames: spontaneous and periodic measurements (M_ME_NC_1, M_ME_TF_1, M_SP_NA_1,
  M_DP_NA_1, M_IT_NA_1), commands (C_SC_NA_1, C_DC_NA_1, C_SE_NC_1 with act con / act term), S frames
  every 8 I frames, U TESTFR act/con.

For each capture it times, in this order:

- ``in-process``: ``agent.cli.main(["replay", "--json", "--no-progress", F])`` in this process (CPU
  time of this process, and wall time), after one warm-up on a small prefix (imports, Numba cache);
- ``process``: ``python -m agent.cli replay --json F`` as a child process (its user + system CPU and
  wall time: includes interpreter start-up and imports, as a user sees it);
- ``learn``: the same child with ``--learn LEARN`` (detection on: learning then monitoring);
- ``tshark``: ``tshark -n -r F -T fields -e FIELD`` (user + system CPU of the child, and wall);
- ``edge`` (with ``--edge``): the pipeline alone in this process with compiled parsers off (the
  edge agent's default: no Numba), CPU time.

The ratio is tshark's time over ours (CPU time: the machine is shared and wall time swings with
other load; wall ratios are printed too).  > 1 means otwatch is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:  # measure another checkout (e.g. main, for before/after numbers)
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from agent.simulator import dnp3 as sim_dnp3  # noqa: E402
from agent.simulator import iec104 as sim_104  # noqa: E402

START_EPOCH = 1_700_000_000
SPAN_S = 3600.0
FRAMES = {"modbus": 1_000_000, "dnp3": 500_000, "iec104": 500_000}
PORTS = {"modbus": 502, "dnp3": 20000, "iec104": 2404}
TSHARK_FIELD = {"modbus": "mbtcp.trans_id", "dnp3": "dnp3.ctl", "iec104": "iec60870_104.apdulen"}
CONNECTIONS = 12


# -- capture writer ----------------------------------------------------------------------------

class Writer:
    """Ethernet/IPv4/TCP frames of several mid-stream connections into a pcap (ns resolution)."""

    def __init__(self, path: Path, n_frames: int):
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
        self.parts: list[bytes] = []
        self.n = 0
        self.step = int(SPAN_S * 1e9 / max(n_frames, 1))
        self.ts = START_EPOCH * 10**9
        self.seq: dict = {}

    def send(self, conn: int, from_client: bool, payload: bytes, port: int) -> None:
        client_ip = 0x0A000100 + 10 + conn
        server_ip = 0x0A000200 + 1 + conn % 4
        cport = 40000 + conn
        key = (conn, from_client)
        seq = self.seq.get(key)
        if seq is None:
            seq = random.getrandbits(32)
        peer = self.seq.get((conn, not from_client), 1000)
        self.seq[key] = (seq + len(payload)) & 0xFFFFFFFF
        if from_client:
            src, dst, sport, dport = client_ip, server_ip, cport, port
            smac, dmac = b"\x02\x00\x00\x00\x01" + bytes([conn]), b"\x02\x00\x00\x00\x02" + bytes([conn % 4])
        else:
            src, dst, sport, dport = server_ip, client_ip, port, cport
            smac, dmac = b"\x02\x00\x00\x00\x02" + bytes([conn % 4]), b"\x02\x00\x00\x00\x01" + bytes([conn])
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, peer, 0x50, 0x18, 8192, 0, 0)
        ip = struct.pack(">BBHHHBBHII", 0x45, 0, 40 + len(payload), self.n & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
        frame = dmac + smac + b"\x08\x00" + ip + tcp + payload
        self.ts += self.step
        sec, ns = divmod(self.ts, 10**9)
        self.parts.append(struct.pack("<IIII", sec, ns, len(frame), len(frame)) + frame)
        self.n += 1
        if len(self.parts) >= 50_000:
            self.fh.write(b"".join(self.parts))
            self.parts = []

    def close(self) -> None:
        self.fh.write(b"".join(self.parts))
        self.fh.close()


def gen_modbus(path: Path, n_frames: int, rng: random.Random) -> None:
    w = Writer(path, n_frames)
    tid = [0] * CONNECTIONS
    port = PORTS["modbus"]
    while w.n < n_frames:
        c = rng.randrange(CONNECTIONS)
        tid[c] = (tid[c] + 1) & 0xFFFF
        unit = 1 + c % 4
        r = rng.random()
        addr = rng.randrange(0, 1000)
        values = [rng.randrange(0, 65536) for _ in range(17)]
        if r < 0.70:
            fc, req = 3, struct.pack(">BHH", 3, addr, 17)
            resp = struct.pack(">BB", 3, 34) + struct.pack(">17H", *values)
        elif r < 0.83:
            fc, req = 6, struct.pack(">BHH", 6, addr, values[0])
            resp = req
        else:
            fc = 16
            req = struct.pack(">BHHB", 16, addr, 17, 34) + struct.pack(">17H", *values)
            resp = struct.pack(">BHH", 16, addr, 17)
        if rng.random() < 0.03:
            resp = bytes([fc | 0x80, rng.choice((1, 2, 3, 4))])

        def adu(pdu):
            return struct.pack(">HHHB", tid[c], 0, len(pdu) + 1, unit) + pdu
        w.send(c, True, adu(req), port)
        w.send(c, False, adu(resp), port)
    w.close()


def _dnp3_frames(station: sim_dnp3.Station, apdu: bytes) -> list[bytes]:
    """An APDU as transport segments of up to 249 octets, each in its own link frame."""
    out = []
    chunks = [apdu[i:i + 249] for i in range(0, len(apdu), 249)] or [b""]
    control = sim_dnp3.LINK_USER_DATA_FROM_MASTER if station.from_master else sim_dnp3.LINK_USER_DATA_FROM_OUTSTATION
    for k, part in enumerate(chunks):
        th = (0x40 if k == 0 else 0) | (0x80 if k == len(chunks) - 1 else 0) | station.transport_seq
        station.transport_seq = (station.transport_seq + 1) & 0x3F
        out.append(sim_dnp3.link_frame(control, station.peer, station.address, bytes([th]) + part))
    return out


def gen_dnp3(path: Path, n_frames: int, rng: random.Random) -> None:
    w = Writer(path, n_frames)
    port = PORTS["dnp3"]
    masters = [sim_dnp3.Station(1, 10 + c, True) for c in range(CONNECTIONS)]
    outs = [sim_dnp3.Station(10 + c, 1, False) for c in range(CONNECTIONS)]
    t = float(START_EPOCH)
    FIR, FIN, CON = 0x80, 0x40, 0x20

    def send_apdu(c, station, apdu, from_client):
        for f in _dnp3_frames(station, apdu):
            w.send(c, from_client, f, port)

    while w.n < n_frames:
        c = rng.randrange(CONNECTIONS)
        m, o = masters[c], outs[c]
        seq = m.app_seq
        m.app_seq = (m.app_seq + 1) & 0x0F
        t += 0.01
        r = rng.random()
        iin = 0x0000
        if r < 0.80:  # event poll: class 1, 2, 3
            req = bytes([FIR | FIN | seq, 1]) + sim_dnp3.class_header(2) + sim_dnp3.class_header(3) \
                + sim_dnp3.class_header(4)
            send_apdu(c, m, req, True)
            k = rng.randrange(0, 4)
            objs = b""
            if k:
                objs += sim_dnp3.binary_events([(rng.randrange(16), rng.random() < 0.5, t) for _ in range(k)])
                objs += sim_dnp3.analog_events([(rng.randrange(32), rng.randrange(-1000, 1000)) for _ in range(k)])
            resp = bytes([FIR | FIN | (CON if k else 0) | seq, 129, iin >> 8, iin & 0xFF]) + objs
            send_apdu(c, o, resp, False)
            if k:
                send_apdu(c, m, bytes([FIR | FIN | seq, 0]), True)
        elif r < 0.93:  # integrity poll: one fragment over several link frames
            req = bytes([FIR | FIN | seq, 1]) + sim_dnp3.class_header(1)
            send_apdu(c, m, req, True)
            objs = sim_dnp3.binary_inputs([rng.random() < 0.5 for _ in range(16)]) \
                + sim_dnp3.analog_inputs([rng.randrange(-10000, 10000) for _ in range(48)]) \
                + sim_dnp3.counters([rng.randrange(0, 10**6) for _ in range(8)])
            send_apdu(c, o, bytes([FIR | FIN | seq, 129, 0, 0]) + objs, False)
        else:  # multi-fragment response: two or three application fragments, each confirmed
            req = bytes([FIR | FIN | seq, 1]) + sim_dnp3.class_header(1)
            send_apdu(c, m, req, True)
            n_frag = rng.choice((2, 3))
            for k in range(n_frag):
                fseq = (seq + k) & 0x0F
                ctl = (FIR if k == 0 else 0) | (FIN if k == n_frag - 1 else 0) | CON | fseq
                objs = sim_dnp3.analog_inputs([rng.randrange(-10000, 10000) for _ in range(20)])
                send_apdu(c, o, bytes([ctl, 129, 0, 0]) + objs, False)
                send_apdu(c, m, bytes([FIR | FIN | fseq, 0]), True)
    w.close()


def gen_iec104(path: Path, n_frames: int, rng: random.Random) -> None:
    w = Writer(path, n_frames)
    port = PORTS["iec104"]
    ns = [[0, 0] for _ in range(CONNECTIONS)]  # per connection: controlling station's N(S), RTU's N(S)
    unacked = [[0, 0] for _ in range(CONNECTIONS)]
    t = float(START_EPOCH)

    def i_frame(c, side, asdu_bytes):
        other = 1 - side
        frame = sim_104.apci_i(ns[c][side] & 0x7FFF, ns[c][other] & 0x7FFF, asdu_bytes)
        ns[c][side] += 1
        w.send(c, side == 0, frame, port)
        unacked[c][side] += 1
        if unacked[c][side] >= sim_104.W:  # the receiver acknowledges with an S frame
            unacked[c][side] = 0
            w.send(c, side != 0, sim_104.apci_s(ns[c][side] & 0x7FFF), port)

    while w.n < n_frames:
        c = rng.randrange(CONNECTIONS)
        ca = 1 + c
        t += 0.01
        r = rng.random()
        if r < 0.45:
            objs = [(1001 + k, sim_104.float_element(rng.uniform(0, 100))) for k in range(rng.randrange(1, 6))]
            i_frame(c, 1, sim_104.asdu(13, rng.choice((1, 3)), ca, objs))
        elif r < 0.60:
            objs = [(1001 + k, sim_104.float_element(rng.uniform(0, 100)) + sim_104.cp56time2a(t))
                    for k in range(rng.randrange(1, 3))]
            i_frame(c, 1, sim_104.asdu(36, 3, ca, objs))
        elif r < 0.70:
            i_frame(c, 1, sim_104.asdu(1, 3, ca, [(3001, bytes([rng.randrange(2)]))]))
        elif r < 0.78:
            i_frame(c, 1, sim_104.asdu(3, 3, ca, [(2001 + rng.randrange(4), sim_104.double_point(rng.random() < 0.5))]))
        elif r < 0.83:
            i_frame(c, 1, sim_104.asdu(15, 37, ca, [(4001, struct.pack("<iB", rng.randrange(10**6), 0))]))
        elif r < 0.93:  # command: act, act con, act term
            type_id, ioa, element = rng.choice(((45, 5001, bytes([1])), (46, 5002, bytes([2])),
                                                (50, 6001, struct.pack("<fB", rng.uniform(0, 10), 0))))
            i_frame(c, 0, sim_104.asdu(type_id, 6, ca, [(ioa, element)]))
            i_frame(c, 1, sim_104.asdu(type_id, 7, ca, [(ioa, element)]))
            i_frame(c, 1, sim_104.asdu(type_id, 10, ca, [(ioa, element)]))
        else:  # idle link test
            w.send(c, True, sim_104.apci_u(sim_104.TESTFR_ACT), port)
            w.send(c, False, sim_104.apci_u(sim_104.TESTFR_CON), port)
    w.close()


GENERATORS = {"modbus": gen_modbus, "dnp3": gen_dnp3, "iec104": gen_iec104}


def capture(name: str, scale: float, seed: int, workdir: Path) -> tuple[Path, int]:
    n = max(1000, int(FRAMES[name] * scale))
    path = workdir / f"e2e_{name}_{n}_{seed}.pcap"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        GENERATORS[name](tmp, n, random.Random(f"{seed}-{name}"))
        tmp.rename(path)
    return path, n


# -- timing ------------------------------------------------------------------------------------

def child_cpu(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(user + system CPU seconds, wall seconds, stdout) of running ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, proc.stdout


def in_process(path: Path) -> tuple[float, float, dict]:
    from agent.cli import main as cli_main

    buf = io.StringIO()
    c0, w0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["replay", "--json", "--no-progress", str(path)])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    if rc:
        raise RuntimeError(f"replay {path} exited {rc}")
    return cpu, wall, json.loads(buf.getvalue())


def edge(path: Path) -> float:
    """CPU seconds of the pipeline alone with compiled parsers off (the edge agent's default)."""
    from agent.pipeline import Pipeline
    from agent.sources import CaptureReader

    pipeline = Pipeline(compiled=False)
    c0 = time.process_time()
    for batch in CaptureReader(path):
        pipeline.process(batch)
    pipeline.finish()
    return time.process_time() - c0


def warm_up(workdir: Path, seed: int, names) -> None:
    """Imports and compiled walks loaded once, outside the timed runs."""
    for name in names:
        path, _ = capture(name, 0.002, seed, workdir)
        in_process(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink (or grow) the captures (default 1.0)")
    ap.add_argument("--protocols", default="modbus,dnp3,iec104")
    ap.add_argument("--learn", default="600s", help="learning window of the detection run ('' to skip)")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/otwatch_bench_e2e")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-process", action="store_true", help="skip the child-process runs")
    ap.add_argument("--no-tshark", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--edge", action="store_true", help="also time the pipeline with compiled parsers off")
    ap.add_argument("--root", help="the checkout to measure (default: this one)")
    args = ap.parse_args(argv)
    names = [n for n in args.protocols.split(",") if n]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    has_tshark = not args.no_tshark and shutil.which("tshark") is not None
    warm_up(workdir, args.seed, names)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for name in names:
        path, n = capture(name, args.scale, args.seed, workdir)
        row = {"protocol": name, "frames": n, "mb": round(path.stat().st_size / 1e6, 1)}
        cpu, wall, summary = in_process(path)
        row.update(inproc_cpu=cpu, inproc_wall=wall, pdus=summary["by_protocol"].get(name, {}).get("pdus"),
                   errors=summary["errors"])
        if args.edge:
            row["edge_cpu"] = edge(path)
        if not args.no_process:
            row["proc_cpu"], row["proc_wall"], _ = child_cpu(
                [sys.executable, "-m", "agent.cli", "replay", "--json", "--no-progress", str(path)], env)
            if args.learn:
                row["learn_cpu"], row["learn_wall"], _ = child_cpu(
                    [sys.executable, "-m", "agent.cli", "replay", "--json", "--no-progress", "--learn", args.learn,
                     str(path)], env)
        if has_tshark:
            row["tshark_cpu"], row["tshark_wall"], out = child_cpu(
                ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", TSHARK_FIELD[name]])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'capture':<8}{'frames':>9}{'in-proc s':>10}{'k fr/s':>8}{'proc s':>8}{'learn s':>8}"
          f"{'tshark s':>9}{'x in':>7}{'x proc':>7}{'x learn':>8}{'  (wall: x in / proc / learn)'}")
    for r in rows:
        ts = r.get("tshark_cpu")
        tw = r.get("tshark_wall")

        def ratio(key, t=ts):
            v = r.get(key)
            return f"{t / v:.1f}" if t and v else "-"

        def fmt(key):
            v = r.get(key)
            return f"{v:.1f}" if v is not None else "-"
        print(f"{r['protocol']:<8}{r['frames']:>9,}{r['inproc_cpu']:>10.1f}{r['frames'] / r['inproc_cpu'] / 1e3:>8.0f}"
              f"{fmt('proc_cpu'):>8}{fmt('learn_cpu'):>8}{fmt('tshark_cpu'):>9}{ratio('inproc_cpu'):>7}"
              f"{ratio('proc_cpu'):>7}{ratio('learn_cpu'):>8}   {ratio('inproc_wall', tw)} / {ratio('proc_wall', tw)}"
              f" / {ratio('learn_wall', tw)}")
        if "edge_cpu" in r:
            print(f"{'':<8}edge (compiled parsers off): {r['edge_cpu']:.1f} s, "
                  f"{r['frames'] / r['edge_cpu'] / 1e3:.0f} k frames per CPU second, x{ratio('edge_cpu')} tshark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
