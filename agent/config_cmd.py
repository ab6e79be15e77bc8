"""``otwatch config check|show [--config FILE] [--iface IFACE] [--json]``: validate or print the configuration.

``check`` reads the file exactly as ``otwatch run`` does, then makes the checks ``run`` makes when it
starts (interface, user and group, state key and directory, alert log, metrics TLS and auth files,
detector libraries), and lists *every* problem at once as ``FILE:LINE: error: ...`` (exit 2), plus
warnings for what would work but hurt (metrics open to the network without TLS and auth; a capture
filter that hides ICS traffic on other ports from content detection).  ``FILE: ok`` (exit 0) otherwise.
``show`` prints the effective configuration (the file's values over the defaults) as TOML, or JSON
with ``--json``; with ``--comments`` each key carries its one-line help.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tomllib
from pathlib import Path

from . import config as config_mod
from .errors import InputError


def add_arguments(p) -> None:
    p.add_argument("action", choices=("check", "show"), help="check: validate; show: print the effective config")
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML file (default: $OTWATCH_CONFIG, else {config_mod.DEFAULT_PATH} if present, "
                        "else the built-in defaults)")
    p.add_argument("--iface", metavar="IFACE", help="check: the interface `run --iface` will be given")
    p.add_argument("--json", action="store_true", help="show: print JSON instead of TOML")
    p.add_argument("--comments", action="store_true", help="show: a comment line with each key's help")


def _writable_dir(path: Path) -> str | None:
    """Why ``path`` cannot be (made) a directory the agent writes in, or None."""
    p = path
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable by uid {os.getuid()}"
    return None


def preflight(cfg, iface: str | None = None, from_file: bool = True) -> list[tuple[str, str, str, str]]:
    """The checks ``otwatch run`` makes at start (agent/daemon.py ``Agent.open`` and ``warm_up``), without
    opening anything: ``(level, section, key, message)`` with level ``error`` or ``warning``."""
    from .extras import missing_detectors
    from .metrics import is_loopback, load_basic_auth, parse_listen

    out = []
    err = lambda s, k, m: out.append(("error", s, k, m))  # noqa: E731
    warn = lambda s, k, m: out.append(("warning", s, k, m))  # noqa: E731
    name = iface or cfg.capture.interface
    if not name:
        err("capture", "interface", "capture.interface: expected an interface name (in the config file or --iface)")
    else:
        try:
            socket.if_nametoindex(name)
        except OSError:
            err("capture", "interface", f"capture.interface: no such network interface {name!r} on this machine")
    if cfg.daemon.user:
        from .daemon import resolve_user

        try:
            resolve_user(cfg.daemon.user, cfg.daemon.group)  # run drops root to this user
        except InputError as exc:
            if from_file or str(exc).startswith("daemon.group"):
                err("daemon", "group" if str(exc).startswith("daemon.group") else "user", str(exc))
            else:  # as run does without a config file
                warn("daemon", "user", f"daemon.user: no user {cfg.daemon.user!r}: run without a config file "
                     "drops root to 'nobody' instead")
    state_dir, key_path = Path(cfg.state.directory), cfg.key_path()
    if key_path.resolve().is_relative_to(state_dir.resolve()):
        err("state", "key_file", f"state.key_file: expected a path outside state.directory ({state_dir}), got "
            f"{key_path}: whoever can write the state could then also sign it")
    elif key_path.exists():
        try:
            key = key_path.read_bytes().strip()
            if len(key) < 16:
                err("state", "key_file", f"state.key_file: {key_path}: expected a key of at least 16 bytes, "
                    f"got {len(key)}")
        except OSError as exc:
            err("state", "key_file", f"state.key_file: {key_path}: cannot read ({exc.strerror})")
    elif _writable_dir(key_path.parent):
        err("state", "key_file", f"state.key_file: {key_path}: missing and cannot be created "
            f"({_writable_dir(key_path.parent)})")
    why = _writable_dir(state_dir)
    if why:
        err("state", "directory", f"state.directory: {state_dir}: {why}")
    why = _writable_dir(Path(cfg.alerts.log).parent)
    if why:
        err("alerts", "log", f"alerts.log: {cfg.alerts.log}: {why}")
    m = cfg.metrics
    for key in ("tls_cert", "tls_key"):
        path = getattr(m, key)
        if path and not os.access(path, os.R_OK):
            err("metrics", key, f"metrics.{key}: {path}: missing or not readable")
    if m.tls_cert and m.tls_key and os.access(m.tls_cert, os.R_OK) and os.access(m.tls_key, os.R_OK):
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(m.tls_cert, m.tls_key)
        except (ssl.SSLError, OSError) as exc:
            err("metrics", "tls_cert", f"metrics.tls_cert: {m.tls_cert} with {m.tls_key}: not a certificate "
                f"and its key ({exc})")
    users = None
    if m.auth_file:
        try:
            users = load_basic_auth(m.auth_file)
        except (OSError, ValueError) as exc:
            err("metrics", "auth_file", f"metrics.auth_file: {exc}")
    if m.listen:
        host, _port = parse_listen(m.listen)
        if not is_loopback(host) and not (m.tls_cert and users):
            missing = " and ".join(w for w, on in (("TLS", m.tls_cert), ("basic auth", users)) if not on)
            warn("metrics", "listen", f"metrics.listen: {m.listen} is reachable from the network without {missing}: "
                 "anyone there can read what the agent sees (set tls_cert/tls_key and auth_file, or listen on "
                 "127.0.0.1)")
    for why in missing_detectors(cfg.detection.detectors).values():
        err("detection", "detectors", f"detection.detectors: {why}")
    if cfg.capture.ports:
        ports = ", ".join(map(str, cfg.capture.ports))
        warn("capture", "ports", f"capture.ports: the kernel filter passes only ports {ports}: ICS traffic on any "
             "other port (DNP3 on 20001, IEC-104 or Modbus on a vendor's port) never reaches the parsers, so "
             "content detection cannot find it; ports = [] passes everything (the parsers still read only what "
             "they recognise), or add the plant's ports")
    return out


def check(path: str | None, iface: str | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) as ``FILE:LINE: message`` lines, every one of them."""
    where = path or "built-in defaults"
    text = None
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return [f"{path}: no such config file"], []
        except (OSError, UnicodeDecodeError) as exc:
            return [f"{path}: cannot read: {exc}"], []
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            return [f"{path}: not valid TOML: {exc}"], []
    else:
        doc = {}
    problems: list = []
    cfg = config_mod.from_dict(doc, text, problems)
    bad_keys = {msg.split(":", 1)[0] for _, msg in problems}

    def at(line):
        return f"{where}:{line}" if line else where

    errors = [f"{at(line)}: {msg}" for line, msg in problems]
    warnings = []
    for level, section, key, msg in preflight(cfg, iface, from_file=path is not None):
        if f"{section}.{key}" in bad_keys:
            continue  # already reported as a bad value; its default is what was checked
        line = config_mod.line_number(text, section, key) or config_mod.line_number(text, section, None)
        (errors if level == "error" else warnings).append(f"{at(line)}: {msg}")
    return errors, warnings


def run(args) -> int:
    path = args.config or config_mod.default_config_path()
    if args.action == "check":
        errors, warnings = check(path, args.iface)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if errors:
            print(f"{path or 'built-in defaults'}: {len(errors)} error(s)", file=sys.stderr)
            return 2
        print(f"{path or 'built-in defaults'}: ok" + (f" ({len(warnings)} warning(s))" if warnings else ""))
        return 0
    cfg = config_mod.load(path)  # InputError -> one line on stderr, exit 2
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(config_mod.to_toml(cfg, comments=args.comments), end="")
    return 0
