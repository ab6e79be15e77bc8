"""``otwatch run --config FILE | --iface IFACE``: the long-running agent on a SPAN port.

Three threads joined by bounded queues, so a slow stage never stalls capture::

    capture ──(capture_queue, batches)──► processing ──(alert_queue)──► export
    AF_PACKET ring                        pipeline + detection engine     alert log (fsync per record)
    kernel drops counted                  metrics, checkpoint snapshots

- **capture** polls the receive-only AF_PACKET ring (:func:`agent.live.open_live`) and hands each
  frame batch over with ``put_nowait``; when the queue is full the batch is dropped and its frames
  counted as *internal* drops.  The kernel's own drop counter (ring full) is read every second.
  Both are exported (``otwatch_capture_drops_total{source="kernel"|"internal"}``) and logged at exit.
- **processing** runs the pipeline and the detection engine on each batch, updates the metrics and
  snapshots the learned state when learning ends, every ``state.checkpoint_interval`` and at
  shutdown (a checkpoint thread writes the snapshot to disk, so fsync latency never stalls processing) -- while learning too, so a restart or a power cut carries learning on instead of
  starting it again.
- **export** writes every alert to the durable alert log.

Signals: SIGTERM/SIGINT stop cleanly (capture stops, queued batches are processed, buffered streams
flushed, alerts written, state checkpointed, exit 0; exit 1 if an alert could not be written or
the last checkpoint failed).  SIGHUP re-reads the configuration; the
learned state, flows and counters are kept; keys that need a restart (interface, ports, ring
sizes, state directory, metrics address) are reported and left as they were.

Checkpoints (:class:`Checkpoints`): the engine saves into a fresh ``ckpt-N`` directory (JSON +
``.npz``, HMAC-SHA256 under a key kept outside the state directory), every file is fsynced, then
the ``current`` symlink is swapped atomically (symlink to a temporary name + rename + directory
fsync).  A crash at any moment leaves ``current`` pointing at a complete checkpoint.  A state that
fails its HMAC check, or cannot be read, is refused with a clear message and the agent learns again
rather than monitor with a baseline it cannot trust.

Privileges: the capture socket and the metrics listener are opened first; then, when started as
root, the agent sets no_new_privs and drops to ``daemon.user`` (supplementary groups cleared,
setgid, setuid: every capability is gone).  The state key is read before the drop, so it can stay
readable by root only.  The socket is never written to: nothing is ever transmitted on the capture
interface.

Logging: JSON lines on stderr (``{"ts": ..., "level": ..., "logger": ..., "msg": ..., ...}``), one
start-up line saying what the agent is doing.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from . import config as config_mod
from .errors import InputError

log = logging.getLogger("otwatch.daemon")
NS = 1_000_000_000
PR_SET_NO_NEW_PRIVS = 38


# -- structured logging -----------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and any ``extra={"fields": {...}}``.

    >>> rec = logging.LogRecord("otwatch.daemon", logging.INFO, __file__, 1, "started %s", ("eth1",), None)
    >>> rec.fields = {"iface": "eth1"}
    >>> d = json.loads(JsonFormatter().format(rec)); d["level"], d["msg"], d["iface"]
    ('info', 'started eth1', 'eth1')
    """

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, verbose: int = 0) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    lvl = getattr(logging, level.upper())
    if verbose:
        lvl = min(lvl, logging.INFO if verbose == 1 else logging.DEBUG)
    root.setLevel(lvl)
    logging.getLogger("otwatch.start").setLevel(logging.INFO)  # the start-up line is always shown


def _info(msg: str, *args, **fields) -> None:
    log.info(msg, *args, extra={"fields": fields})


# an alert's severity -> the level it is logged at in the journal
JOURNAL_LEVEL = {"low": logging.INFO, "medium": logging.WARNING, "high": logging.ERROR, "critical": logging.CRITICAL}


