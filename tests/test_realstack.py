"""The real-stack harness (bench/realstack): pymodbus, dnp3py and c104 (lib60870) on loopback with
scripted attacks.  A short run of all three at once; the captures must parse cleanly in otwatch,
carry each protocol's traffic from the master, the device and the attacker, and the labels must be
well-formed and describe what is on the wire."""

from __future__ import annotations

import csv
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from agent.pipeline import Pipeline, parse_file
from parsers.events import KIND_PDU, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "realstack" / "run.py"
NET = "127.0.1"  # not the harness's default 127.0.0: a long run of it may be going on beside the test
MASTER, ATTACKER = f"{NET}.10", f"{NET}.66"
DEVICE = {"modbus": f"{NET}.20", "dnp3": f"{NET}.21", "iec104": f"{NET}.22"}
PROTO_CODE = {"modbus": PROTO_MODBUS, "dnp3": PROTO_DNP3, "iec104": PROTO_IEC104}
PACKAGE = {"modbus": "pymodbus", "dnp3": "dnp3", "iec104": "c104"}  # import names (dnp3py installs dnp3)
STAGES = ["recon", "unauthorised_write", "flood", "dangerous_function", "measurement_spoofing", "replay"]
# functions each capture must carry (Modbus FC, DNP3 application FC, IEC-104 type id / S-frame 512)
MUST_HAVE = {
    "modbus": {1, 3, 4, 6, 8, 16, 43},
    "dnp3": {1, 2, 3, 4, 5, 13, 18, 21, 129},
    "iec104": {13, 45, 50, 100, 102, 103, 105, 512},
}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ports 502/2404/20000, capture on lo, raw-socket injection)"
    if not (shutil.which("dumpcap") or shutil.which("tcpdump")):
        return "needs dumpcap or tcpdump"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "needs a C compiler for the harness's bind shim"
    missing = [name for name in PACKAGE.values() if find_spec(name) is None]
    if missing:
        return f"real stacks not installed ({', '.join(missing)}): pip install -e '.[realstack]'"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _record(out: Path, *args: str, timeout: float) -> None:
    cmd = [sys.executable, str(RUN), "--protocol", "all", "--out", str(out), "--seed", "7", *args]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, REALSTACK_NET=NET)
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realstack")
    # ~75 s for all three at once: 25 s of polling, commands every ~12 s, short gaps and flood
    timing = {"--benign": 25, "--gap": 2, "--tail": 5, "--flood": 2, "--command-every": 12}
    _record(out, *(str(x) for kv in timing.items() for x in kv), timeout=300)
    return out


def pcap_records(path: Path):
    """(ts seconds, IPv4 src, TTL) of each frame of a classic Ethernet pcap, and the raw records."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data, 0)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), "run.py writes classic pcap"
    scale = 1e-6 if magic == 0xA1B2C3D4 else 1e-9
    off, out = 24, []
    while off + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16 : off + 16 + incl]
        src, ttl = None, None
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
            src, ttl = socket.inet_ntoa(frame[26:30]), frame[22]
        out.append((sec + frac * scale, src, ttl, data[off : off + 16 + incl]))
        off += 16 + incl
    return data[:24], out


def read_labels(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        rd = csv.DictReader(fh)
        assert rd.fieldnames == ["start_ts", "end_ts", "scenario", "src", "dst", "protocol", "description"]
        return list(rd)


@pytest.mark.parametrize("proto", ["modbus", "dnp3", "iec104"])
def test_capture_parses_with_every_role_and_function(short_run, proto, tmp_path):
    pcap = short_run / f"{proto}.pcap"
    labels = read_labels(short_run / f"{proto}.labels.csv")
    spoof = next(lab for lab in labels if lab["scenario"] == "measurement_spoofing")
    # Before the injection the streams are clean: no parse error, gap or decode error at all.  (The
    # forged segments then overlap the device's real bytes; what that does to a parser is the
    # detectors' business, not the harness's.)
    head, recs = pcap_records(pcap)
    clean = tmp_path / "clean.pcap"
    clean.write_bytes(head + b"".join(r[3] for r in recs if r[0] < float(spoof["start_ts"])))
    p = Pipeline()
    parse_file(clean, p)
    assert p.error_summary() == {}
    ev = parse_file(pcap)
    ev = ev.select((ev.kind == KIND_PDU) & (ev.protocol == PROTO_CODE[proto]))
    hosts = lambda col: {str(ipaddress.IPv4Address(int(x))) for x in np.unique(col)}
    assert {MASTER, ATTACKER, DEVICE[proto]} <= hosts(ev.src) and {MASTER, ATTACKER, DEVICE[proto]} <= hosts(
        ev.dst
    )
    missing = MUST_HAVE[proto] - set(np.unique(ev.function).tolist())
    assert not missing, f"{proto}: functions missing from the capture: {sorted(missing)}"
    if proto == "iec104":  # data transfer runs from the start: the RTU reports on change (cause 3)
        first_attack = int(float(labels[0]["start_ts"]) * 1e9)
        to_master = ev.dst == int(ipaddress.IPv4Address(MASTER))
        assert (
            np.count_nonzero((ev.function == 13) & (ev.cause == 3) & to_master & (ev.ts < first_attack)) > 10
        )


@pytest.mark.parametrize("proto", ["modbus", "dnp3", "iec104"])
def test_labels_well_formed_and_on_the_wire(short_run, proto):
    labels = read_labels(short_run / f"{proto}.labels.csv")
    assert [lab["scenario"] for lab in labels] == STAGES
    _, recs = pcap_records(short_run / f"{proto}.pcap")
    first, last = recs[0][0], recs[-1][0]
    prev_end = first
    for lab in labels:
        start, end = float(lab["start_ts"]), float(lab["end_ts"])
        assert prev_end < start < end < last, lab
        prev_end = end
        assert lab["protocol"] == proto and lab["description"]
        in_window = [r for r in recs if start <= r[0] <= end]
        if lab["scenario"] == "measurement_spoofing":  # device → master, injected: the forged TTL
            assert (lab["src"], lab["dst"]) == (DEVICE[proto], MASTER)
            assert any(r[1] == DEVICE[proto] and r[2] == 128 for r in in_window), "no injected segment"
        else:
            assert (lab["src"], lab["dst"]) == (ATTACKER, DEVICE[proto])
            assert any(r[1] == ATTACKER for r in in_window), (
                f"{lab['scenario']}: attacker silent in its window"
            )
    # nothing from the attacker outside its stages (its earlier sniffing is passive)
    windows = [(float(lab["start_ts"]), float(lab["end_ts"]) + 1.0) for lab in labels]
    stray = [r for r in recs if r[1] == ATTACKER and not any(a <= r[0] <= b for a, b in windows)]
    assert not stray
    flood = next(lab for lab in labels if lab["scenario"] == "flood")
    n = sum(
        1 for r in recs if r[1] == ATTACKER and float(flood["start_ts"]) <= r[0] <= float(flood["end_ts"])
    )
    assert n > 100, f"flood of {n} frames in {float(flood['end_ts']) - float(flood['start_ts']):.1f} s"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OTWATCH_REALSTACK_FULL"),
                    reason="set OTWATCH_REALSTACK_FULL=1 for the 17-minute default run")
def test_full_length_run_evaluates(tmp_path):
    """The default run (10 min of benign traffic, 45 s gaps), scored by evaluate.py."""
    _record(tmp_path, timeout=1800)
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "realstack" / "evaluate.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") > 18
