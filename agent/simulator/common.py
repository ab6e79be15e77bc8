"""Pieces every protocol's traffic uses: the simulation context, attacks, and a conversation loop.

A :class:`Conversation` is the benign dialogue of one master/outstation pair on one TCP
connection, driven by timers (poll cycles, keep-alives, writes) and by *hooks*: attacks that
need the legitimate conversation (setpoint manipulation from the real master, a man in the
middle, spoofed measurements) hook into it at their start time, and everything the pair sends
while the attack runs is tagged with it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .plant import Plant
from .tcp import Capture, TcpConnection
from .wire import Host

SCENARIOS = ("recon", "unauthorised_write", "setpoint_manipulation", "dangerous_function", "flood", "mitm",
             "measurement_spoofing")
# Opt-in (``--attacks rule-blind``), never in ``all``: attacks built so that no allow-list, cycle or
# process rule can see them -- each request is allowed, each value in range -- for the learned models
# (models/sequence.py, models/process_state.py).  Kept out of SCENARIOS so that existing seeds give the
# same bytes.
RULE_BLIND = ("replayed_state", "operate_out_of_order")
ALL_SCENARIOS = SCENARIOS + RULE_BLIND
PROTOCOLS = ("modbus", "dnp3", "iec104")
REPLAY_S = 300.0  # a replayed recording runs this long (or 85 % of its slot)


def replay_lag(feeder, t0: float, duration: float) -> float:
    """A whole number of 5 minutes (every poll period divides it) whose recording splices in unseen."""
    return feeder.seamless_lag(t0, t0 + duration, 300.0, 600.0, 3600.0)
PORTS = {"modbus": 502, "dnp3": 20000, "iec104": 2404}

SUBNET = "10.20.0."
MASTER, HMI, ENGINEERING, ATTACKER = 10, 11, 12, 66
# Outstations per protocol (last octet): PLCs, DNP3 outstations, IEC-104 RTUs.
OUTSTATIONS = {"modbus": (20, 21, 22), "dnp3": (23, 24, 25), "iec104": (26, 27, 28)}


@dataclass
class Attack:
    """One injected attack; frames it causes are tagged with it and give its label row."""

    index: int
    scenario: str
    protocol: str
    t: float  # planned start, seconds since the capture start
    budget: float  # seconds it may last
    src: str = ""
    dst: str = ""
    description: str = ""
    variant: str = ""
    frames: int = field(default=0, compare=False)


class Context:
    def __init__(self, seed: int, start_epoch: float, duration: float):
        self.seed, self.start_epoch, self.duration = seed, start_epoch, duration
        self.cap = Capture(int(round(start_epoch * 1e6)), duration)
        self.plant = Plant(seed, start_epoch, duration)
        self.hosts: dict[int, Host] = {}
        self._ports: dict[int, int] = {}

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:{name}")

    def host(self, octet: int) -> Host:
        if octet not in self.hosts:
            # Windows-based SCADA master/HMI/workstation use TTL 128, embedded devices and Linux 64.
            ttl = 128 if octet in (MASTER, HMI, ENGINEERING) else 64
            self.hosts[octet] = Host(SUBNET + str(octet), octet, ttl=ttl)
        return self.hosts[octet]

    def ephemeral_port(self, octet: int) -> int:
        """Client ports rise per host like an OS allocator (Windows from 49152, Linux from 33000)."""
        base = 49152 if octet in (MASTER, HMI, ENGINEERING) else 33000 + (self.seed * 7919) % 20000
        port = self._ports.get(octet, base + (self.seed * 31 + octet * 97) % 2000)
        self._ports[octet] = port + 1 + (octet % 3)
        return port

    def connection(self, client: int, server: int, dport: int, name: str, **kw) -> TcpConnection:
        return TcpConnection(self.cap, self.host(client), self.host(server), self.ephemeral_port(client), dport,
                             self.rng("tcp:" + name), **kw)


class Conversation:
    """Benign traffic of one connection: named timers (``on_<name>`` methods) and attack hooks."""

    def __init__(self, ctx: Context, conn: TcpConnection, name: str):
        self.ctx, self.conn, self.name = ctx, conn, name
        self.rng = ctx.rng("conv:" + name)
        self.timers: dict[str, list] = {}  # name -> [planned, period or None, jitter]
        self.hooks: list[tuple[float, int, object]] = []
        self.latency_extra = (0.0, 0.0)  # (mean, jitter) added by a man in the middle

    def every(self, name: str, first: float, period: float, jitter: float = 0.0) -> None:
        self.timers[name] = [first, period, jitter]

    def once(self, name: str, t: float) -> None:
        self.timers[name] = [t, None, 0.0]

    def hook(self, t: float, fn) -> None:
        self.hooks.append((t, len(self.hooks), fn))
        self.hooks.sort(key=lambda h: (h[0], h[1]))

    def delay(self, base: float, spread: float) -> float:
        """A device's response time, plus whatever a man in the middle adds."""
        d = base + spread * self.rng.random()
        mean, jitter = self.latency_extra
        if mean:
            d += mean + jitter * self.rng.random()
        return d

    def start(self, t: float) -> float:
        return t

    def relabel(self, attack: Attack, duration: float, mitm_mac=None, on_begin=None, on_end=None) -> None:
        """Tag this conversation's own frames as ``attack`` for ``duration`` from ``attack.t``: a man
        in the middle (``mitm_mac``: relayed frames carry the attacker's MAC, 20-60 ms are added)
        or spoofed measurements.  What is in flight is flushed first, so no benign frame is tagged."""
        def begin(conv, t):
            t = max(t, conv.conn.flush() + 0.001)
            self.ctx.cap.tag = attack
            if mitm_mac is not None:
                conv.latency_extra = (0.02, 0.04)
                conv.conn.sides[0].src_mac = conv.conn.sides[1].src_mac = mitm_mac
            if on_begin is not None:
                on_begin(conv)
            return t

        def end(conv, t):
            conv.conn.flush()
            if mitm_mac is not None:
                conv.latency_extra = (0.0, 0.0)
                conv.conn.sides[0].src_mac = conv.conn.sides[1].src_mac = None
            if on_end is not None:
                on_end(conv)
            self.ctx.cap.tag = None
            return t
        self.hook(attack.t, begin)
        self.hook(attack.t + duration, end)

    def tagged_block(self, attack: Attack, t: float, body) -> float:
        """Run ``body(t) -> t_end`` with every frame tagged as ``attack`` (pending ACKs go first)."""
        t = max(t, self.conn.flush() + 0.001)
        with self.ctx.cap.tagged(attack):
            t_end = body(t)
            t_end = max(t_end, self.conn.flush())
        return t_end

    def run(self, t0: float, t_end: float) -> None:
        busy = self.start(t0)
        while True:
            hook_t = self.hooks[0][0] if self.hooks else math.inf
            name = min(self.timers, key=lambda k: self.timers[k][0]) if self.timers else None
            next_t = self.timers[name][0] if name else math.inf
            if hook_t <= next_t:
                if hook_t >= t_end:
                    break
                _, _, fn = self.hooks.pop(0)
                busy = fn(self, max(hook_t, busy + 0.001))
                for timer in self.timers.values():  # cycles that fell inside the attack are skipped
                    while timer[1] and timer[0] < busy:
                        timer[0] += timer[1]
                continue
            if next_t >= t_end:
                break
            planned, period, jitter = self.timers[name]
            t = planned + (self.rng.gauss(0.0, jitter) if jitter else 0.0)
            t = max(t, busy + 0.002)
            if period is None:
                del self.timers[name]
            else:
                self.timers[name][0] = planned + period
            busy = getattr(self, "on_" + name)(t)
        self.conn.flush()
        self.ctx.cap.tag = None  # an attack window cut off by the end of the capture ends here too


def port_scan(ctx: Context, attacker: int, targets: list[int], open_ports: dict[int, tuple[int, ...]],
              ports: tuple[int, ...], t: float, rng: random.Random) -> float:
    """A SYN scan: half-open probes to open ports, RST|ACK from closed ones."""
    for octet in targets:
        for port in ports:
            conn = ctx.connection(attacker, octet, port, f"scan:{octet}:{port}:{t:.3f}", rtt=0.0003)
            if port in open_ports.get(octet, ()):
                conn.half_open_probe(t)
            else:
                conn.connect(t, refuse=True)
            t = conn.t_last + 0.002 + 0.004 * rng.random()
    return t