# -- the state key and checkpoints ------------------------------------------------------------------
def read_key(path: Path, create: bool = True) -> bytes:
    """The HMAC key (at least 16 bytes); created (mode 0600, 32 random bytes hex) when missing and
    its directory is writable."""
    from models.safefile import UnsafeFile, read_secret

    try:
        key = read_secret(path, "state.key_file").strip()
    except UnsafeFile as exc:
        raise InputError(exc.strerror) from None
    except FileNotFoundError:
        if not create:
            raise InputError(f"state.key_file: {path}: missing") from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InputError(f"state.key_file: {path}: missing and cannot be created ({exc.strerror}); "
                             f"create it: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {path}") from None
        import secrets

        key = secrets.token_hex(32).encode()
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("created a new state key at %s", path, extra={"fields": {"key_file": str(path)}})
        return key
    except OSError as exc:
        raise InputError(f"state.key_file: {path}: cannot read ({exc.strerror})") from None
    if len(key) < 16:
        raise InputError(f"state.key_file: {path}: expected a key of at least 16 bytes, got {len(key)}")
    return key


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """Numbered checkpoint directories under ``directory`` and an atomically swapped ``current`` link.

    >>> import tempfile
    >>> cp = Checkpoints(tempfile.mkdtemp(), b"k" * 32)
    >>> p = cp.write(lambda d, key: (Path(d) / "x").write_text("1")); p.name, cp.current().name
    ('ckpt-1', 'ckpt-1')
    >>> _ = cp.write(lambda d, key: (Path(d) / "x").write_text("2")); cp.current().name, cp.previous().name
    ('ckpt-2', 'ckpt-1')
    """

    KEEP = 2  # the current checkpoint and the one before it

    def __init__(self, directory, key: bytes):
        self.dir = Path(directory)
        self.key = key

    def _numbers(self) -> list[int]:
        out = []
        for p in self.dir.glob("ckpt-*"):
            suffix = p.name[5:]
            if suffix.isdigit() and p.is_dir():
                out.append(int(suffix))
        return sorted(out)

    def current(self) -> Path | None:
        link = self.dir / "current"
        if not link.is_symlink():
            return None
        target = self.dir / os.readlink(link)
        return target if target.is_dir() else None

    def previous(self) -> Path | None:
        cur = self.current()
        older = [n for n in self._numbers() if cur is None or n < int(cur.name[5:])]
        return self.dir / f"ckpt-{older[-1]}" if older else None

    def write(self, save) -> Path:
        """``save(directory, key)`` into a new checkpoint, fsync it, then make it current."""
        self.dir.mkdir(parents=True, exist_ok=True)
        before = self.current()
        nums = self._numbers()
        n = (nums[-1] + 1) if nums else 1
        target = self.dir / f"ckpt-{n}"
        target.mkdir(mode=0o750)
        save(target, self.key)
        for f in target.iterdir():
            _fsync_path(f)  # state_io fsyncs its files; this also covers anything else saved
        _fsync_path(target)
        tmp = self.dir / f".current.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target.name, tmp)
        os.replace(tmp, self.dir / "current")  # rename(2): atomic
        _fsync_path(self.dir)
        self._prune(keep={target.name, before.name if before else None})
        return target

    def _prune(self, keep: set) -> None:
        """Remove every checkpoint but the new one and the one it replaced (also half-written
        ones a crash left behind, which never became current)."""
        import shutil

        for m in self._numbers():
            if f"ckpt-{m}" not in keep:
                shutil.rmtree(self.dir / f"ckpt-{m}", ignore_errors=True)


# -- privileges -------------------------------------------------------------------------------------
def resolve_user(user: str, group: str = "") -> tuple[int, int, str]:
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise InputError(f"daemon.user: no such user {user!r} (create it: useradd --system --no-create-home "
                         f"--shell /usr/sbin/nologin {user}; or set daemon.user = \"\" to keep the "
                         "starting user)") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise InputError(f"daemon.group: no such group {group!r}") from None
    return pw.pw_uid, gid, user


def no_new_privs() -> bool:
    """prctl(PR_SET_NO_NEW_PRIVS): no exec can ever gain privileges again (setuid bits, file caps)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Give freed heap back to the kernel (glibc ``malloc_trim``): batch temporaries otherwise stay
    resident, and RSS is what a 1-4 GB box and systemd's MemoryMax see."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def drop_capabilities() -> bool:
    """Give up every capability (CAP_NET_RAW included) once the capture socket is open: what a
    non-root agent started by systemd with ``AmbientCapabilities=CAP_NET_RAW`` still holds.
    capset(2) with all sets empty; False when the system refused (the agent then runs on as it is)."""
    PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all empty
        return libc.capset(header, data) == 0
    except (OSError, AttributeError):
        return False


def drop_privileges(uid: int, gid: int) -> None:
    """Leave root for good: no supplementary groups, then gid, then uid (all three ids each)."""
    no_new_privs()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("still able to become root after dropping privileges")


def _make_dir_for(path: Path, owner: tuple[int, int] | None) -> None:
    """mkdir -p, giving the directories created here to ``owner``."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o750)
        if owner is not None:
            # fchown on the directory just made, never chown by path: a symlink swapped in meanwhile
            # must not hand its target to the service user
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, *owner)
            finally:
                os.close(fd)


# -- the detection engine, as the configuration says ------------------------------------------------
KEPT_ALERTS = 1000


def engine_kwargs(cfg: config_mod.Config) -> dict:
    d = cfg.detection
    return {"detectors": tuple(d.detectors), "alerts_per_hour": d.alerts_per_hour, "cooldown_s": d.alert_cooldown}


def tune_engine(eng, cfg: config_mod.Config) -> None:
    """Settings that also apply to a loaded engine (and on SIGHUP)."""
    d = cfg.detection
    eng.allowlist.min_count = d.min_count
    eng.allowlist.min_span_s = d.min_span
    eng.allowlist.capacity = cfg.limits.max_baseline_entries
    eng.alerts_per_hour = d.alerts_per_hour
    eng.manager.cooldown_ns = int(d.alert_cooldown * NS)
    # The agent writes every alert to the log as it opens and closes; it needs only a short
    # history in memory (the manager keeps 100,000 for replay summaries by default).
    eng.manager.keep = KEPT_ALERTS


