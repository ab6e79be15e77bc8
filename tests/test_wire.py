"""The wire detector (models/wire.py) through the real decoder, pipeline and engine.

Frames are built with scapy: a Modbus master (10.0.0.10) polls an outstation (10.0.0.20) while the
engine learns; afterwards a third host (10.0.0.66) spoofs ARP, relays, changes TTLs and scans.
Benign captures (the project's and the public ones) must raise none of the wire rules.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.all import ARP, IP, TCP, Ether, raw

from agent.pipeline import Pipeline
from agent.sources import CaptureReader
from models.engine import DetectionEngine
from models.wire import WireFrames
from parsers.decode import decode
from parsers.frames import FrameBatch

from conftest import PROJECT_PCAPS, SHARED_PCAPS, needs_shared, shared_pcaps

MASTER, OUT, EVIL = ("10.0.0.10", "02:00:00:00:00:10"), ("10.0.0.20", "02:00:00:00:00:20"), \
    ("10.0.0.66", "02:00:00:00:00:66")
BCAST = "ff:ff:ff:ff:ff:ff"
S = 10**9
T0 = 1_700_000_000 * S
LEARN_S = 120


def arp(who, ip, op=1, target="10.0.0.1", eth=None):
    return raw(Ether(src=eth or who[1], dst=BCAST) / ARP(op=op, hwsrc=who[1], psrc=ip, pdst=target))


def tcp(src, dst, sport, dport, flags="PA", payload=b"", ttl=64, seq=1000, ip_id=1, mac=None, dmac=None):
    return raw(Ether(src=mac or src[1], dst=dmac or dst[1]) / IP(src=src[0], dst=dst[0], ttl=ttl, id=ip_id)
               / TCP(sport=sport, dport=dport, flags=flags, seq=seq) / payload)


def modbus_poll(i, ttl_master=64, mac_out=None):
    req = struct.pack(">HHHBBHH", i & 0xFFFF, 0, 6, 1, 3, 0, 2)
    rsp = struct.pack(">HHHBBB", i & 0xFFFF, 0, 7, 1, 3, 4) + struct.pack(">HH", 1, 2)
    return [tcp(MASTER, OUT, 40000, 502, payload=req, ttl=ttl_master, seq=1000 + 12 * i, ip_id=i + 1),
            tcp(OUT, MASTER, 502, 40000, payload=rsp, seq=5000 + 13 * i, ip_id=i + 1, mac=mac_out)]


class Run:
    """A pipeline whose frames and events both reach one engine, as in the agent."""

    def __init__(self, engine: DetectionEngine):
        self.engine = engine
        self.pipeline = Pipeline()
        self.alerts = []
        self.pending = []  # a batch's frames reach the engine after its events (as in the daemon)
        self.pipeline.frame_observers.append(lambda b, d, p: self.pending.append((d, b, p)))

    def batch(self, batch):
        events = self.pipeline.process(batch)
        (d, b, p), = self.pending
        self.pending.clear()
        self.alerts += self.engine.process_batch(events, WireFrames.from_decoded(b, d, p))

    def feed(self, frames, ts):
        self.batch(FrameBatch.from_frames(frames, ts=ts))

    def wire(self, rule=None):
        return [a for a in self.engine.alerts if a.rule.startswith("wire.") and (rule is None or a.rule == rule)]


def learned_plant() -> Run:
    """Two minutes of polling, each host's ARP, then monitoring starts."""
    run = Run(DetectionEngine(learn_seconds=LEARN_S, detectors=("allowlist", "wire")))
    frames, ts = [arp(MASTER, MASTER[0], target=OUT[0]), arp(OUT, OUT[0], op=2, target=MASTER[0]),
                  arp(EVIL, EVIL[0], target="10.0.0.1")], [T0, T0 + 1000, T0 + 2000]
    for i in range(LEARN_S + 30):
        f = modbus_poll(i)
        frames += f
        ts += [T0 + i * S + 10**6, T0 + i * S + 3 * 10**6]
    run.feed(frames, ts)
    assert not run.wire()
    return run


def at(s):
    return T0 + int(s * S)


