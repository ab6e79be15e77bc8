"""Prometheus metrics: every metric otwatch exports, defined here and nowhere else.

Metrics live on a :class:`~prometheus_client.CollectorRegistry` passed in (never the global one),
follow Prometheus' naming conventions (``otwatch_`` prefix, base units, ``_total`` on counters) and
carry only labels with small fixed value sets: protocol, function class, reason, detector,
severity, and alert rule names capped by :data:`RULE_LABEL_LIMIT`.  No IP address or register
number is ever a label value.  Every child whose label values are known up front is created at
start, so its series exists (at 0) from the first scrape and ``increase()`` sees the first event.

The hot path calls :meth:`Metrics.observe` once per batch; it adds whole-batch differences with
``inc(n)``, never one call per frame or PDU.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> m = Metrics(CollectorRegistry())
>>> text = generate_latest(m.registry).decode()
>>> 'otwatch_frames_total{protocol="modbus"} 0.0' in text
True

Default port: the Prometheus wiki page "Default port allocations" tracks one port per exporter
in 9100-9999; that range has been fully allocated since mid-2023, and the page (like the
"Writing exporters" guide) asks software without an allocation to stay outside it.  otwatch
therefore defaults to :data:`DEFAULT_PORT` = 10502 (Modbus's 502 behind a 10): above the
allocated range, below the Linux ephemeral range (32768-60999), not in /etc/services.  See
docs/metrics.md.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time

import numpy as np
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector, make_wsgi_app,
)
from prometheus_client.core import HistogramMetricFamily

from models.function_classes import CLASS_NAMES, N_CLASSES, function_class
from models.rules import RULES
from parsers.events import KIND_PDU, PROTOCOL_NAMES, REASON_NAMES

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10502

PROTOCOLS = tuple(name for code, name in sorted(PROTOCOL_NAMES.items()) if code)  # modbus, dnp3, iec104
TRAFFIC_PROTOCOLS = PROTOCOLS + ("other",)  # frames and bytes also count what no parser claimed
FUNCTION_CLASSES = tuple(name for code, name in sorted(CLASS_NAMES.items()))  # read, write, control, ...
PARSE_REASONS = tuple(name for code, name in sorted(REASON_NAMES.items()) if code)
DROP_SOURCES = ("kernel", "internal")
FLOW_END_REASONS = ("closed", "expired", "evicted")
# Detectors an alert or a score can come from (models/alerts.py, Alert.detector); anything else
# is counted as "other" so a new detector cannot grow the label set by accident.
DETECTORS = ("allowlist", "cycle", "process", "river", "pyod", "sequence", "state", "parser", "inventory", "sessions",
             "wire", "other")
SEVERITIES = ("low", "medium", "high", "critical")
MODES = ("learn", "monitor")
#: (protocol, role) label pairs of otwatch_assets: each protocol's own words for its two roles.
ASSET_ROLES = (("modbus", "client"), ("modbus", "server"), ("dnp3", "master"), ("dnp3", "outstation"),
               ("iec104", "controlling"), ("iec104", "controlled"), ("other", "none"))
#: Rule names the detectors raise (the catalogue, models/rules.py): their by-rule series are created at 0 up
#: front, so the first alert of a rule shows in increase().  A rule missing there is still counted, from its
#: first alert on; tests/test_metrics.py checks the catalogue against a real engine run.
KNOWN_RULES = tuple(RULES)
#: Alert rule names are code-defined ("allowlist.new_talker", ...), but a label must stay bounded
#: even if a rule name were ever built from data: after this many distinct names, "other".
RULE_LABEL_LIMIT = 64
_RULE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")

# Batch processing time: a batch is up to a few thousand frames; milliseconds normally.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Anomaly scores as the detection engine reports them: score / threshold, so 1.0 is the alerting
# threshold whatever the detector's own scale is.
SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

def count_function_classes(events) -> dict:
    """{(protocol, function class): PDUs} of an event batch (classes from models.function_classes).

    >>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS
    >>> b = EventBuilder(); ctx = StreamContext()
    >>> for fc, w in ((3, False), (3, False), (6, True)):
    ...     _ = b.pdu(ctx, PROTO_MODBUS, function=fc, is_write=w)
    >>> sorted(count_function_classes(b.build()).items())
    [(('modbus', 'read'), 2), (('modbus', 'write'), 1)]
    """
    if len(events) == 0:
        return {}
    pdu = events.kind == KIND_PDU
    protocol = events.protocol[pdu]
    classes = function_class(protocol, events.function[pdu], events.is_write[pdu], events.is_control[pdu])
    keys, counts = np.unique(protocol.astype(np.int64) * N_CLASSES + classes, return_counts=True)
    out: dict = {}
    for k, n in zip(keys.tolist(), counts.tolist()):
        name = PROTOCOL_NAMES.get(k // N_CLASSES)
        if name in PROTOCOLS:
            out[(name, CLASS_NAMES[k % N_CLASSES])] = n
    return out


class BatchHistogram:
    """A labelled histogram that takes a whole NumPy array per call (one lock, one searchsorted).

    prometheus_client's Histogram takes one value per ``observe`` call; anomaly scores come a
    batch at a time, so this collector keeps cumulative bucket counts in arrays and exposes them
    as an ordinary histogram family.

    >>> h = BatchHistogram("otwatch_example_score", "example", "detector", ("a",), (1.0, 2.0))
    >>> h.observe("a", np.array([0.5, 1.5, 9.0]))
    >>> [(s.name, s.labels.get("le"), s.value) for s in next(iter(h.collect())).samples][:3]
    [('otwatch_example_score_bucket', '1.0', 1.0), ('otwatch_example_score_bucket', '2.0', 2.0), \
('otwatch_example_score_bucket', '+Inf', 3.0)]
    """

    def __init__(self, name: str, documentation: str, label: str, values, buckets):
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._lock = threading.Lock()
        self._counts = {v: np.zeros(len(self.bounds) + 1, dtype=np.int64) for v in values}
        self._sums = {v: 0.0 for v in values}

    def observe(self, value: str, scores) -> None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        scores = scores[np.isfinite(scores)]
        if scores.size == 0:
            return
        # Bucket i holds le=bounds[i]: values <= bound, so the search is on the left side.
        per_bucket = np.bincount(np.searchsorted(self.bounds, scores, side="left"),
                                 minlength=len(self.bounds) + 1)
        with self._lock:
            if value not in self._counts:
                self._counts[value] = np.zeros(len(self.bounds) + 1, dtype=np.int64)
                self._sums[value] = 0.0
            self._counts[value] += per_bucket
            self._sums[value] += float(scores.sum())

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            items = [(v, np.cumsum(c).tolist(), self._sums[v]) for v, c in self._counts.items()]
        for value, cumulative, total in items:
            buckets = [(_float_text(b), float(c)) for b, c in zip(self.bounds.tolist(), cumulative)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([value], buckets, total)
        yield family


def _float_text(x: float) -> str:
    return repr(float(x))


class Metrics:
    """Every otwatch metric, on ``registry``.  Call :meth:`observe` once per batch.

    ``process_metrics`` adds the standard ``process_*`` and ``python_info`` collectors to the same
    registry (what every Prometheus client exposes by default on the global one).
    """

    def __init__(self, registry: CollectorRegistry, process_metrics: bool = True, version: str | None = None,
                 identity=None):
        self.registry = r = registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        if version is None:
            from . import __version__ as version
        Info("otwatch_build", "otwatch version", registry=r).info({"version": version})
        # One series naming the agent and its site (agent.site); the site reaches every other series
        # as the central Prometheus' target label, not from here (deploy/fleet/).
        if identity is None:
            from .site import SiteIdentity

            identity = SiteIdentity()
        Info("otwatch_agent", "This agent's name and site", registry=r).info(
            {"site": identity.site, "agent": identity.agent, "version": version})
        self.start_time = Gauge("otwatch_start_time_seconds", "Unix time the agent started", registry=r)
        self.start_time.set(time.time())

        # Traffic.
        self.frames = Counter("otwatch_frames_total", "Frames seen, by the protocol of their flow "
                              "(other: not claimed by any parser)", ["protocol"], registry=r)
        self.bytes = Counter("otwatch_bytes_total", "Bytes on the wire (frame lengths) seen, by the "
                             "protocol of their flow", ["protocol"], registry=r)
        self.pdus = Counter("otwatch_pdus_total", "Protocol data units parsed, by protocol and function "
                            "class", ["protocol", "function_class"], registry=r)
        self.points = Counter("otwatch_points_total", "Process values (registers, points, information "
                              "objects) parsed, by protocol", ["protocol"], registry=r)
        # Errors and losses.
        self.parse_errors = Counter("otwatch_parse_errors_total", "PDUs or byte runs a parser could not "
                                    "read, by protocol and reason", ["protocol", "reason"], registry=r)
        self.decode_skipped = Counter("otwatch_decode_skipped_frames_total", "Frames not decoded to a "
                                      "transport payload, by reason", ["reason"], registry=r)
        self.drops = Counter("otwatch_capture_drops_total", "Frames lost before otwatch saw them: kernel "
                             "(socket buffer overrun) or internal (queue full)", ["source"], registry=r)
        self.gaps = Counter("otwatch_reassembly_gaps_total", "TCP stream gaps (bytes never seen)", registry=r)
        self.gap_bytes = Counter("otwatch_reassembly_gap_bytes_total", "Bytes missing in TCP stream gaps",
                                 registry=r)
        self.flows_opened = Counter("otwatch_flows_opened_total", "Flows opened by reassembly", registry=r)
        # Asset inventory (models/inventory.py): counts by protocol and role, never per asset.
        self.assets = Gauge("otwatch_assets", "Assets seen, by protocol and role (protocol other: assets that "
                            "speak no ICS protocol)", ["protocol", "role"], registry=r)
        for (proto, role) in ASSET_ROLES:
            self.assets.labels(proto, role)
        self.conversations = Gauge("otwatch_conversations", "ICS conversations (client, server, protocol, "
                                   "port) seen, by protocol", ["protocol"], registry=r)
        for proto in PROTOCOLS:
            self.conversations.labels(proto)
        self.inventory_dropped = Counter("otwatch_inventory_dropped_total", "Assets or conversations not "
                                         "kept because the inventory was full", ["table"], registry=r)
        for table in ("assets", "conversations"):
            self.inventory_dropped.labels(table)
        self.flows_ended = Counter("otwatch_flows_ended_total", "Flows that ended: closed (FIN/RST), "
                                   "expired (idle) or evicted (flow table full)", ["reason"], registry=r)
        self.active_flows = Gauge("otwatch_active_flows", "Flows currently tracked by reassembly", registry=r)
        # Pipeline health.
        self.batch_seconds = Histogram("otwatch_batch_duration_seconds", "Time to process one frame batch "
                                       "(decode, reassembly, parsing)", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.detection_seconds = Histogram("otwatch_detection_duration_seconds", "Time the detection engine "
                                           "took for one batch", buckets=LATENCY_BUCKETS, registry=r)
        self.last_frame_ts = Gauge("otwatch_last_frame_timestamp_seconds", "Capture timestamp of the newest "
                                   "frame processed (Unix time)", registry=r)
        self.lag = Gauge("otwatch_pipeline_lag_seconds", "Now minus the capture timestamp of the newest frame "
                         "processed (meaningful on live capture; replays show the capture's age)", registry=r)
        # Detection.
        self.alerts = Counter("otwatch_alerts_total", "Alerts raised, by detector kind and severity",
                              ["kind", "severity"], registry=r)
        self.alerts_by_rule = Counter("otwatch_alert_rule_alerts_total", "Alerts raised, by rule name "
                                      f"(at most {RULE_LABEL_LIMIT} names, then 'other')", ["rule"], registry=r)
        self.sink_errors = Counter("otwatch_alert_sink_errors_total", "Alert records a sink failed to "
                                   "deliver", ["sink"], registry=r)
        self.alerts_lost = Counter("otwatch_alerts_lost", "Alerts that never reached the alert log (every "
                                   "retry failed: disk full, I/O error)", registry=r)
        self.scores = BatchHistogram("otwatch_anomaly_score", "Anomaly scores relative to the alerting "
                                     "threshold (1 = threshold), by detector", "detector", DETECTORS[:-1],
                                     SCORE_BUCKETS)
        r.register(self.scores)
        self.mode = Gauge("otwatch_mode", "1 for the detection mode the agent is in (learn or monitor)",
                          ["mode"], registry=r)
        self.baseline_age = Gauge("otwatch_baseline_age_seconds", "Age of the baseline in use (capture time "
                                  "since learning ended)", registry=r)
        self.baseline_entries = Gauge("otwatch_baseline_entries", "Entries in the learned baseline "
                                      "(talkers, functions, ranges, cycles)", registry=r)
        self.provisional = Gauge("otwatch_baseline_provisional_entries", "Baseline entries learned but "
                                 "not yet approved", registry=r)
        self.open_alerts = Gauge("otwatch_open_alerts", "Incidents still open (findings being merged into "
                                 "them until their cool-down ends)", registry=r)
        self.score_drift = Gauge("otwatch_model_score_drift", "Shift of a detector's recent median score "
                                 "from its calibration median, in calibration IQRs (0 = none)", ["detector"],
                                 registry=r)
        self.above_threshold = Gauge("otwatch_model_above_threshold_ratio", "Fraction of recent scores "
                                     "above the alerting threshold, by detector", ["detector"], registry=r)

        # Children up front, so every series exists at 0 from the first scrape.
        for p in TRAFFIC_PROTOCOLS:
            self.frames.labels(p)
            self.bytes.labels(p)
        for p in PROTOCOLS:
            self.points.labels(p)
            for c in FUNCTION_CLASSES:
                self.pdus.labels(p, c)
            for reason in PARSE_REASONS:
                self.parse_errors.labels(p, reason)
        from parsers.decode import SKIP_NAMES

        self._skip_reasons = tuple(v for k, v in sorted(SKIP_NAMES.items()) if k)
        for reason in self._skip_reasons:
            self.decode_skipped.labels(reason)
        for s in DROP_SOURCES:
            self.drops.labels(s)
        for reason in FLOW_END_REASONS:
            self.flows_ended.labels(reason)
        for kind in DETECTORS:
            for sev in SEVERITIES:
                self.alerts.labels(kind, sev)
            if kind != "other":
                self.score_drift.labels(kind)
                self.above_threshold.labels(kind)
        for sink in ("alert_log", "syslog"):
            self.sink_errors.labels(sink)
        self.set_mode("monitor")
        self._rules: set = set()
        self.declare_rules(KNOWN_RULES)
        # Cumulative values already added, per source counter (observe adds the difference).
        self._seen: dict = {}

    # -- once per batch ----------------------------------------------------------------------------
    def observe(self, pipeline=None, events=None, *, seconds: float | None = None, alerts=(),
                scores: dict | None = None, health: dict | None = None, now: float | None = None) -> None:
        """Account for one processed batch.

        ``pipeline``: the :class:`agent.pipeline.Pipeline` (its cumulative counters are read and the
        growth since the last call added); ``events``: the batch's EventBatch (PDUs by function
        class); ``seconds``: time the batch took; ``alerts``: Alert objects raised for it;
        ``scores``: {detector: array of score/threshold}; ``health``: the detection engine's
        model-health numbers (see :meth:`set_health`).
        """
        if pipeline is not None:
            self._observe_pipeline(pipeline, now)
        if events is not None and len(events):
            for (protocol, cls), n in count_function_classes(events).items():
                self.pdus.labels(protocol, cls).inc(n)
        if seconds is not None:
            self.batch_seconds.observe(seconds)
        if alerts:
            self.count_alerts(alerts)
        if scores:
            for detector, values in scores.items():
                self.scores.observe(self._detector(detector), values)
        if health:
            self.set_health(health)

    def _add(self, counter, key, total) -> None:
        """Add to ``counter`` what the cumulative ``total`` grew by since the last call."""
        before = self._seen.get((id(counter), key), 0)
        if total > before:
            (counter.labels(*key) if key else counter).inc(total - before)
        self._seen[(id(counter), key)] = total

    def _observe_pipeline(self, pipeline, now: float | None) -> None:
        st = pipeline.stats
        for name in TRAFFIC_PROTOCOLS:
            if name == "other":
                continue
            self._add(self.frames, (name,), st.frames_by_protocol.get(name, 0))
            self._add(self.bytes, (name,), st.bytes_by_protocol.get(name, 0))
            self._add(self.points, (name,), st.points_by_protocol.get(name, 0))
        self._add(self.frames, ("other",), st.frames - sum(st.frames_by_protocol.values()))
        self._add(self.bytes, ("other",), st.bytes - sum(st.bytes_by_protocol.values()))
        for key, n in st.parse_errors.items():
            protocol, _, reason = key.partition("/")
            if protocol in PROTOCOLS and reason in PARSE_REASONS:
                self._add(self.parse_errors, (protocol, reason), n)
        for reason, n in st.skipped.items():
            if reason in self._skip_reasons:
                self._add(self.decode_skipped, (reason,), n)
        rs = pipeline.reassembler.stats
        self._add(self.gaps, (), rs.gaps)
        self._add(self.gap_bytes, (), rs.gap_bytes)
        self._add(self.flows_opened, (), rs.flows_opened)
        self._add(self.flows_ended, ("closed",), rs.flows_closed)
        self._add(self.flows_ended, ("expired",), rs.flows_expired)
        self._add(self.flows_ended, ("evicted",), rs.flows_evicted)
        self.active_flows.set(len(pipeline.reassembler))
        if st.last_ts is not None:
            newest = st.last_ts / 1e9
            self.last_frame_ts.set(newest)
            self.lag.set((time.time() if now is None else now) - newest)

    def observe_drops(self, kernel: int | None = None, internal: int | None = None) -> None:
        """Cumulative drop counts from a live source (kernel: PACKET_STATISTICS tp_drops)."""
        if kernel is not None:
            self._add(self.drops, ("kernel",), int(kernel))
        if internal is not None:
            self._add(self.drops, ("internal",), int(internal))

    # -- detection ---------------------------------------------------------------------------------
    def _detector(self, name) -> str:
        return name if name in DETECTORS else "other"

    def _rule(self, name: str) -> str:
        if name in self._rules:
            return name
        if not isinstance(name, str) or not _RULE_NAME.match(name) or len(self._rules) >= RULE_LABEL_LIMIT:
            return "other"
        self._rules.add(name)
        return name

    def count_alerts(self, alerts) -> None:
        """Count alerts (Alert objects or ECS dicts), grouped so each child gets one ``inc(n)``."""
        by_kind: dict = {}
        by_rule: dict = {}
        for a in alerts:
            if isinstance(a, dict):
                kind, sev, rule = a["rule"].get("category"), a["otwatch"]["severity"], a["rule"]["name"]
            else:
                kind, sev, rule = a.detector, a.severity, a.rule
            sev = sev if sev in SEVERITIES else "low"
            k = (self._detector(kind), sev)
            by_kind[k] = by_kind.get(k, 0) + 1
            k = self._rule(rule)
            by_rule[k] = by_rule.get(k, 0) + 1
        for k, n in by_kind.items():
            self.alerts.labels(*k).inc(n)
        for k, n in by_rule.items():
            self.alerts_by_rule.labels(k).inc(n)

    def declare_rules(self, rules) -> None:
        """Create the by-rule children of rules known up front at 0."""
        for rule in rules:
            self.alerts_by_rule.labels(self._rule(rule))

    def set_mode(self, mode: str) -> None:
        for m in MODES:
            self.mode.labels(m).set(1 if m == mode else 0)

    # Keys of the detection engine's health dict -> gauges.  Values are numbers, or for the
    # per-detector ones, {detector: number}.
    def set_health(self, health: dict) -> None:
        """Set the model-health gauges from the engine's plain dict (unknown keys are ignored).

        >>> from prometheus_client import CollectorRegistry
        >>> m = Metrics(CollectorRegistry(), process_metrics=False)
        >>> m.set_health({"mode": "learn", "baseline_entries": 12, "river_score_drift": 0.25})
        >>> m.registry.get_sample_value("otwatch_mode", {"mode": "learn"}), \
