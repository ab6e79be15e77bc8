"""Resident memory of the agent's processing with and without the compiled parser batch paths.

Each setting runs in its own process, as the agent would: warm-up from the configuration, then
mixed.pcap in batches of 1,000 frames through the pipeline and an engine with the default (edge)
detectors, learning the first half, monitoring the rest.  Frames are read with struct, not
agent.sources, since the live agent has no file reader (whose record walk would load Numba).

    python bench/bench_memory.py [--json]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, struct, sys
from agent.config import parse_text
from agent.daemon import new_engine, release_memory, warm_up
from agent.pipeline import Pipeline
from parsers.frames import FrameBatch

compiled = sys.argv[1] == "true"
data = open("pcaps/mixed.pcap", "rb").read()
frames, ts, pos = [], [], 24
while pos + 16 <= len(data):
    sec, usec, incl, _ = struct.unpack_from("<IIII", data, pos)
    frames.append(data[pos + 16: pos + 16 + incl])
    ts.append(sec * 10**9 + usec * 1000)
    pos += 16 + incl
span = (ts[-1] - ts[0]) / 1e9
cfg = parse_text(f'[capture]\ncompiled_parsers = {sys.argv[1]}\n'
                 f'[detection]\nlearning_clock = "capture"\nlearning_period = {span / 2}\n')
warm_up(cfg)
pipeline, engine = Pipeline(compiled=compiled), new_engine(cfg)
for i in range(0, len(frames), 1000):
    engine.process(pipeline.process(FrameBatch.from_frames(frames[i:i + 1000], ts=ts[i:i + 1000])))
del frames, data
release_memory()
status = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status")
          if l.startswith(("VmRSS", "VmHWM"))}
print(json.dumps({"compiled_parsers": compiled, "mode": engine.mode, "rss_mb": round(status["VmRSS"], 1),
                  "peak_mb": round(status["VmHWM"], 1), "numba_loaded": "numba" in sys.modules}))
"""


def main(argv) -> int:
    rows = []
    for flag in ("false", "true"):
        r = subprocess.run([sys.executable, "-c", CHILD, flag], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(f"mixed.pcap, compiled_parsers = {str(row['compiled_parsers']).lower()}: {row['rss_mb']:.0f} MB resident "
              f"after monitoring (peak {row['peak_mb']:.0f} MB), Numba loaded: {row['numba_loaded']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
