"""``otwatch export --stix ALERTS.jsonl -o bundle.json``: alert records as a STIX 2.1 bundle.

For standardised incident reporting (a CERT, an ISAC, a TIP such as OpenCTI or MISP).  Per alert
record (STIX 2.1 OASIS standard, 10 June 2021):

- an ``incident`` SDO (§4.8): name = rule, description = the operator message, otwatch details as
  custom properties ``x_otwatch_*`` (§11.1);
- an ``observed-data`` SDO (§4.13) with first/last observed and the number of merged events,
  referring to ``ipv4-addr``/``ipv6-addr`` SCOs (§6.4, §6.5) and a ``network-traffic`` SCO (§6.12);
- when the alert names an ATT&CK for ICS technique: one ``attack-pattern`` SDO per technique
  (§4.1, external id ``Txxxx`` in ``mitre-ics-attack``) and a ``sighting`` (§5.2) of it, observed in
  the observed-data, sighted by the otwatch ``identity`` (§4.7);
- ``related-to`` relationships (§5.1) from the incident to its observed-data and attack pattern.

Identifiers are deterministic: SCOs use the UUIDv5 rule of §2.9 (namespace
``00abedb4-aa42-466c-9c01-fed23315a9b7`` over the canonical JSON of their ID-contributing
properties), SDOs and SROs a UUIDv5 of the alert id, so exporting the same alerts twice gives the
same bundle and re-imports update rather than duplicate.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from models.alerts import ATTACK_ICS

from .errors import InputError

SCO_NAMESPACE = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")  # STIX 2.1 §2.9
OTWATCH_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/otwatch/otwatch/stix")
# IANA service names (www.iana.org/assignments/service-names-port-numbers) for network-traffic.protocols.
IANA_SERVICE = {"modbus": "mbap", "dnp3": "dnp", "iec104": "iec-104"}


def add_arguments(p) -> None:
    p.add_argument("--stix", nargs="+", metavar="ALERTS.jsonl", required=True,
                   help="alert records (JSON lines) to export as one STIX 2.1 bundle")
    p.add_argument("-o", "--output", default="-", help="bundle file (default: standard output)")


def _sco_id(kind: str, contributing: dict) -> str:
    """§2.9: UUIDv5 over the JCS-canonical JSON of the ID-contributing properties."""
    canonical = json.dumps(contributing, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{kind}--{uuid.uuid5(SCO_NAMESPACE, canonical)}"


def _sdo_id(kind: str, key: str) -> str:
    return f"{kind}--{uuid.uuid5(OTWATCH_NAMESPACE, f'{kind}|{key}')}"


def _stix_time(ts: str) -> str:
    """STIX timestamps (§3.2) are RFC 3339 in UTC with a 'Z'; ECS records already are."""
    if not ts.endswith("Z"):
        raise ValueError(f"timestamp not in UTC: {ts}")
    return ts


def _address(ip: str) -> dict:
    kind = "ipv6-addr" if ":" in ip else "ipv4-addr"
    return {"type": kind, "spec_version": "2.1", "id": _sco_id(kind, {"value": ip}), "value": ip}


IDENTITY = {
    "type": "identity", "spec_version": "2.1", "id": _sdo_id("identity", "otwatch"),
    "created": "2026-01-01T00:00:00.000Z", "modified": "2026-01-01T00:00:00.000Z",
    "name": "otwatch", "identity_class": "system",
    "description": "otwatch network anomaly monitoring agent for OT/ICS networks",
}


def observer_identity(rec: dict) -> dict | None:
    """The agent that raised the alert, at its site (``observer.name``, ``labels.site``), as a
    ``system`` identity: what a sighting was sighted by.  None for records without them."""
    agent, site = rec.get("observer", {}).get("name"), rec.get("labels", {}).get("site")
    if not agent or not site:
        return None
    host = rec["observer"].get("hostname")
    return {"type": "identity", "spec_version": "2.1", "id": _sdo_id("identity", f"agent|{site}|{agent}"),
            "created": IDENTITY["created"], "modified": IDENTITY["modified"], "created_by_ref": IDENTITY["id"],
            "name": f"{agent} at {site}", "identity_class": "system",
            "description": f"otwatch agent {agent}" + (f" on host {host}" if host else "") + f" at site {site}"}


def attack_pattern(technique: str) -> dict:
    return {
        "type": "attack-pattern", "spec_version": "2.1", "id": _sdo_id("attack-pattern", technique),
        "created": IDENTITY["created"], "modified": IDENTITY["modified"], "created_by_ref": IDENTITY["id"],
        "name": ATTACK_ICS.get(technique, technique),
        "external_references": [{"source_name": "mitre-ics-attack", "external_id": technique,
                                 "url": f"https://attack.mitre.org/techniques/{technique}/"}],
    }


def alert_objects(rec: dict) -> list[dict]:
    """The STIX objects of one ECS alert record (SCOs, observed-data, incident, SROs)."""
    ev, ow = rec["event"], rec.get("otwatch", {})
    key = ev["id"]
    created = _stix_time(rec["@timestamp"])
    first, last = _stix_time(ev.get("start", created)), _stix_time(ev.get("end", created))
    common = {"spec_version": "2.1", "created": created, "modified": created, "created_by_ref": IDENTITY["id"]}
    objects = []
    observer = observer_identity(rec)
    if observer is not None:
        objects.append(observer)
    src = _address(rec["source"]["ip"]) if rec.get("source", {}).get("ip") else None
    dst = _address(rec["destination"]["ip"]) if rec.get("destination", {}).get("ip") else None
    refs = []
    for a in (src, dst):
        if a is not None and a["id"] not in refs:
            objects.append(a)
            refs.append(a["id"])
    protocol = rec.get("network", {}).get("protocol")
    if src and dst:
        traffic = {"src_ref": src["id"], "dst_ref": dst["id"],
                   "protocols": [p for p in ("ipv6" if src["type"] == "ipv6-addr" else "ipv4",
                                             rec.get("network", {}).get("transport", "tcp"),
                                             IANA_SERVICE.get(protocol)) if p],
                   "start": first}
        for side, port_key in (("source", "src_port"), ("destination", "dst_port")):
            if rec[side].get("port") is not None:
                traffic[port_key] = int(rec[side]["port"])
        contributing = {k: traffic[k] for k in ("start", "src_ref", "dst_ref", "src_port", "dst_port", "protocols")
                        if k in traffic}
        nt = {"type": "network-traffic", "spec_version": "2.1", "id": _sco_id("network-traffic", contributing),
              **traffic}
        objects.append(nt)
        refs.append(nt["id"])
    observed = None
    if refs:
        observed = {"type": "observed-data", "id": _sdo_id("observed-data", key), **common,
                    "first_observed": first, "last_observed": last,
                    "number_observed": max(1, int(ow.get("count", 1))), "object_refs": refs}
        objects.append(observed)
    incident = {"type": "incident", "id": _sdo_id("incident", key), **common,
                "name": rec["rule"]["name"], "description": rec.get("message", ""),
                "labels": [ow.get("severity", "low"), ow.get("detector", rec["rule"].get("category", ""))],
                "x_otwatch_alert_id": key, "x_otwatch_severity": ow.get("severity"),
                "x_otwatch_detector": ow.get("detector"), "x_otwatch_entity": ow.get("entity"),
                "x_otwatch_protocol": protocol, "x_otwatch_fields": ow.get("fields", {}),
                "x_otwatch_explanation": ow.get("explanation", []), "x_otwatch_provisional": ow.get("provisional")}
    for k in ("score", "threshold"):
        if ow.get(k) is not None:
            incident[f"x_otwatch_{k}"] = ow[k]
    incident["labels"] = [x for x in incident["labels"] if x]
    objects.append(incident)
    if observed is not None:
        objects.append({"type": "relationship", "id": _sdo_id("relationship", f"{key}|observed"), **common,
                        "relationship_type": "related-to", "source_ref": incident["id"],
                        "target_ref": observed["id"]})
    for t in rec.get("threat", {}).get("technique", []):
        ap_id = _sdo_id("attack-pattern", t["id"])
        objects.append({"type": "relationship", "id": _sdo_id("relationship", f"{key}|{t['id']}"), **common,
                        "relationship_type": "related-to", "source_ref": incident["id"], "target_ref": ap_id})
        if observed is not None:
            objects.append({"type": "sighting", "id": _sdo_id("sighting", f"{key}|{t['id']}"), **common,
                            "first_seen": first, "last_seen": last,
                            "count": max(1, int(ow.get("count", 1))), "sighting_of_ref": ap_id,
                            "observed_data_refs": [observed["id"]],
                            "where_sighted_refs": [(observer or IDENTITY)["id"]]})
    return objects


def bundle(records) -> dict:
    """A STIX 2.1 bundle (§8) of ECS alert records; shared objects (addresses, techniques) once."""
    objects = {IDENTITY["id"]: IDENTITY}
    keys = []
    for rec in records:
        keys.append(rec["event"]["id"])
        for t in rec.get("threat", {}).get("technique", []):
            ap = attack_pattern(t["id"])
            objects.setdefault(ap["id"], ap)
        for obj in alert_objects(rec):
            objects.setdefault(obj["id"], obj)
    return {"type": "bundle", "id": f"bundle--{uuid.uuid5(OTWATCH_NAMESPACE, '|'.join(sorted(keys)))}",
            "objects": list(objects.values())}


def read_records(paths) -> list[dict]:
    """ECS alert records from JSON-lines files.  A torn last line (a crash mid-write) is skipped
    with a warning; any other bad line is an input error naming the file and line."""
    records = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such file")
        lines = p.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec["event"]["id"], rec["rule"]["name"], rec["@timestamp"]  # noqa: B018 - required fields
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                if n == len(lines) and not isinstance(exc, KeyError):  # last line, no newline: torn write
                    print(f"otwatch export: warning: {p}:{n}: incomplete last record skipped", file=sys.stderr)
                    continue
                raise InputError(f"{p}:{n}: not an otwatch alert record ({exc})") from None
            records.append(rec)
    return records


def run(args) -> int:
    b = bundle(read_records(args.stix))
    text = json.dumps(b, indent=2, ensure_ascii=False) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return 0
