"""``otwatch eval CAPTURE --labels LABELS.csv``: learn, monitor, and score the alerts against labels.

The capture runs through the pipeline and the detection engine; learning lasts ``--learn`` of
capture time, by default everything before the first labelled attack (minus a small margin).  The
table says per scenario whether it was detected, how fast, by which rules; then false alerts per
hour of benign monitored traffic and event-level precision, recall and F1.  ``--json`` prints
``{"scenarios": [...], "false_alerts_per_hour", "precision", "recall", "f1", ...}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from models.engine import DETECTORS, DetectionEngine
from models.scoring import GRACE_S, read_labels, score_alerts
from parsers.events import EventBatch

from .errors import InputError
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
    p.add_argument("capture", metavar="CAPTURE", help="pcap or pcapng capture")
    p.add_argument("--labels", required=True, metavar="LABELS.csv", help="the simulator's labels CSV")
    p.add_argument("--learn", metavar="DURATION", default=None,
                   help="learn the first DURATION of capture time from its first frame (e.g. 200s, 2h); "
                        "default: up to 1 s before the first labelled attack")
    p.add_argument("--learn-until", metavar="TIME", default=None,
                   help="learn up to this absolute time (epoch seconds or ISO 8601, UTC unless a zone is given)")
    p.add_argument("--detectors", default=",".join(DETECTORS),
                   help=f"comma-separated subset of {','.join(DETECTORS)} (ablation)")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help=f"seconds after an attack its effects may alert (default {GRACE_S:g})")
    p.add_argument("--alerts", metavar="FILE", help="also write the alerts as JSON lines")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--ablation", action="store_true",
                   help="run each detector alone and all together; print one row per run")


class Batches(list):
    """A capture's event batches as the pipeline emits them (parsed once, replayed into engines), and
    the time of the capture's first frame (``first_frame_ns``), where learning windows start."""

    first_frame_ns: int | None = None


def load_batches(capture) -> Batches:
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
    replay_files([Path(capture)], pipeline, None, on_events=on_events)
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
             learn_until_s: float | None = None) -> tuple[dict, DetectionEngine]:
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
    parts = load_batches(capture) if batches is None else batches
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


def run(args) -> int:
    (path,) = check_files([args.capture])  # exists, readable, a pcap or pcapng file
    if not Path(args.labels).is_file():
        raise InputError(f"{args.labels}: no such labels file")
    detectors = tuple(d.strip() for d in args.detectors.split(",") if d.strip())
    bad = [d for d in detectors if d not in DETECTORS]
    if bad:
        raise InputError(f"unknown detector(s) {', '.join(bad)}; choose from {', '.join(DETECTORS)}")
    try:
        labels = read_labels(args.labels)
    except (KeyError, ValueError) as exc:
        raise InputError(f"{args.labels}: not a labels CSV ({exc})") from None
    if not labels:
        raise InputError(f"{args.labels}: no labels")
    learn_s = parse_duration(args.learn) if args.learn else None
    learn_until = parse_time(args.learn_until) if getattr(args, "learn_until", None) else None
    if learn_s is not None and learn_until is not None:
        raise InputError("--learn and --learn-until: give one of them")
    if getattr(args, "ablation", False):
        rows = ablation(path, args.labels, learn_s, args.grace, learn_until_s=learn_until)
        if args.json:
            print(json.dumps({"capture": str(path), "runs": rows}, default=str))
        else:
            print(format_ablation(rows))
        sys.stdout.flush()
        return 0
    result, engine = evaluate(path, args.labels, learn_s, detectors, args.grace, learn_until_s=learn_until)
    if args.alerts:
        from .sinks import AlertLog
        with AlertLog(args.alerts, fsync=False) as log:
            for a in engine.alerts:
                log.write(a)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(format_result(result))
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
    g.add_argument("--alerts", metavar="FILE", default=None, help="write every alert as one JSON line (ECS)")
    g.add_argument("--state", metavar="DIR", default=None,
                   help="load what was learned from DIR if saved there, else learn and save it there")


class ReplayDetection:
    """Runs the detection engine beside ``replay_files`` and writes each incident once, as one JSON
    line, when it closes (after its cool-down, or at the end of input) with its final count and last
    seen: one record per alert, one ``event.id`` per record."""

    def __init__(self, learn_s: float | None, alerts_path: str | None, state_dir: str | None,
                 learn_until_s: float | None = None):
        from models import state as state_io

        self.state_dir = state_dir
        self.loaded = bool(state_dir) and state_io.exists(state_dir)
        if self.loaded:
            try:
                self.engine = DetectionEngine.load(state_dir)
            except state_io.StateError as exc:
                raise InputError(str(exc)) from None
        elif learn_until_s is not None:
            self.engine = DetectionEngine(learn_seconds=None, learn_until_ns=int(learn_until_s * 1e9))
        else:
            self.engine = DetectionEngine(learn_seconds=learn_s if learn_s is not None else 600.0)
        self.log = None
        self._frames: list = []
        if alerts_path:
            from .sinks import AlertLog
            self.log = AlertLog(alerts_path)

    @classmethod
    def from_args(cls, args):
        until = getattr(args, "learn_until", None)
        if not (getattr(args, "learn", None) or until or getattr(args, "alerts", None) or getattr(args, "state", None)):
            return None
        if args.learn and until:
            raise InputError("--learn and --learn-until: give one of them")
        return cls(parse_duration(args.learn) if args.learn else None, args.alerts, args.state,
                   parse_time(until) if until else None)

    def on_events(self, ev, first_frame_ns: int | None = None) -> None:
        if first_frame_ns is not None:
            self.engine.start_clock(first_frame_ns)  # --learn counts from the first frame
        frames, self._frames = self._frames, []
        # the batch's events and frames together, in slices of capture time (DetectionEngine.process_batch)
        self.engine.process_batch(ev, frames[0] if frames else None)
        for wf in frames[1:]:
            self.engine.process_batch(EventBatch.empty(), wf)
        for a in self.engine.pop_closed():
            self._write(a)

    def on_frames(self, batch, decoded, proto) -> None:
        """A ``Pipeline.frame_observers`` callable: every frame batch to the wire detector."""
        from models.wire import WireFrames

        self._frames.append(WireFrames.from_decoded(batch, decoded, proto))

    def _write(self, a) -> None:
        if self.log is not None:
            self.log.write(a)

    def finish(self) -> dict:
        self.engine.finish()
        for a in self.engine.pop_closed():
            self._write(a)
        if self.log is not None:
            self.log.close()
        if self.state_dir and not self.loaded:
            if self.engine.mode == "learn" and self.engine.events_seen == 0:
                raise InputError("nothing to learn from: the captures hold no protocol events")
            self.engine.save(self.state_dir)
        return self.summary()

    def summary(self) -> dict:
        alerts = self.engine.alerts
        by_rule: dict = {}
        by_sev: dict = {}
        for a in alerts:
            by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
            by_sev[a.severity] = by_sev.get(a.severity, 0) + 1
        return {"mode": self.engine.mode, "state_loaded": self.loaded, "alerts": len(alerts),
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
    return "\n".join(lines)