m.registry.get_sample_value("otwatch_model_score_drift", {"detector": "river"})
        (1.0, 0.25)
        """
        for key, value in health.items():
            if value is None:
                continue
            if key == "mode":
                self.set_mode(str(value))
            elif key in ("baseline_age_s", "baseline_age_seconds", "baseline_age"):
                self.baseline_age.set(float(value))
            elif key in ("baseline_size", "baseline_entries"):
                self.baseline_entries.set(float(value))
            elif key in ("provisional", "provisional_entries", "baseline_provisional"):
                self.provisional.set(float(value))
            elif key == "open_alerts":
                self.open_alerts.set(float(value))
            elif key in ("score_drift", "drift"):
                self._per_detector(self.score_drift, value)
            elif key in ("above_threshold", "fraction_above"):
                self._per_detector(self.above_threshold, value)
            elif key.endswith("_score_drift"):  # models.engine: "<detector>_score_drift"
                self._per_detector(self.score_drift, {key[:-len("_score_drift")]: value})
            elif key.endswith("_fraction_above"):
                self._per_detector(self.above_threshold, {key[:-len("_fraction_above")]: value})

    def set_inventory(self, counts: dict) -> None:
        """Set the asset gauges from ``AssetInventory.counts()``.

        >>> from prometheus_client import CollectorRegistry
        >>> m = Metrics(CollectorRegistry(), process_metrics=False)
        >>> m.set_inventory({"assets": {"dnp3": {"master": 1}}, "conversations": {"dnp3": 2},
        ...                  "dropped": {"assets": 0, "conversations": 3}})
        >>> m.registry.get_sample_value("otwatch_assets", {"protocol": "dnp3", "role": "master"}), \