def new_engine(cfg: config_mod.Config, now_ns: int | None = None):
    """A learning :class:`~models.engine.DetectionEngine` configured by ``cfg``.

    ``learning_clock = "capture"``: learning ends ``learning_period`` of capture time after the
    first event, exactly as for a replayed file.  ``"wall"``: it ends ``learning_period`` after now,
    whatever the traffic does (the engine switches on the first batch past that time).
    """
    from models.engine import DetectionEngine

    d = cfg.detection
    if d.learning_clock == "capture":
        eng = DetectionEngine(learn_seconds=d.learning_period, **engine_kwargs(cfg))
    else:
        now_ns = time.time_ns() if now_ns is None else now_ns
        eng = DetectionEngine(learn_seconds=None, learn_until_ns=now_ns + int(d.learning_period * NS),
                              **engine_kwargs(cfg))
    tune_engine(eng, cfg)
    return eng


def _modbus_frames(n: int = 40) -> tuple[list[bytes], list[int]]:
    """A few seconds of one Modbus/TCP poll (read holding registers), built by hand for :func:`warm_up`."""
    import struct

    def frame(src, dst, sport, dport, seq, ack, payload):
        eth = bytes.fromhex("020000000002" "020000000001") + struct.pack(">H", 0x0800)
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, 0x18, 8192, 0, 0)
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0, 64, 6, 0,
                         bytes(src), bytes(dst))
        return eth + ip + tcp + payload

    a, b = (10, 255, 0, 1), (10, 255, 0, 2)
    frames, ts = [], []
    cseq, sseq = 1000, 5000
    for i in range(n):
        req = struct.pack(">HHHBBHH", i, 0, 6, 1, 3, 0, 2)  # MBAP + FC 3 (Modbus v1.1b3 §6.3)
        rsp = struct.pack(">HHHBBB", i, 0, 7, 1, 3, 4) + struct.pack(">HH", i, 100 + i % 3)
        frames += [frame(a, b, 40000, 502, cseq, sseq, req), frame(b, a, 502, 40000, sseq, cseq + len(req), rsp)]
        cseq += len(req)
        sseq += len(rsp)
        ts += [i * 100_000_000, i * 100_000_000 + 2_000_000]
    return frames, ts


def _compile_parsers() -> None:
    """Parse a minute of simulated Modbus, DNP3 and IEC-104 traffic, so the parsers' compiled walks
    (Numba) are compiled -- or loaded from the cache -- now, not when the first DNP3 batch arrives
    (compiling takes seconds, during which the capture ring would overflow)."""
    import tempfile

    from .pipeline import Pipeline, parse_file
    from .simulator.common import PROTOCOLS
    from .simulator.substation import simulate

    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "warm-up.pcap"
        simulate(pcap, Path(tmp) / "warm-up.csv", PROTOCOLS, 60.0, 1, (), 1_700_000_000.0)
        parse_file(pcap, Pipeline())


def warm_up(cfg: config_mod.Config) -> None:
    """Run a little synthetic traffic through a throwaway pipeline, engine and checkpoint, so every
    module the agent imports lazily is loaded now: when learning ends (the ML libraries take seconds
    to import, and processing would stall meanwhile) and after privileges are dropped (a Python
    installation the agent's user cannot read, as with a per-user pyenv)."""
    import tempfile

    from parsers.frames import FrameBatch

    from .pipeline import Pipeline

    d = cfg.detection.detectors
    from .extras import missing_detectors

    missing = missing_detectors(d)
    if missing:  # now, not when learning ends days later
        raise InputError("detection.detectors: " + "; ".join(missing.values()))
    if "river" in d:
        from river import anomaly, preprocessing  # noqa: F401
    if "pyod" in d:
        from pyod.models.iforest import IForest  # noqa: F401
    from models.engine import DetectionEngine

    if cfg.capture.compiled_parsers:
        _compile_parsers()
    frames, ts = _modbus_frames()
    pipeline = Pipeline(compiled=cfg.capture.compiled_parsers)
    # the throwaway engine's own log lines ("learned 2 windows ...") would only confuse an operator
    quiet = logging.getLogger("models")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        eng = DetectionEngine(learn_seconds=2.0, detectors=tuple(d))
        half = len(frames) // 2
        for lo, hi in ((0, half), (half, len(frames))):
            eng.process(pipeline.process(FrameBatch.from_frames(frames[lo:hi], ts=ts[lo:hi])))
        eng.process(pipeline.finish())
        eng.health()
        with tempfile.TemporaryDirectory() as tmp:
            eng.save(tmp, key=b"warm-up" * 4)
            DetectionEngine.load(tmp, key=b"warm-up" * 4)
    finally:
        quiet.setLevel(level)


