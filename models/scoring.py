"""Alerts against labels: per-scenario detection, time to detect, event-level precision/recall/F1.

Labels are the simulator's CSV (``start_ts,end_ts,scenario,src,dst,protocol,description``; extra
columns ignored, ``protocol`` optional).  A label covers every event between its hosts (either
direction; empty ``dst``: every event to or from ``src``) inside its interval.

The matching rule (stated in docs/detection.md, "How alerts are scored"):

- **Time**: an alert can belong to an attack only if it *opened* inside ``[start - pre_s, end +
  grace_s]`` (``pre_s`` = 1 s; ``grace_s`` = 60 s by default, the slowest poll of the simulated plant,
  the DNP3 integrity poll: an attack's effect on a device, such as a tripped breaker or a silenced
  PLC, shows in the next full poll).  An incident opened long before the attack does not count, even if the
  attack's findings later merged into it.
- **Hosts**: an attack from an *outsider* (a ``src`` never seen while learning: the attacker)
  matches alerts that name that host (source, destination, or the servers of a new-talker alert).
  An attack from an *insider* (``src`` already talking while learning: the legitimate master
  writing a bad setpoint, a relay in the middle of the real conversation, an outstation reporting
  spoofed values) matches only alerts on the exact ``src``/``dst`` pair (either direction).  An
  alert that merely involves the SCADA master, which talks to everyone, does not match.
  A label whose ``dst`` names two or more hosts (space-separated, as QUT's do: the attacker relayed,
  injected or masqueraded *between or as* the master and the outstation, so the frames carry the
  victims' addresses) also matches an alert on a pair of those hosts.
- A scenario is *detected* when some alert matches it; time to detect = the first matching alert's
  ``first_ts`` minus the label start (0 when it opened up to ``pre_s`` before).
- An alert that matches no scenario but opened in an attack's time window on the attacked device
  (``dst``) is an *effect* (an opened breaker seen in the next poll, a restarted device falling
  silent): it neither detects the attack nor counts as false.  Every other alert is *false*; false
  alerts per hour divide by the monitored time outside the labelled intervals (plus grace).
- Event level: an event (PDU row) is *predicted* when an alert on its host pair (or host) spans its
  time; precision/recall/F1 of predicted against labelled PDU rows of the monitored part.

>>> labels = [Label(10.0, 20.0, "flood", "10.0.0.66", "10.0.0.1", "modbus")]
>>> from models.alerts import Alert
>>> a = Alert("r", "allowlist", "high", 12 * 10**9, 15 * 10**9, "10.0.0.66", "10.0.0.1", "modbus", "e", "m")
>>> r = score_alerts([a], labels, monitor_start_s=0.0, monitor_end_s=3600.0)
>>> r["scenarios"][0]["detected"], r["scenarios"][0]["time_to_detect_s"], r["false_alerts"]
(True, 2.0, 0)
>>> master = Label(10.0, 20.0, "setpoint_manipulation", "10.0.0.10", "10.0.0.2", insider=True)
>>> other = Alert("r", "cycle", "medium", 12 * 10**9, 15 * 10**9, "10.0.0.10", "10.0.0.3", "modbus", "e", "m")
>>> matches(other, master, 30.0), matches(a, master, 30.0)
(False, False)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from parsers.decode import format_ipv4
from parsers.events import KIND_PDU, EventBatch


@dataclass
class Label:
    start_ts: float
    end_ts: float
    scenario: str
    src: str
    dst: str
    protocol: str = ""
    description: str = ""
    insider: bool | None = None  # src already talking while learning; None: decided by the scenario name

    @property
    def dsts(self) -> list:
        """The attacked hosts: ``dst`` may name several, space-separated (QUT's labels name the master
        and the outstation of an attack made between or in place of them)."""
        return self.dst.split()

    def hosts(self) -> set:
        return {h for h in [self.src, *self.dsts] if h}


def read_labels(path) -> list[Label]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.append(Label(float(row["start_ts"]), float(row["end_ts"]), row["scenario"], row.get("src", "") or "",
                             row.get("dst", "") or "", row.get("protocol", "") or "", row.get("description", "") or ""))
    out.sort(key=lambda lab: lab.start_ts)
    return out


def _alert_hosts(a) -> set:
    hosts = {h for h in (a.src, a.dst) if h}
    hosts |= set(a.fields.get("servers", []) or [])
    return hosts


GRACE_S = 60.0  # see the module doc

# Scenarios the simulator runs from hosts of the plant itself (docs/simulator.md), used only when the
# scorer is not given the events to tell insiders from outsiders.
INSIDER_SCENARIOS = {"setpoint_manipulation", "mitm", "measurement_spoofing"}


def is_insider(lab: Label) -> bool:
    return lab.insider if lab.insider is not None else lab.scenario in INSIDER_SCENARIOS


def in_window(a, lab: Label, grace_s: float, pre_s: float = 1.0) -> bool:
    t0 = a.first_ts / 1e9
    return lab.start_ts - pre_s <= t0 <= lab.end_ts + grace_s


def matches(a, lab: Label, grace_s: float, pre_s: float = 1.0) -> bool:
    """The alert opened in the attack's window and names the attack's own hosts (see module doc)."""
    if not in_window(a, lab, grace_s, pre_s):
        return False
    dsts = lab.dsts
    if len(dsts) >= 2 and {a.src, a.dst} <= set(dsts) and a.src and a.dst and a.src != a.dst:
        return True  # the attack spoke as (or between) the labelled victims: an alert on their pair
    if is_insider(lab) and dsts:
        return any({a.src, a.dst} == {lab.src, d} for d in dsts)
    return lab.src in _alert_hosts(a)


def is_effect(a, lab: Label, grace_s: float, pre_s: float = 1.0) -> bool:
    """An alert on the attacked device inside the attack's window (not a detection, not false)."""
    return bool(lab.dst) and in_window(a, lab, grace_s, pre_s) and bool(set(lab.dsts) & _alert_hosts(a))


