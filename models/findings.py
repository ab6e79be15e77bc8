"""What a detector hands the alert manager: one :class:`Finding` per rule and entity in a batch.

Detectors work on arrays; they build findings only for the few (rule, entity) groups that are
anomalous in a batch.  The alert manager (:mod:`models.alert_manager`) merges findings of the same
rule and entity into one incident.  This module also has the small text helpers alert messages use.

>>> ip_text(0x0A14000A)
'10.20.0.10'
>>> function_text(1, 8, 4)
'function 8 (diagnostics, sub-function 4 force_listen_only_mode)'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parsers import dnp3_objects, iec104_types
from parsers import modbus as modbus_names
from parsers.decode import format_ipv4
from parsers.events import PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, PROTOCOL_NAMES

PROTOCOL_TEXT = {PROTO_MODBUS: "Modbus", PROTO_DNP3: "DNP3", PROTO_IEC104: "IEC-104"}


@dataclass
class Finding:
    rule: str
    detector: str
    severity: str
    first_ts: int
    last_ts: int
    src: int  # uint32 address (0 when the finding is about many hosts)
    dst: int
    protocol: int
    entity: str
    message: str
    technique: str | None = None
    count: int = 1
    score: float | None = None
    threshold: float | None = None
    fields: dict = field(default_factory=dict)
    explanation: list = field(default_factory=list)
    provisional: bool = False
    sport: int | None = None
    dport: int | None = None
    hold_s: float = 0.0  # keep the incident open at least this long without findings (slow polls)


def ip_text(addr) -> str:
    """IPv4 text of a uint32 address; interned IPv6 ids (240.0.0.0/5) print as ``ipv6#N``."""
    a = int(addr)
    if a == 0:
        return ""
    if a >= 0xF0000000:
        return f"ipv6#{a - 0xF0000000}"
    return format_ipv4(a)


def protocol_text(code) -> str:
    return PROTOCOL_TEXT.get(int(code), PROTOCOL_NAMES.get(int(code), f"unknown-{int(code)}"))


def function_text(protocol: int, function: int, subfunction: int = -1) -> str:
    """A function code with its name in the protocol's own terms."""
    protocol, function, subfunction = int(protocol), int(function), int(subfunction)
    if protocol == PROTO_MODBUS:
        name = modbus_names.function_name(function)
        if function == 8 and subfunction >= 0:
            name += f", sub-function {subfunction} {modbus_names.DIAGNOSTIC_NAMES.get(subfunction, '')}".rstrip()
        elif function == 43 and subfunction >= 0:
            name += f", MEI type {subfunction}"
        return f"function {function} ({name})"
    if protocol == PROTO_DNP3:
        return f"function {function} ({dnp3_objects.function_name(function)})"
    if protocol == PROTO_IEC104:
        return f"{iec104_types.function_name(function)}"
    return f"function {function}"
