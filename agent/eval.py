"""``otwatch eval CAPTURE --labels LABELS.csv``: learn, monitor, and score the alerts against labels.

The capture runs through the pipeline and the detection engine; learning lasts ``--learn`` of
capture time, by default everything before the first labelled attack (minus a small margin).  The
table says per scenario whether it was detected, how fast, by which rules; then false alerts per
hour of benign monitored traffic and event-level precision, recall and F1.  ``--json`` prints
``{"scenarios": [...], "false_alerts_per_hour", "precision", "recall", "f1", ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from models.engine import DETECTORS, DetectionEngine
from models.scoring import GRACE_S, read_labels, score_alerts
from parsers.events import EventBatch

from .errors import InputError
from .extras import missing_detectors
from .pipeline import Pipeline
from .replay import check_files, replay_files


def parse_duration(text: str) -> float:
    """``200s``, ``30m``, ``2h``, ``1d`` or plain seconds -> seconds.

    >>> parse_duration("2h"), parse_duration("200s"), parse_duration("90")
    (7200.0, 200.0, 90.0)
    """
    t = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise InputError(f"{text!r}: not a duration (use e.g. 200s, 30m, 2h)") from None
    if value <= 0:
        raise InputError(f"{text!r}: a duration must be positive")
    return value


def parse_time(text: str) -> float:
    """An absolute time: epoch seconds or ISO 8601 (no zone = UTC) -> epoch seconds.

    >>> parse_time("1474613770.5"), parse_time("2016-09-23T06:56:10Z"), parse_time("2016-09-23 06:56:10")
    (1474613770.5, 1474613770.0, 1474613770.0)
    """
    from datetime import datetime, timezone

    t = str(text).strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
    except ValueError:
        raise InputError(f"{text!r}: not a time (use epoch seconds or ISO 8601, e.g. 2024-05-01T12:00:00Z)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()


def add_arguments(p) -> None:
    p.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng capture(s), scored independently")
    p.add_argument("--labels", action="append", metavar="LABELS.csv",
                   help="the simulator's labels CSV: once, or once per capture in the same order "
                        "(default: CAPTURE's name with .labels.csv, as pcaps/ ships them)")
    p.add_argument("--learn", metavar="DURATION", default=None,
                   help="learn the first DURATION of capture time from its first frame (e.g. 200s, 2h); "
                        "default: up to 1 s before the first labelled attack")
    p.add_argument("--learn-until", metavar="TIME", default=None,
                   help="learn up to this absolute time (epoch seconds or ISO 8601, UTC unless a zone is given)")
    p.add_argument("--detectors", default=None,
                   help=f"comma-separated subset of {','.join(DETECTORS)} (ablation; default: all installed)")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help=f"seconds after an attack its effects may alert (default {GRACE_S:g})")
    p.add_argument("--alerts", metavar="FILE", help="also write the alerts as JSON lines (- for standard output; "
                   "overwritten unless --append)")
    p.add_argument("--append", action="store_true", help="append to the --alerts file instead of overwriting it")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("--html", metavar="FILE", help="also write the HTML report (as `otwatch report`) to FILE")
    p.add_argument("--ablation", action="store_true",
                   help="run each detector alone and all together; print one row per run")
    from . import parallel

    parallel.add_arguments(p)


def default_detectors() -> tuple:
    """Every detector whose library is installed; the score-based ones left out say so once."""
    missing = missing_detectors(DETECTORS)
    if missing:
        print(f"otwatch: note: {', '.join(missing)} skipped (not installed: pip install 'otwatch[ml]')",
              file=sys.stderr)
    return tuple(d for d in DETECTORS if d not in missing)


class Batches(list):
    """A capture's event batches as the pipeline emits them (parsed once, replayed into engines), and
    the time of the capture's first frame (``first_frame_ns``), where learning windows start."""

    first_frame_ns: int | None = None


