"""The agent's configuration: one TOML file (stdlib :mod:`tomllib`), checked before anything starts.

Every key has a default chosen for a small box on a substation SPAN port, so a file holding only
``[capture] interface = "eth1"`` is a working configuration.  Sections and keys are declared as
data (one dataclass per section, each field with a ``kind`` and a one-line ``help``), the way dpkt
declares header fields; :func:`load` walks the TOML document against them and the first problem
becomes one :class:`~agent.errors.InputError` line naming the key and what was expected, which the
CLI prints with exit status 2:

>>> parse_text('[capture]\\nports = [502, "x"]\\n')
Traceback (most recent call last):
...
agent.errors.InputError: capture.ports: expected a list of port numbers 1-65535, got [502, "x"] (line 2)

>>> cfg = parse_text('[capture]\\ninterface = "eth1"\\n[detection]\\nlearning_period = "3d"\\n')
>>> cfg.capture.interface, cfg.detection.learning_period, cfg.state.checkpoint_interval
('eth1', 259200.0, 300.0)

Durations are a number of seconds or a string with a unit (``"90s"``, ``"15m"``, ``"12h"``,
``"14d"``); sizes are a number of bytes or a string with a binary unit (``"64MiB"``, ``"1GiB"``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

DEFAULT_PATH = "/etc/otwatch/otwatch.toml"
DETECTORS = ["allowlist", "process", "cycle", "parser", "river", "pyod", "sessions", "sequence", "state", "wire"]  # models.engine.DETECTORS
# On the edge box: the models that carry detection (docs/detection.md, ablation) in ~90 MB resident;
# River and PyOD pull in scikit-learn/SciPy/Numba (~190-270 MB) and found 1 and 0 of 84 held-out attacks
# on their own.  Add them where memory allows; replay and eval run all of them.  The sequence and
# replayed-state models (NumPy only, ~5 MB) find what no rule can, and the wire detector (L2-L4: ARP
# spoofing, relays, scans) needs no ICS parsing: they run on the edge too.
EDGE_DETECTORS = ["allowlist", "process", "cycle", "parser", "sessions", "sequence", "state", "wire"]
ICS_PORTS = [502, 2404, 20000]  # Modbus/TCP, IEC 60870-5-104 (§10.2), DNP3 (IEEE 1815 §A.1)


def _opt(default, kind: str, help: str, **extra):  # noqa: A002 - "help" reads best in the tables
    """A config field: its default, how to read it (``kind``) and the one-line help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"kind": kind, "help": help, **extra})
    return field(default=default, metadata={"kind": kind, "help": help, **extra})


# -- sections ------------------------------------------------------------------------------------
@dataclass
class Capture:
    interface: str = _opt("", "iface", "network interface on the SPAN/mirror port (or --iface)")
    ports: list = _opt(ICS_PORTS, "ports", "TCP/UDP ports passed by the kernel filter (empty list: all); ARP and TCP SYN/RST always pass")
    snaplen: int = _opt(65535, "int", "bytes kept per frame", min=64, max=262144)
    ring_block_size: int = _opt(1 << 20, "size", "AF_PACKET ring block size (power of two)", min=4096,
                                max=1 << 28, power_of_two=True)
    ring_blocks: int = _opt(32, "int", "AF_PACKET ring blocks (ring memory = blocks x block size)", min=2,
                            max=4096)
    block_timeout: float = _opt(0.1, "duration", "longest a part-filled ring block waits before it is "
                                "handed over", min=0.001, max=10)
    promiscuous: bool = _opt(True, "bool", "put the interface in promiscuous mode (a SPAN port needs it)")
    compiled_parsers: bool = _opt(False, "bool", "parse through the Numba-compiled batch paths: 3-10x the parser "
                                  "throughput, for ~160 MB more resident memory and ~20 s of compiling at the "
                                  "first start (cached)")