# -- the agent --------------------------------------------------------------------------------------
def _fmt_duration(seconds: float) -> str:
    """
    >>> _fmt_duration(0), _fmt_duration(93), _fmt_duration(6 * 86400 + 7200)
    ('0s', '1m33s', '6d2h')
    """
    s = int(round(seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{s}s"


class Agent:
    """The daemon: build with a checked :class:`~agent.config.Config`, then :meth:`run`."""

    def __init__(self, cfg: config_mod.Config, config_path: str | None = None, iface: str | None = None,
                 verbose: int = 0):
        self.cfg = cfg
        self.config_path = config_path
        self.iface_override = iface
        self.verbose = verbose
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.internal_drops = 0
        self.failed: BaseException | None = None
        self.source = None
        self.endpoint = None
        self.alert_log = None
        self.engine = None
        self.pipeline = None
        self.inventory = None
        self.loaded_from: Path | None = None
        self.last_checkpoint = 0.0
        self.checkpoints_written = 0
        self.alerts_written = 0
        self.alerts_lost = 0
        self.checkpoint_failed = False  # the latest checkpoint attempt failed (exit status 1)
        self._checkpoint_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards reopening the alert log on reload
        from .site import SiteIdentity

        self.identity = SiteIdentity(cfg.identity.site, cfg.identity.agent)  # restart keys: fixed for the run

    # -- setup ------------------------------------------------------------------------------------
    @property
    def iface(self) -> str:
        return self.iface_override or self.cfg.capture.interface

    def new_engine(self):
        return new_engine(self.cfg)

    def _ecs_identity(self) -> tuple[dict, str | None]:
        """ECS ``observer`` (agent name and host from the site identity, otwatch's version, the capture
        interface) and ``labels.site`` of the records (the alert sinks stamp the same identity again)."""
        ident = self.identity
        if getattr(self, "_ecs", None) is None:
            from .sinks import default_observer

            obs = default_observer(name=ident.agent, interface=self.iface)
            obs["hostname"] = ident.hostname
            self._ecs = (obs, ident.site)
        return self._ecs

    def _tune(self, eng) -> None:
        tune_engine(eng, self.cfg)

    def load_state(self):
        """The engine from the current checkpoint, or a new learning engine (state refused/absent)."""
        from models.engine import DetectionEngine

        cp = self.checkpoints
        for where in (cp.current(), cp.previous()):
            if where is None:
                continue
            try:
                eng = DetectionEngine.load(where, key=cp.key, **engine_kwargs(self.cfg))
            except Exception as exc:  # noqa: BLE001 - any failure to load means: do not trust it
                log.error("saved state %s refused: %s; %s", where, exc,
                          "trying the previous checkpoint" if where == cp.current() else "learning again",
                          extra={"fields": {"event": "state_refused", "path": str(where)}})
                continue
            self._tune(eng)
            self.loaded_from = where
            return eng
        return self.new_engine()

    def load_inventory(self):
        """The asset inventory saved beside the engine's state, or a new one."""
        from models.inventory import InventoryLimits

        from .inventory_stage import InventoryStage

        lim = self.cfg.limits
        limits = InventoryLimits(max_assets=lim.max_assets, max_conversations=lim.max_conversations)
        if self.loaded_from is not None:
            try:
                stage = InventoryStage.load(self.loaded_from, self.pipeline, key=self.checkpoints.key, limits=limits)
            except Exception as exc:  # noqa: BLE001 - a refused inventory is rebuilt from traffic
                log.error("saved inventory in %s refused: %s; rebuilding it from traffic", self.loaded_from, exc,
                          extra={"fields": {"event": "state_refused", "path": str(self.loaded_from)}})
                stage = None
            if stage is not None:
                return stage
        return InventoryStage(self.pipeline, limits)

    def open(self) -> None:
        """Everything that may need root: capture socket, metrics listener, files; then drop root."""
        cfg = self.cfg
        if not self.iface:
            raise InputError("capture.interface: expected an interface name (in the config file or --iface)")
        owner = None
        if os.geteuid() == 0 and cfg.daemon.user:
            uid, gid, _ = resolve_user(cfg.daemon.user, cfg.daemon.group)
            owner = (uid, gid) if uid != 0 else None
        key_path = self.cfg.key_path()
        state_dir = Path(cfg.state.directory)
        if key_path.resolve().is_relative_to(state_dir.resolve()):
            raise InputError(f"state.key_file: expected a path outside state.directory ({state_dir}), got {key_path}")
        key = read_key(key_path)
        _make_dir_for(state_dir, owner)
        self.checkpoints = Checkpoints(state_dir, key)
        self._open_alert_log(owner)

        from .live import RingSource, SocketSource

        c = cfg.capture
        ports = tuple(c.ports)
        try:
            self.source = RingSource(self.iface, ports=ports, snaplen=c.snaplen, block_size=c.ring_block_size,
                                     block_count=c.ring_blocks, block_timeout_ms=max(1, int(c.block_timeout * 1000)),
                                     promisc=c.promiscuous).open()
            self.source_kind = "ring"
        except InputError:
            raise
        except OSError as exc:
            log.warning("TPACKET_V3 ring unavailable on %s (%s); plain AF_PACKET socket", self.iface, exc)
            self.source = SocketSource(self.iface, ports=ports, snaplen=c.snaplen, promisc=c.promiscuous).open()
            self.source_kind = "socket"
        self._open_metrics()
        warm_up(self.cfg)  # before the drop: loads every module the agent needs later
        if owner is not None:
            if state_dir.stat().st_uid != owner[0]:
                # a directory made by the installer or systemd's StateDirectory= is already the user's
                log.warning("state.directory %s is not owned by %s", state_dir, cfg.daemon.user)
            drop_privileges(*owner)
            self.dropped_to = cfg.daemon.user
        else:
            self.dropped_to = None
            if os.geteuid() != 0 and no_new_privs() and drop_capabilities():
                log.debug("capabilities dropped after opening the capture socket")
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise InputError(f"state.directory: {state_dir} is not writable by uid {os.getuid()}")

    def _sink_error(self, name: str) -> None:
        if self.endpoint is not None:
            self.endpoint.metrics.sink_errors.labels(name).inc()

    def _open_alert_log(self, owner=None) -> None:
        from .sinks import AlertLog, AlertSinks, SyslogSink

        a = self.cfg.alerts
        path = Path(a.log)
        _make_dir_for(path.parent, owner)
        from models.safefile import UnsafeFile

        try:  # O_NOFOLLOW, 0640, a torn last record removed; a file created here goes to ``owner``
            log_ = AlertLog(path, max_bytes=a.max_bytes, backups=a.backups, fsync=a.fsync, owner=owner)
        except UnsafeFile as exc:
            raise InputError(f"alerts.log: {exc.strerror}") from None
        if owner is not None and os.fstat(log_.fd).st_uid != owner[0]:
            # kept open across the drop; rotation then creates the next file as the service user
            log.warning("alert log %s is not owned by %s; left as it is", path, self.cfg.daemon.user)
        copies = []
        if a.syslog:
            transport, address = config_mod.syslog_target(a.syslog)
            copies.append(SyslogSink(address, transport, facility=a.syslog_facility, payload=a.syslog_payload,
                                     hostname=self.identity.hostname))
        sinks = AlertSinks(log_, copies, on_error=self._sink_error, identity=self.identity)
        old, self.alert_log = self.alert_log, sinks
        if old is not None:
            old.close()

    def _open_metrics(self) -> None:
        m = self.cfg.metrics
        if not m.listen:
            return
        from .metrics import MetricsEndpoint

        endpoint = MetricsEndpoint.start(m.listen, m.tls_cert, m.tls_key, m.auth_file,
                                         names=("metrics.listen", "metrics.tls_cert", "metrics.auth_file"),
                                         identity=self.identity)
        endpoint.metrics.declare_rules([])
        self.endpoint = endpoint

    # -- the three stages -------------------------------------------------------------------------
    def _capture_loop(self, q_in: queue.Queue) -> None:
        src = self.source
        next_stats = 0.0
        try:
            while not self.stop_event.is_set():
                batch = src.poll(0.2)
                now = time.monotonic()
                if now >= next_stats and hasattr(src, "read_stats"):
                    src.read_stats()
                    next_stats = now + 1.0
                if batch is None or not len(batch):
                    continue
                try:
                    q_in.put_nowait(batch)
                except queue.Full:
                    self.internal_drops += len(batch)
            while True:  # blocks the kernel already retired: take them before stopping
                batch = src.poll(0.05)
                if batch is None:
                    break
                if len(batch):
                    try:
                        q_in.put(batch, timeout=2.0)
                    except queue.Full:
                        self.internal_drops += len(batch)
            src.read_stats()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failed = exc
            self.stop_event.set()
        finally:
            q_in.put(None)

    def _process_loop(self, q_in: queue.Queue, q_out: queue.Queue) -> None:
        try:
            next_health = next_trim = 0.0
            mode = self.engine.mode
            while True:
                try:
                    batch = q_in.get(timeout=0.5)
                except queue.Empty:
                    batch = False  # no traffic: still reload and checkpoint on time
                if batch is None:
                    break
                if batch is not False:
                    t0 = time.perf_counter()
                    events = self.pipeline.process(batch)
                    # the batch's events and frames together, in slices of capture time
                    frames, self._wire_frames = self._wire_frames, []
                    alerts = self.engine.process_batch(events, frames[0] if frames else None)
                    alerts += self.inventory.observe(events, self.engine.mode)
                    self._after_batch(events, alerts, t0, q_out, next_health)
                now = time.monotonic()
                if now >= next_health:
                    next_health = now + 1.0
                    counts = self.inventory.refresh()
                    if self.endpoint is not None:
                        self.endpoint.metrics.set_inventory(counts)
                if now >= next_trim:
                    release_memory()
                    next_trim = now + 10.0
                if self.engine.mode != mode:
                    mode = self.engine.mode
                    _info("learning finished: monitoring", event="mode", mode=mode)
                    self.checkpoint("learning finished")
                elif now - self.last_checkpoint >= self.cfg.state.checkpoint_interval:
                    self.checkpoint("scheduled")
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
            # clean stop: parse what the flows still buffer, close the windows, save
            t0 = time.perf_counter()
            events = self.pipeline.finish()
            alerts = self.engine.process(events) + self.engine.finish()
            alerts += self.inventory.observe(events, self.engine.mode)
            self._after_batch(events, alerts, t0, q_out, 0.0)
            self.checkpoint("shutdown", wait=True)
        except BaseException as exc:  # noqa: BLE001
            self.failed = exc
            self.stop_event.set()
        finally:
            q_out.put(None)

    def _after_batch(self, events, alerts, t0, q_out, next_health) -> None:
        # An incident is written when it opens and again, same event.id, with its final count when it
        # closes (a SIEM keeps the latest record per id).  Records are made here, not in the export
        # thread, so each one shows the alert as it was at that moment; popping the closed ones also
        # keeps the engine's list of them bounded.
        obs, site = self._ecs_identity()
        records = [a.to_ecs(obs, site) for a in alerts + self.engine.pop_closed()]
        if records:
            q_out.put(records)  # blocks when export is behind: capture keeps going, the capture queue absorbs it
        if self.endpoint is not None:
            health = None
            if time.monotonic() >= next_health:
                health = self.engine.health()
            st = self.pipeline.stats
            busy = time.perf_counter() - t0
            self.endpoint.batch(self.pipeline, events, extra_seconds=max(0.0, busy - (st.busy_s - self.endpoint._busy)),
                                alerts=alerts, health=health)
            self.endpoint.metrics.observe_drops(kernel=self.source.stats.kernel_drops, internal=self.internal_drops)

    def _export_loop(self, q_out: queue.Queue) -> None:
        while True:
            alerts = q_out.get()
            if alerts is None:
                break
            for a in alerts:
                self._write_alert(a)

    def _write_alert(self, alert) -> None:
        for attempt in range(3):
            try:
                with self._lock:
                    self.alert_log.write(alert)
                self.alerts_written += 1
                self._journal(alert)
                return
            except OSError as exc:
                if self.endpoint is not None:
                    self.endpoint.metrics.sink_errors.labels("alert_log").inc()
                log.error("alert log write failed (%s), attempt %d", exc, attempt + 1)
                time.sleep(0.5)
        self.alerts_lost += 1
        if self.endpoint is not None:
            self.endpoint.metrics.alerts_lost.inc()

    def _journal(self, rec: dict) -> None:
        """Each alert once in the agent's own log (the journal), at the level matching its severity:
        when it opens (its closing record, same id, is not repeated there)."""
        if not isinstance(rec, dict):
            rec = rec.to_ecs(*self._ecs_identity())
        ev_id = rec["event"]["id"]
        logged = self.__dict__.setdefault("_journaled", set())
        if ev_id in logged:
            return
        if len(logged) >= 100_000:  # bounded: an id forgotten here is at most logged twice
            logged.clear()
        logged.add(ev_id)
        ow = rec.get("otwatch", {})
        level = JOURNAL_LEVEL.get(ow.get("severity"), logging.INFO)
        log.log(level, "alert %s: %s", rec["rule"]["name"], rec.get("message", ""),
                extra={"fields": {"event": "alert", "id": ev_id, "rule": rec["rule"]["name"],
                                  "severity": ow.get("severity")}})

    # -- checkpoints and reload -------------------------------------------------------------------
    def checkpoint(self, why: str, wait: bool = False) -> None:
        """Snapshot what was learned on this (the processing) thread -- serialised to bytes, quick --
        and write it to disk (files, fsyncs, the ``current`` swap) on a thread of its own, so a slow
        disk never stalls processing.  One checkpoint is written at a time; ``wait`` (shutdown)
        returns once it is on disk."""
        from models import state as state_io

        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join()  # the previous one first: never two writers
        t0 = time.perf_counter()
        self.last_checkpoint = time.monotonic()  # retry at the next interval, not every batch
        try:
            with state_io.deferred_writes() as writes:
                self._save_state(".", self.checkpoints.key)
        except Exception as exc:  # noqa: BLE001 - a state that cannot be serialised is a failed checkpoint
            log.error("checkpoint failed: %s", exc, extra={"fields": {"event": "checkpoint_failed"}})
            self.checkpoint_failed = True
            return
        snapshot_s = time.perf_counter() - t0

        def write() -> None:
            t1 = time.perf_counter()
            try:
                where = self.checkpoints.write(lambda d, _key: [w(d) for w in writes])
            except OSError as exc:
                log.error("checkpoint failed: %s", exc, extra={"fields": {"event": "checkpoint_failed"}})
                self.checkpoint_failed = True
                return
            self.checkpoint_failed = False  # a later checkpoint holds everything the failed one had
            self.checkpoints_written += 1
            _info("checkpoint written (%s)", why, event="checkpoint", path=str(where),
                  seconds=round(snapshot_s + time.perf_counter() - t1, 3), snapshot_seconds=round(snapshot_s, 3))

        self._checkpoint_thread = threading.Thread(target=write, name="checkpoint")
        self._checkpoint_thread.start()
        if wait:
            self._checkpoint_thread.join()

    def apply_review(self, why: str) -> None:
        """The operator's approvals and revocations (``otwatch baseline approve`` writes them to the
        signed review file) applied to the running baseline: at load, on SIGHUP, before each checkpoint."""
        from models import review
        from models.state import StateError

        try:
            decided = review.read(self.cfg.state.directory, self.checkpoints.key)
        except StateError as exc:
            log.error("baseline review refused: %s", exc, extra={"fields": {"event": "review_refused"}})
            return
        if not decided:
            return
        applied, unknown = review.apply(self.engine.allowlist, decided)
        if (applied, len(unknown)) != getattr(self, "_review_seen", None):
            self._review_seen = (applied, len(unknown))
            _info("baseline review applied (%s): %d decisions, %d for entries not in this baseline", why, applied,
                  len(unknown), event="review", applied=applied, unknown=len(unknown))

    def _save_state(self, directory, key) -> None:
        self.apply_review("checkpoint")
        self.engine.save_progress(directory, key=key)  # the finished baseline, or learning so far
        self.inventory.save(directory, key)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change while running, keep learned state;
        apply the operator's baseline review."""
        self.apply_review("reload")
        if not self.config_path:
            _info("reload: no config file (started with --iface only); nothing to reload", event="reload")
            return
        try:
            new = config_mod.load(self.config_path)
        except InputError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc,
                      extra={"fields": {"event": "reload_refused"}})
            return
        old = self.cfg
        needs_restart = [f"{s}.{k}" for s, k in RESTART_KEYS
                         if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]
        # keep the values that need a restart, take everything else
        for s, k in RESTART_KEYS:
            setattr(getattr(new, s), k, getattr(getattr(old, s), k))
        self.cfg = new
        setup_logging(new.daemon.log_level, self.verbose)
        self._tune(self.engine)
        with self._lock:
            self._open_alert_log()  # new path or rotation settings; also what logrotate expects of SIGHUP
        changed = [f"{s}.{k}" for s in config_mod.SECTIONS for k in getattr(new, s).__dataclass_fields__
                   if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]
        _info("configuration reloaded; learned state kept (%s)", self.engine.mode, event="reload",
              changed=changed, needs_restart=needs_restart, mode=self.engine.mode)
        if needs_restart:
            log.warning("reload: %s changed; restart the agent to apply", ", ".join(needs_restart),
                        extra={"fields": {"event": "reload_needs_restart"}})

    # -- run --------------------------------------------------------------------------------------
    def start_line(self) -> None:
        e = self.engine
        if e.mode == "monitor":
            mode = f"monitoring with the baseline from {self.loaded_from}" if self.loaded_from else "monitoring"
            left = 0.0
        else:
            d = self.cfg.detection
            left = d.learning_period if d.learning_clock == "capture" else max(
                0.0, (e.learn_until_ns - time.time_ns()) / NS)
            mode = f"learning, {_fmt_duration(left)} left ({d.learning_clock} clock)"
            if self.loaded_from:
                mode += f", resumed from {self.loaded_from}"
        metrics = self.endpoint.server.url if self.endpoint else "off"
        user = f", running as {self.dropped_to}" if self.dropped_to else ""
        logging.getLogger("otwatch.start").info(
            "otwatch run: capturing on %s (%s, ports %s), %s; metrics %s; alerts to %s; state in %s%s",
            self.iface, self.source_kind, ",".join(map(str, self.cfg.capture.ports)) or "all", mode, metrics,
            self.cfg.alerts.log, self.cfg.state.directory, user,
            extra={"fields": {"event": "start", "iface": self.iface, "source": self.source_kind, "mode": e.mode,
                              "learning_left_s": round(left, 3), "metrics": metrics, "alerts": self.cfg.alerts.log,
                              "state": self.cfg.state.directory, "pid": os.getpid(), "user": self.dropped_to,
                              "loaded_from": str(self.loaded_from) if self.loaded_from else None}})

    def run(self) -> int:
        from parsers.reassembly import ReassemblyLimits

        from .pipeline import Pipeline

        self.open()
        lim = self.cfg.limits
        self.pipeline = Pipeline(limits=ReassemblyLimits(max_flows=lim.max_flows,
                                                         idle_timeout_s=lim.flow_idle_timeout),
                                 compiled=self.cfg.capture.compiled_parsers)
        self.engine = self.load_state()
        self.apply_review("start")
        # every frame (ARP too) reaches the wire detector before the ICS-only filtering, with the
        # batch's events (DetectionEngine.process_batch)
        from models.wire import WireFrames

        self._wire_frames: list = []
        self.pipeline.frame_observers.append(
            lambda b, d, p: self._wire_frames.append(WireFrames.from_decoded(b, d, p)))
        self.inventory = self.load_inventory()
        if self.endpoint is not None:
            self.endpoint.metrics.set_mode(self.engine.mode)
        self.last_checkpoint = time.monotonic()
        q_in: queue.Queue = queue.Queue(maxsize=lim.capture_queue)
        q_out: queue.Queue = queue.Queue(maxsize=lim.alert_queue)
        threads = [threading.Thread(target=self._capture_loop, args=(q_in,), name="capture"),
                   threading.Thread(target=self._process_loop, args=(q_in, q_out), name="processing"),
                   threading.Thread(target=self._export_loop, args=(q_out,), name="export")]
        self.start_line()
        for t in threads:
            t.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            self.stop_event.set()
            for t in threads:
                t.join()
            if self._checkpoint_thread is not None:
                self._checkpoint_thread.join()
            self.close()
        stats = self.source.stats
        st = self.pipeline.stats
        _info("stopped: %d frames processed, %d dropped by the kernel, %d dropped internally, %d alerts written",
              st.frames, stats.kernel_drops, self.internal_drops, self.alerts_written, event="stop",
              frames=st.frames, received=stats.received, delivered=stats.delivered,
              kernel_drops=stats.kernel_drops, internal_drops=self.internal_drops,
              alerts_written=self.alerts_written, alerts_lost=self.alerts_lost,
              checkpoints=self.checkpoints_written, mode=self.engine.mode)
        if self.failed is not None:
            log.error("stopped by an internal error: %s: %s", type(self.failed).__name__, self.failed,
                      exc_info=self.failed, extra={"fields": {"event": "failed"}})
            return 1
        if self.alerts_lost or self.checkpoint_failed:
            log.error("stopped with %d alerts lost%s", self.alerts_lost,
                      ", the last checkpoint failed" if self.checkpoint_failed else "",
                      extra={"fields": {"event": "lost", "alerts_lost": self.alerts_lost,
                                        "checkpoint_failed": self.checkpoint_failed}})
            return 1
        return 0

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.alert_log is not None:
            self.alert_log.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def install_signals(self) -> None:
        def stop(signum, _frame):
            _info("signal %s: stopping", signal.Signals(signum).name, event="signal")
            self.stop_event.set()

        def hup(_signum, _frame):
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)