def test_arp_spoof_names_attacker_and_victim():
    run = learned_plant()
    t = LEARN_S + 40
    run.feed([arp(EVIL, OUT[0], op=2, target=MASTER[0])], [at(t)])
    (a,) = run.wire("wire.arp_spoof")
    assert a.src == EVIL[0] and a.dst == OUT[0] and a.technique == "T0830" and a.severity == "high"
    assert a.fields["attacker_mac"] == EVIL[1] and a.fields["victim_mac"] == OUT[1]
    assert EVIL[1] in a.message and OUT[0] in a.message and OUT[1] in a.message
    # the owner keeps its address: its own ARP is no finding, the spoofer's next one joins the incident
    run.feed([arp(OUT, OUT[0], op=2, target=MASTER[0]), arp(EVIL, OUT[0], op=2, target=MASTER[0])],
             [at(t + 2), at(t + 4)])
    assert len(run.wire("wire.arp_spoof")) == 1 and run.wire("wire.arp_spoof")[0].count == 2


def test_replaced_device_takes_over_only_after_the_owner_fell_silent():
    run = learned_plant()
    new = (OUT[0], "02:00:00:00:00:99")  # the outstation's new network card
    t = LEARN_S + 3600
    run.feed([arp(new, OUT[0], op=2, target=MASTER[0])], [at(t)])
    assert [a.severity for a in run.wire("wire.arp_spoof")] == ["high"]
    run.feed([arp(new, OUT[0], op=2, target=MASTER[0])], [at(t + 2 * 3600)])  # old card silent since
    moved = run.wire("wire.arp_spoof")[-1]
    assert moved.severity == "medium" and "replaced device" in moved.message
    run.feed([arp(new, OUT[0], op=2, target=MASTER[0])], [at(t + 3 * 3600)])
    assert len(run.wire("wire.arp_spoof")) == 2  # the new card is the owner now


def test_known_ip_from_other_mac_alternating_is_a_relay():
    run = learned_plant()
    frames, ts = [], []
    for k in range(3):  # the outstation's answers arrive from the attacker's MAC, between its own
        i = LEARN_S + 40 + k
        frames += modbus_poll(i, mac_out=EVIL[1] if k % 2 else None)
        ts += [at(i), at(i) + 2 * 10**6]
    run.feed(frames, ts)
    (a,) = run.wire("wire.mac_change")
    assert a.src == EVIL[0] and a.dst == OUT[0] and a.fields["alternating"] and a.severity == "high"
    assert OUT[1] in a.message and EVIL[1] in a.message


def test_same_packet_twice_with_other_mac_and_ttl():
    run = learned_plant()
    t = at(LEARN_S + 40)
    req = struct.pack(">HHHBBHH", 7, 0, 6, 1, 3, 0, 2)
    first = tcp(MASTER, OUT, 40000, 502, payload=req, ttl=64, seq=99999, ip_id=4242, dmac=EVIL[1])
    again = tcp(MASTER, OUT, 40000, 502, payload=req, ttl=63, seq=99999, ip_id=4242, mac=EVIL[1])
    run.feed([first, again], [t, t + 300_000])  # forwarded 0.3 ms later, one hop less
    (a,) = run.wire("wire.relay")
    assert a.src == EVIL[0] and a.fields["attacker_mac"] == EVIL[1] and a.fields["ttl"] == [64, 63]
    assert f"{MASTER[0]}>{OUT[0]}" in a.fields["pairs"]


def test_ttl_of_another_stack():
    run = learned_plant()
    i = LEARN_S + 40
    run.feed(modbus_poll(i, ttl_master=128), [at(i), at(i) + 10**6])
    assert not run.wire()  # one frame of another class may be a corrupted one
    for k in (1, 2):
        run.feed(modbus_poll(i + k, ttl_master=128), [at(i + k), at(i + k) + 10**6])
    (a,) = run.wire("wire.ttl_change")
    assert a.src == MASTER[0] and "128" in a.message and "64" in a.message


def test_ttl_class_adopted_after_learning():
    """A host first seen while monitoring: its class, alone for five minutes, becomes its baseline."""
    run = learned_plant()
    new = ("10.0.0.30", "02:00:00:00:00:30")
    t = LEARN_S + 40
    run.feed([tcp(new, OUT, 47000, 8000, seq=10 * k, ip_id=k) for k in range(25)],
             [at(t + 15 * k) for k in range(25)])  # six minutes at TTL 64
    assert not run.wire()
    t += 400
    run.feed([tcp(new, OUT, 47000, 8000, ttl=128, seq=10 * k + 5, ip_id=500 + k) for k in range(3)],
             [at(t + k) for k in range(3)])
    (a,) = run.wire("wire.ttl_change")
    assert a.src == new[0] and a.fields["learned_initial_ttl"] == "64" and a.first_ts == at(t)


