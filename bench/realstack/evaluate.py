#!/usr/bin/env python3
"""Score the current detectors on the harness's captures: ``otwatch eval`` per protocol, one table.

    python bench/realstack/evaluate.py /work/realstack-out --learn 600s

runs, for each ``<proto>.pcap`` + ``<proto>.labels.csv`` in the directory,

    python -m agent.cli eval DIR/<proto>.pcap --labels DIR/<proto>.labels.csv --learn 600s --json

(from the repository this file is in) and prints detected/missed per attack stage (eval's rule:
an alert naming the attacker opens within [start - 1 s, end + 60 s]; and issue 12's stricter
end + 10 s), time to detect, the rules that fired, and false alerts per benign hour with the rules
behind them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("modbus", "dnp3", "iec104")
# issue 12's target: an alert that opens by 10 s after the stage ends (eval's grace is 60 s)
TARGET_AFTER_END_S = 10.0


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
    ap.add_argument("--markdown", action="store_true", help="print the stage table as Markdown")
    ap.add_argument("extra", nargs="*", help="more eval options, after --")
    args = ap.parse_args(argv)
    results, rows = {}, []
    for proto in PROTOCOLS:
        pcap, labels = args.dir / f"{proto}.pcap", args.dir / f"{proto}.labels.csv"
        if not (pcap.exists() and labels.exists()):
            continue
        r = results[proto] = evaluate(pcap, labels, args.learn, args.extra)
        for s in r["scenarios"]:
            ttd = s["time_to_detect_s"]
            s["in_target"] = ttd is not None and ttd <= s["end_ts"] - s["start_ts"] + TARGET_AFTER_END_S
            rows.append(
                (
                    proto,
                    s["scenario"],
                    "yes" if s["detected"] else "MISSED",
                    "yes" if s["in_target"] else "no",
                    "-" if ttd is None else f"{ttd:.3f}",
                    ", ".join(s["rules"]),
                )
            )
    if not results:
        raise SystemExit(f"evaluate: no <proto>.pcap with labels in {args.dir}")
    if args.markdown:
        print("| protocol | stage | detected | <=end+10s | TTD s | rules |\n|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(f"{'protocol':8} {'stage':22} {'detected':8} {'<=end+10s':9} {'TTD s':>7}  rules")
        for proto, stage, det, target, ttd, rules in rows:
            print(f"{proto:8} {stage:22} {det:8} {target:9} {ttd:>7}  {rules}")
    print()
    print(
        f"{'protocol':8} {'detected':>9} {'<=end+10s':>9} {'false':>6} {'benign h':>9} {'false/h':>8}  false-alert rules"
    )
    tot_det = tot_in = tot_n = tot_false = 0
    tot_h = 0.0
    for proto, r in results.items():
        n = len(r["scenarios"])
        n_in = sum(s["in_target"] for s in r["scenarios"])
        tot_det, tot_in, tot_n = tot_det + r["detected"], tot_in + n_in, tot_n + n
        tot_false, tot_h = tot_false + r["false_alerts"], tot_h + r["benign_hours"]
        rules = ", ".join(f"{k} {v}" for k, v in r["false_alert_rules"].items())
        per_h = "-" if r["false_alerts_per_hour"] is None else r["false_alerts_per_hour"]
        print(
            f"{proto:8} {r['detected']:>5}/{n:<3} {n_in:>5}/{n:<3} {r['false_alerts']:>6} {r['benign_hours']:>9.3f} "
            f"{per_h:>8}  {rules}"
        )
    per_h = f"{tot_false / tot_h:.1f}" if tot_h else "-"
    print(f"{'all':8} {tot_det:>5}/{tot_n:<3} {tot_in:>5}/{tot_n:<3} {tot_false:>6} {tot_h:>9.3f} {per_h:>8}")
    if not tot_h:
        print(
            "(no benign monitored time: every gap is inside an attack's grace; record with a longer --benign "
            "than --learn to measure false alerts per benign hour)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
