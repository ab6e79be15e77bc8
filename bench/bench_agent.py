"""CPU cost of the agent's processing per 1,000 frames/s (pipeline + detection engine, as `otwatch run`).

Reads a bundled capture through the pipeline and an engine built from the default configuration
(learning on the first half, monitoring the rest), measures process CPU time, and prints CPU per
1,000 frames/s as a share of one core -- with the edge default (parsers fed chunk by chunk) and with
``capture.compiled_parsers = true`` (the Numba-compiled batch paths).  The capture, not the network, is the input: the capture
thread's own cost (copying ring blocks) is small next to parsing and detection.

    python bench/bench_agent.py [CAPTURE] [--json]

A Raspberry Pi 4 (Cortex-A72, 1.5 GHz) runs single-threaded Python and NumPy roughly 3-5x slower than
a current x86 server core; the printed Pi figure uses a factor of 4 (an estimate, not a measurement).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PI4_FACTOR = 4.0


def main(argv):
    from agent.config import parse_text
    from agent.daemon import new_engine, warm_up
    from agent.pipeline import Pipeline
    from agent.sources import read_capture
    from parsers.frames import FrameBatch

    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else ROOT / "pcaps" / "mixed.pcap"
    batch = read_capture(path)
    span = (int(batch.ts[-1]) - int(batch.ts[0])) / 1e9
    rows = []
    for compiled in (False, True):  # the edge default, then capture.compiled_parsers = true
        cfg = parse_text(f'[capture]\ncompiled_parsers = {str(compiled).lower()}\n'
                         f'[detection]\nlearning_clock = "capture"\nlearning_period = {span / 2}\n')
        warm_up(cfg)
        pipeline, engine = Pipeline(compiled=compiled), new_engine(cfg)
        n = len(batch)
        step = 1000  # about one ring block of ICS traffic
        c0, w0 = time.process_time(), time.perf_counter()
        for lo in range(0, n, step):
            idx = range(lo, min(n, lo + step))
            part = FrameBatch.from_frames([batch.frame(i) for i in idx], ts=batch.ts[lo:lo + step].tolist())
            engine.process(pipeline.process(part))
        engine.process(pipeline.finish())
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        per_frame = cpu / n
        rows.append({"capture": path.name, "compiled_parsers": compiled, "frames": n, "cpu_s": round(cpu, 3),
                     "wall_s": round(wall, 3), "frames_per_cpu_s": round(n / cpu),
                     "cpu_share_per_1000_fps": round(per_frame * 1000, 4),
                     "pi4_cpu_share_per_1000_fps_est": round(per_frame * 1000 * PI4_FACTOR, 4),
                     "mode": engine.mode})
    if "--json" in argv:
        print(json.dumps(rows))
        return
    for r in rows:
        share = r["cpu_share_per_1000_fps"]
        print(f"{r['capture']} (compiled_parsers = {str(r['compiled_parsers']).lower()}): {r['frames']:,} frames "
              f"in {r['cpu_s']:.2f} s CPU ({r['frames_per_cpu_s']:,} frames per CPU second); CPU per 1,000 "
              f"frames/s: {100 * share:.1f}% of one core here, about {100 * share * PI4_FACTOR:.0f}% of one "
              f"Pi 4 core (x{PI4_FACTOR:g}, estimated)")


if __name__ == "__main__":
    main(sys.argv[1:])
