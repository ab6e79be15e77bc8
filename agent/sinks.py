"""Where alerts go: a durable JSON-lines alert log, and optional copies by syslog (RFC 5424).

The alert log is what a SIEM tails, so an alert once written must survive a crash or a power cut:
every record is written whole, flushed and fsynced before ``write`` returns, and the file is rotated
by size (``alerts.jsonl`` -> ``alerts.jsonl.1`` -> ...) with a rename, never truncated in place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from models.alerts import Alert, observer_fields, record_techniques
from models.safefile import open_append


class AlertLog:
    """Append-only JSON lines, one ECS record per alert, fsynced per record.

    Each record is written whole or not at all: one ``write(2)``, its length checked, then
    ``fsync``; when any step fails (disk full, I/O error) the file is cut back to the end of the last
    good record, the failure counted in :attr:`failed` and ``OSError`` raised, so a retry never glues a
    record onto half of another.  Opening repairs a torn last record the same way (power cut).
    The file is opened with ``O_NOFOLLOW`` and created 0640 (:mod:`models.safefile`); ``owner``
    is given to a file created here, never to one found in place.

    >>> import tempfile, json
    >>> p = os.path.join(tempfile.mkdtemp(), "alerts.jsonl")
    >>> log = AlertLog(p)
    >>> log.write(Alert(rule="r", detector="allowlist", severity="low", first_ts=0, last_ts=0, src="a",
    ...                 dst="b", protocol="modbus", entity="e", message="m"))
    >>> log.close(); json.loads(open(p).readline())["rule"]["name"]
    'r'
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = 64 << 20, backups: int = 5, fsync: bool = True,
                 identity=None, observer: dict | None = None, site: str | None = None, truncate: bool = False,
                 owner: tuple[int, int] | None = None):
        # ``identity`` (agent.site.SiteIdentity) stamps observer.name/hostname and labels.site; ``observer`` is
        # the rest of the ECS observer (default: this host, otwatch's version).  ``path`` "-" is standard
        # output (no rotation, no fsync); ``truncate`` starts the file afresh (a replay's output) where the
        # agent's log appends.
        self.identity = identity
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.fsync = fsync
        self.owner = owner
        self.written = 0
        #: writes that failed (each raised OSError from :meth:`write`; nothing of them is in the file)
        self.failed = 0
        self.observer = observer if observer is not None else default_observer()
        self.site = site
        self._fd = -1
        if str(path) == "-":
            self.max_bytes, self.fsync = 0, False
            self._fd, self._size = os.dup(1), 0
            return
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._open(truncate)

    def _open(self, truncate: bool = False) -> None:
        fd, created = open_append(self.path, owner=self.owner)
        self._fd = fd
        if truncate and not created:
            os.ftruncate(fd, 0)
        self._size = os.fstat(fd).st_size  # the end of the last good record
        if not created:
            self._repair_tail()

    def _repair_tail(self) -> None:
        """A power cut can leave the last record cut short: drop the torn part so the log stays
        one whole JSON record per line."""
        if self._size == 0 or os.pread(self._fd, 1, self._size - 1) == b"\n":
            return
        end = self._size
        good = 0
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(self._fd, end - start, start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                good = start + nl + 1
                break
            end = start
        os.ftruncate(self._fd, good)
        os.fsync(self._fd)
        logging.getLogger(__name__).warning(
            "alert log %s ended in a partial record (power cut?); removed its %d bytes", self.path,
            self._size - good)
        self._size = good

    @property
    def fd(self) -> int:
        return self._fd

    def write(self, alert: Alert | dict) -> None:
        rec = alert.to_ecs(self.observer, self.site) if isinstance(alert, Alert) else alert
        if self.identity is not None:
            rec = self.identity.stamp(rec)
        line = (json.dumps(rec, separators=(",", ":"), default=_jsonable) + "\n").encode()
        if self.max_bytes and self._size + len(line) > self.max_bytes and self._size > 0:
            try:
                self._rotate()
            except OSError:
                self.failed += 1
                raise
        try:
            n = os.write(self._fd, line)  # O_APPEND: one write(2) per record
            if n != len(line):
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(line)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            self.failed += 1
            self._cut_back()
            raise
        self._size += len(line)
        self.written += 1

    def _cut_back(self) -> None:
        """Remove whatever part of a failed record reached the file."""
        if str(self.path) == "-":
            return  # standard output: not ours to cut
        try:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
        except OSError as exc:
            logging.getLogger(__name__).error("alert log %s: cannot remove a partial record: %s", self.path, exc)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._open()
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_observer(name: str | None = None, interface: str | None = None) -> dict:
    """The ECS observer of this agent: host name (or the configured agent name), otwatch's version, and
    the capture interface when live."""
    from . import __version__

    return observer_fields(name=name or None, version=__version__, interface=interface or None)


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


# --- Syslog (RFC 5424) ----------------------------------------------------------------------------------
# RFC 5424 §6.2.1 table 1 (facilities) and table 2 (severities).
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}  # crit, err, warning, notice
# SD-ID "name@PEN" (§7.2.2) needs an IANA private enterprise number; otwatch has none, so the
# default uses 32473, the number RFC 5612 reserves for documentation.  Set your own with sd_id=.
DEFAULT_SD_ID = "otwatch@32473"
NILVALUE = "-"