def load_batches(capture, progress=None) -> Batches:
    """Each event batch is followed by the columns of its frames the wire detector reads
    (:class:`models.wire.WireFrames`)."""
    from models.wire import WireFrames

    parts = Batches()
    pipeline = Pipeline()
    frames: list = []  # each batch's frames go after its events (DetectionEngine.process_batch)

    def on_events(ev):
        if len(ev):
            parts.append(ev)
        parts.extend(frames)
        frames.clear()

    pipeline.frame_observers.append(lambda b, d, p: frames.append(WireFrames.from_decoded(b, d, p)))
    replay_files([Path(capture)], pipeline, progress, on_events=on_events)
    if progress is not None:
        progress.close()
    parts.first_frame_ns = pipeline.stats.first_ts
    return parts


def _feed(engine: DetectionEngine, parts) -> None:
    """Each event batch with the frames of its pipeline batch (DetectionEngine.process_batch)."""
    events = None
    for part in parts:
        if isinstance(part, EventBatch):
            if events is not None:
                engine.process(events)
            events = part
        else:
            engine.process_batch(events if events is not None else EventBatch.empty(), part)
            events = None
    if events is not None:
        engine.process(events)


def evaluate(capture, labels_path, learn_s: float | None = None, detectors=DETECTORS, grace_s: float = GRACE_S,
             engine_kwargs: dict | None = None, batches: list | None = None,
             learn_until_s: float | None = None, progress=None) -> tuple[dict, DetectionEngine]:
    labels = read_labels(labels_path)
    kw = dict(engine_kwargs or {})
    if learn_until_s is not None:
        engine = DetectionEngine(learn_seconds=None, learn_until_ns=int(learn_until_s * 1e9), detectors=detectors, **kw)
    elif learn_s is None and labels:
        engine = DetectionEngine(learn_seconds=None, learn_until_ns=int((labels[0].start_ts - 1.0) * 1e9),
                                 detectors=detectors, **kw)
    else:
        engine = DetectionEngine(learn_seconds=learn_s or 600.0, detectors=detectors, **kw)
    t0 = time.perf_counter()
    parts = load_batches(capture, progress) if batches is None else batches
    t1 = time.perf_counter()
    first_frame = getattr(parts, "first_frame_ns", None)
    if first_frame is not None:
        engine.start_clock(first_frame)
    _feed(engine, parts)
    engine.finish()
    t2 = time.perf_counter()
    # the last frame ends monitoring (a capture may hold no ICS events after learning: the wire detector
    # still monitored it)
    last_ns = max((int(p.ts.max()) for p in parts if len(p)), default=0)
    parts = [p for p in parts if isinstance(p, EventBatch)]
    events = EventBatch.concat(parts) if parts else EventBatch.empty()
    if engine.mode != "monitor" or last_ns == 0:
        raise InputError(f"{capture}: the capture ended while learning; nothing was monitored")
    mon_start = engine.learn_until_ns / 1e9
    mon_end = last_ns / 1e9
    result = score_alerts(engine.alerts, labels, mon_start, mon_end, grace_s=grace_s, events=events)
    result.update({"capture": str(capture), "detectors": list(detectors), "learn_s": round(
        (engine.learn_until_ns - engine.first_ts) / 1e9, 3), "monitor_s": round(mon_end - mon_start, 3),
        "elapsed_s": round((t1 - t0) + (t2 - t1), 3), "detect_s": round(t2 - t1, 3), "events": len(events),
        "health": engine.health()})
    return result, engine


ABLATION = tuple((d,) for d in DETECTORS) + (DETECTORS,)


def ablation(capture, labels_path, learn_s: float | None = None, grace_s: float = GRACE_S,
             configs=ABLATION, learn_until_s: float | None = None) -> list[dict]:
    """Each detector alone, then all together, on one parse of the capture."""
    batches = load_batches(capture)
    return [evaluate(capture, labels_path, learn_s, d, grace_s, batches=batches, learn_until_s=learn_until_s)[0]
            for d in configs]