def test_syn_scan_and_sweeps():
    run = learned_plant()
    t = LEARN_S + 40
    frames, ts = [], []
    for k in range(40):  # ARP sweep of the segment
        frames.append(arp(EVIL, EVIL[0], target=f"10.0.0.{100 + k}"))
        ts.append(at(t) + k * 10**6)
    for port in range(1, 31):  # SYN scan of the outstation; closed ports answer RST
        frames.append(tcp(EVIL, OUT, 55555, port, flags="S", seq=777, ip_id=port))
        frames.append(raw(Ether(src=OUT[1], dst=EVIL[1]) / IP(src=OUT[0], dst=EVIL[0])
                          / TCP(sport=port, dport=55555, flags="RA", seq=0, ack=778)))
        ts += [at(t + 1) + port * 10**6, at(t + 1) + port * 10**6 + 100]
    for h in range(12):  # and one port on many hosts
        frames.append(tcp(EVIL, (f"10.0.0.{150 + h}", "02:00:00:00:01:00"), 55556, 102, flags="S", ip_id=h))
        ts.append(at(t + 2) + h * 10**6)
    run.feed(frames, ts)
    (scan,) = run.wire("wire.port_scan")
    assert scan.src == EVIL[0] and scan.dst == OUT[0] and scan.technique == "T0840" and scan.severity == "high"
    assert scan.fields["ports"] >= 30 and scan.first_ts - at(t + 1) < S  # within a second of the first probe
    (sweep,) = run.wire("wire.host_sweep")
    assert sweep.src == EVIL[0] and sweep.fields["hosts"] >= 10 and sweep.technique == "T0846"
    (arps,) = run.wire("wire.arp_sweep")
    assert arps.src == EVIL[0] and arps.fields["addresses"] >= 16 and arps.fields["attacker_mac"] == EVIL[1]


def test_master_reconnecting_is_no_scan():
    """SYNs to the port a client always uses, and RSTs of aborted connections, are no probes."""
    run = learned_plant()
    t = LEARN_S + 40
    frames, ts = [], []
    for k in range(30):
        frames.append(tcp(MASTER, OUT, 41000 + k, 502, flags="S", seq=1 + k, ip_id=900 + k))
        frames.append(tcp(MASTER, OUT, 41000 + k, 502, flags="R", seq=5 + k, ip_id=950 + k))
        ts += [at(t) + k * 10**7, at(t) + k * 10**7 + 1000]
    run.feed(frames, ts)
    assert not run.wire()


def test_state_keeps_what_was_learned(tmp_path):
    run = learned_plant()
    run.engine.save(tmp_path / "st", key=b"k" * 32)
    back = Run(DetectionEngine.load(tmp_path / "st", key=b"k" * 32))
    assert not back.engine.wire.learning
    back.feed([arp(OUT, OUT[0], op=2, target=MASTER[0]), arp(EVIL, OUT[0], op=2, target=MASTER[0])],
              [at(LEARN_S + 60), at(LEARN_S + 61)])
    (a,) = back.wire("wire.arp_spoof")
    assert a.src == EVIL[0] and a.dst == OUT[0]


def test_tables_are_bounded():
    from models.wire import WireDetector, WireFrames

    w = WireDetector(capacity=8)
    frames = [arp((f"10.1.0.{i}", f"02:00:00:00:01:{i:02x}"), f"10.1.0.{i}") for i in range(1, 30)]
    b = FrameBatch.from_frames(frames, ts=np.arange(len(frames)) * S)
    w.learn(WireFrames.from_decoded(b, decode(b)))
    assert len(w.owner) == 8 and w.owner.overflow == 21


def test_decode_reads_arp_and_ttl():
    f = [arp(EVIL, OUT[0], op=2, target=MASTER[0]), tcp(MASTER, OUT, 1, 2, ttl=77, ip_id=4321)]
    d = decode(FrameBatch.from_frames(f, ts=[0, 1]))
    assert d.arp_op.tolist() == [2, 0] and d.skip_counts() == {"not_ip": 1}
    assert hex(int(d.arp_sha[0])) == "0x20000000066" and int(d.arp_spa[0]) == 0x0A000014
    assert int(d.arp_tpa[0]) == 0x0A00000A and int(d.ttl[1]) == 77 and int(d.ip_id[1]) == 4321


