"""Fingerprint of every event column of every capture, to show a change left the output unchanged.

    python bench/hash_outputs.py [--root CHECKOUT] [--out FILE.json] [--compare OTHER.json] [FILES...]

Runs each capture (default: every file of ../shared/pcaps/MANIFEST.tsv, the labelled captures and the
bundled pcaps/) through the pipeline both ways (batch paths, ``compiled=True``, and chunk by chunk,
``compiled=False``) and records, per capture and way, the SHA-256 of each event column, the parse
error counts and the reassembly counters.  ``--root`` measures another checkout (e.g. main before a
change); ``--compare`` prints every difference against an earlier run's file (columns or counters
only one side has are listed, not counted as differences) and exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))


def default_files() -> list[Path]:
    shared = ROOT.parent / "shared" / "pcaps"
    if not shared.exists():
        shared = Path("/work/shared/pcaps")
    files = []
    manifest = shared / "MANIFEST.tsv"
    if manifest.exists():
        files += [shared / r["file"] for r in csv.DictReader(open(manifest, newline=""), delimiter="\t")]
    files += sorted((shared / "labelled").glob("**/*.pcap*"))
    files += sorted((ROOT / "pcaps").glob("*.pcap"))
    return [f for f in files if f.is_file()]


def fingerprint(path: Path, compiled: bool) -> dict:
    from agent.pipeline import Pipeline
    from agent.sources import CaptureReader
    from parsers.events import COLUMNS, EventBatch

    pipeline = Pipeline(compiled=compiled)
    parts = [pipeline.process(b) for b in CaptureReader(path)]
    parts.append(pipeline.finish())
    events = EventBatch.concat(parts)
    out = {"rows": len(events)}
    for name in COLUMNS:
        col = events[name]
        out["col:" + name] = hashlib.sha256(col.tobytes()).hexdigest()[:16]
    out["errors"] = {f"{k[0]}/{k[1]}": v for k, v in sorted(events.errors.items())}
    out["reassembly"] = {k: v for k, v in pipeline.reassembler.stats.as_dict().items() if isinstance(v, int)}
    return out


def _name(path: str) -> str:
    """A capture's name independent of the checkout it was read from (its folder and file)."""
    return "/".join(Path(path).parts[-2:])


def compare(old: dict, new: dict) -> int:
    old = {_name(k): v for k, v in old.items()}
    new = {_name(k): v for k, v in new.items()}
    diffs = 0
    for f in sorted(set(old) | set(new)):
        if f not in old or f not in new:
            print(f"only in {'new' if f in new else 'old'}: {f}")
            continue
        for way in old[f]:
            a, b = old[f][way], new[f].get(way, {})
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b:
                    continue
                va, vb = a[key], b[key]
                if isinstance(va, dict) and isinstance(vb, dict):
                    common = set(va) & set(vb)
                    va = {k: va[k] for k in common if va[k]}
                    vb = {k: vb[k] for k in common if vb[k]}
                if va != vb:
                    diffs += 1
                    print(f"DIFF {Path(f).name} [{way}] {key}: {va} -> {vb}")
    print(f"{len(new)} captures, {diffs} differences")
    return 1 if diffs else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--root")
    ap.add_argument("--out")
    ap.add_argument("--compare")
    args = ap.parse_args(argv)
    files = [Path(f) for f in args.files] or default_files()
    result = {}
    for path in files:
        result[str(path)] = {way: fingerprint(path, compiled) for way, compiled in (("batch", True), ("feed", False))}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare:
        return compare(json.loads(Path(args.compare).read_text()), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