def format_ablation(results: list[dict]) -> str:
    names = [s["scenario"] for s in results[0]["scenarios"]]
    short = {"setpoint_manipulation": "setpoint", "measurement_spoofing": "spoof", "unauthorised_write": "write",
             "dangerous_function": "dangerous"}
    head = f"{'detectors':<10}" + "".join(f"{short.get(n, n)[:9]:>10}" for n in names) + \
        f"{'false/h':>9}{'P':>7}{'R':>7}{'F1':>7}"
    lines = [f"{results[0]['capture']}", head]
    for r in results:
        label = "all" if len(r["detectors"]) > 1 else r["detectors"][0]
        cells = "".join(f"{'-' if not s['detected'] else format(s['time_to_detect_s'], '.2f') + 's':>10}"
                        for s in r["scenarios"])
        fa = r["false_alerts_per_hour"]
        lines.append(f"{label:<10}{cells}{'-' if fa is None else format(fa, '.2f'):>9}"
                     f"{r['precision']:>7.2f}{r['recall']:>7.2f}{r['f1']:>7.2f}")
    lines.append("cells: time to detect of each scenario, '-' missed")
    return "\n".join(lines)


def format_result(r: dict) -> str:
    lines = [f"{r['capture']}: learned {r['learn_s']:.0f} s, monitored {r['monitor_s']:.0f} s, "
             f"{r['alerts']} alerts ({', '.join(r['detectors'])})",
             f"{'scenario':<24}{'detected':>9}{'TTD s':>9}{'alerts':>8}  rules"]
    for s in r["scenarios"]:
        ttd = "-" if s["time_to_detect_s"] is None else f"{s['time_to_detect_s']:.3f}"
        lines.append(f"{s['scenario']:<24}{'yes' if s['detected'] else 'MISSED':>9}{ttd:>9}{s['alerts']:>8}  "
                     f"{', '.join(s['rules'])}")
    med = r["median_time_to_detect_s"]
    lines.append(f"detected {r['detected']}/{len(r['scenarios'])}, median time to detect "
                 f"{'-' if med is None else f'{med:.3f} s'}")
    fa = r["false_alerts_per_hour"]
    lines.append(f"false alerts: {r['false_alerts']} in {r['benign_hours'] * 3600:.0f} s of benign monitoring "
                 f"= {'-' if fa is None else f'{fa:.2f}'} per hour"
                 + (f" ({', '.join(f'{k} {v}' for k, v in r['false_alert_rules'].items())})"
                    if r["false_alert_rules"] else ""))
    if r.get("effect_alerts"):
        lines.append(f"effects: {r['effect_alerts']} alerts on attacked devices within {r['grace_s']:g} s of an attack "
                     "(neither detections nor false)")
    if r.get("precision") is not None:
        lines.append(f"events: precision {r['precision']:.3f}, recall {r['recall']:.3f}, F1 {r['f1']:.3f}")
    return "\n".join(lines)


def labels_for(captures, given) -> list[Path]:
    """The labels file of each capture: the ``--labels`` given (one, or one per capture), else the
    capture's sibling ``NAME.labels.csv``."""
    if given:
        if len(given) not in (1, len(captures)) or (len(given) == 1 and len(captures) > 1):
            raise InputError(f"--labels given {len(given)} times for {len(captures)} captures: give it once per "
                             "capture, or leave it out to use each capture's NAME.labels.csv")
        return [Path(g) for g in given]
    out = []
    for c in captures:
        p = Path(c)
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        out.append(p.with_name(name.rsplit(".", 1)[0] + ".labels.csv"))
    return out


def eval_capture(task: dict) -> dict:
    """Score one capture (run in a worker): its result (or ablation rows) and its alert records."""
    if task["ablation"]:
        return {"rows": ablation(task["capture"], task["labels"], task["learn_s"], task["grace"],
                                 learn_until_s=task["learn_until_s"])}
    progress = None
    if task.get("progress"):
        from .progress import Progress

        progress = Progress(Path(task["capture"]).stat().st_size, stream=sys.stderr)
    result, engine = evaluate(task["capture"], task["labels"], task["learn_s"], tuple(task["detectors"]),
                              task["grace"], learn_until_s=task["learn_until_s"], progress=progress)
    records = [a.to_ecs() for a in engine.alerts] if task["alerts"] else []
    return {"result": result, "alerts": records}


