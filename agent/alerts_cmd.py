"""``otwatch alerts FILE...``: the alert log as a table people read, filtered.

The agent writes an incident when it opens and again, with the same ``event.id``, when it closes;
this command shows the latest record of each.  Filters: ``--severity S`` (S and above), ``--rule R``
(a rule, a detector prefix such as ``allowlist``, or a glob), ``--host H`` (an address or network
on either side), ``--since/--until`` (incidents overlapping that time).  ``--json`` prints the
matching records as JSON lines instead (to pipe into ``jq`` or ``otwatch export``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import shutil
import sys
from datetime import datetime, timezone

from models.alerts import SEVERITIES, record_techniques

from .errors import InputError
from .eval import parse_time  # one grammar for times: --learn-until, --since, --until

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="alert log(s) (JSON lines, ECS); - for standard input")
    p.add_argument("--severity", choices=SEVERITIES, help="only alerts of this severity or higher")
    p.add_argument("--rule", metavar="R", help="rule name, detector prefix (allowlist) or glob (process.*)")
    p.add_argument("--host", metavar="H", help="address or network (10.20.0.0/24) on either side")
    p.add_argument("--since", metavar="T", help="incidents still going at or after T (ISO 8601 UTC or epoch s)")
    p.add_argument("--until", metavar="T", help="incidents started at or before T")
    p.add_argument("--json", action="store_true", help="matching records as JSON lines")


def _ts(text) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def read(paths) -> list[dict]:
    """The latest record of each incident (by ``event.id``), in order of start time."""
    from .export_cmd import read_records

    records = []
    for path in paths:
        if path == "-":
            records += [json.loads(line) for line in sys.stdin if line.strip()]
        else:
            records += read_records([path])
    latest: dict = {}
    for rec in records:
        latest[rec["event"]["id"]] = rec  # later lines are later states of the same incident
    return sorted(latest.values(), key=lambda r: (r["@timestamp"], r["event"]["id"]))


def severity(rec: dict) -> str:
    return (rec.get("otwatch") or {}).get("severity") or "low"


def hosts(rec: dict) -> list[str]:
    out = [(rec.get(side) or {}).get("ip") for side in ("source", "destination")]
    out += (rec.get("related") or {}).get("ip", [])
    return [h for h in dict.fromkeys(out) if h]


def matcher(args):
    """A predicate over records from the filter arguments."""
    min_rank = SEVERITY_RANK[args.severity] if args.severity else 0
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    net = None
    if args.host:
        try:
            net = ipaddress.ip_network(args.host, strict=False)
        except ValueError:
            raise InputError(f"--host {args.host!r}: not an address or network") from None

    def ok(rec: dict) -> bool:
        if SEVERITY_RANK.get(severity(rec), 0) < min_rank:
            return False
        rule = rec["rule"]["name"]
        if args.rule and not (rule == args.rule or rule.startswith(args.rule + ".")
                              or fnmatch.fnmatchcase(rule, args.rule)):
            return False
        if net is not None and not any(_in(h, net) for h in hosts(rec)):
            return False
        start = _ts(rec["event"].get("start", rec["@timestamp"]))
        end = _ts(rec["event"].get("end")) or start
        if since is not None and end is not None and end < since:
            return False
        if until is not None and start is not None and start > until:
            return False
        return True

    return ok


def _in(host: str, net) -> bool:
    try:
        return ipaddress.ip_address(host) in net
    except ValueError:
        return False


def when(rec: dict) -> str:
    t = _ts(rec["@timestamp"])
    return "?" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def who(rec: dict) -> str:
    src = (rec.get("source") or {}).get("ip") or ("many" if "many>" in str(rec.get("otwatch", {}).get("entity"))
                                                  else "-")
    dst = (rec.get("destination") or {}).get("ip")
    if not dst:
        servers = (rec.get("otwatch", {}).get("fields") or {}).get("servers")
        dst = f"{len(servers)} hosts" if isinstance(servers, list) and len(servers) > 1 else "-"
    return f"{src} -> {dst}"


def format_line(rec: dict, width: int | None = None) -> str:
    """One alert as one line: time, severity, rule, who, technique, message.

    >>> from models.alerts import Alert
    >>> a = Alert(rule="cycle.latency", detector="cycle", severity="medium", first_ts=0, last_ts=0,
    ...           src="10.0.0.1", dst="10.0.0.2", protocol="modbus", entity="e", message="slow", technique="T0830")
    >>> format_line(a.to_ecs(), 200)
    '1970-01-01 00:00:00  MEDIUM    cycle.latency             10.0.0.1 -> 10.0.0.2             T0830  slow'
    """
    tech = ",".join(record_techniques(rec)) or "-"
    line = (f"{when(rec)}  {severity(rec).upper():<8}  {rec['rule']['name']:<24}  {who(rec):<31}  {tech:<5}  "
            f"{rec.get('message', '')}")
    if width and len(line) > width:
        line = line[: max(width - 1, 20)] + "…"
    return line


def format_table(records: list[dict], width: int | None = None) -> str:
    head = f"{'start (UTC)':<19}  {'severity':<8}  {'rule':<24}  {'source -> destination':<31}  {'ATT&CK':<5}  message"
    lines = [head] + [format_line(r, width) for r in records]
    by_sev = {s: sum(severity(r) == s for r in records) for s in reversed(SEVERITIES)}
    lines.append(f"{len(records)} alert(s): " + ", ".join(f"{k} {v}" for k, v in by_sev.items() if v))
    return "\n".join(lines)


def run(args) -> int:
    records = [r for r in read(args.files) if matcher(args)(r)]
    if args.json:
        for r in records:
            sys.stdout.write(json.dumps(r, separators=(",", ":")) + "\n")
        return 0
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else None
    print(format_table(records, width))
    return 0