def _printusascii(text: str, limit: int) -> str:
    """Header fields are PRINTUSASCII (33-126) of bounded length (§6.2.4-6.2.7); NILVALUE if empty."""
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in str(text))[:limit]
    return out or NILVALUE


def _sd_value(value) -> str:
    """PARAM-VALUE escaping, §6.3.3: '"', '\\' and ']' get a backslash."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_name(name: str) -> str:
    return "".join(c for c in name if 33 <= ord(c) <= 126 and c not in '= ]"')[:32]


def rfc5424(alert: Alert | dict, *, facility: int = 16, hostname: str | None = None, app_name: str = "otwatch",
            procid: str | None = None, sd_id: str = DEFAULT_SD_ID, payload: str = "text",
            timestamp: str | None = None) -> bytes:
    """One alert as an RFC 5424 SYSLOG-MSG (no transport framing).

    ``payload="text"`` sends the alert's message; ``"json"`` sends the ECS record as compact JSON.

    >>> a = Alert(rule="allowlist.new_talker", detector="allowlist", severity="high", first_ts=0, last_ts=0,
    ...           src="10.0.0.66", dst="10.0.0.20", protocol="modbus", entity="e", message='new "talker"')
    >>> rfc5424(a, hostname="sensor1", procid="42", timestamp="2026-01-05T08:00:00.000000Z")[:89]
    b'<131>1 2026-01-05T08:00:00.000000Z sensor1 otwatch 42 allowlist.new_talker [otwatch@32473'
    """
    import socket as _socket
    from datetime import datetime, timezone

    rec = alert.to_ecs() if isinstance(alert, Alert) else alert
    ow = rec.get("otwatch", {})
    severity = ow.get("severity", rec.get("log", {}).get("level", "low"))
    pri = facility * 8 + SYSLOG_SEVERITY.get(severity, 5)  # §6.2.1
    if timestamp is None:
        timestamp = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = " ".join((
        f"<{pri}>1", timestamp,  # VERSION 1, TIMESTAMP RFC 3339 (§6.2.3)
        _printusascii(hostname if hostname is not None else
                      rec.get("observer", {}).get("hostname") or _socket.gethostname(), 255),
        _printusascii(app_name, 48),
        _printusascii(procid if procid is not None else os.getpid(), 128),
        _printusascii(rec.get("rule", {}).get("name", ""), 32),  # MSGID: the rule
    ))
    params = {
        "id": rec.get("event", {}).get("id"), "severity": severity, "detector": ow.get("detector"),
        "rule": rec.get("rule", {}).get("name"), "src": rec.get("source", {}).get("ip"),
        "dst": rec.get("destination", {}).get("ip"), "protocol": rec.get("network", {}).get("protocol"),
        "start": rec.get("event", {}).get("start"), "end": rec.get("event", {}).get("end"),
        "count": ow.get("count"),
        "site": rec.get("labels", {}).get("site"), "agent": rec.get("observer", {}).get("name"),
        "technique": next(iter(record_techniques(rec)), None),
    }
    sd = "[" + " ".join([_sd_name(sd_id)] + [f'{_sd_name(k)}="{_sd_value(v)}"' for k, v in params.items()
                                             if v not in (None, "")]) + "]"
    if payload == "json":
        msg = json.dumps(rec, separators=(",", ":"), default=_jsonable)
    else:
        msg = rec.get("message", "")
    # §6.4: MSG in UTF-8 starts with the BOM.
    return f"{header} {sd} ".encode() + b"\xef\xbb\xbf" + msg.encode("utf-8")


class SyslogSink:
    """Sends alerts as RFC 5424 messages: UDP (RFC 5426), TCP or TLS (RFC 6587 / RFC 5425 octet
    counting), or a local UNIX datagram socket such as ``/dev/log``.

    Syslog is a copy for the SIEM, not the record: the :class:`AlertLog` is.  A failed send is
    retried once on a fresh connection, then counted in :attr:`errors` and logged; it never raises
    into the pipeline.
    """

    def __init__(self, address: str | tuple = ("127.0.0.1", 514), transport: str = "udp",
                 facility: str | int = "local0", hostname: str | None = None, sd_id: str = DEFAULT_SD_ID,
                 payload: str = "text", ssl_context=None, timeout: float = 5.0):
        if transport not in ("udp", "tcp", "tls", "unix"):
            raise ValueError(f"syslog transport {transport!r}: expected udp, tcp, tls or unix")
        if isinstance(facility, str):
            if facility not in SYSLOG_FACILITIES:
                raise ValueError(f"syslog facility {facility!r}: expected one of {', '.join(SYSLOG_FACILITIES)}")
            facility = SYSLOG_FACILITIES[facility]
        if payload not in ("text", "json"):
            raise ValueError(f"syslog payload {payload!r}: expected text or json")
        self.address, self.transport, self.facility = address, transport, int(facility)
        self.hostname, self.sd_id, self.payload = hostname, sd_id, payload
        self.ssl_context, self.timeout = ssl_context, timeout
        self.sent = 0
        self.errors = 0
        self._sock = None

    def _connect(self):
        import socket as _socket
        import ssl as _ssl

        if self.transport == "unix":
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            s.connect(self.address)
            return s
        host, port = self.address
        if self.transport == "udp":
            family = _socket.getaddrinfo(host, port, type=_socket.SOCK_DGRAM)[0][0]
            s = _socket.socket(family, _socket.SOCK_DGRAM)
            s.connect((host, port))
            return s
        s = _socket.create_connection((host, port), timeout=self.timeout)
        if self.transport == "tls":
            ctx = self.ssl_context or _ssl.create_default_context()
            s = ctx.wrap_socket(s, server_hostname=host)
        return s

    def send(self, alert: Alert | dict) -> bool:
        msg = rfc5424(alert, facility=self.facility, hostname=self.hostname, sd_id=self.sd_id,
                      payload=self.payload)
        if self.transport in ("tcp", "tls"):
            msg = f"{len(msg)} ".encode() + msg  # RFC 6587 §3.4.1 octet counting
        for attempt in (1, 2):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(msg)
                self.sent += 1
                return True
            except OSError as exc:
                self._close_socket()
                if attempt == 2:
                    self.errors += 1
                    logging.getLogger(__name__).warning("syslog %s %s: %s", self.transport, self.address, exc)
        return False

    write = send

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        self._close_socket()


class AlertSinks:
    """The alert log first (durable, raises on failure), then the optional copies (syslog).

    ``on_error(sink_name)`` is called for each copy a sink failed to deliver (the metrics count it).
    """

    def __init__(self, log: AlertLog | None = None, copies=(), on_error=None, identity=None):
        self.log, self.copies, self.on_error = log, list(copies), on_error
        self.identity = identity  # stamped once, so the log and every copy carry the same names
        self.written = 0

    def write(self, alert: Alert | dict) -> None:
        if self.identity is not None:
            alert = self.identity.stamp(alert.to_ecs() if isinstance(alert, Alert) else alert)
        if self.log is not None:
            self.log.write(alert)
        self.written += 1
        for sink in self.copies:
            if sink.send(alert) is False and self.on_error is not None:
                self.on_error(getattr(sink, "name", "syslog"))

    def close(self) -> None:
        for sink in [self.log, *self.copies]:
            if sink is not None:
                sink.close()
