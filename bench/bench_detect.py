"""Detection speed: features + all detectors in events/s on one core, and what each detector sees.

The capture is parsed once (parsing is not timed here; see bench_parsers.py), then its event batches
run through :class:`models.engine.DetectionEngine`: learning for the first ``--learn-fraction`` of
capture time, monitoring for the rest.  CPU time (``time.process_time``) of ``engine.process`` is
what counts; BLAS/OpenMP pools are pinned to one thread before NumPy loads.

Printed per phase: events/s (all event rows: PDUs and point values), and per detector in monitoring
its share of the time, the rows it sees (every event, every point row, one row per channel-second)
and its own rate.  The target of issue 5 is >= 200k events/s for features + all detectors.

    python bench/bench_detect.py                      # a 3 h mixed capture, generated (seed 555)
    python bench/bench_detect.py --duration 6h --json
    python bench/bench_detect.py --capture some.pcap --learn-fraction 0.5
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.eval import load_batches, parse_duration  # noqa: E402
from models.engine import DETECTORS, DetectionEngine  # noqa: E402
from parsers.events import KIND_PDU, KIND_POINT, EventBatch  # noqa: E402

# which rows each part of the engine works on (docs/detection.md, "Speed")
SEES = {"features": "every event (PDUs into channel-second windows)", "allowlist": "every PDU row",
        "process": "every point row", "cycle": "PDU rows per channel + windows", "parser": "one row per channel-second",
        "river": "one row per channel-second", "pyod": "one row per channel-second",
        "sessions": "PDU rows grouped by session",
        "sequence": "request PDU rows (transitions per channel)", "state": "point rows (vectors per report)"}


def generate(duration: str, seed: int, directory: Path) -> Path:
    from agent.cli import main
    out = directory / f"bench_mixed_{seed}_{duration}.pcap"
    if not out.exists():
        rc = main(["simulate", "-o", str(out), "--protocols", "modbus,dnp3,iec104", "--duration", duration,
                   "--seed", str(seed)])
        if rc != 0:
            raise SystemExit(f"simulate failed ({rc})")
    return out


def replicate(events: EventBatch, copies: int) -> EventBatch:
    """``copies`` substations at once: the capture repeated with each copy's hosts moved to their own
    /16 (10.20.x.y -> 10.(20+k).x.y) and flows renumbered, interleaved in time.  The traffic per
    device stays the simulator's; only the number of devices (and so events per batch) grows."""
    if copies <= 1:
        return events
    recs = events.to_records()
    parts = []
    for k in range(copies):
        r = recs.copy()
        for col in ("src", "dst"):
            r[col] = r[col] + np.uint32(k << 16)
        r["flow"] = r["flow"] + np.uint32(k * (int(recs["flow"].max()) + 1))
        parts.append(r)
    out = np.concatenate(parts)
    return EventBatch(out[np.argsort(out["ts"], kind="stable")])


def run(batches, learn_fraction: float, detectors=DETECTORS) -> dict:
    import models.engine
    models.engine.time.perf_counter = time.process_time  # the engine's per-detector clocks count CPU time

    t_first = min(int(b.ts.min()) for b in batches)
    t_last = max(int(b.ts.max()) for b in batches)
    learn_until = t_first + int((t_last - t_first) * learn_fraction)
    engine = DetectionEngine(learn_seconds=None, learn_until_ns=learn_until, detectors=detectors)
    learn_cpu = mon_cpu = 0.0
    learn_ev = mon_ev = 0
    rows = {"pdu": 0, "point": 0}
    busy_at_monitor = None  # the engine's per-part clocks when monitoring starts (they count learning too)
    for b in batches:
        n_learn = int(np.count_nonzero(b.ts < learn_until))
        if busy_at_monitor is None and n_learn * 2 < len(b):
            busy_at_monitor = dict(engine.busy_s)
        c0 = time.process_time()
        engine.process(b)
        dt = time.process_time() - c0
        # a batch that crosses the boundary is counted with the phase most of its rows belong to
        if n_learn * 2 >= len(b):
            learn_cpu += dt
            learn_ev += len(b)
        else:
            mon_cpu += dt
            mon_ev += len(b)
            rows["pdu"] += int(np.count_nonzero(b.kind == KIND_PDU))
            rows["point"] += int(np.count_nonzero(b.kind == KIND_POINT))
    c0 = time.process_time()
    engine.finish()
    mon_cpu += time.process_time() - c0
    windows_monitored = engine.features.windows - engine.learn_n
    seen = {"features": mon_ev, "allowlist": rows["pdu"], "process": rows["point"], "cycle": rows["pdu"],
            "parser": windows_monitored, "river": windows_monitored, "pyod": windows_monitored,
            "sessions": rows["pdu"], "sequence": rows["pdu"], "state": rows["point"]}
    parts = {}
    busy_at_monitor = busy_at_monitor or {}
    monitor_busy = {k: v - busy_at_monitor.get(k, 0.0) for k, v in engine.busy_s.items()}
    for name in ("features",) + tuple(detectors):
        busy = monitor_busy.get(name, 0.0)
        parts[name] = {"cpu_s": round(busy, 3), "share": round(busy / mon_cpu, 3) if mon_cpu else None,
                       "sees": SEES[name], "rows": seen[name],
                       "rows_per_s": round(seen[name] / busy) if busy > 0 else None}
    other = mon_cpu - sum(monitor_busy.get(n, 0.0) for n in parts)
    return {
        "events": learn_ev + mon_ev, "capture_s": round((t_last - t_first) / 1e9, 1),
        "learn": {"events": learn_ev, "cpu_s": round(learn_cpu, 3),
                  "events_per_s": round(learn_ev / learn_cpu) if learn_cpu else None},
        "monitor": {"events": mon_ev, "cpu_s": round(mon_cpu, 3),
                    "events_per_s": round(mon_ev / mon_cpu) if mon_cpu else None,
                    "windows": windows_monitored, "alerts": len(engine.alerts)},
        "overall_events_per_s": round((learn_ev + mon_ev) / (learn_cpu + mon_cpu)),
        "detectors": parts, "other_cpu_s": round(other, 3),
    }


