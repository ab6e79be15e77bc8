"""One alert per incident: findings of the same rule on the same entity merge until it goes quiet.

An incident opens with the first finding (that alert is returned at once, so time to detect is the
time of the first anomalous event), collects later findings of the same ``(rule, entity)`` (count,
last seen, highest severity), and closes after ``cooldown_s`` of capture time without one: the
alert clears when traffic is normal again, and a later finding opens a new incident.

>>> from models.findings import Finding
>>> am = AlertManager(cooldown_s=60)
>>> f = lambda t: Finding("r", "allowlist", "high", t * 10**9, t * 10**9, 0x0A000001, 0x0A000002, 1, "e", "m")
>>> len(am.add([f(0)])), len(am.add([f(10)])), len(am.expire(50 * 10**9)), len(am.expire(71 * 10**9))
(1, 0, 0, 1)
>>> am.alerts[0].count, am.alerts[0].status
(2, 'closed')
"""

from __future__ import annotations

from models.alerts import SEVERITIES, Alert

from .findings import ip_text, protocol_text

_RANK = {s: i for i, s in enumerate(SEVERITIES)}


class AlertManager:
    """Findings in, incidents out (see the module docstring).

    Roll-up: once ``rollup`` incidents of one rule are open against the same destination (a flood of
    spoofed sources, a scan from many addresses), further sources join one incident for that rule
    and destination instead of opening one each, so a flood is one alert, not one per address.

    >>> from models.findings import Finding
    >>> am = AlertManager(rollup=3)
    >>> new = am.add([Finding("allowlist.new_talker", "allowlist", "medium", 0, 0, 0x0B000000 + i, 0x0A000002, 1,
    ...                       f"src{i}", "new talker") for i in range(100)])
    >>> len(new), new[-1].entity, new[-1].count, new[-1].fields["sources"]
    (4, 'many>10.0.0.2', 97, 97)
    """

    def __init__(self, cooldown_s: float = 60.0, max_open: int = 10000, keep: int = 100000, rollup: int = 20):
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.max_open = max_open
        self.keep = keep
        self.rollup = rollup
        self._group_open: dict[tuple, int] = {}  # (rule, dst) -> open incidents
        self._group_of: dict[tuple, tuple] = {}  # incident key -> its (rule, dst)
        self.open: dict[tuple, Alert] = {}
        self.hold_ns: dict[tuple, int] = {}  # per open incident: cool-down when longer than the default
        self.alerts: list[Alert] = []  # every incident, newest last (bounded by ``keep``)
        self.suppressed = 0

    def add(self, findings) -> list[Alert]:
        new = []
        for f in findings:
            key = (f.rule, f.entity)
            a = self.open.get(key)
            if f.hold_s:
                self.hold_ns[key] = max(self.hold_ns.get(key, 0), int(f.hold_s * 1e9))
            if a is not None:
                a.count += f.count
                a.first_ts = min(a.first_ts, f.first_ts)
                a.last_ts = max(a.last_ts, f.last_ts)
                if _RANK[f.severity] > _RANK[a.severity]:
                    a.severity = f.severity
                if f.score is not None and (a.score is None or f.score > a.score):
                    a.score = f.score
                items = a.fields.get("items")
                if items is not None:  # a review incident lists every item that joined it (bounded)
                    items.extend(i for i in f.fields.get("items", ()) if i not in items and len(items) < 50)
                continue
            group = (f.rule, f.dst)
            rolled = self._group_open.get(group, 0) >= self.rollup
            if rolled:
                key = (f.rule, f"many>{ip_text(f.dst)}")
                a = self.open.get(key)
                if a is not None:  # one more source joins the roll-up incident
                    a.count += f.count
                    a.fields["sources"] = a.fields.get("sources", 1) + 1
                    a.first_ts = min(a.first_ts, f.first_ts)
                    a.last_ts = max(a.last_ts, f.last_ts)
                    if _RANK[f.severity] > _RANK[a.severity]:
                        a.severity = f.severity
                    continue
            if len(self.open) >= self.max_open:
                self.suppressed += 1
                continue
            a = Alert(rule=f.rule, detector=f.detector, severity=f.severity, first_ts=int(f.first_ts),
                      last_ts=int(f.last_ts), src=ip_text(f.src), dst=ip_text(f.dst),
                      protocol=protocol_text(f.protocol).lower().replace("-", ""), entity=f.entity,
                      message=f.message, technique=f.technique, count=int(f.count), score=f.score,
                      threshold=f.threshold, fields=dict(f.fields), explanation=list(f.explanation),
                      sport=f.sport, dport=f.dport, provisional=f.provisional)
            if rolled:
                a.entity = key[1]
                a.src = "many"
                a.sport = None
                a.fields["sources"] = 1
                a.message = (f"{f.message} -- and at the same time {self.rollup} other sources did the same to "
                             f"{ip_text(f.dst)} (a flood of spoofed addresses or a scan): each further source is "
                             "counted in this alert")
            else:
                self._group_open[group] = self._group_open.get(group, 0) + 1
                self._group_of[key] = group
            self.open[key] = a
            self.alerts.append(a)
            if len(self.alerts) > self.keep:
                del self.alerts[: len(self.alerts) - self.keep]
            new.append(a)
        return new

    def expire(self, now_ns: int) -> list[Alert]:
        """Close incidents quiet for the cool-down; returns them (final count and last seen)."""
        done = [k for k, a in self.open.items() if now_ns - a.last_ts > max(self.cooldown_ns, self.hold_ns.get(k, 0))]
        out = []
        for k in done:
            self.hold_ns.pop(k, None)
            self._ungroup(k)
            a = self.open.pop(k)
            a.status = "closed"
            out.append(a)
        return out

    def close_all(self) -> list[Alert]:
        out = list(self.open.values())
        for a in out:
            a.status = "closed"
        self.open.clear()
        self.hold_ns.clear()
        self._group_open.clear()
        self._group_of.clear()
        return out

    def _ungroup(self, key) -> None:
        group = self._group_of.pop(key, None)
        if group is not None:
            n = self._group_open.get(group, 1) - 1
            if n > 0:
                self._group_open[group] = n
            else:
                self._group_open.pop(group, None)
