#!/usr/bin/env python3
"""Score the current detectors on the harness's captures: ``otwatch eval`` per protocol, one table.

    python bench/realstack/evaluate.py /work/realstack-out --learn 600s

runs, for each ``<proto>.pcap`` + ``<proto>.labels.csv`` in the directory,

    python -m agent.cli eval DIR/<proto>.pcap --labels DIR/<proto>.labels.csv --learn 600s --json

(from the repository this file is in) and prints detected/missed per attack stage, time to detect,
the rules that fired, and false alerts per benign hour with the rules behind them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("modbus", "dnp3", "iec104")


def evaluate(pcap: Path, labels: Path, learn: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "agent.cli",
        "eval",
        str(pcap),
        "--labels",
        str(labels),
        "--learn",
        learn,
        "--json",
        *extra,
    ]
    print("$ python " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"evaluate: eval failed on {pcap}:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="output directory of run.py")
    ap.add_argument("--learn", default="600s", help="learning window passed to eval (default 600s)")
    ap.add_argument("--json", type=Path, help="also write every protocol's eval result here")
    ap.add_argument("extra", nargs="*", help="more eval options, after --")
    args = ap.parse_args(argv)
    results, rows = {}, []
    for proto in PROTOCOLS:
        pcap, labels = args.dir / f"{proto}.pcap", args.dir / f"{proto}.labels.csv"
        if not (pcap.exists() and labels.exists()):
            continue
        r = results[proto] = evaluate(pcap, labels, args.learn, args.extra)
        for s in r["scenarios"]:
            rows.append(
                (
                    proto,
                    s["scenario"],
                    "yes" if s["detected"] else "MISSED",
                    "-" if s["time_to_detect_s"] is None else f"{s['time_to_detect_s']:.3f}",
                    ", ".join(s["rules"]),
                )
            )
    if not results:
        raise SystemExit(f"evaluate: no <proto>.pcap with labels in {args.dir}")
    print(f"{'protocol':8} {'stage':22} {'detected':8} {'TTD s':>7}  rules")
    for proto, stage, det, ttd, rules in rows:
        print(f"{proto:8} {stage:22} {det:8} {ttd:>7}  {rules}")
    print()
    print(f"{'protocol':8} {'detected':>9} {'false':>6} {'benign h':>9} {'false/h':>8}  false-alert rules")
    tot_det = tot_n = tot_false = 0
    tot_h = 0.0
    for proto, r in results.items():
        n = len(r["scenarios"])
        tot_det, tot_n, tot_false, tot_h = (
            tot_det + r["detected"],
            tot_n + n,
            tot_false + r["false_alerts"],
            tot_h + r["benign_hours"],
        )
        rules = ", ".join(f"{k} {v}" for k, v in r["false_alert_rules"].items())
        print(
            f"{proto:8} {r['detected']:>4}/{n:<4} {r['false_alerts']:>6} {r['benign_hours']:>9.3f} "
            f"{r['false_alerts_per_hour'] if r['false_alerts_per_hour'] is not None else '-':>8}  {rules}"
        )
    per_h = f"{tot_false / tot_h:.1f}" if tot_h else "-"
    print(f"{'all':8} {tot_det:>4}/{tot_n:<4} {tot_false:>6} {tot_h:>9.3f} {per_h:>8}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