def total(results: list[dict]) -> dict:
    """Scenarios detected and false alerts over several captures."""
    hours = sum(r["benign_hours"] for r in results)
    false = sum(r["false_alerts"] for r in results)
    return {"captures": len(results), "scenarios": sum(len(r["scenarios"]) for r in results),
            "detected": sum(r["detected"] for r in results), "alerts": sum(r["alerts"] for r in results),
            "false_alerts": false, "benign_hours": round(hours, 4),
            "false_alerts_per_hour": round(false / hours, 3) if hours > 0 else None}


def run(args) -> int:
    paths = check_files(args.captures)  # exist, readable, pcap or pcapng files
    label_paths = labels_for(paths, args.labels)
    if args.detectors is None:
        detectors = default_detectors()
    else:
        detectors = tuple(d.strip() for d in args.detectors.split(",") if d.strip())
        bad = [d for d in detectors if d not in DETECTORS]
        if bad:
            raise InputError(f"unknown detector(s) {', '.join(bad)}; choose from {', '.join(DETECTORS)}")
        missing = missing_detectors(detectors)
        if missing:
            raise InputError("; ".join(missing.values()))
    for lp in label_paths:
        if not lp.is_file():
            raise InputError(f"{lp}: no such labels file")
        try:
            labels = read_labels(lp)
        except (KeyError, ValueError) as exc:
            raise InputError(f"{lp}: not a labels CSV ({exc})") from None
        if not labels:
            raise InputError(f"{lp}: no labels")
    learn_s = parse_duration(args.learn) if args.learn else None
    learn_until = parse_time(args.learn_until) if getattr(args, "learn_until", None) else None
    if learn_s is not None and learn_until is not None:
        raise InputError("--learn and --learn-until: give one of them")
    if len(label_paths) == 1 and len(paths) > 1:
        label_paths = label_paths * len(paths)
    from . import parallel

    jobs = parallel.jobs_of(args)
    show = not args.no_progress and (len(paths) == 1 or jobs <= 1) and not args.scheduler  # one bar at a time
    tasks = [{"capture": str(p), "labels": str(lp), "learn_s": learn_s, "learn_until_s": learn_until,
              "detectors": list(detectors), "grace": args.grace, "ablation": bool(getattr(args, "ablation", False)),
              "alerts": bool(args.alerts), "progress": show}
             for p, lp in zip(paths, label_paths)]
    ml = tasks[0]["ablation"] or {"river", "pyod"} & set(detectors)
    outs = parallel.run_tasks(eval_capture, tasks, jobs, args.scheduler,
                              preload=parallel.ML_MODULES if ml else ())
    if tasks[0]["ablation"]:
        if args.json:
            runs = [{"capture": t["capture"], "runs": o["rows"]} for t, o in zip(tasks, outs)]
            print(json.dumps(runs[0] if len(runs) == 1 else {"results": runs}, default=str))
        else:
            print("\n\n".join(format_ablation(o["rows"]) for o in outs))
        sys.stdout.flush()
        return 0
    if args.alerts:
        from .sinks import AlertLog
        try:
            with AlertLog(args.alerts, fsync=False, truncate=not args.append) as log:
                for o in outs:
                    for rec in o["alerts"]:
                        log.write(rec)
        except OSError as exc:  # a symlink planted at the path, a full disk: one line, not a traceback
            raise InputError(f"--alerts: {exc.strerror or exc}") from None
    if args.html:  # the report of the first capture: a pass of its own, for the plots and the inventory
        from .report import collect, write_report

        data = collect([paths[0]], str(label_paths[0]), learn_s, detectors, grace_s=args.grace,
                       learn_until_s=learn_until)
        write_report(data, args.html)
    out = sys.stderr if args.alerts == "-" else sys.stdout  # standard output holds the alert records
    results = [o["result"] for o in outs]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results, "total": total(results)},
                         default=str), file=out)
    else:
        print("\n\n".join(format_result(r) for r in results), file=out)
        if len(results) > 1:
            t = total(results)
            fa = t["false_alerts_per_hour"]
            print(f"\n{t['captures']} captures: detected {t['detected']}/{t['scenarios']} scenarios, "
                  f"{t['false_alerts']} false alerts in {t['benign_hours'] * 3600:.0f} s of benign monitoring "
                  f"= {'-' if fa is None else f'{fa:.2f}'} per hour", file=out)
    sys.stdout.flush()
    return 0