m.registry.get_sample_value("otwatch_inventory_dropped_total", {"table": "conversations"})
        (1.0, 3.0)
        """
        known = set(ASSET_ROLES)
        for proto, roles in counts.get("assets", {}).items():
            for role, n in roles.items():
                if (proto, role) in known:
                    self.assets.labels(proto, role).set(n)
        for proto, n in counts.get("conversations", {}).items():
            if proto in PROTOCOLS:
                self.conversations.labels(proto).set(n)
        dropped = counts.get("dropped", {})
        for table in ("assets", "conversations"):
            self._add(self.inventory_dropped, (table,), int(dropped.get(table, 0)))

    def _per_detector(self, gauge, value) -> None:
        if isinstance(value, dict):
            for detector, v in value.items():
                if v is not None and np.isfinite(v):
                    gauge.labels(self._detector(detector)).set(float(v))
        elif np.isfinite(value):
            gauge.labels("other").set(float(value))


# --- HTTP exposition --------------------------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT`` -> (host, port); host defaults to loopback.

    >>> parse_listen("127.0.0.1:9999"), parse_listen(":8000"), parse_listen("[::1]:10502")
    (('127.0.0.1', 9999), ('127.0.0.1', 8000), ('::1', 10502))
    >>> parse_listen("")
    ('127.0.0.1', 10502)
    """
    text = text.strip()
    host, port = DEFAULT_HOST, DEFAULT_PORT
    if not text:
        return host, port
    if text.startswith("["):
        end = text.index("]")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            port = int(rest.lstrip(":"))
    elif text.count(":") == 1:
        h, p = text.split(":")
        host = h or DEFAULT_HOST
        port = int(p)
    elif text.isdigit():
        port = int(text)
    else:
        host = text
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_basic_auth(path) -> dict:
    """Read ``user:password`` lines (``#`` comments allowed) from a file only the agent can read."""
    from models.safefile import read_secret

    users = {}
    text = read_secret(path, "basic-auth file").decode("utf-8")  # refused when others may read it
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path}:{n}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"{path}: no user:password line")
    return users


