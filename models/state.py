"""Saving what was learned: data formats only (JSON + ``.npz``), in an HMAC-SHA256 envelope.

A state directory holds ``state.json`` (metadata, allow-list descriptions, periods) and
``state.npz`` (arrays, loaded with ``allow_pickle=False``), plus ``state.hmac``: the HMAC of both
files under a key from ``$OTWATCH_STATE_KEY`` or the ``key`` file created beside them (mode 0600).
A state that fails the check is refused (an attacker who can replace it could otherwise bless
their own traffic); nothing here ever unpickles.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> save(d, {"a": np.arange(3)}, {"x": 1})
>>> arrays, meta = load(d); arrays["a"].tolist(), meta["x"]
([0, 1, 2], 1)
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
from pathlib import Path

import numpy as np


class StateError(Exception):
    """The saved state is missing, damaged or was changed by someone without the key."""


def _key(directory: Path, key: bytes | None, create: bool) -> bytes:
    if key:
        return key
    env = os.environ.get("OTWATCH_STATE_KEY")
    if env:
        return env.encode()
    kf = directory / "key"
    if kf.exists():
        return kf.read_bytes()
    if not create:
        raise StateError(f"{kf}: no key to check the saved state with (set OTWATCH_STATE_KEY)")
    k = secrets.token_hex(32).encode()
    fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(k)
    return k


def _mac(key: bytes, meta: bytes, arrays: bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (meta, arrays):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(directory, arrays: dict, meta: dict, key: bytes | None = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    k = _key(d, key, create=True)
    meta_b = json.dumps(meta, sort_keys=True, default=_plain).encode()
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(v) for name, v in arrays.items()})
    arr_b = buf.getvalue()
    _write(d / "state.json", meta_b)
    _write(d / "state.npz", arr_b)
    _write(d / "state.hmac", _mac(k, meta_b, arr_b).encode())


def load(directory, key: bytes | None = None) -> tuple[dict, dict]:
    d = Path(directory)
    try:
        meta_b = (d / "state.json").read_bytes()
        arr_b = (d / "state.npz").read_bytes()
        mac = (d / "state.hmac").read_bytes().decode().strip()
    except OSError as exc:
        raise StateError(f"{d}: no saved state ({exc.strerror}: {exc.filename})") from None
    k = _key(d, key, create=False)
    if not hmac.compare_digest(mac, _mac(k, meta_b, arr_b)):
        raise StateError(f"{d}: saved state fails its HMAC check (changed, damaged or another key)")
    with np.load(io.BytesIO(arr_b), allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    return arrays, json.loads(meta_b)


def exists(directory) -> bool:
    d = Path(directory)
    return all((d / n).exists() for n in ("state.json", "state.npz", "state.hmac"))


def _plain(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return str(obj)