# --- detection during `otwatch replay` -----------------------------------------------------------

def add_detection_arguments(p) -> None:
    """The replay flags: ``--learn DURATION``, ``--alerts FILE``, ``--state DIR``."""
    g = p.add_argument_group("detection")
    g.add_argument("--learn", metavar="DURATION", default=None,
                   help="learn for the first DURATION of capture time, counted from the first frame "
                        "(200s, 2h), then monitor")
    g.add_argument("--learn-until", metavar="TIME", default=None,
                   help="learn up to this absolute time (epoch seconds or ISO 8601, UTC unless a zone is given)")
    g.add_argument("--alerts", metavar="FILE", default=None,
                   help="write every alert as one JSON line (ECS); - for standard output (the summary then goes "
                        "to standard error); the file is overwritten unless --append")
    g.add_argument("--append", action="store_true", help="append to the --alerts file instead of overwriting it")
    g.add_argument("--print-alerts", action=argparse.BooleanOptionalAction, default=None,
                   help="print each alert as it opens, one line (default: on when standard output is a terminal)")
    g.add_argument("--state", metavar="DIR", default=None,
                   help="load what was learned from DIR if saved there, else learn and save it there")


class ReplayDetection:
    """Runs the detection engine beside ``replay_files`` and writes each incident once, as one JSON
    line, when it closes (after its cool-down, or at the end of input) with its final count and last
    seen: one record per alert, one ``event.id`` per record."""

    def __init__(self, learn_s: float | None, alerts_path: str | None, state_dir: str | None,
                 learn_until_s: float | None = None, identity=None, append: bool = False, print_to=None):
        from models import state as state_io

        self.state_dir = state_dir
        self.loaded = bool(state_dir) and state_io.exists(state_dir)
        #: alerts that could not be written to the alert log (disk full...): the exit status says so
        self.lost = 0
        self.on_lost = None  # called once per lost alert (the metrics count it)
        self.state_error: str | None = None
        if self.loaded:
            try:
                self.engine = DetectionEngine.load(state_dir)
            except state_io.StateError as exc:
                raise InputError(str(exc)) from None
        elif learn_until_s is not None:
            self.engine = DetectionEngine(learn_seconds=None, learn_until_ns=int(learn_until_s * 1e9),
                                          detectors=default_detectors())
        else:
            self.engine = DetectionEngine(learn_seconds=learn_s if learn_s is not None else 600.0,
                                          detectors=default_detectors())
        self.resumed_learning = self.loaded and self.engine.mode == "learn"
        self.log = None
        self._frames: list = []
        if alerts_path:
            from models.safefile import UnsafeFile

            from .sinks import AlertLog
            try:
                self.log = AlertLog(alerts_path, identity=identity, truncate=not append)
            except UnsafeFile as exc:
                raise InputError(f"--alerts: {exc}") from None
        self.print_to = print_to  # a text stream: each alert as one line when it opens
        self.observer = None

    @classmethod
    def from_args(cls, args, print_to=None):
        until = getattr(args, "learn_until", None)
        if not (getattr(args, "learn", None) or until or getattr(args, "alerts", None) or getattr(args, "state", None)):
            return None
        if args.learn and until:
            raise InputError("--learn and --learn-until: give one of them")
        from .site import SiteIdentity

        return cls(parse_duration(args.learn) if args.learn else None, args.alerts, args.state,
                   parse_time(until) if until else None, identity=SiteIdentity.from_args(args),
                   append=getattr(args, "append", False), print_to=print_to)

    def on_events(self, ev, first_frame_ns: int | None = None) -> None:
        if first_frame_ns is not None:
            self.engine.start_clock(first_frame_ns)  # --learn counts from the first frame
        frames, self._frames = self._frames, []
        # the batch's events and frames together, in slices of capture time (DetectionEngine.process_batch)
        opened = self.engine.process_batch(ev, frames[0] if frames else None)
        for wf in frames[1:]:
            opened += self.engine.process_batch(EventBatch.empty(), wf)
        self._print(opened)
        for a in self.engine.pop_closed():
            self._write(a)

    def on_frames(self, batch, decoded, proto) -> None:
        """A ``Pipeline.frame_observers`` callable: every frame batch to the wire detector."""
        from models.wire import WireFrames

        self._frames.append(WireFrames.from_decoded(batch, decoded, proto))

    def _print(self, opened) -> None:
        if self.print_to is None or not opened:
            return
        from .alerts_cmd import format_line

        if self.observer is None:
            from .sinks import default_observer

            self.observer = default_observer()
        for a in opened:
            self.print_to.write("\r\033[K" if self.print_to.isatty() else "")  # over a progress bar
            self.print_to.write(format_line(a.to_ecs(self.observer)) + "\n")
        self.print_to.flush()

    def _write(self, a) -> None:
        if self.log is None:
            return
        try:  # a failed record is cut back out of the log (AlertLog); replay goes on and counts it
            self.log.write(a)
        except OSError as exc:
            if not self.lost:
                logging.getLogger(__name__).error("alert log %s: %s; alerts are being lost", self.log.path, exc)
            self.lost += 1
            if self.on_lost is not None:
                self.on_lost()

    def finish(self, interrupted: bool = False) -> dict:
        """Close every open incident and write it; save the state.  ``interrupted`` (SIGTERM/SIGINT):
        learning that had not reached its end is saved as learning in progress, to be resumed, never
        as a finished baseline."""
        from models import state as state_io

        self._print(self.engine.finish())
        for a in self.engine.pop_closed():
            self._write(a)
        if self.log is not None:
            self.log.close()
        if self.state_dir and (not self.loaded or self.resumed_learning):
            if self.engine.mode == "learn" and self.engine.events_seen == 0:
                raise InputError("nothing to learn from: the captures hold no protocol events")
            try:
                if interrupted and self.engine.mode == "learn":
                    self.engine.save_progress(self.state_dir)
                else:
                    self.engine.save(self.state_dir)
            except (OSError, state_io.StateError) as exc:
                self.state_error = f"{self.state_dir}: state not saved: {getattr(exc, 'strerror', None) or exc}"
        return self.summary()

    def summary(self) -> dict:
        alerts = self.engine.alerts
        by_rule: dict = {}
        by_sev: dict = {}
        for a in alerts:
            by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
            by_sev[a.severity] = by_sev.get(a.severity, 0) + 1
        return {"mode": self.engine.mode, "state_loaded": self.loaded, "alerts": len(alerts),
                "alerts_lost": self.lost, "state_error": self.state_error,
                "alerts_by_rule": dict(sorted(by_rule.items())), "alerts_by_severity": by_sev,
                "baseline": self.engine.baseline_summary(), "health": self.engine.health()}


