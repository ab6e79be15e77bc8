"""Alert records: what a detector found, said so an operator and a SIEM can both use it.

An :class:`Alert` is one incident, not one packet: the alert manager (``models.alert_manager``)
merges repeated findings of the same rule on the same entity into one record with first/last seen
and a count.  :meth:`Alert.to_ecs` gives the JSON-lines record, with field names from the Elastic
Common Schema (ECS 8.x) where one fits and protocol details under ``otwatch``.

>>> a = Alert(rule="allowlist.new_talker", detector="allowlist", severity="medium",
...           first_ts=1_700_000_000_000_000_000, last_ts=1_700_000_001_000_000_000,
...           src="10.0.0.66", dst="10.0.0.20", protocol="modbus", entity="10.0.0.66>10.0.0.20/modbus",
...           message="10.0.0.66 talked Modbus to 10.0.0.20 for the first time", technique="T0846")
>>> r = a.to_ecs()
>>> r["event"]["kind"], r["event"]["severity"], r["log"]["level"], r["source"]["ip"]
('alert', 47, 'warning', '10.0.0.66')
>>> r["threat"]["technique"]["name"], r["threat"]["tactic"]["name"]
('Remote System Discovery', ['Discovery'])
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .rules import FRAMEWORK, RULES, TECHNIQUES, tactic_url, tactics_of, technique_name, technique_url

SEVERITIES = ("low", "medium", "high", "critical")
# ECS event.severity is numeric; these are the values Elastic Security uses for its four levels.
ECS_SEVERITY = {"low": 21, "medium": 47, "high": 73, "critical": 99}
# log.level takes the standard (syslog) level names a SIEM expects, not otwatch's severity words.
LOG_LEVEL = {"low": "info", "medium": "warning", "high": "error", "critical": "critical"}
ECS_VERSION = "8.11.0"

# Names of the ATT&CK for ICS techniques (the catalogue with tactics is models/rules.py).
ATTACK_ICS = {tid: name for tid, (name, _) in TECHNIQUES.items()}


def _product_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("otwatch")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout): no version to report
        return None


def observer_fields(name: str | None = None, hostname: str | None = None, version: str | None = None,
                    interface: str | None = None) -> dict:
    """The ECS ``observer`` of the records: which agent saw it (``name`` defaults to the host name) and,
    live, on which capture interface.

    >>> o = observer_fields(name="sub-7", hostname="edge1", version="1.0", interface="eth1")
    >>> o["name"], o["hostname"], o["type"], o["ingress"]
    ('sub-7', 'edge1', 'ids', {'interface': {'name': 'eth1'}})
    """
    host = hostname or socket.gethostname()
    obs = {"name": name or host, "hostname": host, "type": "ids", "vendor": "otwatch", "product": "otwatch"}
    version = version or _product_version()
    if version:
        obs["version"] = version
    if interface:
        obs["ingress"] = {"interface": {"name": interface}}
    return obs


def ip_or_none(text) -> str | None:
    """``text`` if it is an IP address, else None: an ECS ip field must never hold "" or a label such as
    "many" (Elasticsearch rejects the whole event).

    >>> ip_or_none("10.0.0.1"), ip_or_none(""), ip_or_none("many"), ip_or_none("fe80::1")
    ('10.0.0.1', None, None, 'fe80::1')
    """
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return None


def threat_fields(technique: str) -> dict:
    """ECS ``threat.*`` for one ATT&CK for ICS technique, with its tactics."""
    tactics = tactics_of(technique)
    out = {"framework": FRAMEWORK,
           "technique": {"id": technique, "name": technique_name(technique), "reference": technique_url(technique)}}
    if tactics:
        out["tactic"] = {"id": [t for t, _ in tactics], "name": [n for _, n in tactics],
                         "reference": [tactic_url(t) for t, _ in tactics]}
    return out


def _finite(obj):
    """``obj`` with NaN and infinite floats replaced by None (JSON has neither)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def record_techniques(rec: dict) -> list[str]:
    """The technique ids of an ECS alert record, also from records written before ``threat.technique``
    became one ECS object (a list of ``{"id": ...}``).

    >>> record_techniques({"threat": {"technique": {"id": "T0846"}}}), record_techniques({})
    (['T0846'], [])
    """
    t = (rec.get("threat") or {}).get("technique") or []
    items = t if isinstance(t, list) else [t]
    out = []
    for item in items:
        ids = item.get("id") if isinstance(item, dict) else item
        out += [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, str) and i]
    return out


