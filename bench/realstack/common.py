"""What the three protocol scenarios share: hosts, capture, labels, timing, a port scan, the
bind shim, and a raw loopback tap that sniffs and injects TCP segments (the spoofing stages)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One loopback address per role, so the capture tells the hosts apart.  Each protocol's device has
# its own address: the three scenarios can run at once, each capture filtered on its device.
# REALSTACK_NET moves them to another 127.x.y.0/24 (two runs at once, e.g. a test beside a long run).
NET = os.environ.get("REALSTACK_NET", "127.0.0")
MASTER = f"{NET}.10"
ATTACKER = f"{NET}.66"
DEVICES = {"modbus": (f"{NET}.20", 502), "dnp3": (f"{NET}.21", 20000), "iec104": (f"{NET}.22", 2404)}
# TCP ports the recon stage probes on the device (ICS and management ports; closed ones answer RST)
SCAN_PORTS = (21, 22, 23, 80, 102, 443, 502, 2404, 4840, 20000, 44818, 47808)

LABEL_FIELDS = ["start_ts", "end_ts", "scenario", "src", "dst", "protocol", "description"]


@dataclass
class Timing:
    """Durations of one run; ``scale`` shortens everything but the polling itself (for tests)."""

    benign: float = 600.0  # benign lead-in before the first attack
    gap: float = 45.0  # benign time between attack stages
    tail: float = 75.0  # benign time after the last stage (covers the scorer's 60 s grace)
    flood: float = 10.0  # length of the flood stage
    command_every: float = 150.0  # mean interval of the operator's commands
    scale: float = 1.0

    def __post_init__(self):
        for name in ("benign", "gap", "tail", "flood", "command_every"):
            setattr(self, name, getattr(self, name) * self.scale)


@dataclass
class Labels:
    protocol: str
    rows: list = field(default_factory=list)

    def add(self, start: float, end: float, scenario: str, src: str, dst: str, description: str) -> None:
        self.rows.append(
            {
                "start_ts": f"{start:.6f}",
                "end_ts": f"{end:.6f}",
                "scenario": scenario,
                "src": src,
                "dst": dst,
                "protocol": self.protocol,
                "description": description,
            }
        )

    def write(self, path: Path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LABEL_FIELDS)
            w.writeheader()
            w.writerows(self.rows)


def log(proto: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {proto}: {msg}", file=sys.stderr, flush=True)


# --- capture ---------------------------------------------------------------------------------------


class Capture:
    """dumpcap on ``lo`` into a classic pcap, limited to one device's traffic (its filter)."""

    def __init__(self, path: Path, bpf: str):
        self.path, self.bpf, self.proc = Path(path), bpf, None

    def __enter__(self):
        exe = shutil.which("dumpcap") or shutil.which("tcpdump")
        if exe is None:
            raise SystemExit(
                "realstack: needs dumpcap (wireshark-common/tshark) or tcpdump to record loopback"
            )
        if self.path.exists():
            self.path.unlink()
        if exe.endswith("dumpcap"):
            cmd = [exe, "-q", "-i", "lo", "-P", "-f", self.bpf, "-w", str(self.path)]
        else:
            cmd = [exe, "-q", "-i", "lo", "-U", "-w", str(self.path), self.bpf]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while time.time() < deadline and not (self.path.exists() and self.path.stat().st_size >= 24):
            if self.proc.poll() is not None:
                raise SystemExit(f"realstack: {exe} failed: {self.proc.stderr.read().decode().strip()}")
            time.sleep(0.1)
        time.sleep(0.5)  # the filter is attached once the file exists; let it settle
        return self

    def __exit__(self, *exc):
        time.sleep(0.5)
        stop(self.proc, signal.SIGINT)


def stop(proc, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- role processes --------------------------------------------------------------------------------


def bind_shim(out_dir: Path) -> Path:
    """Compile bindshim.c once (per output directory) and return the shared object."""
    so = Path(out_dir) / ".bindshim.so"
    src = HERE / "bindshim.c"
    if not so.exists() or so.stat().st_mtime < src.stat().st_mtime:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise SystemExit("realstack: needs a C compiler (cc) for the bind shim of c104/dnp3py clients")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(so), str(src), "-ldl"], check=True)
    return so


