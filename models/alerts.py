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
>>> r["event"]["kind"], r["event"]["severity"], r["source"]["ip"], r["threat"]["technique"][0]["name"]
('alert', 47, '10.0.0.66', 'Remote System Discovery')
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

SEVERITIES = ("low", "medium", "high", "critical")
# ECS event.severity is numeric; these are the values Elastic Security uses for its four levels.
ECS_SEVERITY = {"low": 21, "medium": 47, "high": 73, "critical": 99}

# MITRE ATT&CK for ICS techniques otwatch maps findings to (attack.mitre.org/techniques/ics/).
ATTACK_ICS = {
    "T0846": "Remote System Discovery",
    "T0888": "Remote System Information Discovery",
    "T0855": "Unauthorized Command Message",
    "T0836": "Modify Parameter",
    "T0816": "Device Restart/Shutdown",
    "T0814": "Denial of Service",
    "T0830": "Adversary-in-the-Middle",
    "T0856": "Spoof Reporting Message",
    "T0831": "Manipulation of Control",
    "T0832": "Manipulation of View",
    "T0843": "Program Download",
    "T0858": "Change Operating Mode",
    "T0804": "Block Reporting Message",
    "T0815": "Denial of View",
    "T0869": "Standard Application Layer Protocol",
    "T0861": "Point & Tag Identification",
    "T0801": "Monitor Process State",
    "T0840": "Network Connection Enumeration",
}


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

    def to_ecs(self) -> dict:
        rec = {
            "@timestamp": iso8601(self.first_ts),
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
            "log": {"level": self.severity},
            "rule": {"name": self.rule, "category": self.detector},
            "message": self.message,
            "source": {"ip": self.src} | ({"port": self.sport} if self.sport is not None else {}),
            "destination": {"ip": self.dst} | ({"port": self.dport} if self.dport is not None else {}),
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
                "fields": self.fields,
                "explanation": self.explanation,
            },
        }
        if self.score is not None:
            rec["otwatch"]["score"] = round(float(self.score), 6)
        if self.threshold is not None:
            rec["otwatch"]["threshold"] = round(float(self.threshold), 6)
        if self.technique:
            rec["threat"] = {
                "framework": "MITRE ATT&CK for ICS",
                "technique": [{"id": self.technique, "name": ATTACK_ICS.get(self.technique, self.technique),
                               "reference": f"https://attack.mitre.org/techniques/{self.technique}/"}],
            }
        return rec
