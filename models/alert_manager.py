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

    def __init__(self, cooldown_s: float = 60.0, max_open: int = 10000, keep: int = 100000, rollup: int = 20,
                 fanout: int = 8):
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.max_open = max_open
        self.keep = keep
        self.rollup = rollup
        self.fanout = fanout
        self._sources: dict[tuple, dict] = {}  # (rule, dst) -> {source: its open incidents}
        self._items: dict[tuple, int] = {}  # (rule, src) -> open incidents of that source
        self._group_of: dict[tuple, tuple] = {}  # incident key -> (rule, dst, src)
        self.open: dict[tuple, Alert] = {}
        self.hold_ns: dict[tuple, int] = {}  # per open incident: cool-down when longer than the default
        self.alerts: list[Alert] = []  # every incident, newest last (bounded by ``keep``)
        self.suppressed = 0

    @staticmethod
    def _join(a: Alert, f) -> None:
        a.count += f.count
        a.first_ts = min(a.first_ts, f.first_ts)
        a.last_ts = max(a.last_ts, f.last_ts)
        if _RANK[f.severity] > _RANK[a.severity]:
            a.severity = f.severity
        if f.score is not None and (a.score is None or f.score > a.score):
            a.score = f.score

    def add(self, findings) -> list[Alert]:
        new = []
        for f in findings:
            key = (f.rule, f.entity)
            a = self.open.get(key)
            if f.hold_s:
                self.hold_ns[key] = max(self.hold_ns.get(key, 0), int(f.hold_s * 1e9))
            if a is not None:
                self._join(a, f)
                items = a.fields.get("items")
                if items is not None:  # a review incident lists every item that joined it (bounded)
                    items.extend(i for i in f.fields.get("items", ()) if i not in items and len(items) < 50)
                continue
            # roll-ups: many sources doing the same to one device (a spoofed flood), or one source doing
            # the same kind of thing to many devices or items (a sweep, a function-code scan)
            sources = self._sources.get((f.rule, f.dst), {})
            rolled = len(sources) >= self.rollup and f.src not in sources
            spread = not rolled and bool(f.src) and self._items.get((f.rule, f.src), 0) >= self.fanout
            if rolled:
                key = (f.rule, f"many>{ip_text(f.dst)}")
            elif spread:
                key = (f.rule, f"{ip_text(f.src)}>many")
            a = self.open.get(key) if rolled or spread else None
            if a is not None:  # one more source, target or item joins the roll-up incident
                self._join(a, f)
                a.fields["sources" if rolled else "items_rolled_up"] += 1
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
            elif spread:
                a.entity = key[1]
                a.fields["items_rolled_up"] = 1
                a.message = (f"{f.message} -- and {self.fanout} other findings of this kind about "
                             f"{ip_text(f.src)} are open (a sweep or a scan): each further one is counted in this "
                             "alert")
            else:
                self._sources.setdefault((f.rule, f.dst), {})
                self._sources[(f.rule, f.dst)][f.src] = self._sources[(f.rule, f.dst)].get(f.src, 0) + 1
                self._items[(f.rule, f.src)] = self._items.get((f.rule, f.src), 0) + 1
                self._group_of[key] = (f.rule, f.dst, f.src)
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
        self._sources.clear()
        self._items.clear()
        self._group_of.clear()
        return out

    def _ungroup(self, key) -> None:
        g = self._group_of.pop(key, None)
        if g is None:
            return
        rule, dst, src = g
        sources = self._sources.get((rule, dst), {})
        if sources.get(src, 0) > 1:
            sources[src] -= 1
        else:
            sources.pop(src, None)
            if not sources:
                self._sources.pop((rule, dst), None)
        n = self._items.get((rule, src), 1) - 1
        if n > 0:
            self._items[(rule, src)] = n
        else:
            self._items.pop((rule, src), None)
