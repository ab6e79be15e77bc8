"""``otwatch parse CAPTURE [--format jsonl|csv] [-o FILE]``: the parsed events, one record per row.

One record per PDU and one per point (process value), with the event batch's column names; codes
become text at this edge (protocol, direction, kind, status, reason, addresses, function names), so a
tester can read exactly what otwatch parsed.  Field meanings: README "Parsed events".
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from parsers import dnp3_objects, iec104_types, modbus
from parsers.events import (COLUMNS, DIRECTION_NAMES, KIND_NAMES, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS,
                            PROTOCOL_NAMES, REASON_NAMES, STATUS_NAMES, EventBatch)

from .pipeline import Pipeline
from .replay import check_files, replay_files
from .errors import InputError

FUNCTION_NAMERS = {
    PROTO_MODBUS: modbus.function_name,
    PROTO_DNP3: dnp3_objects.function_name,
    PROTO_IEC104: iec104_types.function_name,
}
# Output order: the event columns, with a function name after the function code.
FIELDS = [c for c in COLUMNS[: COLUMNS.index("function") + 1]] + ["function_name"] + \
    [c for c in COLUMNS[COLUMNS.index("function") + 1:]]
_TEXT = {"protocol": PROTOCOL_NAMES, "direction": DIRECTION_NAMES, "kind": KIND_NAMES, "status": STATUS_NAMES,
         "reason": REASON_NAMES}


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="CAPTURE", help="pcap or pcapng capture (optionally .gz)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--pdus-only", action="store_true", help="leave out the per-point rows")
    from . import parallel

    parallel.add_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def records(events: EventBatch, book):
    """Yield one dict per event row, codes turned into text."""
    cols = {c: events[c].tolist() for c in COLUMNS}
    for i in range(len(events)):
        rec = {}
        for c in COLUMNS:
            v = cols[c][i]
            if c in _TEXT:
                v = _TEXT[c].get(v, f"unknown-{v}")
            elif c in ("src", "dst"):
                v = book.format(v)
            elif c == "value" and isinstance(v, float) and math.isnan(v):
                v = None
            rec[c] = v
            if c == "function":
                namer = FUNCTION_NAMERS.get(cols["protocol"][i])
                rec["function_name"] = namer(v) if namer else None
        yield rec


def parse_chain(task: dict) -> dict:
    """Parse one chain of captures (in a worker): the records as text (JSON lines, or CSV rows
    without the header), zlib-compressed for the trip back, and the files' notes."""
    import io
    import zlib

    pipeline = Pipeline()
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore") if task["format"] == "csv" else None

    def emit(events: EventBatch) -> None:
        if task["pdus_only"]:
            events = events.pdus
        for rec in records(events, pipeline.book):
            if writer is not None:
                writer.writerow(rec)
            else:
                buf.write(json.dumps(rec, separators=(",", ":")) + "\n")

    files = replay_files([Path(f) for f in task["files"]], pipeline, on_events=emit)
    return {"text": zlib.compress(buf.getvalue().encode("utf-8"), 1), "files": files["files"]}


def _warn(notes) -> None:
    for f in notes:
        if f.get("truncated_bytes"):
            print(f"otwatch parse: warning: {f['file']}: last record cut short; frames before it were read",
                  file=sys.stderr)
        if f.get("corrupt"):
            print(f"otwatch parse: warning: {f['file']}: stopped reading: {f['corrupt']}", file=sys.stderr)


def run_chains(args, chains, jobs: int) -> int:
    """Independent captures, each through its own pipeline, printed in command-line order."""
    import zlib

    from . import parallel

    tasks = [{"files": [str(p) for p in c], "format": args.format, "pdus_only": args.pdus_only} for c in chains]
    try:
        out = open(args.output, "w", newline="") if args.output else sys.stdout
    except OSError as exc:
        raise InputError(f"{args.output}: cannot write: {exc.strerror}") from None
    try:
        if args.format == "csv":
            csv.DictWriter(out, fieldnames=FIELDS).writeheader()
        for r in parallel.run_tasks(parse_chain, tasks, jobs, args.scheduler):
            out.write(zlib.decompress(r["text"]).decode("utf-8"))
            _warn(r["files"])
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def run(args) -> int:
    paths = check_files(args.files)
    from . import parallel

    if len(paths) > 1:
        jobs = parallel.jobs_of(args)
        chains = parallel.chains_of(paths, jobs, args.scheduler)
        if len(chains) > 1:
            return run_chains(args, chains, jobs)
    pipeline = Pipeline()
    try:
        out = open(args.output, "w", newline="") if args.output else sys.stdout
    except OSError as exc:
        raise InputError(f"{args.output}: cannot write: {exc.strerror}") from None
    writer = None
    if args.format == "csv":
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()

    def emit(events: EventBatch) -> None:
        if args.pdus_only:
            events = events.pdus
        for rec in records(events, pipeline.book):
            if writer is not None:
                writer.writerow(rec)
            else:
                out.write(json.dumps(rec, separators=(",", ":")) + "\n")

    progress = None
    if not args.no_progress and (out is not sys.stdout or not sys.stdout.isatty()):  # not over the records
        from .progress import Progress

        progress = Progress(sum(p.stat().st_size for p in paths), stream=sys.stderr)
    try:
        files = replay_files(paths, pipeline, progress, on_events=emit)
    finally:
        if progress is not None:
            progress.close()
        if out is not sys.stdout:
            out.close()
    for f in files["files"]:
        if f.get("truncated_bytes"):
            print(f"otwatch parse: warning: {f['file']}: last record cut short; frames before it were read",
                  file=sys.stderr)
        if f.get("corrupt"):
            print(f"otwatch parse: warning: {f['file']}: stopped reading: {f['corrupt']}", file=sys.stderr)
    return 0
