#!/usr/bin/env python3
"""Record labelled captures of real protocol stacks (pymodbus, dnp3py, c104/lib60870) on loopback.

    python bench/realstack/run.py --protocol all --benign 600 --out /tmp/realstack --seed 1

writes ``<proto>.pcap`` and ``<proto>.labels.csv`` per protocol (see README.md).  Needs root
(ports 502/2404/20000, dumpcap on lo, raw-socket injection)."""

from __future__ import annotations

import argparse
import importlib
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DEVICES,
    MASTER,
    Capture,
    Labels,
    PayloadRecorder,
    Timing,
    log,
    port_open,
    spawn_role,
    stop,
    wait_port,
)

PROTOCOLS = ("modbus", "dnp3", "iec104")
MODULES = {"modbus": "modbus_stack", "dnp3": "dnp3_stack", "iec104": "iec104_stack"}


@dataclass
class Context:
    protocol: str
    timing: Timing
    rng: random.Random
    recorded: list = field(default_factory=list)  # master→device payloads the attacker captured


def record(proto: str, timing: Timing, seed: int, out: Path) -> tuple[Path, Path]:
    mod = importlib.import_module(MODULES[proto])
    missing = mod.requirement()
    if missing:
        raise SystemExit(f"realstack {proto}: {missing}")
    host, port = DEVICES[proto]
    pcap, labels_path = out / f"{proto}.pcap", out / f"{proto}.labels.csv"
    labels = Labels(proto)
    ctx = Context(proto, timing, random.Random(seed))
    master = recorder = None
    if port_open(host, port):
        raise SystemExit(
            f"realstack {proto}: something already listens on {host}:{port} (another harness run?)"
        )
    server = spawn_role(proto, "server", seed, timing, out)
    try:
        wait_port(host, port)  # before the capture starts: the probe is the harness's, not the plant's
    except BaseException:
        stop(server)
        raise
    with Capture(pcap, f"host {host}"):
        try:
            # the master's client stack has no source-address option in dnp3py/c104: the shim binds it
            master = spawn_role(proto, "master", seed, timing, out, bind=MASTER)
            recorder = PayloadRecorder(out / f".{proto}.attacker-sniff.pcap", MASTER, host, port).start()
            log(proto, f"benign lead-in {timing.benign:.0f} s")
            time.sleep(timing.benign)
            ctx.recorded = recorder.payloads()
            for scenario, fn, src, dst in mod.STAGES:
                if master.poll() is not None or server.poll() is not None:
                    raise SystemExit(f"realstack {proto}: a role process died (see {out}/{proto}.*.log)")
                t0 = time.time()
                desc = fn(ctx)
                t1 = time.time()
                labels.add(t0, t1, scenario, src, dst, desc)
                log(proto, f"{scenario} {t1 - t0:.1f} s: {desc}")
                time.sleep(timing.gap if scenario != mod.STAGES[-1][0] else timing.tail)
        finally:
            stop(master)
            stop(server)
            if recorder is not None:
                recorder.close()
    labels.write(labels_path)
    log(proto, f"wrote {pcap} and {labels_path}")
    return pcap, labels_path


def run_role(args) -> None:
    """One stack's server or master in this process, until SIGTERM."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mod = importlib.import_module(MODULES[args.protocol])
    try:
        mod._main(args.role, args.seed, args.command_every)
    except (KeyboardInterrupt, SystemExit):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="all", choices=PROTOCOLS + ("all",))
    ap.add_argument("--benign", type=float, default=600.0, help="benign lead-in, seconds (default 600)")
    ap.add_argument(
        "--gap", type=float, default=45.0, help="benign seconds between attack stages (default 45)"
    )
    ap.add_argument(
        "--tail", type=float, default=75.0, help="benign seconds after the last stage (default 75)"
    )
    ap.add_argument("--flood", type=float, default=10.0, help="flood stage length, seconds (default 10)")
    ap.add_argument(
        "--command-every",
        type=float,
        default=150.0,
        help="mean seconds between the operator's commands (default 150)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every duration above (not the polling periods) by this, e.g. 0.05 for a test",
    )
    ap.add_argument("--out", type=Path, default=Path("realstack-out"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--role", choices=("server", "master"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # SIGTERM (and SIGINT, ignored in background jobs otherwise) unwind through the finally blocks
    # that stop the stacks and the captures
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(130))
    if args.role:
        run_role(args)
        return 0
    timing = Timing(args.benign, args.gap, args.tail, args.flood, args.command_every, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    protos = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    if len(protos) == 1:
        record(protos[0], timing, args.seed, args.out)
        return 0
    # each protocol in its own process: three captures recorded at the same time
    import subprocess

    passthrough = [
        "--benign",
        str(args.benign),
        "--gap",
        str(args.gap),
        "--tail",
        str(args.tail),
        "--flood",
        str(args.flood),
        "--command-every",
        str(args.command_every),
        "--scale",
        str(args.scale),
        "--out",
        str(args.out),
        "--seed",
        str(args.seed),
    ]
    procs = [subprocess.Popen([sys.executable, __file__, "--protocol", p] + passthrough) for p in protos]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            stop(p)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