def iso8601(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


@dataclass
class Alert:
    rule: str  # e.g. "allowlist.new_function", "cycle.missed_poll", "process.out_of_range", "ml.river"
    detector: str  # allowlist | cycle | process | river | pyod | parser
    severity: str  # one of SEVERITIES
    first_ts: int  # ns
    last_ts: int  # ns
    src: str
    dst: str
    protocol: str  # modbus | dnp3 | iec104 | other
    entity: str  # what the alert is about; dedup key together with rule
    message: str  # one plain sentence for the operator
    technique: str | None = None  # ATT&CK for ICS id
    count: int = 1  # events merged into this alert
    score: float | None = None
    threshold: float | None = None
    fields: dict = field(default_factory=dict)  # protocol fields: function, unit, address, value...
    explanation: list = field(default_factory=list)  # top contributing features, in words
    sport: int | None = None
    dport: int | None = None
    provisional: bool = False  # raised by a baseline entry still under review
    status: str = "open"  # open while findings go on; closed after the alert manager's cool-down

    #: stable id (ECS event.id) fixed when the incident is created: later findings may move
    #: ``first_ts`` earlier, the id must not change with it
    id: str = ""

    def __post_init__(self):
        if not self.id:
            key = f"{self.rule}|{self.entity}|{self.first_ts}".encode()
            self.id = hashlib.sha1(key).hexdigest()[:20]

    @property
    def alert_id(self) -> str:
        return self.id

    def to_ecs(self, observer: dict | None = None, site: str | None = None) -> dict:
        """The ECS record (JSON lines, ECS 8.x; ``docs/alert.schema.json``).  ``observer`` is the ECS
        observer object (:func:`observer_fields`; default: this host), ``site`` goes to ``labels.site``.

        ``source``/``destination`` are the sender and receiver of what was found (for allow-list findings
        the client and the server), each port with its own address; an address that is not an IP (a
        roll-up of many sources, several servers) is left out rather than sent empty, and every address
        involved is listed in ``related.ip``."""
        src, dst = ip_or_none(self.src), ip_or_none(self.dst)
        rule = RULES.get(self.rule)
        rec = {
            "@timestamp": iso8601(self.first_ts),
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "alert",
                "category": ["network", "intrusion_detection"],
                "type": ["info"],
                "module": "otwatch",
                "dataset": "otwatch.alert",
                "severity": ECS_SEVERITY.get(self.severity, 21),
                "start": iso8601(self.first_ts),
                "end": iso8601(self.last_ts),
                "id": self.alert_id,
            },
            "log": {"level": LOG_LEVEL.get(self.severity, "info")},
            "observer": observer if observer is not None else observer_fields(),
            "rule": {"id": self.rule, "name": self.rule, "category": self.detector, "ruleset": "otwatch"},
            "message": self.message,
            "network": {"protocol": self.protocol, "transport": "udp" if self.fields.get("transport") == "udp"
                        else "tcp"},
            "otwatch": {
                "severity": self.severity,
                "detector": self.detector,
                "entity": self.entity,
                "count": self.count,
                "first_seen": iso8601(self.first_ts),
                "last_seen": iso8601(self.last_ts),
                "provisional": self.provisional,
                "status": self.status,
                "fields": _finite(self.fields),
                "explanation": self.explanation,
            },
        }
        if rule is not None:
            rec["rule"]["description"] = rule.trigger
        for side, ip, port in (("source", src, self.sport), ("destination", dst, self.dport)):
            if ip is not None:
                rec[side] = {"ip": ip} | ({"port": int(port)} if port is not None else {})
        related = [ip for ip in (src, dst) if ip]
        for ip in self.fields.get("servers", ()) if isinstance(self.fields.get("servers"), list) else ():
            ip = ip_or_none(ip)
            if ip and ip not in related:
                related.append(ip)
        if related:
            rec["related"] = {"ip": related}
        if site:
            rec["labels"] = {"site": str(site)}
        for k in ("score", "threshold"):  # JSON has no NaN or infinity: left out, not sent as a string
            v = getattr(self, k)
            if v is not None and math.isfinite(float(v)):
                rec["otwatch"][k] = round(float(v), 6)
        if self.technique:
            rec["threat"] = threat_fields(self.technique)
        return rec
