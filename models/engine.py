"""The detection engine: features and the five detectors behind one call, learn then monitor.

``engine.process(events) -> list[Alert]`` takes event batches in capture order.  Until
``learn_seconds`` of capture time have passed (or ``learn_until_ns``) every batch is learned from;
the batch that crosses the boundary is split, the baseline is finalised (provisional entries,
periods, thresholds calibrated on the learning scores, PyOD fitted) and monitoring starts.

Per batch, in monitoring:

======================= ======================================= ==========================
detector                what it sees                            rate
======================= ======================================= ==========================
allow-list              every PDU row (searchsorted on hashes)  every event
process-variable model  every point row                         every event
polling-cycle model     PDU rows grouped by channel; windows    every event / per second
protocol sessions       PDU rows grouped by session             every event
parser health           per channel-second error counts         one row per channel-second
River HalfSpaceTrees    per channel-second feature vectors      one row per channel-second
PyOD (IForest)          per channel-second feature vectors      one row per channel-second
wire (L2-L4)            every IP and ARP frame (process_frames) every frame
======================= ======================================= ==========================

The wire detector (:mod:`models.wire`) reads frames, not events: front ends pass each batch's
decoded columns to :meth:`DetectionEngine.process_frames` before the ICS-only filtering, and it
learns until the same ``learn_until_ns``.

Large batches are cut into slices of at most ``slice_s`` seconds of capture time so that silence
checks and alert cool-downs follow capture time, not batch size.  ``health()`` returns the model
health numbers (stable names, documented in docs/detection.md).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from parsers.events import EventBatch

from . import state as state_io
from .alert_manager import AlertManager
from .allowlist import AllowList
from .cycle import CycleModel
from .flood import FloodModel
from .features import F, FEATURE_NAMES, FEATURE_WORDS, NS, FeatureBatch, WindowFeatures
from .findings import Finding, ip_text, protocol_text
from .process import ProcessModel
from .sessions import SessionModel
from .process_state import ProcessStateModel
from .sequence import SequenceModel
from .thresholds import ScoreMonitor, calibrate
from .wire import WireDetector, WireFrames

log = logging.getLogger(__name__)

DETECTORS = ("allowlist", "process", "cycle", "parser", "river", "pyod", "sessions", "sequence", "state", "wire")
ML_DETECTORS = ("river", "pyod", "sequence", "state")  # learned anomaly models (the rest are rules)
_ERR = (F["bad_pdus"], F["sequence_errors"])


def transform(X: np.ndarray) -> np.ndarray:
    """What the ML models see: log1p of the window features (counts span decades)."""
    return np.log1p(np.maximum(X, 0.0))


class DetectionEngine:
    def __init__(self, learn_seconds: float | None = 600.0, learn_until_ns: int | None = None,
                 detectors=DETECTORS, alerts_per_hour: float = 0.5, cooldown_s: float = 60.0,
                 slice_s: float = 5.0, pyod_method: str = "iforest", max_learn_windows: int = 50000):
        self.learn_seconds = learn_seconds
        self.learn_until_ns = learn_until_ns
        self.detectors = tuple(detectors)
        self.alerts_per_hour = alerts_per_hour
        self.slice_ns = int(slice_s * NS)
        self.pyod_method = pyod_method
        self.max_learn_windows = max_learn_windows
        self.mode = "learn"
        self.features = WindowFeatures()
        self.allowlist = AllowList()
        self.cycle = CycleModel()
        self.flood = FloodModel()  # part of the "cycle" detector: request rates per pair
        self.process_model = ProcessModel()
        self.sessions = SessionModel()
        self.wire = WireDetector()
        self.river = None
        self.pyod = None
        self.sequence = SequenceModel()  # order of requests per channel (models/sequence.py)
        self.state = ProcessStateModel()  # measurement vectors per report (models/process_state.py)
        self.manager = AlertManager(cooldown_s=cooldown_s)
        self.learn_X: list = []
        self.learn_n = 0
        self.first_ts: int | None = None
        self.learned_from: int | None = None
        self.learned_to: int | None = None
        self.now_ns = 0
        self.thresholds = {"river": np.inf, "pyod": np.inf}
        self.monitors = {"river": ScoreMonitor(), "pyod": ScoreMonitor()}
        self.feature_ref = (np.zeros(len(FEATURE_NAMES)), np.ones(len(FEATURE_NAMES)))
        self.err_max = 0.0
        self.closed: list = []
        self.events_seen = 0
        self.events_learned = 0
        self.busy_s = {d: 0.0 for d in DETECTORS + ("features",)}

    # -- the stream ----------------------------------------------------------------------------
    def start_clock(self, first_frame_ns: int) -> None:
        """The capture's (or the interface's) first frame: ``learn_seconds`` count from here, not from
        the first protocol event -- in a capture whose first ICS traffic is an attack, counting from
        that event would learn the attack as normal.  Later calls change nothing."""
        if self.first_ts is None:
            self.first_ts = int(first_frame_ns)
            if self.learn_until_ns is None:
                self.learn_until_ns = self.first_ts + int((self.learn_seconds or 0) * NS)

    def process(self, events: EventBatch) -> list:
        """Learn from or monitor one batch; return the alerts it opened."""
        n = len(events)
        if n == 0:
            return []
        self.events_seen += n
        self.start_clock(int(events.ts.min()))  # no frame clock given: the first event starts it
        out = []
        ts = events.ts
        if self.mode == "learn":
            before = ts < self.learn_until_ns
            if before.all():
                self._learn(events)
                return out
            if before.any():
                self._learn(events.select(before))
            self.finish_learning()
            events = events.select(~before)
            ts = events.ts
        # cut into slices of capture time (few per batch)
        t0 = int(ts.min())
        cuts = np.flatnonzero(np.diff((ts - t0) // self.slice_ns)) + 1
        bounds = np.r_[0, cuts, ts.shape[0]]
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            out.extend(self._monitor(events.select(slice(a, b))))
        return out

    def process_batch(self, events: EventBatch, frames: "WireFrames | None") -> list:
        """One pipeline batch: its events and its frames' columns, taken together in slices of capture
        time (a batch may span hours; neither side's clock may close the other's incidents early)."""
        if frames is None or len(frames) == 0 or "wire" not in self.detectors:
            return self.process(events)
        ids_e = events.ts // self.slice_ns
        ids_w = frames.ts // self.slice_ns
        oe, ow = np.argsort(ids_e, kind="stable"), np.argsort(ids_w, kind="stable")
        se, sw = ids_e[oe], ids_w[ow]
        out = []
        for sid in np.union1d(se, sw).tolist():
            a, b = np.searchsorted(se, sid), np.searchsorted(se, sid, side="right")
            if b > a:
                out += self.process(events.select(oe[a:b]))
            a, b = np.searchsorted(sw, sid), np.searchsorted(sw, sid, side="right")
            if b > a:
                out += self.process_wire(frames.select(ow[a:b]))
        return out

    def process_frames(self, decoded, batch, proto=None) -> list:
        """Learn from or monitor one frame batch at layers 2-4 (its decoded columns, ARP included;
        ``proto``: the pipeline's protocol per frame); return the alerts it opened.  See
        :meth:`process_batch` to give a batch's events and frames together."""
        if "wire" not in self.detectors or len(batch) == 0:
            return []
        return self.process_wire(WireFrames.from_decoded(batch, decoded, proto))

    def process_wire(self, wf: WireFrames) -> list:
        """:meth:`process_frames` on columns already taken from a batch (``otwatch eval`` keeps them).
        A batch's frames and events are best given together to :meth:`process_batch`: each side's
        clock closes quiet incidents, so neither may run ahead of the other by more than a slice."""
        if "wire" not in self.detectors or len(wf) == 0:
            return []
        t0 = time.perf_counter()
        self.start_clock(int(wf.ts.min()))  # learning counts from the first frame
        before = wf.ts < self.learn_until_ns
        if before.any():  # (the events of the same batch may have ended learning already)
            self.wire.learn(wf.select(before) if not before.all() else wf)
        if before.all():
            self.busy_s["wire"] += time.perf_counter() - t0
            return []
        if self.wire.learning:
            self.wire.finish_learning()
        elif self.mode == "learn":
            # frames crossed the boundary in an earlier batch and no event has since (a capture with no ICS
            # traffic after learning): learning ends for every detector, by capture time
            self.finish_learning()
        wf = wf.select(~before) if before.any() else wf
        # slices of capture time, as for events: windows and cool-downs follow capture time, not batch size
        ts = wf.ts
        cuts = np.flatnonzero(np.diff((ts - int(ts.min())) // self.slice_ns)) + 1
        bounds = np.r_[0, cuts, ts.shape[0]].tolist()
        opened = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = wf.select(slice(a, b))
            findings = self.wire.findings(part)
            # incidents quiet since before this slice close first, as in _monitor
            self.closed.extend(self.manager.expire(max(self.now_ns, int(part.ts.min()))))
            self.now_ns = max(self.now_ns, int(part.ts.max()))
            opened += self.manager.add(findings)
            self.closed.extend(self.manager.expire(self.now_ns))
        self.busy_s["wire"] += time.perf_counter() - t0
        return opened

    def finish(self) -> list:
        """End of input: flush the last windows and close every incident; returns the closed alerts."""
        if self.mode == "learn" and not self.wire.learning:
            self.finish_learning()  # the frames went past learn_until_ns (see process_wire)
        if self.mode == "learn":
            fb = self.features.flush()
            self._learn_windows(fb)
            return []
        fb = self.features.flush()
        opened = self._monitor_windows(fb) if len(fb) else []
        self.closed.extend(self.manager.close_all())
        return opened

    # -- learning ------------------------------------------------------------------------------
    def _learn(self, ev: EventBatch) -> None:
        t = time.perf_counter
        t0 = t()
        fb = self.features.push(ev)
        self.busy_s["features"] += t() - t0
        self.events_learned += len(ev)
        self.allowlist.learn(ev)
        self.process_model.learn(ev)
        self.cycle.learn(ev, fb)
        self.flood.learn(ev)
        self.sessions.learn(ev)
        if "sequence" in self.detectors:
            self.sequence.learn(ev)
        if "state" in self.detectors:
            self.state.learn(ev)
        self._learn_windows(fb)
        self.learned_from = self.learned_from if self.learned_from is not None else int(ev.ts.min())
        self.learned_to = int(ev.ts.max())

    def _learn_windows(self, fb: FeatureBatch) -> None:
        if len(fb) == 0:
            return
        X = transform(fb.X)
        self.err_max = max(self.err_max, float(fb.X[:, _ERR].sum(axis=1).max()))
        if self.learn_n < self.max_learn_windows:
            self.learn_X.append(X[: self.max_learn_windows - self.learn_n])
            self.learn_n += min(X.shape[0], self.max_learn_windows - self.learn_n)

    def finish_learning(self) -> None:
        """Freeze the baseline and calibrate every threshold on the learning window."""
        fb = self.features.flush()
        self.cycle.learn(EventBatch.empty(), fb)
        self._learn_windows(fb)
        self.allowlist.finish_learning()
        if self.wire.learning:
            self.wire.finish_learning()
        Xl = np.concatenate(self.learn_X) if self.learn_X else np.empty((0, len(FEATURE_NAMES)))
        hours = max(((self.learned_to or 0) - (self.learned_from or 0)) / NS / 3600, 1 / 60)
        budget = self.alerts_per_hour * hours / max(Xl.shape[0], 1)  # fraction of windows allowed over
        self.budget = budget
        self.process_model.finish_learning(budget)
        self.cycle.finish_learning(budget)
        self.sessions.finish_learning()
        # the same 0.5/h over the learning span, spread over each model's own units (transitions, reports)
        self.sequence.finish_learning(self.alerts_per_hour * hours)
        self.state.finish_learning(self.alerts_per_hour * hours)
        self._fit_ml(Xl, budget)
        self.mode = "monitor"
        if self.allowlist.overflow:
            self.manager.add([self._overflow_finding()])
        log.info("learned %d windows over %.2f h; thresholds %s", Xl.shape[0], hours, self.thresholds)

    def _fit_ml(self, Xl: np.ndarray, budget: float) -> None:
        self.learn_matrix = Xl
        if Xl.shape[0]:
            med = np.median(Xl, axis=0)
            q1, q3 = np.quantile(Xl, [0.25, 0.75], axis=0)
            self.feature_ref = (med, np.maximum(q3 - q1, 0.05))
        if Xl.shape[0] < 20:
            return
        if "river" in self.detectors:
            from .river_detector import RiverDetector
            self.river = RiverDetector()
            self.river.learn(Xl)
            s = self.river.score(Xl)
            # HalfSpaceTrees scores 0 until it has a reference window (window_size rows): calibrated on those
            # zeros, every later window would alert; with fewer learning windows River stays silent
            ready = self.river.learned >= self.river.hst.window_size
            self.thresholds["river"] = calibrate(s, budget, floor=1.0) if ready else np.inf
            self.monitors["river"].set_reference(s, self.thresholds["river"])
        if "pyod" in self.detectors:
            from .pyod_detector import PyODDetector
            self.pyod = PyODDetector(method=self.pyod_method)
            self.pyod.fit(Xl)
            s = self.pyod.score(Xl)
            self.thresholds["pyod"] = calibrate(s, budget, floor=1.0)
            self.monitors["pyod"].set_reference(s, self.thresholds["pyod"])

    # -- monitoring ----------------------------------------------------------------------------
    def _monitor(self, ev: EventBatch) -> list:
        t = time.perf_counter
        findings: list[Finding] = []
        # close incidents that went quiet before this slice begins, so that a finding after a quiet
        # spell opens a new alert instead of joining one that should have closed (capture time)
        self.closed.extend(self.manager.expire(max(self.now_ns, int(ev.ts.min()))))
        self.now_ns = max(self.now_ns, int(ev.ts.max()))
        if "allowlist" in self.detectors:
            t0 = t()
            findings += self.allowlist.findings(ev)
            self.busy_s["allowlist"] += t() - t0
        if "process" in self.detectors:
            t0 = t()
            findings += self.process_model.findings(ev)
            self.busy_s["process"] += t() - t0
        t0 = t()
        fb = self.features.push(ev)
        self.busy_s["features"] += t() - t0
        if "cycle" in self.detectors:
            t0 = t()
            findings += self.cycle.findings(ev, fb, self.now_ns)
            findings += self.flood.findings(ev)
            self.busy_s["cycle"] += t() - t0
        if "sessions" in self.detectors:
            t0 = t()
            findings += self.sessions.findings(ev, self.now_ns)
            self.busy_s["sessions"] += t() - t0
        if "sequence" in self.detectors:
            t0 = t()
            findings += self.sequence.findings(ev)
            self.busy_s["sequence"] += t() - t0
        if "state" in self.detectors:
            t0 = t()
            findings += self.state.findings(ev)
            self.busy_s["state"] += t() - t0
        opened = self.manager.add(findings)
        opened += self._monitor_windows(fb)
        self.closed.extend(self.manager.expire(self.now_ns))
        return opened

    def _monitor_windows(self, fb: FeatureBatch) -> list:
        if len(fb) == 0:
            return []
        t = time.perf_counter
        X = transform(fb.X)
        flagged = np.zeros(len(fb), bool)
        findings = []
        if "parser" in self.detectors:
            t0 = t()
            err = fb.X[:, _ERR].sum(axis=1)
            hit = err > self.err_max
            flagged |= hit
            for i in np.flatnonzero(hit).tolist():
                findings.append(self._parser_finding(fb, i))
            self.busy_s["parser"] += t() - t0
        for name, model in (("river", self.river), ("pyod", self.pyod)):
            if model is None or name not in self.detectors:
                continue
            t0 = t()
            s = model.score(X)
            self.monitors[name].observe(s)
            hit = s > self.thresholds[name]
            flagged |= hit
            for i in np.flatnonzero(hit).tolist():
                findings.append(self._ml_finding(name, fb, X, i, float(s[i])))
            self.busy_s[name] += t() - t0
        # learn on from windows nothing flagged (anomalies are never learned from)
        ok = ~flagged
        if ok.any():
            t0 = t()
            if self.river is not None:  # a sample when windows are many (RiverDetector.learn_sample)
                self.river.learn_sample(X[ok], float(fb.sec.max() - fb.sec.min() + 1))
            self.busy_s["river"] += t() - t0
            t0 = t()
            if self.pyod is not None:
                self.pyod.learn(X[ok], float(fb.last_ts.max()) / NS)
            self.busy_s["pyod"] += t() - t0
        return self.manager.add(findings)

    def explain(self, x: np.ndarray, raw: np.ndarray, top: int = 3) -> list:
        med, iqr = self.feature_ref
        z = (x - med) / iqr
        order = np.argsort(-np.abs(z))[:top]
        out = []
        for j in order.tolist():
            if abs(z[j]) < 1:
                continue
            usual = float(np.expm1(med[j]))
            out.append(f"{FEATURE_WORDS[FEATURE_NAMES[j]]}: {raw[j]:.4g} (usually about {usual:.3g})")
        return out

    def _overflow_finding(self) -> Finding:
        """One alert when learning saw more distinct items than the baseline holds: a flood or a scan
        while learning.  The baseline is incomplete and must not be trusted as a picture of normal."""
        n, cap = self.allowlist.overflow, self.allowlist.capacity
        t = self.learn_until_ns or self.learned_to or 0
        return Finding(
            rule="allowlist.learning_overflow", detector="allowlist", severity="medium", first_ts=t, last_ts=t,
            src=0, dst=0, protocol=0, entity="baseline",
            message=(f"learning saw {n:,} items more than the baseline holds ({cap:,} per table): a flood of "
                     "spoofed addresses or a scan while learning. Those items were not learned (they alert when "
                     "used); the baseline is incomplete: review it (otwatch baseline show) and consider learning "
                     "again"),
            technique="T0814", count=n, fields={"overflow": n, "capacity_per_table": cap})

    def _ml_finding(self, name, fb, X, i, score) -> Finding:
        c, s, p = ip_text(fb.client[i]), ip_text(fb.server[i]), int(fb.protocol[i])
        expl = self.explain(X[i], fb.X[i])
        r = fb.X[i]
        technique = "T0814" if r[F["rate_1"]] > 5 * max(float(np.expm1(self.feature_ref[0][F["rate_1"]])), 1) else \
            "T0830" if r[F["latency_ms_mean"]] > 0 and X[i, F["latency_ms_mean"]] > self.feature_ref[0][
                F["latency_ms_mean"]] + 3 * self.feature_ref[1][F["latency_ms_mean"]] else "T0869"
        return Finding(
            rule=f"ml.{name}", detector=name, severity="medium", first_ts=int(fb.first_ts[i]),
            last_ts=int(fb.last_ts[i]), src=int(fb.client[i]), dst=int(fb.server[i]), protocol=p,
            entity=f"{c}>{s}/{p}",
            message=(f"unusual {protocol_text(p)} traffic between {c} and {s} ({name} score {score:.3g} over "
                     f"threshold {self.thresholds[name]:.3g})" + (": " + "; ".join(expl) if expl else "")),
            technique=technique, count=int(r[F["requests"]] + r[F["responses"]]), score=score,
            threshold=self.thresholds[name], explanation=expl,
            fields={FEATURE_NAMES[j]: round(float(r[j]), 4) for j in range(len(FEATURE_NAMES)) if r[j]})

    def _parser_finding(self, fb, i) -> Finding:
        c, s, p = ip_text(fb.client[i]), ip_text(fb.server[i]), int(fb.protocol[i])
        bad, seq = int(fb.X[i, F["bad_pdus"]]), int(fb.X[i, F["sequence_errors"]])
        return Finding(
            rule="parser.errors", detector="parser", severity="medium", first_ts=int(fb.first_ts[i]),
            last_ts=int(fb.last_ts[i]), src=int(fb.client[i]), dst=int(fb.server[i]), protocol=p,
            entity=f"{c}>{s}/{p}",
            message=(f"{protocol_text(p)} between {c} and {s}: {bad} malformed or unknown PDUs and {seq} "
                     f"sequence/CRC errors in one second (at most {self.err_max:g} during the baseline): "
                     "replayed, injected or corrupted frames"),
            technique="T0830" if seq else "T0855", count=bad + seq, score=float(bad + seq),
            threshold=self.err_max, fields={"bad_pdus": bad, "sequence_errors": seq})

    def pop_closed(self) -> list:
        out, self.closed = self.closed, []
        return out

    @property
    def alerts(self) -> list:
        return self.manager.alerts

    @classmethod
    def _resume_learning(cls, arrays, meta, kwargs) -> "DetectionEngine":
        """An engine still learning, from :meth:`save_progress`: learning goes on to the same end."""
        kwargs.setdefault("learn_seconds", meta["learn_seconds"])
        kwargs["learn_until_ns"] = meta["learn_until_ns"]
        e = cls(**kwargs)
        e.allowlist = AllowList.from_state(arrays, meta["allowlist"])
        e.cycle = CycleModel.from_learning_state(arrays, meta["cycle"])
        e.flood = FloodModel.from_state(arrays, meta.get("flood", {}))
        e.process_model = ProcessModel.from_state(arrays, meta["process"])
        e.process_model.learning = True
        if "sessions" in meta:
            e.sessions = SessionModel.from_state(arrays, meta["sessions"])
            e.sessions.learning = True
        if "wire" in meta:
            e.wire = WireDetector.from_state(arrays, meta["wire"])
        e.learned_from, e.learned_to = meta["learned_from"], meta["learned_to"]
        e.first_ts = meta["first_ts"]
        e.err_max = meta["err_max"]
        e.events_seen = int(meta.get("events_seen", 0))
        e.events_learned = int(meta.get("events_learned", 0))
        X = np.asarray(arrays["ml.learn_matrix"], dtype=np.float64)
        e.learn_X = [X] if X.shape[0] else []
        e.learn_n = int(X.shape[0])
        return e

    # -- health and persistence ----------------------------------------------------------------
    def baseline_summary(self) -> dict:
        """What the baseline holds, in words a user checks before trusting it: the learned span of
        capture time, how many events, talker pairs and allow-list entries."""
        span = ((self.learned_to - self.learned_from) / NS) if self.learned_to and self.learned_from else 0.0
        talkers = len(self.allowlist.tables["talker"])
        return {"learn_from_ts": self.first_ts / NS if self.first_ts else None,
                "learn_until_ts": self.learn_until_ns / NS if self.learn_until_ns else None,
                "events_learned": self.events_learned, "talker_pairs": talkers,
                "baseline_entries": self.allowlist.size(), "hours_with_events": round(span / 3600, 4),
                "overflow": self.allowlist.overflow, "complete": self.allowlist.overflow == 0}

    def health(self) -> dict:
        """Model health as plain numbers (names are stable; see docs/detection.md)."""
        h = {
            "mode": self.mode,
            "events_seen": self.events_seen,
            "baseline_age_s": (self.now_ns - self.learned_to) / NS if self.learned_to and self.mode == "monitor"
            else 0.0,
            "baseline_entries": self.allowlist.size(),
            "baseline_provisional": self.allowlist.provisional_count(),
            "baseline_overflow": self.allowlist.overflow,
            "process_points": self.process_model.size(),
            "cycle_regular_channels": self.cycle.regular_channels(),
            "learn_windows": self.learn_n,
            "sequence_transitions": self.sequence.size(),
            "sequence_threshold": self.sequence.threshold,
            "state_run_needed": self.state.run_needed,
            "open_alerts": len(self.manager.open),
            "alerts_total": len(self.manager.alerts),
        }
        for name, m in self.monitors.items():
            for k, v in m.as_dict().items():
                h[f"{name}_{k}"] = v
        h["latency_threshold_ms"] = self.cycle.latency_threshold
        h.update(self.wire.health())
        return h

    def save_progress(self, directory, key: bytes | None = None) -> None:
        """Save what learning has gathered so far without ending it (an agent restarted or powered
        off mid-learning carries on where it stopped instead of starting again).  In monitor mode
        this is :meth:`save`.  The damped window statistics are not kept: they re-warm in seconds."""
        if self.mode == "monitor":
            self.save(directory, key)
            return
        arrays, meta = {}, {"version": 1, "mode": "learn", "learned_from": self.learned_from,
                            "learned_to": self.learned_to, "first_ts": self.first_ts,
                            "learn_until_ns": self.learn_until_ns, "learn_seconds": self.learn_seconds,
                            "detectors": list(self.detectors), "alerts_per_hour": self.alerts_per_hour,
                            "pyod_method": self.pyod_method, "err_max": self.err_max,
                            "events_seen": self.events_seen, "events_learned": self.events_learned}
        for name, (a, m) in (("allowlist", self.allowlist.to_state()), ("cycle", self.cycle.learning_state()),
                             ("process", self.process_model.to_state()), ("flood", self.flood.to_state()),
                             ("sessions", self.sessions.to_state()), ("wire", self.wire.to_state())):
            arrays.update(a)
            meta[name] = m
        arrays["ml.learn_matrix"] = (np.concatenate(self.learn_X) if self.learn_X
                                     else np.empty((0, len(FEATURE_NAMES))))
        state_io.save(directory, arrays, meta, key=key)

    def save(self, directory, key: bytes | None = None) -> None:
        if self.mode != "monitor":
            self.finish_learning()
        arrays, meta = {}, {"version": 1, "learned_from": self.learned_from, "learned_to": self.learned_to,
                            "detectors": list(self.detectors), "alerts_per_hour": self.alerts_per_hour,
                            "pyod_method": self.pyod_method, "err_max": self.err_max,
                            "budget": getattr(self, "budget", 1e-4), "events_learned": self.events_learned,
                            "learn_first_ts": self.first_ts, "learn_until_ns": self.learn_until_ns}
        for name, part in (("allowlist", self.allowlist), ("cycle", self.cycle), ("process", self.process_model),
                           ("flood", self.flood), ("sessions", self.sessions), ("sequence", self.sequence),
                           ("state", self.state), ("wire", self.wire)):
            a, m = part.to_state()
            arrays.update(a)
            meta[name] = m
        arrays["ml.learn_matrix"] = getattr(self, "learn_matrix", np.empty((0, len(FEATURE_NAMES))))
        state_io.save(directory, arrays, meta, key=key)

    @classmethod
    def load(cls, directory, key: bytes | None = None, **kwargs) -> "DetectionEngine":
        arrays, meta = state_io.load(directory, key=key)
        kwargs.setdefault("detectors", meta["detectors"])
        kwargs.setdefault("alerts_per_hour", meta["alerts_per_hour"])
        kwargs.setdefault("pyod_method", meta["pyod_method"])
        if meta.get("mode") == "learn":
            return cls._resume_learning(arrays, meta, kwargs)
        e = cls(**kwargs)
        e.allowlist = AllowList.from_state(arrays, meta["allowlist"])
        e.cycle = CycleModel.from_state(arrays, meta["cycle"])
        e.flood = FloodModel.from_state(arrays, meta.get("flood", {}))
        e.process_model = ProcessModel.from_state(arrays, meta["process"])
        if "sessions" in meta:  # states saved before the session model learn nothing here
            e.sessions = SessionModel.from_state(arrays, meta["sessions"])
        if "sequence" in meta:  # baselines saved before these models learn them again
            e.sequence = SequenceModel.from_state(arrays, meta["sequence"])
            e.state = ProcessStateModel.from_state(arrays, meta["state"])
        if "wire" in meta:  # states saved before the wire detector: it starts empty, learning new stations
            e.wire = WireDetector.from_state(arrays, meta["wire"])
        e.wire.learning = False
        e.learned_from, e.learned_to = meta["learned_from"], meta["learned_to"]
        e.err_max = meta["err_max"]
        e.budget = meta["budget"]
        e._fit_ml(np.asarray(arrays["ml.learn_matrix"]), e.budget)  # River/PyOD rebuilt from data, no pickle
        e.learn_n = int(e.learn_matrix.shape[0])
        e.mode = "monitor"
        e.events_learned = int(meta.get("events_learned", 0))
        e.first_ts = meta.get("learn_first_ts") or 0
        e.learn_until_ns = meta.get("learn_until_ns") or 0
        return e