def spawn_role(proto: str, role: str, seed: int, timing: Timing, out_dir: Path, bind: str | None = None):
    """Start ``run.py --role`` in its own process; ``bind``: its client sockets' source address."""
    env = dict(os.environ)
    if bind:
        env["LD_PRELOAD"] = str(bind_shim(out_dir))
        env["REALSTACK_BIND"] = bind
    cmd = [
        sys.executable,
        str(HERE / "run.py"),
        "--role",
        role,
        "--protocol",
        proto,
        "--seed",
        str(seed),
        "--command-every",
        str(timing.command_every),
    ]
    errlog = open(Path(out_dir) / f"{proto}.{role}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=errlog, stderr=subprocess.STDOUT)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"realstack: nothing listens on {host}:{port} after {timeout:.0f} s")


# --- attacker helpers ------------------------------------------------------------------------------


def attacker_socket(host: str, port: int, timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    s.bind((ATTACKER, 0))
    s.connect((host, port))
    return s


def port_scan(host: str, ports=SCAN_PORTS) -> list[int]:
    """TCP connect scan from the attacker's address; returns the open ports."""
    open_ports = []
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.5)
        s.bind((ATTACKER, 0))
        try:
            s.connect((host, p))
            open_ports.append(p)
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.02)
    return open_ports


def recv_some(s: socket.socket, timeout: float = 1.0) -> bytes:
    s.settimeout(timeout)
    try:
        return s.recv(65536)
    except (TimeoutError, OSError):
        return b""


# --- raw loopback tap: sniff and inject TCP segments ----------------------------------------------


@dataclass
class Segment:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes
    ts: float


ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


class LoopTap:
    """An AF_PACKET socket on ``lo``: the attacker's view of the wire (needs root).  Injected frames
    enter the stack as if received, with the forged source address, their own TTL and IP id."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.ip_id = 0x4D00

    def close(self):
        self.sock.close()

    def next(self, pred, timeout: float) -> Segment | None:
        """The next TCP segment (seen once: outgoing copies skipped) for which ``pred`` holds."""
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            seg = parse_tcp(frame)
            if seg is not None and pred(seg):
                return seg

    def inject(
        self,
        src: str,
        dst: str,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        payload: bytes,
        options: bytes = b"",
        window: int = 512,
        ttl: int = 128,
    ) -> None:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        self.sock.send(
            build_frame(src, dst, sport, dport, seq, ack, payload, options, window, ttl, self.ip_id)
        )


def parse_tcp(frame: bytes) -> Segment | None:
    if len(frame) < 14 + 20 + 20 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6:
        return None
    total = struct.unpack_from("!H", ip, 2)[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", tcp, 0)
    doff = (off_flags >> 12) * 4
    return Segment(
        socket.inet_ntoa(ip[12:16]),
        socket.inet_ntoa(ip[16:20]),
        sport,
        dport,
        seq,
        ack,
        off_flags & 0x1FF,
        window,
        bytes(tcp[20:doff]),
        bytes(tcp[doff:]),
        time.time(),
    )


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_frame(src, dst, sport, dport, seq, ack, payload, options, window, ttl, ip_id) -> bytes:
    options = options + b"\x01" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    tcp = (
        struct.pack(
            "!HHIIHHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (doff << 12) | 0x18, window, 0, 0
        )
        + options
        + payload
    )
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    csum = _checksum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, ttl, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\0" * 12 + struct.pack("!H", ETH_P_IP) + ip + tcp


def echo_timestamps(options: bytes) -> bytes:
    """The TCP options of a sniffed segment with everything but the timestamp dropped (an injected
    segment must carry a timestamp no older than the receiver's, or PAWS drops it)."""
    i, out = 0, b""
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        ln = options[i + 1] if i + 1 < len(options) else 0
        if ln < 2:
            break
        if kind == 8:
            out = b"\x01\x01" + options[i : i + ln]
        i += ln
    return out


class PayloadRecorder:
    """The attacker's earlier capture of master→device requests (for the replay stage): a second
    dumpcap, read back once it stops."""

    def __init__(self, path: Path, src: str, dst: str, port: int):
        self.cap = Capture(path, f"tcp and src host {src} and dst host {dst} and dst port {port}")

    def start(self):
        self.cap.__enter__()
        return self

    def close(self):
        self.cap.__exit__()

    def payloads(self) -> list[bytes]:
        self.close()
        from scapy.all import TCP, PcapReader

        out = []
        with PcapReader(str(self.cap.path)) as rd:
            for pkt in rd:
                if TCP in pkt and bytes(pkt[TCP].payload):
                    out.append(bytes(pkt[TCP].payload))
        return out