def mark_insiders(labels, events: EventBatch, learn_end_s: float) -> None:
    """``insider`` = the label's source host sent or received PDUs before ``learn_end_s``."""
    ev = events.select((events.kind == KIND_PDU) & (events.ts < int(learn_end_s * 1e9)))
    seen = np.union1d(np.unique(ev.src), np.unique(ev.dst)).astype(np.int64)
    for lab in labels:
        ids = _host_ids([lab.src])
        lab.insider = bool(ids.shape[0]) and bool(np.isin(ids, seen).all())


def score_alerts(alerts, labels, monitor_start_s: float, monitor_end_s: float, grace_s: float = GRACE_S,
                 events: EventBatch | None = None) -> dict:
    if events is not None:
        mark_insiders(labels, events, monitor_start_s)
    scenarios = []
    matched = set()
    for lab in labels:
        hits = [a for a in alerts if matches(a, lab, grace_s)]
        matched.update(id(a) for a in hits)
        first = min((a.first_ts for a in hits), default=None)
        scenarios.append({
            "scenario": lab.scenario, "start_ts": lab.start_ts, "end_ts": lab.end_ts, "src": lab.src, "dst": lab.dst,
            "protocol": lab.protocol, "detected": bool(hits),
            "time_to_detect_s": None if first is None else round(max(first / 1e9 - lab.start_ts, 0.0), 6),
            "alerts": len(hits), "rules": sorted({a.rule for a in hits}),
            "monitored": lab.start_ts >= monitor_start_s, "insider": is_insider(lab),
        })
    effects = [a for a in alerts if id(a) not in matched and any(is_effect(a, lab, grace_s) for lab in labels)]
    matched.update(id(a) for a in effects)
    false = [a for a in alerts if id(a) not in matched]
    # benign monitored time: the monitoring span minus the labelled intervals (with grace)
    attack = 0.0
    for lab in labels:
        lo, hi = max(lab.start_ts, monitor_start_s), min(lab.end_ts + grace_s, monitor_end_s)
        attack += max(hi - lo, 0.0)
    benign_h = max(monitor_end_s - monitor_start_s - attack, 0.0) / 3600
    out = {
        "scenarios": scenarios,
        "false_alerts_per_hour": round(len(false) / benign_h, 3) if benign_h > 0 else None,
        "false_alerts": len(false),
        "effect_alerts": len(effects),
        "grace_s": grace_s,
        "benign_hours": round(benign_h, 4),
        "alerts": len(alerts),
        "false_alert_rules": _count(a.rule for a in false),
        "false_alert_list": [{"rule": a.rule, "severity": a.severity, "entity": a.entity, "first_ts": a.first_ts / 1e9,
                              "provisional": a.provisional, "message": a.message} for a in false[:100]],
    }
    ttd = [s["time_to_detect_s"] for s in scenarios if s["detected"]]
    out["median_time_to_detect_s"] = float(np.median(ttd)) if ttd else None
    out["detected"] = sum(s["detected"] for s in scenarios)
    if events is not None:
        out.update(event_metrics(alerts, labels, events, monitor_start_s))
    else:
        out.update({"precision": None, "recall": None, "f1": None})
    return out


def _count(items) -> dict:
    d: dict = {}
    for x in items:
        d[x] = d.get(x, 0) + 1
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def _host_ids(texts) -> np.ndarray:
    import ipaddress
    out = []
    for t in texts:
        try:
            out.append(int(ipaddress.IPv4Address(t)))
        except ValueError:
            pass
    return np.asarray(out, dtype=np.int64)


def event_metrics(alerts, labels, events: EventBatch, monitor_start_s: float) -> dict:
    ev = events.select((events.kind == KIND_PDU) & (events.ts >= int(monitor_start_s * 1e9)))
    n = len(ev)
    src, dst, ts = ev.src.astype(np.int64), ev.dst.astype(np.int64), ev.ts
    truth = np.zeros(n, bool)
    for lab in labels:
        inside = (ts >= int(lab.start_ts * 1e9)) & (ts <= int(lab.end_ts * 1e9))
        s_ids = _host_ids([lab.src])
        if s_ids.shape[0] == 0:
            continue
        s = int(s_ids[0])
        d_ids = _host_ids(lab.dsts)
        if d_ids.shape[0]:
            for d in d_ids.tolist():
                truth |= inside & (((src == s) & (dst == d)) | ((src == d) & (dst == s)))
            if d_ids.shape[0] >= 2:  # spoken as the victims: every PDU between them in the interval
                truth |= inside & np.isin(src, d_ids) & np.isin(dst, d_ids)
        else:
            truth |= inside & ((src == s) | (dst == s))
    pred = np.zeros(n, bool)
    for a in alerts:
        inside = (ts >= a.first_ts) & (ts <= a.last_ts)
        if not inside.any():
            continue
        hosts = _host_ids(_alert_hosts(a))
        if a.src and a.dst:
            s, d = _host_ids([a.src]), _host_ids([a.dst])
            if s.shape[0] and d.shape[0]:
                pred |= inside & (((src == s[0]) & (dst == d[0])) | ((src == d[0]) & (dst == s[0])))
                continue
        pred |= inside & (np.isin(src, hosts) | np.isin(dst, hosts))
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "events": {"tp": tp, "fp": fp, "fn": fn, "total": n}}


__all__ = ["Label", "read_labels", "score_alerts", "event_metrics", "matches", "is_effect", "mark_insiders",
           "format_ipv4"]
