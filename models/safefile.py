"""Opening the files otwatch writes so that whoever can write their directory cannot turn the agent
against another file, and reading secrets only from files nobody else can read.

The agent may start as root and write into directories its service user owns (the alert log's,
the state directory).  That user could put a symlink (or a FIFO) where the agent expects its file:
every open here uses ``O_NOFOLLOW`` (a symlink at the final component is refused, ELOOP) and
``O_CLOEXEC``, checks with ``fstat`` that the result is a regular file with one link, creates new
files 0640 (0600 for keys) and hands ownership over only with ``fchown`` on a file it has just
created itself (``O_EXCL``), never by path.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> fd, created = open_append(os.path.join(d, "log")); created, oct(os.fstat(fd).st_mode & 0o777)
(True, '0o640')
>>> os.close(fd)
>>> os.symlink("/etc/passwd", os.path.join(d, "link"))
>>> open_append(os.path.join(d, "link"))
Traceback (most recent call last):
...
models.safefile.UnsafeFile: .../link: is a symbolic link; refusing to follow it
"""

from __future__ import annotations

import errno
import os
import stat

FILE_MODE = 0o640
KEY_MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class UnsafeFile(OSError):
    """A path the agent refuses to write or trust (a symlink, not a regular file, readable by others)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _checked(fd: int, path) -> int:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
        raise UnsafeFile(errno.EPERM, f"{path}: {what}; refusing to write to it")
    return fd


def _open(path, flags: int, mode: int) -> int:
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang the agent (it is then refused)
        return os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(errno.ELOOP, f"{path}: is a symbolic link; refusing to follow it") from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader
            raise UnsafeFile(errno.ENXIO, f"{path}: not a regular file; refusing to write to it") from None
        raise


def _blocking(fd: int) -> int:
    os.set_blocking(fd, True)
    return fd


def open_append(path, mode: int = FILE_MODE, owner: tuple[int, int] | None = None) -> tuple[int, bool]:
    """An ``O_RDWR|O_APPEND`` descriptor on ``path`` and whether this call created the file.

    A new file gets ``mode`` and, if ``owner`` is given, that owner (``fchown`` on the new file);
    an existing one keeps its owner and mode.
    """
    try:
        fd = _open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        fd = _checked(_open(path, os.O_RDWR | os.O_APPEND, 0), path)
        return _blocking(fd), False
    fd = _checked(fd, path)
    os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any beyond ``mode``
    if owner is not None:
        os.fchown(fd, *owner)
    return _blocking(fd), True


def create_new(path, mode: int = FILE_MODE) -> int:
    """A write descriptor on a file this call creates (an existing file or link at ``path`` is
    removed first: the caller owns the name, e.g. a ``.tmp`` beside its target)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = _checked(_open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), path)
    os.fchmod(fd, mode)
    return _blocking(fd)


def write_new(path, data: bytes, mode: int = FILE_MODE) -> None:
    """``data`` into a new file at ``path``, fsynced."""
    fd = create_new(path, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_new_exclusive(path, data: bytes, mode: int = KEY_MODE) -> None:
    """``data`` into a file that must not exist yet (``O_EXCL``: never replaces or follows anything)."""
    fd = _checked(_open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), path)
    os.fchmod(fd, mode)
    with os.fdopen(_blocking(fd), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_secret(path, what: str, owner_uid: int | None = None) -> bytes:
    """The content of a key or password file, refused when group or others may read or write it
    (or, with ``owner_uid``, when someone else owns it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(errno.EPERM, f"{what}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UnsafeFile(errno.EPERM, f"{what}: {path} is readable or writable by group or others "
                                          f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
        if owner_uid is not None and st.st_uid != owner_uid:
            raise UnsafeFile(errno.EPERM, f"{what}: {path} is owned by uid {st.st_uid}, not {owner_uid}; "
                                          "refusing a key someone else could have written")
        return fh.read()
