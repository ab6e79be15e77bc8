"""``otwatch replay FILE...``: read captures through the pipeline and print what was seen.

Captures that continue each other (a rotated series: ``agent.parallel``) are read one after another
through one pipeline, as if replayed back to back; independent captures each get their own pipeline
and detection engine, up to ``--jobs`` at once, and the summary adds them up in command-line order.
With ``--metrics`` or ``--state`` (one agent, one baseline) every file goes through one pipeline.
The summary (frames, bytes, frames per protocol, errors by reason, elapsed time, frames/s) is printed
for people, or as one JSON object with ``--json``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from parsers.frames import FrameBatch

from .errors import InputError
from .pipeline import Pipeline
from .progress import PIECE_FRAMES, Progress
from .sources import CaptureReader, sniff_format


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="pcap or pcapng capture (optionally .gz)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    from . import metrics

    metrics.add_arguments(p)
    from .eval import add_detection_arguments

    add_detection_arguments(p)
    from . import parallel, site

    site.add_arguments(p)
    parallel.add_arguments(p)


def replay_files(files, pipeline: Pipeline, progress: Progress | None = None, on_events=None,
                 on_frames=None, stop=None) -> dict:
    """Run every file through ``pipeline``; return per-file notes (truncation, corruption).

    ``stop()`` is asked between batches; when it says true, reading ends there (the pipeline is
    still finished: what the flows buffer is parsed)."""
    notes = []
    done_bytes = 0
    frames = 0
    show = progress is not None and progress.enabled
    for path in files:
        if stop is not None and stop():
            break
        reader = CaptureReader(path)
        before = 0
        for batch in reader:
            if stop is not None and stop():
                break
            read = reader.bytes_read - before  # the read block this batch came from
            for lo, piece in pieces(batch, PIECE_FRAMES if show else 0):
                if on_frames is not None:
                    on_frames(piece)
                events = pipeline.process(piece)
                if on_events is not None:
                    on_events(events)
                frames += len(piece)
                if show:
                    progress.update(done_bytes + before + read * (lo + len(piece)) / max(len(batch), 1), frames)
            before = reader.bytes_read
        done_bytes += reader.bytes_read
        note = {"file": str(path), "format": reader.format, "frames": reader.frames}
        if reader.truncated:
            note["truncated_bytes"] = reader.truncated
        if reader.corrupt:
            note["corrupt"] = reader.corrupt
        if reader.bad_timestamps:
            note["bad_timestamps"] = reader.bad_timestamps
        if reader.unsupported_linktypes:
            note["unsupported_linktypes"] = {str(k): v for k, v in reader.unsupported_linktypes.items()}
        notes.append(note)
    events = pipeline.finish()
    if on_events is not None:
        on_events(events)
    return {"files": notes}


def pieces(batch: FrameBatch, size: int):
    """``(first index, frames)`` of ``batch`` in pieces of ``size`` frames (all of it when ``size`` is 0),
    numbered as in the source, sharing its buffer."""
    n = len(batch)
    if not size or n <= size:
        yield 0, batch
        return
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        yield lo, FrameBatch(buf=batch.buf, ts=batch.ts[lo:hi], offset=batch.offset[lo:hi], caplen=batch.caplen[lo:hi],
                             wirelen=batch.wirelen[lo:hi], linktype=batch.linktype[lo:hi], iface=batch.iface[lo:hi],
                             first_frame=batch.first_frame + lo)


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
        if "bad_timestamps" in f:
            lines.append(f"warning: {f['file']}: {f['bad_timestamps']:,} frames skipped: timestamp out of range "
                         "(before 1970 or after 2106, or an invalid if_tsresol/if_tsoffset)")
    if s.get("interrupted"):
        lines.append(f"interrupted by {s['interrupted']}: input not read to the end; open incidents "
                     "flushed, state saved")
    return "\n".join(lines)


def check_files(files) -> list[Path]:
    """The paths, after checking each is a readable, non-empty pcap or pcapng file."""
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p}: is a directory, not a capture file")
        mode = p.stat().st_mode
        if stat.S_ISFIFO(mode):
            # a pipe is read as a stream; peeking at its magic here would eat its first bytes, so
            # the reader checks the format (same one-line error) when it starts
            if not os.access(p, os.R_OK):
                raise InputError(f"{p}: not readable")
            continue
        if not stat.S_ISREG(mode):
            kind = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                    stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")
            raise InputError(f"{p}: is {kind}, not a capture file (a FIFO or a regular file is)")
        if p.stat().st_size == 0:
            raise InputError(f"{p}: empty file, not a capture")
        if not os.access(p, os.R_OK):
            raise InputError(f"{p}: not readable")
        if sniff_format(p) is None:
            raise InputError(f"{p}: not a pcap or pcapng file")
    return paths


class _Stop:
    """SIGTERM/SIGINT during a replay: stop reading at the next batch, then flush open incidents and
    save state as at the end of input.  A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, _frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"otwatch replay: {self.signal}: stopping after this batch", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run(args) -> int:
    paths = check_files(args.files)  # fail on a non-capture before doing any work
    from . import parallel
    from .site import SiteIdentity

    identity = SiteIdentity.from_args(args)  # a bad --site fails before any work too
    jobs = parallel.jobs_of(args)
    if len(paths) > 1 and getattr(args, "metrics", None) is None and not getattr(args, "state", None):
        chains = parallel.chains_of(paths, jobs, args.scheduler)
        if len(chains) > 1:
            return run_chains(args, chains, jobs, identity)
    pipeline = Pipeline()
    total = sum(p.stat().st_size for p in paths)
    progress = None if args.no_progress or args.json else Progress(total, stream=sys.stderr)
    exporter = None
    if getattr(args, "metrics", None) is not None:
        from .metrics import MetricsEndpoint

        exporter = MetricsEndpoint.from_args(args)
    from .eval import ReplayDetection, format_detection

    to_stdout = getattr(args, "alerts", None) == "-"  # the records own standard output; people read stderr
    out = sys.stderr if to_stdout else sys.stdout
    show = args.print_alerts if args.print_alerts is not None else (out.isatty() and not args.json)
    detection = ReplayDetection.from_args(args, print_to=out if show else None)
    if detection is not None:
        pipeline.frame_observers.append(detection.on_frames)
    if exporter is not None and detection is not None:
        exporter.attach(detection.engine)  # alerts opened, detection time, model health, scores

    def on_events(ev):
        if exporter is not None:
            exporter.batch(pipeline, ev)
        if detection is not None:
            detection.on_events(ev, pipeline.stats.first_ts)

    if detection is not None and exporter is not None:
        detection.on_lost = exporter.metrics.alerts_lost.inc
    t0 = time.perf_counter()
    try:
        with _Stop() as stop:
            files = replay_files(paths, pipeline, progress,
                                 on_events=on_events if exporter or detection else None, stop=stop)
            det = detection.finish(interrupted=stop()) if detection is not None else None
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
    if stop.signal:
        s["interrupted"] = stop.signal
    if args.json:
        print(json.dumps(s, sort_keys=False, default=str), file=out)
    else:
        print(format_summary(s), file=out)
        if det is not None:
            print(format_detection(det), file=out)
    if exporter is not None:
        sys.stdout.flush()
        try:
            exporter.linger(args.linger)  # the summary is out; keep the final values scrapeable
        finally:
            exporter.close()
    if det is not None and (det["alerts_lost"] or det["state_error"]):
        return 1  # alerts or the learned state were lost: said in the summary, and in the exit status
    if stop.signal:
        return 128 + signal.Signals[stop.signal].value
    return 0


