"""`otwatch replay --jobs N` over many captures: wall and CPU time for each N, alternating, in one run.

The captures are the four bundled ones plus the six largest public ones found in ../shared/pcaps
(or the files given).  Each run is a fresh `otwatch replay --learn 15m --alerts ...` process; the
outputs of every run are checked to be identical (apart from timings).  Load average is printed
beside each run: on a shared machine it decides more than --jobs does.

    python bench/bench_jobs.py [--jobs 1,2] [--rounds 2] [--json] [CAPTURE...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("OTWATCH_SHARED", ROOT.parent / "shared")) / "pcaps"


def default_captures() -> list[Path]:
    bundled = sorted((ROOT / "pcaps").glob("*.pcap"))
    public = sorted((p for p in SHARED.rglob("*.pcap*") if "labelled" not in p.parts),
                    key=lambda p: p.stat().st_size, reverse=True)[:6] if SHARED.is_dir() else []
    return bundled + public


def run_once(captures, jobs: int, tmp: Path) -> dict:
    alerts = tmp / f"alerts-{jobs}.jsonl"
    alerts.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "agent.cli", "replay", "--json", "--no-progress", "--learn", "15m",
           "--alerts", str(alerts), "--jobs", str(jobs), *map(str, captures)]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out)
    for k in ("elapsed_s", "frames_per_s"):
        summary.pop(k)
    return {"jobs": jobs, "wall_s": round(wall, 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
            "sys_s": round(after.ru_stime - before.ru_stime, 2), "load": round(load, 2),
            "frames": summary["frames"], "chains": len(summary.get("chains", [1])),
            "output": json.dumps(summary, sort_keys=True) + alerts.read_text()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("captures", nargs="*", type=Path)
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    captures = args.captures or default_captures()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for jobs in (int(j) for j in args.jobs.split(",")):
                runs.append(run_once(captures, jobs, Path(tmp)))
    identical = len({r.pop("output") for r in runs}) == 1
    if args.json:
        print(json.dumps({"captures": [str(c) for c in captures], "identical": identical, "runs": runs}))
    else:
        print(f"{len(captures)} captures, {runs[0]['frames']:,} frames, {runs[0]['chains']} chains; "
              f"identical output in every run: {identical}")
        for r in runs:
            print(f"--jobs {r['jobs']}: {r['wall_s']:6.1f} s wall, {r['user_s']:5.1f} s user, "
                  f"{r['sys_s']:4.1f} s sys (load average {r['load']})")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