def public(directory: Path) -> list[dict]:
    """Alerts per public capture when the first half of its capture time is learned (they are mostly
    benign, and mostly seconds long: what the baseline has not seen is what alerts)."""
    rows = []
    for path in sorted(directory.glob("*/*.pcap*")):
        batches = [b for b in load_batches(path) if isinstance(b, EventBatch) and len(b)]
        if not batches:
            rows.append({"file": str(path.relative_to(directory)), "events": 0, "alerts": 0, "rules": {}})
            continue
        t0, t1 = min(int(b.ts.min()) for b in batches), max(int(b.ts.max()) for b in batches)
        engine = DetectionEngine(learn_seconds=None, learn_until_ns=t0 + (t1 - t0) // 2)
        for b in batches:
            engine.process(b)
        engine.finish()
        rules: dict = {}
        for a in engine.alerts:
            rules[a.rule] = rules.get(a.rule, 0) + 1
        rows.append({"file": str(path.relative_to(directory)), "events": sum(len(b) for b in batches),
                     "span_s": round((t1 - t0) / 1e9, 1), "alerts": len(engine.alerts), "rules": rules})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capture", help="pcap to use (default: generate a mixed capture)")
    p.add_argument("--duration", default="3h", help="generated capture length (default 3h)")
    p.add_argument("--seed", type=int, default=555)
    p.add_argument("--learn-fraction", type=float, default=0.55, help="share of capture time learned (0.55)")
    p.add_argument("--cache", default=tempfile.gettempdir(), help="where generated captures are kept")
    p.add_argument("--copies", type=int, default=1,
                   help="run N copies of the plant side by side (N times the devices and events per batch)")
    p.add_argument("--batch-s", type=float, default=10.0, help="capture seconds per batch (default 10)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--public", metavar="DIR",
                   help="instead: alerts per capture of DIR/*/*.pcap*, learning the first half")
    args = p.parse_args(argv)
    if args.public:
        rows = public(Path(args.public))
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['file']:<60} {r['events']:>7} events {r.get('span_s', 0):>9.1f} s {r['alerts']:>4} alerts  "
                      + ", ".join(f"{k} {v}" for k, v in sorted(r["rules"].items())))
            print(f"{len(rows)} captures, {sum(r['alerts'] for r in rows)} alerts")
        return 0
    parse_duration(args.duration)
    cap = Path(args.capture) if args.capture else generate(args.duration, args.seed, Path(args.cache))
    t0 = time.perf_counter()
    events = EventBatch.concat([b for b in load_batches(cap) if isinstance(b, EventBatch)])
    events = replicate(events.select(np.argsort(events.ts, kind="stable")), args.copies)
    # batches as a live pipeline hands them over: --batch-s of capture time each
    edges = np.searchsorted(events.ts, np.arange(int(events.ts[0]), int(events.ts[-1]) + 1,
                                                  int(args.batch_s * 1e9)))
    bounds = np.unique(np.r_[edges, len(events)])
    batches = [events.select(slice(a, b)) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()) if b > a]
    parse_s = time.perf_counter() - t0
    r = run(batches, args.learn_fraction)
    r.update({"capture": str(cap), "copies": args.copies, "batch_s": args.batch_s, "batches": len(batches),
              "parse_wall_s": round(parse_s, 2), "target_events_per_s": 200_000})
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{cap} x{args.copies}: {r['events']} events in {len(batches)} batches of {args.batch_s:g} s, "
          f"{r['capture_s']:.0f} s of capture "
          f"(parsed in {parse_s:.1f} s, not counted)")
    for phase in ("learn", "monitor"):
        x = r[phase]
        print(f"  {phase:<8} {x['events']:>9} events  {x['cpu_s']:>7.2f} s CPU  {x['events_per_s'] or 0:>9,} events/s")
    print(f"  overall  {r['overall_events_per_s']:>,} events/s (target >= 200,000)")
    print(f"  monitoring, per part: {'cpu s':>7} {'share':>6} {'rows':>9} {'rows/s':>11}  sees")
    for name, x in r["detectors"].items():
        print(f"    {name:<10} {x['cpu_s']:>15.2f} {x['share'] or 0:>6.0%} {x['rows']:>9} "
              f"{x['rows_per_s'] or 0:>11,}  {x['sees']}")
    print(f"    {'other':<10} {r['other_cpu_s']:>15.2f}  (slicing, alert manager)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
