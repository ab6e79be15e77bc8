"""``otwatch replay FILE...``: read captures through the pipeline and print what was seen.

Files are read one after another through one pipeline, as if replayed back to back.  The summary
(frames, bytes, frames per protocol, errors by reason, elapsed time, frames/s) is printed for people,
or as one JSON object with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError
from .pipeline import Pipeline
from .progress import Progress
from .sources import CaptureReader, sniff_format


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="pcap or pcapng capture (optionally .gz)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    from . import metrics

    metrics.add_arguments(p)
    from .eval import add_detection_arguments

    add_detection_arguments(p)


def replay_files(files, pipeline: Pipeline, progress: Progress | None = None, on_events=None) -> dict:
    """Run every file through ``pipeline``; return per-file notes (truncation, corruption)."""
    notes = []
    done_bytes = 0
    for path in files:
        reader = CaptureReader(path)
        for batch in reader:
            events = pipeline.process(batch)
            if on_events is not None:
                on_events(events)
            if progress is not None:
                progress.update(done_bytes + reader.bytes_read)
        done_bytes += reader.bytes_read
        note = {"file": str(path), "format": reader.format, "frames": reader.frames}
        if reader.truncated:
            note["truncated_bytes"] = reader.truncated
        if reader.corrupt:
            note["corrupt"] = reader.corrupt
        if reader.unsupported_linktypes:
            note["unsupported_linktypes"] = {str(k): v for k, v in reader.unsupported_linktypes.items()}
        notes.append(note)
    events = pipeline.finish()
    if on_events is not None:
        on_events(events)
    return {"files": notes}


def summary(pipeline: Pipeline, elapsed: float, files: dict) -> dict:
    st = pipeline.stats
    by_protocol = {
        name: {
            "frames": st.frames_by_protocol.get(name, 0),
            "bytes": st.bytes_by_protocol.get(name, 0),
            "pdus": st.pdus_by_protocol.get(name, 0),
            "points": st.points_by_protocol.get(name, 0),
        }
        for name in sorted(set(st.frames_by_protocol) | set(st.pdus_by_protocol))
    }
    other = st.frames - sum(v["frames"] for v in by_protocol.values())
    rs = pipeline.reassembler.stats
    return {
        "frames": st.frames,
        "bytes": st.bytes,
        "by_protocol": by_protocol,
        "other_frames": other,
        "errors": dict(sorted(pipeline.error_summary().items())),
        "skipped": dict(sorted(st.skipped.items())),
        "reassembly": {k: v for k, v in rs.as_dict().items() if v},
        "learned_ports": {f"{'tcp' if t == 6 else 'udp'}/{port}": pipeline.registry.name(code)
                          for (t, port), code in pipeline.registry.learned_ports.items()},
        "first_ts": st.first_ts / 1e9 if st.first_ts is not None else None,
        "last_ts": st.last_ts / 1e9 if st.last_ts is not None else None,
        "elapsed_s": round(elapsed, 4),
        "frames_per_s": round(st.frames / elapsed) if elapsed > 0 else None,
        **files,
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['frames']:,} frames, {s['bytes']:,} bytes in {s['elapsed_s']:.2f} s"
             + (f" ({s['frames_per_s']:,} frames/s)" if s["frames_per_s"] else "")]
    if s["first_ts"] is not None:
        span = s["last_ts"] - s["first_ts"]
        lines.append(f"capture time: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(s['first_ts']))} UTC, "
                     f"{span:,.1f} s")
    lines.append(f"{'protocol':<10}{'frames':>12}{'bytes':>14}{'PDUs':>12}{'points':>12}")
    for name, v in s["by_protocol"].items():
        lines.append(f"{name:<10}{v['frames']:>12,}{v['bytes']:>14,}{v['pdus']:>12,}{v['points']:>12,}")
    lines.append(f"{'other':<10}{s['other_frames']:>12,}")
    if s["learned_ports"]:
        lines.append("found by content: " + ", ".join(f"{k} = {v}" for k, v in s["learned_ports"].items()))
    if s["errors"]:
        lines.append("errors: " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].items()))
    else:
        lines.append("errors: none")
    not_ip = {k: v for k, v in s["skipped"].items() if k not in s["errors"]}
    if not_ip:
        lines.append("not decoded: " + ", ".join(f"{k} {v:,}" for k, v in not_ip.items()))
    for f in s["files"]:
        if "truncated_bytes" in f:
            lines.append(f"warning: {f['file']}: last record cut short ({f['truncated_bytes']} bytes): "
                         "frames before it were read")
        if "corrupt" in f:
            lines.append(f"warning: {f['file']}: stopped reading: {f['corrupt']}")
    return "\n".join(lines)


def check_files(files) -> list[Path]:
    """The paths, after checking each is a readable, non-empty pcap or pcapng file."""
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p}: is a directory, not a capture file")
        if p.stat().st_size == 0:
            raise InputError(f"{p}: empty file, not a capture")
        if not os.access(p, os.R_OK):
            raise InputError(f"{p}: not readable")
        if sniff_format(p) is None:
            raise InputError(f"{p}: not a pcap or pcapng file")
    return paths


def run(args) -> int:
    paths = check_files(args.files)  # fail on a non-capture before doing any work
    pipeline = Pipeline()
    total = sum(p.stat().st_size for p in paths)
    progress = None if args.no_progress or args.json else Progress(total, stream=sys.stderr)
    exporter = None
    if getattr(args, "metrics", None) is not None:
        from .metrics import MetricsEndpoint

        exporter = MetricsEndpoint.from_args(args)
    from .eval import ReplayDetection, format_detection

    detection = ReplayDetection.from_args(args)
    if detection is not None:
        pipeline.frame_observers.append(detection.on_frames)
    if exporter is not None and detection is not None:
        exporter.attach(detection.engine)  # alerts opened, detection time, model health, scores

    def on_events(ev):
        if exporter is not None:
            exporter.batch(pipeline, ev)
        if detection is not None:
            detection.on_events(ev, pipeline.stats.first_ts)

    t0 = time.perf_counter()
    try:
        files = replay_files(paths, pipeline, progress,
                             on_events=on_events if exporter or detection else None)
        det = detection.finish() if detection is not None else None
        elapsed = time.perf_counter() - t0
    except BaseException:
        if exporter is not None:
            exporter.close()
        raise
    if progress is not None:
        progress.close()
    s = summary(pipeline, elapsed, files)
    if pipeline.stats.frames == 0 and not any(f.get("frames") for f in s["files"]):
        hint = "; ".join(f"{f['file']}: {f.get('corrupt') or 'truncated'}" for f in s["files"]
                         if f.get("corrupt") or f.get("truncated_bytes"))
        raise InputError(f"no frames could be read ({hint or 'the captures hold no frames'})")
    if det is not None:
        s["detection"] = det
    if args.json:
        print(json.dumps(s, sort_keys=False, default=str))
    else:
        print(format_summary(s))
        if det is not None:
            print(format_detection(det))
    if exporter is not None:
        sys.stdout.flush()
        try:
            exporter.linger(args.linger)  # the summary is out; keep the final values scrapeable
        finally:
            exporter.close()
    return 0