# Keys read once at start; SIGHUP reports a change but it takes a restart.
RESTART_KEYS = [("identity", "site"), ("identity", "agent"), ("capture", "interface"), ("capture", "ports"), ("capture", "snaplen"),
                ("capture", "ring_block_size"), ("capture", "ring_blocks"), ("capture", "block_timeout"),
                ("capture", "promiscuous"), ("capture", "compiled_parsers"), ("state", "directory"), ("state", "key_file"),
                ("metrics", "listen"), ("metrics", "tls_cert"), ("metrics", "tls_key"),
                ("metrics", "auth_file"), ("limits", "max_flows"), ("limits", "flow_idle_timeout"),
                ("limits", "capture_queue"), ("limits", "alert_queue"), ("daemon", "user"),
                ("daemon", "group"), ("detection", "detectors"), ("detection", "learning_clock"),
                ("detection", "learning_period")]


# -- command line -----------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML configuration (default: $OTWATCH_CONFIG, else {config_mod.DEFAULT_PATH} if present)")
    p.add_argument("--iface", metavar="IFACE", help="capture on this interface (overrides capture.interface)")
    from . import site

    site.add_arguments(p)  # --site / --agent-name override identity.site / identity.agent


def run(args) -> int:
    path = args.config or config_mod.default_config_path()
    cfg = config_mod.load(path)
    from .site import check_name

    if getattr(args, "site", None):
        cfg.identity.site = check_name(args.site, "--site")
    if getattr(args, "agent_name", None):
        cfg.identity.agent = check_name(args.agent_name, "--agent-name")
    setup_logging(cfg.daemon.log_level, getattr(args, "verbose", 0))
    if path is None and os.geteuid() == 0 and cfg.daemon.user:
        import pwd

        try:
            pwd.getpwnam(cfg.daemon.user)
        except KeyError:  # quick start without a config file, on a box without the otwatch user
            log.warning("user %r does not exist; dropping root to 'nobody'", cfg.daemon.user)
            cfg.daemon.user = "nobody"
    agent = Agent(cfg, config_path=path, iface=args.iface, verbose=getattr(args, "verbose", 0))
    agent.install_signals()
    return agent.run()


__all__ = ["Agent", "Checkpoints", "JsonFormatter", "drop_privileges", "read_key", "run", "add_arguments"]