class BasicAuth:
    """WSGI middleware: HTTP Basic authentication (RFC 7617) in front of another app.

    >>> app = BasicAuth(lambda env, start: start("200 OK", []) or [b"ok"], {"prom": "s3cret"})
    >>> seen = []
    >>> app({"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"prom:wrong").decode()},
    ...     lambda status, headers: seen.append(status)) and seen[-1]
    '401 Unauthorized'
    >>> app({"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"prom:s3cret").decode()},
    ...     lambda status, headers: seen.append(status)) and seen[-1]
    '200 OK'
    """

    def __init__(self, app, users: dict, realm: str = "otwatch"):
        self.app, self.realm = app, realm
        self.users = {u.encode(): p.encode() for u, p in users.items()}

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (ValueError, base64.binascii.Error):
            return False
        expected = self.users.get(user)
        # Compare even for unknown users so timing does not tell which user names exist.
        return hmac.compare_digest(password, expected if expected is not None else b"\0" * 32) and \
            expected is not None

    def __call__(self, environ, start_response):
        if self._authorised(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", f'Basic realm="{self.realm}"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"authentication required\n"]


class MetricsServer:
    """Serves ``registry`` at ``/metrics`` from a thread of its own; counts scrapes.

    TLS when ``certfile``/``keyfile`` are given, HTTP Basic auth when ``users`` is.  ``port=0``
    picks a free port (see :attr:`port`).

    One event loop (asyncio) owns the listening socket, so no client can hold up another: the TLS
    handshake runs in the loop with a time-out, not in ``accept()``; a connection must send its
    whole request within :attr:`IDLE_TIMEOUT` seconds; at most :attr:`MAX_CONNECTIONS` are kept
    open past the handshake (a new one closes the oldest still waiting for its request); the
    exposition is built by a pool of :attr:`WORKERS` threads; the listen backlog is :attr:`BACKLOG`.
    Idle or slow clients hold a socket and a few KB each, never a thread.
    """

    BACKLOG = 1024
    MAX_CONNECTIONS = 256
    WORKERS = 2
    HANDSHAKE_TIMEOUT = 5.0
    IDLE_TIMEOUT = 10.0
    WRITE_TIMEOUT = 30.0
    MAX_REQUEST = 16384  # bytes of request line and headers

    def __init__(self, registry: CollectorRegistry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 certfile: str | None = None, keyfile: str | None = None, users: dict | None = None):
        import asyncio
        from collections import OrderedDict
        from concurrent.futures import ThreadPoolExecutor

        self.registry = registry
        self.scrapes = 0
        self._scraped = threading.Condition()
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            result = metrics_app(environ, start_response)
            if environ.get("PATH_INFO", "/") in ("/", "/metrics"):
                with self._scraped:
                    self.scrapes += 1
                    self._scraped.notify_all()
            return result

        self._app = BasicAuth(app, users) if users else app
        self.tls = bool(certfile)
        ctx = None
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(certfile, keyfile)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.host, self.port = host, sock.getsockname()[1]
        self._conns: OrderedDict = OrderedDict()  # writer -> True while waiting for its request
        self._tasks: set = set()
        self._pool = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="otwatch-metrics-worker")
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._handle, sock=sock, ssl=ctx, ssl_handshake_timeout=self.HANDSHAKE_TIMEOUT if ctx else None,
            backlog=self.BACKLOG, limit=self.MAX_REQUEST))
        self._thread = threading.Thread(target=self._loop.run_forever, name="otwatch-metrics", daemon=True)
        self._thread.start()
        if not is_loopback(host) and not (certfile and users):
            log.warning("metrics served on %s:%d without %s", host, self.port,
                        " and ".join(w for w, on in (("TLS", certfile), ("basic auth", users)) if not on))

    # -- one connection ------------------------------------------------------------------------------
    async def _handle(self, reader, writer) -> None:
        import asyncio

        self._tasks.add(asyncio.current_task())
        self._conns[writer] = True
        while len(self._conns) > self.MAX_CONNECTIONS:
            oldest = next((w for w, waiting in self._conns.items() if waiting and w is not writer), None)
            if oldest is None:
                break
            self._conns.pop(oldest)
            oldest.transport.abort()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.IDLE_TIMEOUT)
            if writer not in self._conns:  # evicted meanwhile
                return
            self._conns[writer] = False
            environ = self._environ(head, writer)
            if environ is None:
                status, headers, body = "400 Bad Request", [("Content-Type", "text/plain")], b"bad request\n"
            elif environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
                status, headers, body = "405 Method Not Allowed", [("Allow", "GET, HEAD")], b""
            else:
                status, headers, body = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._call_app, environ)
                if environ["REQUEST_METHOD"] == "HEAD":
                    body = b""
            out = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers
                                             if k.lower() not in ("content-length", "connection")]
            out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(out).encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), self.WRITE_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
                ssl.SSLError, ValueError, UnicodeError):
            pass  # a client that is slow, silent or speaks nonsense: closed, nothing else
        except asyncio.CancelledError:  # closing
            pass
        finally:
            self._conns.pop(writer, None)
            self._tasks.discard(asyncio.current_task())
            writer.transport.abort()  # no lingering TLS close-notify exchange with a client gone quiet

    @staticmethod
    def _environ(head: bytes, writer) -> dict | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        method, target, _version = parts
        path, _, query = target.partition("?")
        env = {"REQUEST_METHOD": method, "PATH_INFO": path or "/", "QUERY_STRING": query,
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "https" if writer.get_extra_info("sslcontext")
               else "http"}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                return None
            env["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        return env

    def _call_app(self, environ: dict):
        started = []
        body = b"".join(self._app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
        status, headers = started[-1]
        return status, headers, body

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    def wait_for_scrapes(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until at least ``n`` scrapes have been served; False on timeout."""
        with self._scraped:
            return self._scraped.wait_for(lambda: self.scrapes >= n, timeout)

    def close(self) -> None:
        import asyncio

        async def shutdown():
            self._server.close()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # let aborted transports finish their callbacks

        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
            self._pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- Command-line wiring (otwatch replay, otwatch run) ---------------------------------------------

def add_arguments(p) -> None:
    """The metrics options of a subcommand."""
    g = p.add_argument_group("metrics (Prometheus)")
    g.add_argument("--metrics", metavar="HOST:PORT", nargs="?", const=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
                   help=f"serve Prometheus metrics at http(s)://HOST:PORT/metrics (default "
                        f"{DEFAULT_HOST}:{DEFAULT_PORT} when given without a value; port 0 picks a free one)")
    g.add_argument("--linger", metavar="SECONDS", type=float, default=0.0,
                   help="keep serving metrics this long after the input ends, so a scraper reads the "
                        "final values")
    g.add_argument("--wait-scrape", metavar="SECONDS", type=float, default=0.0,
                   help="before reading input, wait up to this long for the first scrape, so rate() and "
                        "increase() see the counters start at 0")
    g.add_argument("--metrics-tls-cert", metavar="FILE", help="serve metrics over TLS with this certificate")
    g.add_argument("--metrics-tls-key", metavar="FILE", help="private key of --metrics-tls-cert")
    g.add_argument("--metrics-auth-file", metavar="FILE",
                   help="require HTTP basic auth; FILE holds user:password lines")


class MetricsEndpoint:
    """A :class:`Metrics` set and the server that exposes it, for one command run."""

    def __init__(self, metrics: Metrics, server: MetricsServer):
        self.metrics, self.server = metrics, server
        self._busy = 0.0
        self._batches = 0

    @classmethod
    def start(cls, listen: str, tls_cert: str | None = None, tls_key: str | None = None,
              auth_file: str | None = None, names=("--metrics", "--metrics-tls-cert", "--metrics-auth-file"),
              identity=None):
        """Build the metrics and start serving them at ``listen`` (HOST:PORT).  Bad values raise
        InputError naming the option or config key in ``names`` (listen, TLS, auth file)."""
        from .errors import InputError

        listen_name, tls_name, auth_name = names
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise InputError(f"{listen_name} {listen!r}: {exc}") from None
        if bool(tls_cert) != bool(tls_key):
            raise InputError(f"{tls_name} and its key go together")
        users = None
        if auth_file:
            try:
                users = load_basic_auth(auth_file)
            except (OSError, ValueError) as exc:
                raise InputError(f"{auth_name}: {exc}") from None
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # one process per run: *_created series add nothing for counters here
        metrics = Metrics(CollectorRegistry(), identity=identity)  # complete before the first scrape can arrive
        try:
            server = MetricsServer(metrics.registry, host, port, certfile=tls_cert or None, keyfile=tls_key or None,
                                   users=users)
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"{listen_name}: cannot listen on {host}:{port}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        log.info("serving metrics at %s", server.url)
        return cls(metrics, server)

    @classmethod
    def from_args(cls, args) -> "MetricsEndpoint | None":
        """Start serving when ``--metrics`` was given (None otherwise); bad values raise InputError."""
        if getattr(args, "metrics", None) is None:
            return None
        from .site import SiteIdentity

        endpoint = cls.start(args.metrics, args.metrics_tls_cert, args.metrics_tls_key, args.metrics_auth_file,
                             identity=SiteIdentity.from_args(args))
        if args.wait_scrape > 0 and not endpoint.server.wait_for_scrapes(1, args.wait_scrape):
            log.warning("no scrape within %.0f s; starting anyway", args.wait_scrape)
        return endpoint

    def batch(self, pipeline, events, *, extra_seconds: float = 0.0, alerts=(), scores=None,
              health=None) -> None:
        """Account for one batch: the pipeline's own time for it plus ``extra_seconds`` (detection)."""
        st = pipeline.stats
        seconds = None
        if st.batches > self._batches:
            seconds = st.busy_s - self._busy + extra_seconds
            self._busy, self._batches = st.busy_s, st.batches
        self.metrics.observe(pipeline, events, seconds=seconds, alerts=alerts, scores=scores, health=health)

    def detect(self, engine, pipeline, events, write=None) -> list:
        """Run ``engine.process(events)`` for one batch and account for pipeline and detection together.

        ``write(alert)`` is called for each alert before it is counted, so the alert counter never
        runs ahead of the records written.
        """
        t0 = time.perf_counter()
        alerts = engine.process(events)
        seconds = time.perf_counter() - t0
        for a in alerts:
            if write is not None:
                write(a)
        self.batch(pipeline, events, extra_seconds=seconds, alerts=alerts, health=engine.health())
        return alerts

    def attach(self, engine) -> None:
        """Count what a :class:`models.engine.DetectionEngine` does, without changing its callers.

        Wraps ``engine.process``, ``engine.process_wire`` and ``engine.finish``: the alerts they open are counted, their time
        goes to ``otwatch_detection_duration_seconds``, and the engine's health numbers are read
        after each call; the ML detectors' scores feed ``otwatch_anomaly_score`` (:func:`tap_scores`).
        """
        if getattr(engine, "_otwatch_attached", False):
            return
        tap_scores(engine, self.metrics)
        metrics = self.metrics

        def counted(call):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                alerts = call(*args, **kwargs)
                metrics.detection_seconds.observe(time.perf_counter() - t0)
                metrics.observe(alerts=alerts, health=engine.health())
                return alerts
            return wrapper

        engine.process = counted(engine.process)
        engine.finish = counted(engine.finish)
        if hasattr(engine, "process_wire"):  # frames (process_frames calls it): the wire detector's alerts
            engine.process_wire = counted(engine.process_wire)
        engine._otwatch_attached = True
        metrics.declare_rules(getattr(engine, "RULES", ()))
        metrics.set_health(engine.health())

    def linger(self, seconds: float) -> None:
        """Keep serving for ``seconds`` (the final values stay readable), then return."""
        if seconds > 0:
            log.info("input done; serving metrics %.0f s more at %s", seconds, self.server.url)
            time.sleep(seconds)

    def close(self) -> None:
        self.server.close()



def tap_scores(engine, metrics: Metrics) -> None:
    """Feed the anomaly-score histogram from a :class:`models.engine.DetectionEngine`.

    The engine hands every score array of its ML detectors to a ``ScoreMonitor`` (model health);
    this wraps each monitor's ``observe`` so the same array, divided by the detector's threshold,
    also lands in ``otwatch_anomaly_score``.  Call again after loading a saved engine.
    """
    for name, monitor in getattr(engine, "monitors", {}).items():
        if getattr(monitor, "_otwatch_tapped", False):
            continue
        observe = monitor.observe
        detector = metrics._detector(name)

        def tapped(scores, _observe=observe, _monitor=monitor, _detector=detector):
            _observe(scores)
            threshold = float(_monitor.threshold)
            if np.isfinite(threshold) and threshold > 0:
                metrics.scores.observe(_detector, np.asarray(scores, dtype=np.float64) / threshold)

        monitor.observe = tapped
        monitor._otwatch_tapped = True
