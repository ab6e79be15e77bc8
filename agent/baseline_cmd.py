"""``otwatch baseline show|approve|revoke --state DIR``: review what the agent learned.

``show`` prints every allow-list entry (talkers, functions, written and read ranges) with its
status: *trusted*, *provisional* (seen rarely or in one burst while learning: still alerts at low
severity), *approved* or *revoked*.  ``approve ID...`` makes entries trusted for good; ``revoke
ID...`` makes them alert as if never learned.  The state is re-saved with its HMAC.
"""

from __future__ import annotations

import json

from models import state as state_io
from models.alerts import iso8601
from models.engine import DetectionEngine
from models.allowlist import STATUS_APPROVED, STATUS_REVOKED

from .errors import InputError


def add_arguments(p) -> None:
    p.add_argument("action", choices=("show", "approve", "revoke"))
    p.add_argument("ids", nargs="*", metavar="ID", help="entry ids from `baseline show` (approve/revoke)")
    p.add_argument("--state", required=True, metavar="DIR", help="state directory written by replay --state")
    p.add_argument("--provisional", action="store_true", help="show only provisional entries")
    p.add_argument("--json", action="store_true", help="print entries as JSON lines")


def run(args) -> int:
    if not state_io.exists(args.state):
        raise InputError(f"{args.state}: no saved state (run `otwatch replay CAPTURE --learn ... --state DIR`)")
    try:
        engine = DetectionEngine.load(args.state)
    except state_io.StateError as exc:
        raise InputError(str(exc)) from None
    al = engine.allowlist
    if args.action == "show":
        for e in al.entries():
            if args.provisional and e["status"] != "provisional":
                continue
            if args.json:
                print(json.dumps(e))
                continue
            what = f"{e.get('client', '?')} -> {e.get('server', '?')} {e.get('protocol', '')}"
            if e["table"] not in ("talker", "talker_role"):
                what += f" unit {e.get('unit')} {e.get('direction')} {e.get('function')}"
            if e["table"].startswith(("write", "read")):
                what += f" address {e.get('address')} count {e.get('pdu_count')}"
            print(f"{e['id']}  {e['status']:<11} {e['count']:>7}x  {iso8601(e['first_ts'])[:19]}.."
                  f"{iso8601(e['last_ts'])[11:19]}  {what}")
        return 0
    if not args.ids:
        raise InputError(f"baseline {args.action}: give the ids of the entries (see `otwatch baseline show`)")
    status = STATUS_APPROVED if args.action == "approve" else STATUS_REVOKED
    missing = [i for i in args.ids if not al.set_status(i, status)]
    if missing:
        raise InputError(f"no such baseline entry: {', '.join(missing)}")
    engine.save(args.state)
    print(f"{args.action}d {len(args.ids)} entr{'y' if len(args.ids) == 1 else 'ies'}")
    return 0