@dataclass
class Detection:
    learning_period: float = _opt(7 * 86400.0, "duration", "how long to learn before monitoring", min=0)
    learning_clock: str = _opt("wall", "choice", "what measures the learning period: wall (the agent's "
                               "clock) or capture (frame timestamps, as `otwatch replay --learn`)",
                               choices=("wall", "capture"))
    detectors: list = _opt(list(EDGE_DETECTORS), "detectors", "detectors that raise alerts (add \"river\", "
                           "\"pyod\" where memory allows: +100-180 MB)")
    alerts_per_hour: float = _opt(0.5, "float", "false alarms per hour each score-based detector may raise on "
                                  "traffic like the learning period's (calibrates the thresholds)", min=0, max=3600)
    alert_cooldown: float = _opt(60.0, "duration", "an incident closes after this long without a new finding",
                                 min=0)
    min_count: int = _opt(3, "int", "sightings before a learned allow-list entry is trusted", min=1,
                          max=1_000_000)
    min_span: float = _opt(60.0, "duration", "an entry seen only within this span stays provisional", min=0)


@dataclass
class State:
    directory: str = _opt("/var/lib/otwatch", "path", "where learned state is checkpointed")
    checkpoint_interval: float = _opt(300.0, "duration", "time between checkpoints", min=1)
    key_file: str = _opt("", "path", "HMAC key over the state, kept apart from it (default: "
                         "$CREDENTIALS_DIRECTORY/state.key, else /etc/otwatch/state.key)")


@dataclass
class Alerts:
    log: str = _opt("/var/log/otwatch/alerts.jsonl", "path", "JSON-lines alert log (ECS records)")
    max_bytes: int = _opt(64 << 20, "size", "rotate the alert log at this size", min=0)
    backups: int = _opt(5, "int", "rotated alert logs kept", min=0, max=1000)
    fsync: bool = _opt(True, "bool", "fsync every alert record (survives a power cut)")
    syslog: str = _opt("", "syslog", "also send each alert to a SIEM as RFC 5424 syslog: udp://HOST:PORT, "
                       "tcp://HOST:PORT, tls://HOST:PORT or unix:///dev/log (empty: off)")
    syslog_facility: str = _opt("local0", "choice", "syslog facility of the alert messages",
                                choices=("kern", "user", "daemon", "auth", "local0", "local1", "local2", "local3",
                                         "local4", "local5", "local6", "local7"))
    syslog_payload: str = _opt("text", "choice", "syslog message body: the alert sentence or the ECS JSON record",
                               choices=("text", "json"))


@dataclass
class Metrics:
    listen: str = _opt("127.0.0.1:10502", "listen", "Prometheus endpoint HOST:PORT (empty string: off)")
    tls_cert: str = _opt("", "path", "serve metrics over TLS with this certificate")
    tls_key: str = _opt("", "path", "private key of tls_cert")
    auth_file: str = _opt("", "path", "require HTTP basic auth; file of user:password lines")


@dataclass
class Limits:
    max_flows: int = _opt(20000, "int", "TCP flows tracked at once; the oldest idle one is evicted past it",
                          min=16, max=10_000_000)
    flow_idle_timeout: float = _opt(600.0, "duration", "a flow idle this long is forgotten", min=1)
    capture_queue: int = _opt(64, "int", "frame batches waiting for processing; a full queue drops (and "
                              "counts) batches rather than stall capture", min=1, max=100_000)
    alert_queue: int = _opt(1024, "int", "alert batches waiting for export", min=1, max=1_000_000)
    max_assets: int = _opt(4096, "int", "assets kept in the inventory; past it new ones are counted, not kept",
                           min=16, max=10_000_000)
    max_conversations: int = _opt(16384, "int", "conversations kept in the inventory; past it new ones are "
                                  "counted, not kept", min=16, max=10_000_000)
    max_baseline_entries: int = _opt(20000, "int", "entries of each allow-list table; past it new items are "
                                     "counted, not learned, and the baseline is reported incomplete (a flood "
                                     "while learning)", min=100, max=10_000_000)


@dataclass
class Daemon:
    user: str = _opt("otwatch", "str", "drop root to this user after opening the capture socket "
                     "(empty: stay as started; ignored when not started as root)")
    group: str = _opt("", "str", "group to drop to (empty: the user's primary group)")
    log_level: str = _opt("info", "choice", "stderr log level", choices=("debug", "info", "warning", "error"))


@dataclass
class Identity:
    site: str = _opt("default", "name", "the site (substation, plant) this agent watches: labels.site in alert records, "
                     "syslog and otwatch_agent_info; the central Prometheus adds it as a target label")
    agent: str = _opt("", "name", "this agent's name: observer.name in alert records (empty: the host name)",
                      empty=True)


