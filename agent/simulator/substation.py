"""The whole simulated substation: plans the attacks, runs every conversation, writes pcap + labels.

Addressing (one /24, Ethernet): SCADA master .10, HMI .11, engineering workstation .12, Modbus
PLCs .20-.22, DNP3 outstations .23-.25, IEC-104 RTUs .26-.28, attacker .66.  The first 55% of
every capture is benign (the learning part); attacks are spread, one per slot and never
overlapping, over 55-95% of it, and benign traffic goes on around and after them.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ALL_SCENARIOS, ATTACKER, OUTSTATIONS, PROTOCOLS, Attack, Context
from .wire import write_pcap, write_pcapng

ATTACK_WINDOW = (0.55, 0.95)
MIN_SLOT = 40.0  # seconds each attack needs (the longest, spoofing and MITM, shrink to fit)
LABEL_FIELDS = ("start_ts", "end_ts", "scenario", "src", "dst", "protocol", "description")


@dataclass
class Result:
    frames: int
    pcap_bytes: int
    labels: list[dict]
    attacks: list[Attack] = field(repr=False)
    seconds: float = 0.0


def min_duration(n_attacks: int) -> float:
    return 0.0 if n_attacks == 0 else MIN_SLOT * n_attacks / (ATTACK_WINDOW[1] - ATTACK_WINDOW[0])


def plan_attacks(ctx: Context, protocols: tuple[str, ...], scenarios: tuple[str, ...]) -> list[Attack]:
    """One attack per scenario, shuffled into equal slots of the attack window; protocols rotate."""
    rng = ctx.rng("plan")
    order = list(scenarios)
    rng.shuffle(order)
    lo, hi = (f * ctx.duration for f in ATTACK_WINDOW)
    slot = (hi - lo) / max(len(order), 1)
    first_protocol = rng.randrange(len(protocols))
    attacks = []
    for i, scenario in enumerate(order):
        start = lo + i * slot + rng.uniform(0.05, 0.15) * slot
        attacks.append(Attack(i, scenario, protocols[(first_protocol + i) % len(protocols)], round(start, 3),
                              budget=slot * 0.7))
    return attacks


def build_networks(ctx: Context, protocols: tuple[str, ...], mixed: bool) -> dict:
    import importlib

    classes = {"modbus": "ModbusNetwork", "dnp3": "Dnp3Network", "iec104": "Iec104Network"}
    networks = {}
    for p in protocols:
        cls = getattr(importlib.import_module(f"agent.simulator.{p}"), classes[p])
        # A mixed capture keeps two outstations per protocol so its size stays near the others'.
        networks[p] = cls(ctx, OUTSTATIONS[p][:2] if mixed else OUTSTATIONS[p])
    return networks


def simulate(pcap: Path, labels: Path, protocols: tuple[str, ...], duration: float, seed: int,
             scenarios: tuple[str, ...], start_epoch: float, progress=None) -> Result:
    began = time.perf_counter()
    protocols = tuple(p for p in PROTOCOLS if p in protocols)
    scenarios = tuple(s for s in ALL_SCENARIOS if s in scenarios)
    ctx = Context(seed, start_epoch, duration)
    networks = build_networks(ctx, protocols, mixed=len(protocols) > 1)
    attacks = plan_attacks(ctx, protocols, scenarios)
    for attack in attacks:
        networks[attack.protocol].inject(attack)
    for i, network in enumerate(networks.values()):
        network.run(duration)
        if progress is not None:  # one step per protocol's network, then the writing
            progress.update(i + 1, len(ctx.cap.records))
    records = ctx.cap.sorted_records()
    rows = label_rows(records, attacks)
    writer = write_pcapng if Path(pcap).suffix.lower() == ".pcapng" else write_pcap  # as the name asks
    size = writer(pcap, [(r[0], r[2]) for r in records])
    write_labels(labels, rows)
    return Result(len(records), size, rows, attacks, time.perf_counter() - began)


def _ts(us: int) -> str:
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


def label_rows(records, attacks: list[Attack]) -> list[dict]:
    """Each attack's interval is exactly the span of its frames; check nothing else between its hosts
    falls inside (a generator bug, not a user error)."""
    spans: dict[int, list[int]] = {}
    for ts, _, _, tag, _, _ in records:
        if tag is not None:
            span = spans.setdefault(tag.index, [ts, ts, 0])
            span[1] = ts
            span[2] += 1
    rows = []
    for attack in attacks:
        if attack.index not in spans:
            raise RuntimeError(f"attack {attack.scenario} produced no frames (scheduled at {attack.t:.1f} s)")
        first, last, attack.frames = spans[attack.index]
        hosts = {attack.src, attack.dst} if attack.dst else {attack.src}
        for ts, _, _, tag, src, dst in records:
            if first <= ts <= last and tag is not attack:
                between = {src, dst} == hosts if attack.dst else attack.src in (src, dst)
                if between:
                    raise RuntimeError(f"frame at {_ts(ts)} between {src} and {dst} falls inside the "
                                       f"{attack.scenario} interval but is not part of it")
        rows.append({"start_ts": _ts(first), "end_ts": _ts(last), "scenario": attack.scenario, "src": attack.src,
                     "dst": attack.dst, "protocol": attack.protocol, "description": attack.description})
    rows.sort(key=lambda r: r["start_ts"])
    return rows


def write_labels(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


__all__ = ["simulate", "Result", "plan_attacks", "min_duration", "LABEL_FIELDS", "ATTACKER"]
