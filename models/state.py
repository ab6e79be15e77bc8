"""Saving what was learned: data formats only (JSON + ``.npz``), in an HMAC-SHA256 envelope.

A state directory holds ``state.json`` (metadata, allow-list descriptions, periods) and
``state.npz`` (arrays, loaded with ``allow_pickle=False``), plus ``state.hmac``: the HMAC of both
files under the caller's key, else ``$OTWATCH_STATE_KEY``, else the key file ``DIR.key`` *beside*
the directory (created mode 0600, owned by the user running otwatch).  The key is never kept in
the directory it protects: whoever can write there could otherwise swap in a baseline and the key
that blesses it.  A state that fails the check is refused; nothing here ever unpickles.  Files are
written 0640 with ``O_NOFOLLOW`` (:mod:`models.safefile`).

Older versions kept the key in ``DIR/key``; it is still read, with a warning, when both the
directory and the key are the current user's and nobody else can write them.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> save(d, {"a": np.arange(3)}, {"x": 1})
>>> arrays, meta = load(d); arrays["a"].tolist(), meta["x"]
([0, 1, 2], 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

import numpy as np

from .safefile import KEY_MODE, UnsafeFile, read_secret, write_new, write_new_exclusive

log = logging.getLogger(__name__)


class StateError(Exception):
    """The saved state is missing, damaged or was changed by someone without the key."""


def key_path(directory) -> Path:
    """Where the key of a state directory is kept by default: ``DIR.key`` beside ``DIR``.

    >>> str(key_path("/var/tmp/st/"))
    '/var/tmp/st.key'
    """
    d = Path(os.path.abspath(directory))
    return d.with_name(d.name + ".key")


def _old_key(directory: Path) -> bytes | None:
    """The key of the old layout (``DIR/key``), when nobody but this user could have put it there."""
    kf = directory / "key"
    try:
        dst, kst = os.stat(directory), os.lstat(kf)
    except OSError:
        return None
    uid = os.geteuid()
    if dst.st_uid != uid or dst.st_mode & 0o022 or not stat.S_ISREG(kst.st_mode) or kst.st_uid != uid \
            or kst.st_mode & 0o077:
        log.warning("%s: ignoring a key inside the state directory (others could have written it); "
                    "the key now lives in %s", kf, key_path(directory))
        return None
    log.warning("%s: key inside the state directory (old layout); move it out: mv %s %s", kf, kf,
                key_path(directory))
    return read_secret(kf, "state key", owner_uid=uid)


def _key(directory: Path, key: bytes | None, create: bool) -> bytes:
    if key:
        return key
    env = os.environ.get("OTWATCH_STATE_KEY")
    if env:
        return env.encode()
    kf = key_path(directory)
    try:
        return read_secret(kf, "state key", owner_uid=os.geteuid())
    except FileNotFoundError:
        pass
    except UnsafeFile as exc:
        raise StateError(exc.strerror) from None
    except OSError as exc:
        raise StateError(f"{kf}: cannot read the state key ({exc.strerror})") from None
    old = _old_key(directory)
    if old is not None:
        return old
    if not create:
        raise StateError(f"{kf}: no key to check the saved state with (set OTWATCH_STATE_KEY)")
    k = secrets.token_hex(32).encode()
    try:
        write_new_exclusive(kf, k, KEY_MODE)
    except OSError as exc:
        raise StateError(f"{kf}: cannot create the state key ({exc.strerror}); "
                         "set OTWATCH_STATE_KEY or make the directory's parent writable") from None
    return k


def _mac(key: bytes, meta: bytes, arrays: bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (meta, arrays):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_new(tmp, data)  # a fresh 0640 file: a symlink or file planted at .tmp is replaced, not followed
    os.replace(tmp, path)


_deferred = threading.local()


@contextlib.contextmanager
def deferred_writes():
    """Within the block, :func:`save` only serialises (what was learned, as JSON and ``.npz``
    bytes: a consistent snapshot taken on the calling thread) and records the write; the yielded
    list then holds ``write(directory)`` callables that put the files under ``directory`` -- from
    another thread, so the disk's fsync latency never stalls the thread that learns.  Directories
    given to :func:`save` must be relative (they are taken relative to that ``directory``).

    >>> import tempfile
    >>> with deferred_writes() as writes:
    ...     save(".", {"a": np.arange(2)}, {"x": 1}, key=b"k" * 16)
    >>> d = tempfile.mkdtemp(); [w(d) for w in writes] and load(d, key=b"k" * 16)[1]
    {'x': 1}
    """
    writes: list = []
    _deferred.writes = writes
    try:
        yield writes
    finally:
        _deferred.writes = None


def save(directory, arrays: dict, meta: dict, key: bytes | None = None) -> None:
    meta_b = json.dumps(meta, sort_keys=True, default=_plain).encode()
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(v) for name, v in arrays.items()})
    arr_b = buf.getvalue()
    writes = getattr(_deferred, "writes", None)
    if writes is not None:
        rel = Path(directory)
        if rel.is_absolute() or not key:
            raise ValueError("deferred saves take a relative directory and an explicit key")
        writes.append(lambda base: _save_bytes(Path(base) / rel, meta_b, arr_b, key))
        return
    _save_bytes(Path(directory), meta_b, arr_b, key)


def _save_bytes(d: Path, meta_b: bytes, arr_b: bytes, key: bytes | None) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o750)
    k = _key(d, key, create=True)
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
