"""Operator decisions on the baseline (approve / revoke allow-list entries), kept apart from the state.

A running agent rewrites its state at every checkpoint, so ``otwatch baseline approve`` must not edit the
checkpoint under it: it records the decision in ``review.json`` beside the checkpoints, HMAC-signed with
the state key (whoever can write the state directory but lacks the key cannot bless their own traffic).
The agent applies every recorded decision when it loads its state, on SIGHUP and before each checkpoint;
re-applying is harmless, so a decision survives every later checkpoint and restart.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> record(d, {"talker:00000000000000ab": "approved"}, key=b"k" * 32)
>>> read(d, key=b"k" * 32)
{'talker:00000000000000ab': 'approved'}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from .allowlist import STATUS_APPROVED, STATUS_REVOKED
from .state import StateError

REVIEW_FILE = "review.json"
STATUS = {"approved": STATUS_APPROVED, "revoked": STATUS_REVOKED}


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def read(directory, key: bytes) -> dict[str, str]:
    """Entry id -> "approved" | "revoked"; {} when nothing was decided; StateError when the file fails
    its HMAC check."""
    path = Path(directory) / REVIEW_FILE
    try:
        doc = json.loads(path.read_bytes())
        body = json.dumps(doc["decisions"], sort_keys=True).encode()
        ok = hmac.compare_digest(str(doc["hmac"]), _mac(key, body))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: unreadable review file ({exc})") from None
    if not ok:
        raise StateError(f"{path}: review file fails its HMAC check (changed, or written with another key)")
    return {str(k): str(v) for k, v in doc["decisions"].items() if v in STATUS}


def record(directory, decisions: dict[str, str], key: bytes) -> None:
    """Add ``decisions`` to the review file (a later decision on an entry replaces the earlier one)."""
    d = Path(directory)
    merged = read(d, key) | decisions
    body = json.dumps(merged, sort_keys=True).encode()
    tmp = d / f".{REVIEW_FILE}.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(json.dumps({"decisions": merged, "hmac": _mac(key, body)}, sort_keys=True, indent=1).encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / REVIEW_FILE)


def apply(allowlist, decisions: dict[str, str]) -> tuple[int, list[str]]:
    """Set each decided entry's status; returns (applied, ids not in this baseline)."""
    unknown = [i for i, status in decisions.items() if not allowlist.set_status(i, STATUS[status])]
    return len(decisions) - len(unknown), unknown