def format_detection(d: dict) -> str:
    lines = [f"detection: {d['alerts']} alerts" + (" (baseline loaded from state)" if d["state_loaded"] else "")
             + ("; still learning at the end of input" if d["mode"] == "learn" else "")]
    b = d.get("baseline") or {}
    if b.get("learn_from_ts") and b.get("learn_until_ts"):
        fmt = "%Y-%m-%d %H:%M:%S"
        lines.append(f"  baseline: {time.strftime(fmt, time.gmtime(b['learn_from_ts']))} to "
                     f"{time.strftime(fmt, time.gmtime(b['learn_until_ts']))} UTC "
                     f"({(b['learn_until_ts'] - b['learn_from_ts']) / 3600:.2f} h): {b['events_learned']:,} events, "
                     f"{b['talker_pairs']} talker pairs, {b['baseline_entries']} entries"
                     + ("; NO protocol events were learned: every talker will be new" if not b["events_learned"]
                        else ""))
    if d["alerts_by_severity"]:
        lines.append("  by severity: " + ", ".join(f"{k} {v}" for k, v in d["alerts_by_severity"].items()))
        lines.append("  by rule: " + ", ".join(f"{k} {v}" for k, v in d["alerts_by_rule"].items()))
    if d.get("alerts_lost"):
        lines.append(f"  error: {d['alerts_lost']} alerts could not be written to the alert log")
    if d.get("state_error"):
        lines.append(f"  error: {d['state_error']}")
    return "\n".join(lines)