# --- independent captures, in parallel ------------------------------------------------------------

def replay_chain(task: dict) -> dict:
    """Replay one chain of captures (run in a worker): its summary, detection summary and alert records."""
    from .eval import ReplayDetection

    pipeline = Pipeline()
    detection = None
    records: list = []
    if task["detect"]:
        detection = ReplayDetection(task["learn_s"], None, None, task["learn_until_s"])
        detection.log = _RecordList(records, task["identity"])
    t0 = time.perf_counter()
    files = replay_files([Path(f) for f in task["files"]], pipeline,
                         on_events=(lambda ev: detection.on_events(ev, pipeline.stats.first_ts))
                         if detection is not None else None)
    det = detection.finish() if detection is not None else None
    return {"summary": summary(pipeline, time.perf_counter() - t0, files), "detection": det, "alerts": records}


class _RecordList:
    """An alert log that keeps the records, stamped with the agent's identity, for the parent to write."""

    def __init__(self, records: list, identity):
        self.records, self.identity = records, identity

    def write(self, alert) -> None:
        self.records.append(self.identity.stamp(alert.to_ecs()))

    def close(self) -> None:
        pass


def merge_summaries(parts: list[dict], elapsed: float) -> dict:
    """One summary of several chains' summaries: counts added, files in order."""
    out = {"frames": 0, "bytes": 0, "by_protocol": {}, "other_frames": 0, "errors": {}, "skipped": {},
           "reassembly": {}, "learned_ports": {}, "first_ts": None, "last_ts": None}
    for s in parts:
        for k in ("frames", "bytes", "other_frames"):
            out[k] += s[k]
        for name, v in s["by_protocol"].items():
            acc = out["by_protocol"].setdefault(name, dict.fromkeys(v, 0))
            for k, n in v.items():
                acc[k] = acc.get(k, 0) + n
        for key in ("errors", "skipped", "reassembly"):
            for k, n in s[key].items():
                out[key][k] = out[key].get(k, 0) + n
        out["learned_ports"].update(s["learned_ports"])
        for k, pick in (("first_ts", min), ("last_ts", max)):
            if s[k] is not None:
                out[k] = s[k] if out[k] is None else pick(out[k], s[k])
    for key in ("by_protocol", "errors", "skipped"):
        out[key] = dict(sorted(out[key].items()))
    out["elapsed_s"] = round(elapsed, 4)
    out["frames_per_s"] = round(out["frames"] / elapsed) if elapsed > 0 else None
    out["files"] = [f for s in parts for f in s["files"]]
    return out