@dataclass
class Config:
    capture: Capture = field(default_factory=Capture)
    detection: Detection = field(default_factory=Detection)
    state: State = field(default_factory=State)
    alerts: Alerts = field(default_factory=Alerts)
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = field(default_factory=Limits)
    daemon: Daemon = field(default_factory=Daemon)
    identity: Identity = field(default_factory=Identity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_path(self) -> Path:
        """Where the state HMAC key is read from (see :attr:`State.key_file`)."""
        if self.state.key_file:
            return Path(self.state.key_file)
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            return Path(creds) / "state.key"
        return Path("/etc/otwatch/state.key")


SECTIONS = {f.name: f.type if not isinstance(f.type, str) else globals()[f.type]
            for f in dataclasses.fields(Config)}


# -- reading values ------------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|kB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 10**3, "MB": 10**6,
               "GB": 10**9}


def parse_duration(value) -> float:
    """Seconds from a number or ``"90s"``, ``"15m"``, ``"12h"``, ``"14d"``, ``"2w"``.

    >>> parse_duration("15m"), parse_duration(2.5), parse_duration("250ms")
    (900.0, 2.5, 0.25)
    """
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value) -> int:
    """Bytes from a number or ``"64MiB"``, ``"512KiB"``, ``"1GB"``.

    >>> parse_size("64MiB"), parse_size(4096)
    (67108864, 4096)
    """
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


EXPECTED = {
    "str": "a string",
    "path": "a file or directory path (string)",
    "iface": "an interface name (string, at most 15 characters, no '/' or spaces)",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "duration": "a duration: seconds, or a string like \"90s\", \"15m\", \"12h\", \"7d\"",
    "size": "a size: bytes, or a string like \"512KiB\", \"64MiB\"",
    "ports": "a list of port numbers 1-65535",
    "listen": "HOST:PORT (e.g. \"127.0.0.1:10502\"), or \"\" for no metrics endpoint",
    "syslog": "udp://HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT, unix:///PATH, or \"\" for none",
    "choice": "one of",
    "name": "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "detectors": "a list of detector names from " + ", ".join(DETECTORS),
}


def syslog_target(url: str) -> tuple[str, str | tuple[str, int]]:
    """``(transport, address)`` from ``udp://host:514`` and the like; ValueError when malformed.

    >>> syslog_target("udp://192.0.2.7:514"), syslog_target("unix:///dev/log")
    (('udp', ('192.0.2.7', 514)), ('unix', '/dev/log'))
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("udp", "tcp", "tls", "unix"):
        raise ValueError(url)
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError(url)
        return scheme, rest
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(url)
    return scheme, (host, int(port))


def _convert(value, meta: dict):
    """The value as the field's kind, or ValueError (the caller names the key)."""
    kind = meta["kind"]
    if kind in ("str", "path", "choice", "listen", "iface", "syslog"):
        if not isinstance(value, str):
            raise ValueError
        if kind == "choice" and value not in meta["choices"]:
            raise ValueError
        if kind == "iface" and value and (len(value) > 15 or any(c in value for c in "/ \t:")):
            raise ValueError
        if kind == "syslog" and value:
            syslog_target(value)
        if kind == "listen" and value:
            from .metrics import parse_listen

            host, _port = parse_listen(value)
            if host != "localhost":
                ipaddress.ip_address(host)
        return value
    if kind == "name":
        from .site import NAME

        if not isinstance(value, str) or not (NAME.match(value) or (value == "" and meta.get("empty"))):
            raise ValueError
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        out = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        out = float(value)
    elif kind == "duration":
        out = parse_duration(value)
    elif kind == "size":
        out = parse_size(value)
        if meta.get("power_of_two") and out & (out - 1):
            raise ValueError
    elif kind == "detectors":
        if not isinstance(value, list) or not all(isinstance(d, str) and d in DETECTORS for d in value):
            raise ValueError
        return [d for d in DETECTORS if d in value]
    elif kind == "ports":
        if not isinstance(value, list) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value):
            raise ValueError
        if len(set(value)) > 60:  # the kernel filter program holds at most 60 ports
            raise ValueError
        return sorted(set(value))
    else:  # pragma: no cover - a field declared with a kind this function does not know
        raise AssertionError(kind)
    if isinstance(out, float) and not math.isfinite(out):  # TOML has nan and inf; no setting means them
        raise ValueError
    if "min" in meta and out < meta["min"] or "max" in meta and out > meta["max"]:
        raise ValueError
    return out