def _bpf_run(prog, pkt: bytes) -> int:
    """A classic BPF interpreter for the opcodes bpf_for_ports uses."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x28:
            a = int.from_bytes(pkt[k:k + 2], "big") if k + 2 <= len(pkt) else None
        elif code == 0x30:
            a = pkt[k] if k < len(pkt) else None
        elif code == 0xB1:
            x = 4 * (pkt[k] & 0x0F)
        elif code == 0x48:
            a = int.from_bytes(pkt[x + k:x + k + 2], "big") if x + k + 2 <= len(pkt) else None
        elif code == 0x50:
            a = pkt[x + k] if x + k < len(pkt) else None
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x06:
            return k
        if a is None:
            return 0  # reading past the packet rejects it
        pc += 1


def test_capture_filter_admits_arp_and_syns():
    from agent.live import ICS_PORTS, bpf_for_ports

    prog = bpf_for_ports(ICS_PORTS)
    keep = [arp(EVIL, OUT[0], op=2), tcp(EVIL, OUT, 5555, 8080, flags="S"),
            tcp(OUT, EVIL, 8080, 5555, flags="RA"), tcp(MASTER, OUT, 40000, 502, flags="A")]
    drop = [tcp(EVIL, OUT, 5555, 8080, flags="A"), tcp(EVIL, OUT, 5555, 8080, flags="PA", payload=b"x")]
    assert [bool(_bpf_run(prog, f)) for f in keep] == [True] * 4
    assert [bool(_bpf_run(prog, f)) for f in drop] == [False] * 2
    assert not _bpf_run(bpf_for_ports(ICS_PORTS, wire=False), keep[0])


def _wire_alerts_on(path) -> list:
    """Learn the first half of a capture (by time), monitor the rest; the wire alerts raised."""
    batches = list(CaptureReader(path))
    ts = np.concatenate([b.ts for b in batches]) if batches else np.empty(0, np.int64)
    if ts.shape[0] < 20:
        return []
    engine = DetectionEngine(learn_seconds=None, learn_until_ns=int(np.median(ts)) + 1,
                             detectors=("allowlist", "wire"))
    run = Run(engine)
    for b in batches:
        run.batch(b)
    engine.process(run.pipeline.finish())
    engine.finish()
    return run.wire()


@pytest.mark.parametrize("name", ["modbus.pcap", "dnp3.pcap", "iec104.pcap", "mixed.pcap"])
def test_project_captures_raise_no_wire_alert(name):
    assert _wire_alerts_on(PROJECT_PCAPS / name) == []


@needs_shared
def test_public_captures_raise_no_wire_alert():
    noisy = {}
    for path in shared_pcaps():
        alerts = _wire_alerts_on(path)
        if alerts:
            noisy[path.name] = [(a.rule, a.message) for a in alerts]
    assert noisy == {}


QUT = SHARED_PCAPS / "labelled" / "qut_dnp3_mitm_training_infrequent"


@needs_shared
def test_qut_mitm_is_seen_on_the_wire():
    from agent.eval import evaluate
    from models.scoring import read_labels

    labels = read_labels(f"{QUT}.labels.csv")
    result, engine = evaluate(f"{QUT}.pcap", f"{QUT}.labels.csv", learn_until_s=labels[0].start_ts - 5.0, grace_s=10.0)
    mitm = [lab for lab in labels if lab.scenario.lower().startswith("mitm")]
    assert mitm
    first = mitm[0]
    hits = [a for a in engine.alerts if a.rule in ("wire.arp_spoof", "wire.mac_change", "wire.relay")
            and first.start_ts - 1 <= a.first_ts / 1e9 <= first.end_ts + 10]
    assert {a.rule for a in hits} >= {"wire.arp_spoof", "wire.mac_change"}
    for a in hits:
        assert a.src == "192.168.10.66" and a.fields["attacker_mac"] == "00:10:18:cb:8c:13"
    spoof = [a for a in hits if a.rule == "wire.arp_spoof"]
    assert {a.dst for a in spoof} == {"192.168.10.221", "192.168.10.222"}
    assert min(a.first_ts for a in hits) / 1e9 - first.start_ts < 1.0
    assert not [r for r in result["false_alert_rules"] if r.startswith("wire.")]