def merge_detection(parts: list[dict]) -> dict:
    by_rule: dict = {}
    by_sev: dict = {}
    for d in parts:
        for k, n in d["alerts_by_rule"].items():
            by_rule[k] = by_rule.get(k, 0) + n
        for k, n in d["alerts_by_severity"].items():
            by_sev[k] = by_sev.get(k, 0) + n
    return {"mode": "learn" if any(d["mode"] == "learn" for d in parts) else "monitor", "state_loaded": False,
            "alerts": sum(d["alerts"] for d in parts), "alerts_by_rule": dict(sorted(by_rule.items())),
            "alerts_by_severity": by_sev, "baselines": [d.get("baseline") for d in parts],
            "health": [d["health"] for d in parts]}


def run_chains(args, chains: list[list[Path]], jobs: int, identity) -> int:
    from . import parallel
    from .eval import format_detection, parse_duration, parse_time

    until = getattr(args, "learn_until", None)
    if args.learn and until:
        raise InputError("--learn and --learn-until: give one of them")
    detect = bool(args.learn or until or args.alerts)
    learn_s = parse_duration(args.learn) if args.learn else None
    tasks = [{"files": [str(p) for p in chain], "detect": detect, "learn_s": learn_s,
              "learn_until_s": parse_time(until) if until else None, "identity": identity} for chain in chains]
    t0 = time.perf_counter()
    results = parallel.run_tasks(replay_chain, tasks, jobs, args.scheduler,
                                 preload=parallel.ML_MODULES if detect else ())
    elapsed = time.perf_counter() - t0
    s = merge_summaries([r["summary"] for r in results], elapsed)
    s["chains"] = [{"files": t["files"], "frames": r["summary"]["frames"],
                    **({"alerts": r["detection"]["alerts"]} if r["detection"] else {})}
                   for t, r in zip(tasks, results)]
    if s["frames"] == 0 and not any(f.get("frames") for f in s["files"]):
        raise InputError("no frames could be read (the captures hold no frames)")
    det = merge_detection([r["detection"] for r in results]) if detect else None
    lost = 0
    if args.alerts:
        from models.safefile import UnsafeFile

        from .sinks import AlertLog

        try:
            log = AlertLog(args.alerts, fsync=False)
        except UnsafeFile as exc:
            raise InputError(f"--alerts: {exc}") from None
        with log:
            for r in results:
                for rec in r["alerts"]:
                    try:  # a failed record is cut back out (AlertLog); counted, and the exit status says so
                        log.write(rec)
                    except OSError:
                        lost += 1
    if det is not None:
        det["alerts_lost"] = lost
        s["detection"] = det
    if args.json:
        print(json.dumps(s, sort_keys=False, default=str))
    else:
        print(format_summary(s))
        print(f"{len(chains)} independent captures or series, up to "
              f"{'the Dask cluster' if args.scheduler else f'{min(jobs, len(chains))} at once'}")
        if det is not None:
            print(format_detection(det))
    return 1 if lost else 0