def _expected(meta: dict) -> str:
    text = EXPECTED[meta["kind"]]
    if meta["kind"] == "choice":
        text += " " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = (_num(meta.get(k)) for k in ("min", "max"))
    if lo is not None and hi is not None:
        text += f" from {lo} to {hi}"
    elif lo is not None:
        text += f" >= {lo}"
    if meta.get("power_of_two"):
        text += ", a power of two"
    return text


def _num(v) -> str | None:
    return None if v is None else f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _line_of(text: str | None, section: str, key: str | None) -> str:
    """`` (line N)`` where the key (or section) is written, when the source text is known."""
    if not text:
        return ""
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\s*([A-Za-z0-9_\-]+)\s*\]", s)
        if m:
            current = m.group(1)
            if key is None and current == section:
                return f" (line {n})"
            continue
        if key is not None and current == section and re.match(rf"^{re.escape(key)}\s*=", s):
            return f" (line {n})"
    return ""


def line_number(text: str | None, section: str, key: str | None) -> int | None:
    """The line where ``[section]`` or its ``key`` is written (tomllib gives no positions)."""
    m = re.search(r"\d+", _line_of(text, section, key))
    return int(m.group()) if m else None


def from_dict(doc: dict, text: str | None = None, problems: list | None = None) -> Config:
    """Check a parsed TOML document against the sections.  The first problem raises InputError, or,
    given a ``problems`` list, every problem is appended to it as ``(line, message)`` and checking goes on."""
    def problem(message: str, section: str, key: str | None) -> None:
        if problems is None:
            raise InputError(message + _line_of(text, section, key))
        problems.append((line_number(text, section, key), message))

    cfg = Config()
    for section, table in doc.items():
        cls = SECTIONS.get(section)
        if cls is None:
            problem(f"{section}: unknown section (expected one of: {', '.join(SECTIONS)})", section, None)
            continue
        if not isinstance(table, dict):
            problem(f"{section}: expected a [{section}] table, got {_show(table)}", section, None)
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        obj = getattr(cfg, section)
        for key, value in table.items():
            f = fields.get(key)
            if f is None:
                problem(f"{section}.{key}: unknown key (expected one of: {', '.join(fields)})", section, key)
                continue
            try:
                setattr(obj, key, _convert(value, f.metadata))
            except (ValueError, TypeError):
                problem(f"{section}.{key}: expected {_expected(f.metadata)}, got {_show(value)}", section, key)
    for section, key, message in _check_together(cfg):
        problem(message, section, key)
    return cfg


def _check_together(cfg: Config) -> list[tuple[str, str, str]]:
    """Rules across keys: (section, key, message) for each broken one."""
    out = []
    m = cfg.metrics
    if bool(m.tls_cert) != bool(m.tls_key):
        out.append(("metrics", "tls_cert" if m.tls_cert else "tls_key",
                    "metrics.tls_cert: expected tls_cert and tls_key together, got only one of them"))
    if cfg.capture.ring_block_size < cfg.capture.snaplen + 64:
        out.append(("capture", "ring_block_size", f"capture.ring_block_size: expected at least snaplen + 64 "
                    f"({cfg.capture.snaplen + 64}), got {cfg.capture.ring_block_size}"))
    return out


def parse_text(text: str, origin: str = "config") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{origin}: not valid TOML: {exc}") from None
    return from_dict(doc, text)


def load(path: str | os.PathLike | None) -> Config:
    """Read and check the file at ``path`` (``None``: all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such config file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read: {exc}") from None
    try:
        return parse_text(text, str(p))
    except InputError as exc:
        msg = str(exc)
        raise InputError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None


def default_config_path() -> str | None:
    """``$OTWATCH_CONFIG``, else /etc/otwatch/otwatch.toml when it exists, else None (defaults)."""
    env = os.environ.get("OTWATCH_CONFIG")
    if env:
        return env
    return DEFAULT_PATH if Path(DEFAULT_PATH).exists() else None


# -- writing -------------------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(cfg: Config, comments: bool = False) -> str:
    """The configuration as TOML (reads back to the same values).

    >>> parse_text(to_toml(Config())) == Config()
    True
    """
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            if comments:
                out.append(f"# {f.metadata['help']}")
            out.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
        out.append("")
    return "\n".join(out)


__all__ = ["Config", "load", "parse_text", "from_dict", "to_toml", "parse_duration", "parse_size",
           "default_config_path", "SECTIONS"]
