"""``otwatch report CAPTURE... [--labels L.csv] [--learn D] -o report.html``: one self-contained HTML file.

What happened when, for someone who was not at the console: a summary; frames and PDUs per protocol
and alerts over capture time; the alert timeline by severity with the labelled attacks as shaded
bands; per attack whether and how fast it was detected; top talkers and the communication map (the
graph ``otwatch assets --render`` draws); the alert table with explanations and ATT&CK for ICS.

The file needs no network and runs no script: plots are inline SVG written here, styles inline, the
communication map is Graphviz's SVG when ``dot`` is installed, else a circle layout drawn here.
``otwatch eval CAPTURE --labels L.csv --html FILE`` writes the same report.
"""

from __future__ import annotations

import html
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.alerts import SEVERITIES
from models.rules import tactics_of, technique_name, technique_url
from parsers.events import KIND_PDU, PROTOCOL_NAMES, EventBatch

from .errors import InputError

SEVERITY_COLOUR = {"low": "#6c8ebf", "medium": "#d6a100", "high": "#e06c00", "critical": "#c01e1e"}
PROTOCOL_COLOUR = {"modbus": "#1f77b4", "dnp3": "#2ca02c", "iec104": "#9467bd", "frames": "#999999"}
BINS = 120


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="CAPTURE", help="pcap or pcapng capture(s), read back to back")
    p.add_argument("-o", "--output", required=True, metavar="REPORT.html", help="the HTML file to write")
    p.add_argument("--labels", metavar="LABELS.csv", help="labelled attacks: shaded on the timeline, scored")
    p.add_argument("--learn", metavar="DURATION", default=None,
                   help="learning window of capture time (default: up to the first labelled attack, else 10m)")
    p.add_argument("--learn-until", metavar="TIME", default=None,
                   help="learn up to this absolute time (epoch seconds or ISO 8601, UTC unless a zone is given)")
    p.add_argument("--detectors", default=None, help="comma-separated detectors (default: all installed)")
    p.add_argument("--title", default=None, help="report title (default: the capture names)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


@dataclass
class ReportData:
    captures: list
    frames: int = 0
    bytes: int = 0
    frame_seconds: dict = field(default_factory=dict)  # epoch second -> frames
    pdu_seconds: dict = field(default_factory=dict)  # protocol -> {epoch second -> PDUs}
    by_protocol: dict = field(default_factory=dict)  # replay summary's per-protocol counts
    errors: dict = field(default_factory=dict)
    alerts: list = field(default_factory=list)  # ECS records
    raw_alerts: list = field(default_factory=list)  # the engine's Alert objects
    labels: list = field(default_factory=list)
    result: dict | None = None  # the eval score, when labels are given
    learn_until: float | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    assets: list = field(default_factory=list)
    conversations: list = field(default_factory=list)
    dot: str = ""
    elapsed_s: float = 0.0


def _add_counts(acc: dict, seconds: np.ndarray) -> None:
    if seconds.shape[0]:
        u, c = np.unique(seconds, return_counts=True)
        for s, n in zip(u.tolist(), c.tolist()):
            acc[s] = acc.get(s, 0) + n


def collect(paths, labels_path=None, learn_s=None, detectors=None, progress=None, grace_s=None,
            learn_until_s=None) -> ReportData:
    """One pass over the captures (pipeline, inventory, per-second counts), then detection on the events."""
    from models.engine import DetectionEngine
    from models.inventory import AssetInventory
    from models.scoring import read_labels

    from .assets_cmd import format_dot
    from .eval import Batches, _feed, default_detectors, evaluate
    from .pipeline import Pipeline
    from .replay import replay_files, summary
    from .sinks import default_observer

    t0 = time.perf_counter()
    data = ReportData(captures=[str(p) for p in paths])
    pipeline = Pipeline()
    inventory = AssetInventory().attach(pipeline)
    parts = Batches()
    frames: list = []  # each batch's frame columns after its events, for the wire detector (as eval's)

    def on_events(ev):
        inventory.observe_events(ev)
        if len(ev):
            parts.append(ev)
        parts.extend(frames)
        frames.clear()

    from models.wire import WireFrames

    pipeline.frame_observers.append(lambda b, d, p: frames.append(WireFrames.from_decoded(b, d, p)))

    replay_files(paths, pipeline, progress, on_events=on_events,
                 on_frames=lambda b: _add_counts(data.frame_seconds, b.ts // 1_000_000_000))
    if progress is not None:
        progress.close()
    inventory.refresh_identities()
    parts.first_frame_ns = pipeline.stats.first_ts  # learning windows count from the first frame
    if pipeline.stats.frames == 0:
        raise InputError("no frames could be read from the captures")
    s = summary(pipeline, time.perf_counter() - t0, {"files": []})
    data.frames, data.bytes, data.by_protocol, data.errors = s["frames"], s["bytes"], s["by_protocol"], s["errors"]
    data.first_ts, data.last_ts = s["first_ts"], s["last_ts"]
    for b in parts:
        if not isinstance(b, EventBatch):
            continue
        pdu = b.kind == KIND_PDU
        for code in np.unique(b.protocol[pdu]).tolist():
            name = PROTOCOL_NAMES.get(int(code), str(code))
            _add_counts(data.pdu_seconds.setdefault(name, {}), b.ts[pdu & (b.protocol == code)] // 1_000_000_000)
    detectors = tuple(detectors) if detectors else default_detectors()
    if labels_path:
        data.labels = read_labels(labels_path)
        from models.scoring import GRACE_S

        result, engine = evaluate(paths[0], labels_path, learn_s, detectors,
                                  GRACE_S if grace_s is None else grace_s, batches=parts, learn_until_s=learn_until_s)
        result["capture"] = ", ".join(data.captures)
        data.result = result
    else:
        if learn_until_s is not None:
            engine = DetectionEngine(learn_seconds=None, learn_until_ns=int(learn_until_s * 1e9), detectors=detectors)
        else:
            engine = DetectionEngine(learn_seconds=learn_s or 600.0, detectors=detectors)
        if parts.first_frame_ns is not None:
            engine.start_clock(parts.first_frame_ns)
        _feed(engine, parts)
        engine.finish()
    if engine.learn_until_ns:
        data.learn_until = engine.learn_until_ns / 1e9
    observer = default_observer()
    data.raw_alerts = sorted(engine.alerts, key=lambda a: a.first_ts)
    data.alerts = [a.to_ecs(observer) for a in data.raw_alerts]
    data.assets, data.conversations = inventory.assets(), inventory.conversations()
    data.dot = format_dot(data.assets, data.conversations)
    data.elapsed_s = time.perf_counter() - t0
    return data


# --- SVG helpers -------------------------------------------------------------------------------------
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def _ts(rec_time: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rec_time.replace("Z", "+00:00")).timestamp()


class Axis:
    """Capture time -> x pixels, with tick labels."""

    def __init__(self, t0: float, t1: float, x0: float, x1: float):
        self.t0, self.t1 = t0, max(t1, t0 + 1.0)
        self.x0, self.x1 = x0, x1

    def x(self, t: float) -> float:
        return self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0)

    def ticks(self, y: float, height: float) -> str:
        span = self.t1 - self.t0
        step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
                     if span / s <= 8), 86400 * math.ceil(span / 86400 / 8))
        out = []
        t = math.ceil(self.t0 / step) * step
        while t <= self.t1:
            x = self.x(t)
            out.append(f'<line x1="{x:.1f}" y1="{y - height:.1f}" x2="{x:.1f}" y2="{y:.1f}" class="grid"/>'
                       f'<text x="{x:.1f}" y="{y + 14:.1f}" class="tick" text-anchor="middle">{_clock(t)}</text>')
            t += step
        return "".join(out)


def _binned(per_second: dict, axis: Axis, bins: int) -> np.ndarray:
    out = np.zeros(bins)
    width = (axis.t1 - axis.t0) / bins
    for s, n in per_second.items():
        i = int((s + 0.5 - axis.t0) / width)
        out[min(max(i, 0), bins - 1)] += n
    return out / max(width, 1e-9)  # per second


def rate_plot(data: ReportData, width: int = 960, height: int = 260) -> str:
    """Frames (all) and PDUs per protocol per second over capture time, plus alert marks."""
    left, right, top, bottom = 60, 120, 16, 34
    axis = Axis(data.first_ts, data.last_ts, left, width - right)
    series = {"frames": _binned(data.frame_seconds, axis, BINS)}
    for name in sorted(data.pdu_seconds):
        series[f"{name} PDUs"] = _binned(data.pdu_seconds[name], axis, BINS)
    ymax = max(max(float(v.max()) for v in series.values()), 1.0)
    ybase = height - bottom

    def y(v):
        return ybase - v / ymax * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="rate-plot" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="frames and PDUs per second">',
             axis.ticks(ybase, height - top - bottom),
             f'<line x1="{left}" y1="{ybase}" x2="{width - right}" y2="{ybase}" class="axis"/>',
             f'<text x="{left - 6}" y="{top + 4}" class="tick" text-anchor="end">{ymax:.3g}/s</text>',
             f'<text x="{left - 6}" y="{ybase}" class="tick" text-anchor="end">0</text>']
    if data.learn_until and data.first_ts < data.learn_until:
        x1 = axis.x(min(data.learn_until, axis.t1))
        parts.append(f'<rect x="{left}" y="{top}" width="{x1 - left:.1f}" height="{ybase - top}" class="learn"/>'
                     f'<text x="{left + 4}" y="{top + 12}" class="tick">learning</text>')
    step = (axis.x1 - axis.x0) / BINS
    for i, (name, v) in enumerate(series.items()):
        colour = PROTOCOL_COLOUR.get(name.split()[0], "#555")
        pts = " ".join(f"{axis.x0 + (k + 0.5) * step:.1f},{y(val):.1f}" for k, val in enumerate(v.tolist()))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6" '
                     f'class="series" data-series="{_e(name)}"/>')
        parts.append(f'<rect x="{width - right + 10}" y="{top + i * 18}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{width - right + 26}" y="{top + i * 18 + 10}" class="tick">{_e(name)}</text>')
    for rec in data.alerts:  # alerts per protocol: a tick in the protocol's colour where each opened
        x = axis.x(_ts(rec["@timestamp"]))
        proto = rec["network"]["protocol"]
        parts.append(f'<line x1="{x:.1f}" y1="{ybase}" x2="{x:.1f}" y2="{ybase + 7}" '
                     f'stroke="{PROTOCOL_COLOUR.get(proto, "#555")}" stroke-width="2" class="alert-mark" '
                     f'data-protocol="{_e(proto)}"><title>{_e(proto)}: {_e(rec["rule"]["name"])}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def timeline_plot(data: ReportData, width: int = 960) -> str:
    """Alerts by severity lane over capture time; labelled attacks as shaded bands."""
    left, right, top, lane, bottom = 60, 120, 10, 34, 60
    height = top + lane * len(SEVERITIES) + bottom
    axis = Axis(data.first_ts, data.last_ts, left, width - right)
    ybase = top + lane * len(SEVERITIES)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="timeline-plot" viewBox="0 0 {width} '
             f'{height}" width="{width}" height="{height}" role="img" aria-label="alert timeline">',
             axis.ticks(ybase, ybase - top)]
    for i, lab in enumerate(data.labels):
        x0, x1 = axis.x(lab.start_ts), axis.x(lab.end_ts)
        parts.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 2):.1f}" height="{ybase - top}" '
                     f'class="attack-band"><title>{_e(lab.scenario)}: {_e(lab.description)}</title></rect>'
                     f'<text x="{x0 + 2:.1f}" y="{ybase + 26 + 11 * (i % 3)}" class="band-label">'
                     f'{_e(lab.scenario)}</text>')
    for i, sev in enumerate(reversed(SEVERITIES)):
        yc = top + lane * i + lane / 2
        parts.append(f'<text x="{left - 6}" y="{yc + 4:.1f}" class="tick" text-anchor="end">{sev}</text>'
                     f'<line x1="{left}" y1="{yc:.1f}" x2="{width - right}" y2="{yc:.1f}" class="grid"/>')
    lane_of = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    for rec in data.alerts:
        sev = rec["otwatch"]["severity"]
        yc = top + lane * lane_of[sev] + lane / 2
        x0, x1 = axis.x(_ts(rec["event"]["start"])), axis.x(_ts(rec["event"]["end"]))
        title = f'{rec["rule"]["name"]} {rec["event"]["start"]}: {rec["message"]}'
        parts.append(f'<rect x="{x0:.1f}" y="{yc - 7:.1f}" width="{max(x1 - x0, 3):.1f}" height="14" rx="3" '
                     f'fill="{SEVERITY_COLOUR[sev]}" class="alert-bar" data-severity="{sev}">'
                     f'<title>{_e(title)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def talkers_plot(assets: list, top_n: int = 10, width: int = 460) -> str:
    rows = sorted(assets, key=lambda a: -(a["bytes_in"] + a["bytes_out"]))[:top_n]
    bar_h, left = 22, 130
    height = 10 + bar_h * max(len(rows), 1)
    vmax = max([a["bytes_in"] + a["bytes_out"] for a in rows] + [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="talkers-plot" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="top talkers by bytes">']
    for i, a in enumerate(rows):
        y = 5 + i * bar_h
        w_out = a["bytes_out"] / vmax * (width - left - 90)
        w_in = a["bytes_in"] / vmax * (width - left - 90)
        parts.append(f'<text x="{left - 6}" y="{y + 14}" class="tick" text-anchor="end">{_e(a["address"])}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w_out:.1f}" height="15" fill="#1f77b4" class="bar">'
                     f'<title>sent {a["bytes_out"]:,} bytes</title></rect>'
                     f'<rect x="{left + w_out:.1f}" y="{y + 3}" width="{w_in:.1f}" height="15" fill="#aec7e8" '
                     f'class="bar"><title>received {a["bytes_in"]:,} bytes</title></rect>'
                     f'<text x="{left + w_out + w_in + 4:.1f}" y="{y + 14}" class="tick">'
                     f'{(a["bytes_in"] + a["bytes_out"]) / 1e3:,.1f} kB</text>')
    parts.append("</svg>")
    return "".join(parts)


def communication_map(data: ReportData) -> str:
    """Graphviz's drawing of the ``otwatch assets`` DOT graph when ``dot`` is installed, else circles."""
    exe = shutil.which("dot")
    if exe and data.conversations:
        proc = subprocess.run([exe, "-Tsvg"], input=data.dot, text=True, capture_output=True, timeout=60)
        if proc.returncode == 0 and "<svg" in proc.stdout:
            svg = proc.stdout[proc.stdout.index("<svg"):]
            return svg.replace("<svg", '<svg id="comm-map" class="map"', 1)
    nodes = sorted({c["client"] for c in data.conversations} | {c["server"] for c in data.conversations})
    size = 520
    r = size / 2 - 90
    pos = {n: (size / 2 + r * math.cos(2 * math.pi * i / max(len(nodes), 1)),
               size / 2 + r * math.sin(2 * math.pi * i / max(len(nodes), 1))) for i, n in enumerate(nodes)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="comm-map" class="map" viewBox="0 0 {size} {size}" '
             f'width="{size}" height="{size}" role="img" aria-label="communication map">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for c in data.conversations:
        (x0, y0), (x1, y1) = pos[c["client"]], pos[c["server"]]
        colour = "#c01e1e" if ("write" in c["classes"] or "control" in c["classes"]) else "#555"
        parts.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{colour}" '
                     f'marker-end="url(#arrow)" class="edge"><title>{_e(c["protocol"])} {_e(c["client"])} -&gt; '
                     f'{_e(c["server"])}</title></line>')
    for n, (x, y) in pos.items():
        parts.append(f'<g class="node"><circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#1f77b4"/>'
                     f'<text x="{x:.1f}" y="{y - 10:.1f}" class="tick" text-anchor="middle">{_e(n)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page ------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;
color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.86em;width:100%}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right}
.plot .grid{stroke:#eee}.plot .axis{stroke:#888}.tick{font-size:11px;fill:#555}
.learn{fill:#f2f2f2}.attack-band{fill:#e9b0b0;fill-opacity:.45}.band-label{font-size:10px;fill:#a33}
.sev{font-weight:bold;padding:1px 5px;border-radius:3px;color:#fff}
.sev-low{background:#6c8ebf}.sev-medium{background:#d6a100}.sev-high{background:#e06c00}.sev-critical{background:#c01e1e}
.missed{color:#c01e1e;font-weight:bold}.ok{color:#2a7d2a;font-weight:bold}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:1.4em}.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.map{max-width:100%;height:auto}small{color:#666}
"""


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _summary(data: ReportData) -> str:
    by_sev = {s: sum(r["otwatch"]["severity"] == s for r in data.alerts) for s in reversed(SEVERITIES)}
    cards = [("frames", f"{data.frames:,}"), ("bytes", f"{data.bytes:,}"),
             ("capture time", f"{(data.last_ts - data.first_ts):,.0f} s"),
             ("PDUs", f"{sum(v['pdus'] for v in data.by_protocol.values()):,}"),
             ("assets", f"{len(data.assets):,}"), ("alerts", f"{len(data.alerts):,}")]
    if data.result:
        cards.append(("attacks detected", f"{data.result['detected']}/{len(data.result['scenarios'])}"))
    body = '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards)
    body += "</div>"
    per_proto = {}
    for r in data.alerts:
        per_proto[r["network"]["protocol"]] = per_proto.get(r["network"]["protocol"], 0) + 1
    rows = "".join(f"<tr><td>{_e(n)}</td><td class=num>{v['frames']:,}</td><td class=num>{v['bytes']:,}</td>"
                   f"<td class=num>{v['pdus']:,}</td><td class=num>{v['points']:,}</td>"
                   f"<td class=num>{per_proto.get(n, 0):,}</td></tr>" for n, v in data.by_protocol.items())
    body += ("<p></p><table><tr><th>protocol</th><th>frames</th><th>bytes</th><th>PDUs</th><th>points</th>"
             f"<th>alerts</th></tr>{rows}</table>")
    body += (f"<p>Captured {_e(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(data.first_ts)))} to "
             f"{_e(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(data.last_ts)))} UTC. "
             + (f"Learned until {_e(_clock(data.learn_until))}, monitored after. " if data.learn_until else "")
             + "Alerts by severity: " + ", ".join(f"{k} {v}" for k, v in by_sev.items()) + ". "
             + ("Parse errors: " + ", ".join(f"{_e(k)} {v:,}" for k, v in data.errors.items()) if data.errors
                else "No parse errors.") + "</p>")
    return _section("summary", "Summary", body)


def _attacks(data: ReportData) -> str:
    if not data.result:
        return _section("attacks", "Attacks", "<p>No labels given (<code>--labels</code>): nothing to score.</p>")
    r = data.result
    rows = []
    for s in r["scenarios"]:
        ttd = "-" if s["time_to_detect_s"] is None else f"{s['time_to_detect_s']:.3f} s"
        state = '<span class="ok">detected</span>' if s["detected"] else '<span class="missed">missed</span>'
        rows.append(f"<tr><td>{_e(s['scenario'])}</td><td>{_e(_clock(s['start_ts']))}</td><td>{_e(s['src'])} -&gt; "
                    f"{_e(s['dst'] or '*')}</td><td>{state}</td><td class=num>{ttd}</td><td class=num>{s['alerts']}"
                    f"</td><td>{_e(', '.join(s['rules']))}</td></tr>")
    fa = r["false_alerts_per_hour"]
    body = ("<table><tr><th>attack</th><th>start</th><th>hosts</th><th>result</th><th>time to detect</th>"
            "<th>alerts</th><th>rules</th></tr>" + "".join(rows) + "</table>"
            f"<p>Detected {r['detected']}/{len(r['scenarios'])}; false alerts {r['false_alerts']} "
            f"({'-' if fa is None else f'{fa:.2f}'} per benign hour)"
            + (f"; event precision {r['precision']:.3f}, recall {r['recall']:.3f}" if r.get("precision") is not None
               else "") + ".</p>")
    return _section("attacks", "Attacks: detected and time to detect", body)


def _alert_table(data: ReportData) -> str:
    from .alerts_cmd import who

    rows = []
    for rec in data.alerts:
        sev = rec["otwatch"]["severity"]
        t = rec.get("threat")
        attack = "-"
        if t:
            tid = t["technique"]["id"]
            tactics = ", ".join(n for _, n in tactics_of(tid))
            attack = (f'<a href="{_e(technique_url(tid))}">{_e(tid)}</a> {_e(technique_name(tid))}'
                      f"<br><small>{_e(tactics)}</small>")
        expl = rec["otwatch"].get("explanation") or []
        detail = _e(rec["message"]) + ("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in expl) + "</ul>" if expl else "")
        rows.append(f'<tr class="alert-row"><td>{_e(rec["event"]["start"][11:19])}</td>'
                    f'<td><span class="sev sev-{sev}">{sev}</span></td><td><code>{_e(rec["rule"]["name"])}</code></td>'
                    f"<td>{_e(who(rec))}</td><td class=num>{rec['otwatch']['count']:,}</td><td>{attack}</td>"
                    f"<td>{detail}</td></tr>")
    body = ("<table id=alert-table><tr><th>start</th><th>severity</th><th>rule</th><th>source -&gt; destination</th>"
            "<th>count</th><th>ATT&amp;CK for ICS</th><th>what was seen</th></tr>" + "".join(rows) + "</table>"
            if rows else "<p>No alerts.</p>")
    return _section("alerts", f"Alerts ({len(data.alerts)})", body)


def render_html(data: ReportData, title: str | None = None) -> str:
    from . import __version__

    title = title or "otwatch report: " + ", ".join(Path(c).name for c in data.captures)
    body = [
        f"<h1>{_e(title)}</h1><small>otwatch {_e(__version__)}, made "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))} in {data.elapsed_s:.1f} s</small>",
        _summary(data),
        _section("traffic", "Frames, PDUs and alerts per protocol over capture time",
                 rate_plot(data) + "<p><small>Lines: frames (all) and PDUs of each protocol per second.  Ticks under the axis: "
                 "alerts as they opened, in their protocol's colour.  Grey: the learning period.</small></p>"),
        _section("timeline", "Alert timeline by severity",
                 timeline_plot(data) + ("<p><small>Shaded: labelled attacks.</small></p>" if data.labels else "")),
        _attacks(data),
        _section("talkers", "Top talkers and communication map",
                 f'<div class="row"><div><h3>Top talkers (bytes sent / received)</h3>{talkers_plot(data.assets)}'
                 f'</div><div><h3>Who talks to whom</h3>{communication_map(data)}</div></div>'
                 "<p><small>Map: client -&gt; server per conversation; red edges write or control.</small></p>"),
        _alert_table(data),
    ]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            '<link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(data: ReportData, output: str, title: str | None = None) -> None:
    out = Path(output)
    try:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(render_html(data, title), encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        raise InputError(f"{output}: cannot write: {exc.strerror}") from None


def run(args) -> int:
    from models.engine import DETECTORS

    from .eval import parse_duration, parse_time
    from .extras import missing_detectors
    from .progress import Progress
    from .replay import check_files

    paths = check_files(args.files)
    if args.labels and not Path(args.labels).is_file():
        raise InputError(f"{args.labels}: no such labels file")
    detectors = None
    if args.detectors:
        detectors = tuple(d.strip() for d in args.detectors.split(",") if d.strip())
        bad = [d for d in detectors if d not in DETECTORS]
        if bad:
            raise InputError(f"unknown detector(s) {', '.join(bad)}; choose from {', '.join(DETECTORS)}")
        if missing_detectors(detectors):
            raise InputError("; ".join(missing_detectors(detectors).values()))
    learn_s = parse_duration(args.learn) if args.learn else None
    learn_until = parse_time(args.learn_until) if args.learn_until else None
    if learn_s is not None and learn_until is not None:
        raise InputError("--learn and --learn-until: give one of them")
    total = sum(p.stat().st_size for p in paths)
    progress = None if args.no_progress else Progress(total, stream=sys.stderr)
    if args.labels:
        from models.scoring import read_labels

        try:
            read_labels(args.labels)
        except (KeyError, ValueError) as exc:
            raise InputError(f"{args.labels}: not a labels CSV ({exc})") from None
    try:
        data = collect(paths, args.labels, learn_s, detectors, progress, learn_until_s=learn_until)
    finally:
        if progress is not None:
            progress.close()
    write_report(data, args.output, args.title)
    print(f"wrote {args.output}: {data.frames:,} frames, {len(data.alerts)} alerts"
          + (f", {data.result['detected']}/{len(data.result['scenarios'])} attacks detected" if data.result else ""))
    return 0
