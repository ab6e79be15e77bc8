"""Where alerts go: a durable JSON-lines alert log (more sinks are added beside it).

The alert log is what a SIEM tails, so an alert once written must survive a crash or a power cut:
every record is written whole, flushed and fsynced before ``write`` returns, and the file is rotated
by size (``alerts.jsonl`` -> ``alerts.jsonl.1`` -> ...) with a rename, never truncated in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from models.alerts import Alert


class AlertLog:
    """Append-only JSON lines, one ECS record per alert, fsynced per record.

    >>> import tempfile, json
    >>> p = os.path.join(tempfile.mkdtemp(), "alerts.jsonl")
    >>> log = AlertLog(p)
    >>> log.write(Alert(rule="r", detector="allowlist", severity="low", first_ts=0, last_ts=0, src="a",
    ...                 dst="b", protocol="modbus", entity="e", message="m"))
    >>> log.close(); json.loads(open(p).readline())["rule"]["name"]
    'r'
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = 64 << 20, backups: int = 5, fsync: bool = True):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.fsync = fsync
        self.written = 0
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=0)

    def write(self, alert: Alert | dict) -> None:
        rec = alert.to_ecs() if isinstance(alert, Alert) else alert
        line = (json.dumps(rec, separators=(",", ":"), default=_jsonable) + "\n").encode()
        if self.max_bytes and self._fh.tell() + len(line) > self.max_bytes and self._fh.tell() > 0:
            self._rotate()
        self._fh.write(line)  # unbuffered: one write(2) per record
        if self.fsync:
            os.fsync(self._fh.fileno())
        self.written += 1

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._fh = open(self.path, "ab", buffering=0)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj):
    """NumPy scalars and other odd values in protocol fields become plain JSON."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)
