"""``otwatch baseline show|approve|revoke [ID...] --state DIR [--key-file F]``: review what was learned.

``show`` prints every allow-list entry (talkers, functions, written and read ranges) with its
status: *trusted*, *provisional* (seen rarely or in one burst while learning: still alerts at low
severity), *approved* or *revoked*.  ``approve ID...`` makes entries trusted for good; ``revoke
ID...`` makes them alert as if never learned.  IDs and options may come in any order.

``DIR`` is either a state saved by ``otwatch replay --state DIR`` (re-saved in place with its HMAC)
or the running agent's ``state.directory`` (checkpoints under a ``current`` link): there the decision
goes to the signed review file (:mod:`models.review`), which the agent applies on SIGHUP
(``systemctl reload otwatch``) and before every checkpoint, so it survives them; ``show`` lists the
current checkpoint with the decisions applied.  The key is ``--key-file``, by default the agent's
(``state.key_file`` of the configuration, else ``$CREDENTIALS_DIRECTORY/state.key`` or
``/etc/otwatch/state.key``) for an agent's directory, and the key saved beside a replay's state.
"""

from __future__ import annotations

import json
from pathlib import Path

from models import review
from models import state as state_io
from models.alerts import iso8601
from models.allowlist import STATUS_APPROVED, STATUS_REVOKED
from models.engine import DetectionEngine

from .errors import InputError

#: cli.main gives positional words found after options to this argument ("approve --state DIR ID").
INTERMIXED = "ids"


def add_arguments(p) -> None:
    p.add_argument("action", choices=("show", "approve", "revoke"))
    p.add_argument("ids", nargs="*", metavar="ID", help="entry ids from `baseline show` (approve/revoke)")
    p.add_argument("--state", required=True, metavar="DIR",
                   help="state directory: written by replay --state, or the agent's state.directory")
    p.add_argument("--key-file", metavar="FILE",
                   help="HMAC key of the state (default: the agent's state key for an agent's directory)")
    p.add_argument("--config", metavar="FILE", help="agent configuration to find the key in (default: "
                   "$OTWATCH_CONFIG or /etc/otwatch/otwatch.toml)")
    p.add_argument("--provisional", action="store_true", help="show only provisional entries")
    p.add_argument("--json", action="store_true", help="print entries as JSON lines")


def _key(args, agent_dir: bool) -> bytes | None:
    if args.key_file:
        path = Path(args.key_file)
    elif agent_dir:
        from . import config as config_mod

        path = config_mod.load(args.config or config_mod.default_config_path()).key_path()
    else:
        return None  # a replay's state: the key saved beside it (or $OTWATCH_STATE_KEY)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the state key ({exc.strerror}); give it with --key-file") from None
    if len(key) < 16:
        raise InputError(f"{path}: expected a key of at least 16 bytes, got {len(key)}")
    return key


def _where(state: Path) -> tuple[Path, bool]:
    """The directory holding the state, and whether it is a running agent's checkpoint."""
    link = state / "current"
    if link.is_symlink():
        target = state / link.readlink()
        if not state_io.exists(target):
            raise InputError(f"{state}: the current checkpoint {target.name} holds no saved state")
        return target, True
    if not state_io.exists(state):
        raise InputError(f"{state}: no saved state (run `otwatch replay CAPTURE --learn ... --state DIR`, "
                         "or give the agent's state.directory)")
    return state, False


def run(args) -> int:
    state = Path(args.state)
    where, agent_dir = _where(state)
    key = _key(args, agent_dir)
    try:
        engine = DetectionEngine.load(where, key=key)
        decided = review.read(state, key) if agent_dir else {}
    except state_io.StateError as exc:
        raise InputError(str(exc)) from None
    al = engine.allowlist
    review.apply(al, decided)
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
    n = f"{len(args.ids)} entr{'y' if len(args.ids) == 1 else 'ies'}"
    if agent_dir:
        review.record(state, {i: args.action + "d" for i in args.ids}, key)
        print(f"{args.action}d {n}: recorded in {state / review.REVIEW_FILE}; the agent applies it on SIGHUP "
              "(systemctl reload otwatch) and at its next checkpoint")
    else:
        engine.save(where, key)
        print(f"{args.action}d {n}")
    return 0
