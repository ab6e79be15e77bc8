"""``otwatch export --stix ALERTS.jsonl -o bundle.json``: alert records as a STIX 2.1 bundle.

For standardised incident reporting (a CERT, an ISAC, a TIP such as OpenCTI or MISP).  The objects
are built with the OASIS ``stix2`` library; per alert record (STIX 2.1, 10 June 2021):

- an ``incident`` SDO (§4.8): name = rule, description = the operator message; otwatch's own details
  (alert id, severity, detector, entity, protocol fields, explanation, score) in a *property extension*
  (§7.3) declared by the ``extension-definition`` SMO :data:`EXTENSION`, not as loose ``x_`` properties;
- an ``observed-data`` SDO (§4.13) with first/last observed and the number of merged events,
  referring to ``ipv4-addr``/``ipv6-addr`` SCOs (§6.4, §6.5) and a ``network-traffic`` SCO (§6.12);
- when the alert names an ATT&CK for ICS technique: one ``attack-pattern`` SDO per technique
  (§4.1, external id ``Txxxx`` in ``mitre-ics-attack``, its tactics as kill-chain phases) and a
  ``sighting`` (§5.2) of it, observed in the observed-data, sighted by the otwatch ``identity`` (§4.7);
- ``related-to`` relationships (§5.1) from the incident to its observed-data and attack pattern.

Identifiers are deterministic: SCOs get the UUIDv5 of §2.9 from ``stix2`` (namespace
``00abedb4-aa42-466c-9c01-fed23315a9b7`` over their ID-contributing properties), SDOs and SROs a
UUIDv5 of the alert id, so exporting the same alerts twice gives the same bundle and re-imports update
rather than duplicate.  Every bundle the tests make passes ``stix2-validator``.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path

from models.alerts import record_techniques
from models.rules import TECHNIQUES, tactics_of, technique_name, technique_url

from .errors import InputError

SCO_NAMESPACE = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")  # STIX 2.1 §2.9
OTWATCH_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/otwatch/otwatch/stix")
# IANA service names (www.iana.org/assignments/service-names-port-numbers) for network-traffic.protocols.
IANA_SERVICE = {"modbus": "mbap", "dnp3": "dnp", "iec104": "iec-104"}
EPOCH = "2026-01-01T00:00:00.000Z"  # created/modified of the fixed objects (identity, extension, techniques)


def add_arguments(p) -> None:
    p.add_argument("--stix", nargs="+", metavar="ALERTS.jsonl", required=True,
                   help="alert records (JSON lines) to export as one STIX 2.1 bundle")
    p.add_argument("-o", "--output", default="-", help="bundle file (default: standard output)")


def _sdo_id(kind: str, key: str) -> str:
    return f"{kind}--{uuid.uuid5(OTWATCH_NAMESPACE, f'{kind}|{key}')}"


def _stix_time(ts: str) -> str:
    """STIX timestamps (§3.2) are RFC 3339 in UTC with a 'Z'; ECS records already are."""
    if not isinstance(ts, str) or not ts.endswith("Z"):
        raise ValueError(f"timestamp not in UTC: {ts}")
    return ts


def _stix():
    try:
        import stix2
    except ImportError:
        raise InputError("STIX export needs the stix2 library: pip install 'otwatch[stix]'") from None
    return stix2


def stix2_errors() -> type:
    return _stix().exceptions.STIXError


def observer_identity(rec: dict):
    """The agent that raised the alert, at its site (``observer.name``, ``labels.site``), as a
    ``system`` identity: what a sighting was sighted by.  None for records without both."""
    agent, site = (rec.get("observer") or {}).get("name"), (rec.get("labels") or {}).get("site")
    if not agent or not site:
        return None
    host = rec["observer"].get("hostname")
    stix2 = _stix()
    return stix2.v21.Identity(
        id=_sdo_id("identity", f"agent|{site}|{agent}"), created=EPOCH, modified=EPOCH, created_by_ref=IDENTITY_ID,
        name=f"{agent} at {site}", identity_class="system",
        description=f"otwatch agent {agent}" + (f" on host {host}" if host else "") + f" at site {site}")


IDENTITY_ID = _sdo_id("identity", "otwatch")
EXTENSION_ID = _sdo_id("extension-definition", "otwatch-alert-1")
EXTENSION_SCHEMA = (
    "otwatch alert properties on an incident (property-extension): alert_id (string, the ECS event.id), "
    "severity (low|medium|high|critical), detector (string), entity (string, what the incident is about), "
    "protocol (modbus|dnp3|iec104|other), provisional (boolean, raised by a baseline entry under review), "
    "count (integer, findings merged), score and threshold (numbers, when score-based), explanation (list of "
    "strings, the features furthest from the baseline), fields (object, the rule's protocol fields as in the "
    "ECS record's otwatch.fields).  Empty values are left out.  Rules: docs/rules.md.")


def identity():
    stix2 = _stix()
    return stix2.v21.Identity(id=IDENTITY_ID, created=EPOCH, modified=EPOCH, name="otwatch", identity_class="system",
                              description="otwatch network anomaly monitoring agent for OT/ICS networks")


def extension_definition():
    stix2 = _stix()
    return stix2.v21.ExtensionDefinition(
        id=EXTENSION_ID, created=EPOCH, modified=EPOCH, created_by_ref=IDENTITY_ID, name="otwatch alert",
        description="otwatch's alert details on STIX incidents", schema=EXTENSION_SCHEMA, version="1.0.0",
        extension_types=["property-extension"])


def attack_pattern(technique: str):
    stix2 = _stix()
    phases = [{"kill_chain_name": "mitre-ics-attack", "phase_name": name.lower().replace(" ", "-")}
              for _, name in tactics_of(technique)]
    return stix2.v21.AttackPattern(
        id=_sdo_id("attack-pattern", technique), created=EPOCH, modified=EPOCH, created_by_ref=IDENTITY_ID,
        name=technique_name(technique), **({"kill_chain_phases": phases} if phases else {}),
        external_references=[{"source_name": "mitre-ics-attack", "external_id": technique,
                              "url": technique_url(technique)}])


def _clean(value):
    """STIX allows neither null nor empty lists, dicts or strings (§3.1): such values are left out."""
    if isinstance(value, dict):
        out = {str(k): _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, (list, tuple)):
        out = [v for v in (_clean(v) for v in value) if v is not None]
        return out or None
    if isinstance(value, str):
        return value or None
    if isinstance(value, float) and not math.isfinite(value):  # NaN, infinity
        return None
    return value


def _address(stix2, ip: str):
    cls = stix2.v21.IPv6Address if ":" in ip else stix2.v21.IPv4Address
    return cls(value=ip)


def alert_objects(rec: dict) -> list:
    """The STIX objects of one ECS alert record (SCOs, observed-data, incident, SROs)."""
    stix2 = _stix()
    ev, ow = rec["event"], rec.get("otwatch", {})
    key = ev["id"]
    created = _stix_time(rec["@timestamp"])
    first, last = _stix_time(ev.get("start", created)), _stix_time(ev.get("end", created))
    common = {"created": created, "modified": created, "created_by_ref": IDENTITY_ID}
    count = max(1, int(ow.get("count", 1)))
    objects = []
    observer = observer_identity(rec)
    if observer is not None:
        objects.append(observer)
    ips = [(rec.get(side) or {}).get("ip") for side in ("source", "destination")]
    src, dst = (_address(stix2, ip) if ip else None for ip in ips)
    refs = []
    for a in (src, dst):
        if a is not None and a.id not in refs:
            objects.append(a)
            refs.append(a.id)
    protocol = rec.get("network", {}).get("protocol")
    if src is not None and dst is not None:
        traffic = {"src_ref": src.id, "dst_ref": dst.id, "start": first,
                   "protocols": [p for p in ("ipv6" if src.type == "ipv6-addr" else "ipv4",
                                             rec.get("network", {}).get("transport", "tcp"),
                                             IANA_SERVICE.get(protocol)) if p]}
        for side, port_key in (("source", "src_port"), ("destination", "dst_port")):
            if rec[side].get("port") is not None:
                traffic[port_key] = int(rec[side]["port"])
        nt = stix2.v21.NetworkTraffic(**traffic)
        objects.append(nt)
        refs.append(nt.id)
    observed = None
    if refs:
        observed = stix2.v21.ObservedData(id=_sdo_id("observed-data", key), **common, first_observed=first,
                                          last_observed=last, number_observed=count, object_refs=refs)
        objects.append(observed)
    details = _clean({"extension_type": "property-extension", "alert_id": key, "severity": ow.get("severity"),
                      "detector": ow.get("detector"), "entity": ow.get("entity"), "protocol": protocol,
                      "provisional": ow.get("provisional"), "count": count, "score": ow.get("score"),
                      "threshold": ow.get("threshold"), "explanation": ow.get("explanation"),
                      "fields": ow.get("fields")})
    labels = [x for x in (ow.get("severity"), ow.get("detector", rec["rule"].get("category"))) if x]
    incident = stix2.v21.Incident(id=_sdo_id("incident", key), **common, name=rec["rule"]["name"],
                                  description=rec.get("message") or rec["rule"]["name"],
                                  **({"labels": labels} if labels else {}), extensions={EXTENSION_ID: details})
    objects.append(incident)
    if observed is not None:
        objects.append(stix2.v21.Relationship(id=_sdo_id("relationship", f"{key}|observed"), **common,
                                              relationship_type="related-to", source_ref=incident.id,
                                              target_ref=observed.id))
    for tid in record_techniques(rec):
        ap_id = _sdo_id("attack-pattern", tid)
        objects.append(stix2.v21.Relationship(id=_sdo_id("relationship", f"{key}|{tid}"), **common,
                                              relationship_type="related-to", source_ref=incident.id,
                                              target_ref=ap_id))
        if observed is not None:
            objects.append(stix2.v21.Sighting(id=_sdo_id("sighting", f"{key}|{tid}"), **common, first_seen=first,
                                              last_seen=last, count=count, sighting_of_ref=ap_id,
                                              observed_data_refs=[observed.id],
                                              where_sighted_refs=[(observer.id if observer is not None
                                                                   else IDENTITY_ID)]))
    return objects


def bundle(records) -> dict:
    """A STIX 2.1 bundle (§8) of ECS alert records, as plain JSON; shared objects (addresses,
    techniques, the identity and the extension definition) once."""
    objects = {}
    for obj in (identity(), extension_definition()):
        objects[obj.id] = obj
    keys = []
    for rec in records:
        keys.append(rec["event"]["id"])
        for tid in record_techniques(rec):
            if tid in TECHNIQUES or tid.startswith("T"):
                ap = attack_pattern(tid)
                objects.setdefault(ap.id, ap)
        try:
            made = alert_objects(rec)
        except (ValueError, KeyError, TypeError, stix2_errors()) as exc:
            raise InputError(f"alert {rec['event'].get('id')}: cannot be made STIX ({exc})") from None
        for obj in made:
            objects.setdefault(obj.id, obj)
    stix2 = _stix()
    b = stix2.v21.Bundle(id=f"bundle--{uuid.uuid5(OTWATCH_NAMESPACE, '|'.join(sorted(keys)))}",
                         objects=list(objects.values()))
    return json.loads(b.serialize())


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
