"""Detection over a folder of labelled captures, per attack family: ``python bench/eval_labelled.py DIR``.

Runs ``otwatch eval`` (the same code: :func:`agent.eval.evaluate`) on every ``X.pcap`` in DIR that has
an ``X.labels.csv`` beside it, learning from the first frame up to 5 s before each capture's first labelled attack (a
capture without labels learns its first ``--learn``), and prints one
row per capture and one per attack family: intervals detected, median time to detect, false alerts
per benign hour.  The match window is ``[start - 1 s, end + grace]``, grace 10 s by default (the
issue's target window).  Families come from the scenario names of the QUT 2017 DNP3 data set
(``../shared/pcaps/labelled``) and of the simulator; anything else is its own family.

``--json FILE`` writes every capture's full result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.eval import evaluate, load_batches  # noqa: E402
from models.scoring import read_labels  # noqa: E402


def family(scenario: str) -> str:
    s = scenario.lower()
    if s in ("nmap", "reconnaissance"):
        return s
    if "flooding" in s:
        return "flooding"
    if s.startswith("mitm"):
        return "mitm"
    if "masquerading" in s:
        return "masquerading"
    if s.startswith("injection"):
        return "injection"
    if "replay" in s:
        return "replay"
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--margin", type=float, default=5.0, help="learning ends this long before the first attack")
    ap.add_argument("--learn", type=float, default=600.0, help="learning (s) for captures without labels")
    ap.add_argument("--detectors", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default=None, help="substring of the capture names to run")
    args = ap.parse_args(argv)
    kw = {}
    if args.detectors:
        kw["detectors"] = tuple(args.detectors.split(","))
    fam: dict[str, list] = {}
    total_false = 0
    total_benign_h = 0.0
    results = []
    for pcap in sorted(args.folder.glob("*.pcap")):
        if args.only and args.only not in pcap.name:
            continue
        labels_path = pcap.with_suffix("").with_suffix(".labels.csv")
        if not labels_path.exists():
            labels_path = Path(str(pcap)[: -len(".pcap")] + ".labels.csv")
        if not labels_path.exists():
            continue
        labels = read_labels(labels_path)
        batches = load_batches(pcap)
        if not batches:
            print(f"{pcap.name}: no protocol events", flush=True)
            continue
        learn_until = labels[0].start_ts - args.margin if labels else None
        try:
            r, _ = evaluate(pcap, labels_path, args.learn, grace_s=args.grace, batches=batches,
                            learn_until_s=learn_until, **kw)
        except Exception as exc:  # a capture that ends while learning: say so, go on
            print(f"{pcap.name}: {exc}", flush=True)
            continue
        results.append(r)
        for s in r["scenarios"]:
            fam.setdefault(family(s["scenario"]), []).append(s)
        total_false += r["false_alerts"]
        total_benign_h += r["benign_hours"]
        det = sum(s["detected"] for s in r["scenarios"])
        print(f"{pcap.name:<56} {det:>4}/{len(r['scenarios']):<4} false {r['false_alerts']:>3} "
              f"({r['benign_hours'] * 60:.1f} benign min) rules: {r['false_alert_rules']}", flush=True)
    print()
    print(f"{'family':<16}{'detected':>12}{'%':>7}{'median TTD s':>14}")
    all_s = []
    for name in sorted(fam):
        ss = fam[name]
        all_s += ss
        d = [s for s in ss if s["detected"]]
        ttd = [s["time_to_detect_s"] for s in d if s["time_to_detect_s"] is not None]
        print(f"{name:<16}{len(d):>6}/{len(ss):<5}{100 * len(d) / len(ss):>7.1f}"
              f"{statistics.median(ttd) if ttd else float('nan'):>14.2f}")
    d = [s for s in all_s if s["detected"]]
    if all_s:
        print(f"{'all':<16}{len(d):>6}/{len(all_s):<5}{100 * len(d) / len(all_s):>7.1f}")
    fph = total_false / total_benign_h if total_benign_h else float("nan")
    print(f"false alerts: {total_false} in {total_benign_h:.2f} benign hours = {fph:.2f}/h")
    if args.json:
        args.json.write_text(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
