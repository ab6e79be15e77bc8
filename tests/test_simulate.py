"""`otwatch simulate` and the bundled captures in pcaps/: determinism, tshark-cleanliness, labels
that say the truth (checked against what tshark sees in each labelled interval), realistic benign
traffic, and the CLI's input errors."""

from __future__ import annotations

import csv
import hashlib
import ipaddress
import json
import re
import shlex
import statistics
import subprocess
from functools import lru_cache
from pathlib import Path

import dpkt
import pytest

from agent.cli import main
from agent.simulator.common import SCENARIOS
from tests.conftest import PROJECT_PCAPS, needs_tshark
from tests.tshark import split_multi, tshark_fields

BUNDLED = ("modbus", "dnp3", "iec104", "mixed")
MASTER, ATTACKER = "10.20.0.10", "10.20.0.66"
ATTACKER_MAC = "02:4f:54:00:00:42"
WRITES = {"modbus": {5, 6, 15, 16}, "dnp3": {3, 4, 5}, "iec104": {45, 46, 47, 48, 49, 50, 51}}
LABEL_RE = re.compile(r"^\d{10}\.\d{6}$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def readme_commands() -> dict[str, list[str]]:
    """The `otwatch simulate ...` lines of pcaps/README.md, by output name."""
    text = (PROJECT_PCAPS / "README.md").read_text()
    commands = {}
    for line in text.splitlines():
        if line.startswith("otwatch simulate "):
            argv = shlex.split(line)[1:]
            out = Path(argv[argv.index("-o") + 1])
            commands[out.stem] = argv
    return commands


def labels(name: str) -> list[dict]:
    with open(PROJECT_PCAPS / f"{name}.labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def us(text: str) -> int:
    """'1767601005.117000[000]' -> integer microseconds (no float rounding)."""
    sec, _, frac = text.partition(".")
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


@lru_cache(maxsize=None)
def frames(name: str) -> list[tuple[int, str, str]]:
    """(ts_us, src, dst) of every frame, read with dpkt."""
    out = []
    with open(PROJECT_PCAPS / f"{name}.pcap", "rb") as fh:
        for ts, buf in dpkt.pcap.Reader(fh):
            ip = dpkt.ethernet.Ethernet(buf).data
            out.append((us(f"{ts:.6f}"), ipaddress.ip_address(ip.src).exploded, ipaddress.ip_address(ip.dst).exploded))
    return out


FIELDS = ["frame.time_epoch", "ip.src", "ip.dst", "eth.src", "tcp.flags.syn", "tcp.flags.fin", "tcp.len",
          "tcp.srcport", "tcp.reassembled_in", "tcp.analysis.keep_alive", "modbus.func_code", "modbus.regnum16", "modbus.data",
          "modbus.regval_uint16", "dnp3.ctl.prifunc", "dnp3.al.func", "dnp3.al.obj", "dnp3.al.point_index",
          "dnp3.al.ana.int", "dnp3.al.anaout.int", "iec60870_104.type", "iec60870_104.utype", "iec60870_104.tx",
          "iec60870_asdu.typeid", "iec60870_asdu.causetx", "iec60870_asdu.ioa", "iec60870_asdu.float"]


@lru_cache(maxsize=None)
def dissected(name: str) -> list[dict]:
    rows = tshark_fields(PROJECT_PCAPS / f"{name}.pcap", FIELDS, extra=["-2"])
    for r in rows:
        r["us"] = us(r["frame.time_epoch"])
    return rows


def ints(value: str) -> list[int]:
    return [int(v, 0) for v in split_multi(value)]


def modbus_written(r) -> list[int]:
    """Register values a Modbus write request carries (FC 6 shows as raw data, FC 16 as registers)."""
    if r["tcp.srcport"] == "502":
        return []
    values = ints(r["modbus.regval_uint16"]) if 16 in ints(r["modbus.func_code"]) else []
    if 6 in ints(r["modbus.func_code"]):
        values += [int(d.replace(":", ""), 16) for d in split_multi(r["modbus.data"])]
    return values


def between(rows, label, both_ways=True):
    lo, hi = us(label["start_ts"]), us(label["end_ts"])
    hosts = {label["src"], label["dst"]}
    for r in rows:
        if lo <= r["us"] <= hi:
            if label["dst"]:
                if {r["ip.src"], r["ip.dst"]} == hosts:
                    yield r
            elif label["src"] in (r["ip.src"], r["ip.dst"]):
                yield r


# -- determinism ---------------------------------------------------------------------------------
def test_readme_lists_every_bundled_capture():
    assert sorted(readme_commands()) == sorted(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_regeneration_is_byte_identical(name, tmp_path, capsys):
    argv = readme_commands()[name]
    argv[argv.index("-o") + 1] = str(tmp_path / f"{name}.pcap")
    assert main(argv) == 0
    assert f"{name}.pcap" in capsys.readouterr().out
    assert sha256(tmp_path / f"{name}.pcap") == sha256(PROJECT_PCAPS / f"{name}.pcap")
    assert sha256(tmp_path / f"{name}.labels.csv") == sha256(PROJECT_PCAPS / f"{name}.labels.csv")


def test_other_seed_gives_other_bytes(tmp_path):
    argv = ["simulate", "-o", str(tmp_path / "a.pcap"), "--protocols", "iec104", "--duration", "2m",
            "--attacks", "none"]
    assert main(argv + ["--seed", "1"]) == 0
    first = sha256(tmp_path / "a.pcap")
    assert main(argv + ["--seed", "1"]) == 0
    assert sha256(tmp_path / "a.pcap") == first
    assert main(argv + ["--seed", "2"]) == 0
    assert sha256(tmp_path / "a.pcap") != first


# -- tshark dissects everything cleanly ------------------------------------------------------------
@needs_tshark
@pytest.mark.parametrize("name", BUNDLED)
def test_tshark_dissects_cleanly(name):
    pcap = str(PROJECT_PCAPS / f"{name}.pcap")
    expert = subprocess.run(["tshark", "-n", "-r", pcap, "-q", "-z", "expert,error"], check=True,
                            capture_output=True, text=True).stdout
    assert "Errors" not in expert and "Malformed" not in expert, expert
    malformed = subprocess.run(["tshark", "-n", "-r", pcap, "-Y", "_ws.malformed || _ws.expert.severity == error"],
                               check=True, capture_output=True, text=True).stdout
    assert malformed == ""
    bad = subprocess.run(["tshark", "-n", "-r", pcap, "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
                          "-Y", "tcp.checksum.status != 1 || ip.checksum.status != 1 || dnp3.hdr.CRC.incorrect "
                                "|| dnp3.data_chunk.CRC.incorrect"],
                         check=True, capture_output=True, text=True).stdout
    assert bad == ""


# -- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_labels_are_well_formed_and_exact(name):
    rows = labels(name)
    all_frames = frames(name)
    first_ts, last_ts = all_frames[0][0], all_frames[-1][0]
    assert list(rows[0]) == ["start_ts", "end_ts", "scenario", "src", "dst", "protocol", "description"]
    assert len(rows) == len(SCENARIOS)
    previous_end = 0
    for row in rows:
        assert LABEL_RE.match(row["start_ts"]) and LABEL_RE.match(row["end_ts"])
        start, end = us(row["start_ts"]), us(row["end_ts"])
        assert previous_end < start < end <= last_ts, "intervals ordered and not overlapping"
        previous_end = end
        assert start - first_ts >= 0.5 * (last_ts - first_ts), "the first half is benign"
        assert row["scenario"] in SCENARIOS and row["protocol"] in ("modbus", "dnp3", "iec104")
        ipaddress.IPv4Address(row["src"])
        if row["dst"]:
            ipaddress.IPv4Address(row["dst"])
        else:
            assert row["scenario"] == "recon"
        assert row["description"]
        hosts = {row["src"], row["dst"]}
        inside = [f for f in all_frames if start <= f[0] <= end and
                  ({f[1], f[2]} == hosts if row["dst"] else row["src"] in f[1:])]
        # The interval is exactly the span of the attack's frames: it starts and ends on one of them.
        assert inside and inside[0][0] == start and inside[-1][0] == end
        assert {f[1] for f in inside} >= ({row["src"], row["dst"]} - {""}), "both directions are present"
    if name in ("modbus", "dnp3", "iec104"):
        assert {r["protocol"] for r in rows} == {name}
    assert not [f for f in all_frames if ATTACKER in f[1:] and f[0] < us(rows[0]["start_ts"])]


def test_mixed_has_every_scenario_on_every_protocol():
    rows = labels("mixed")
    assert sorted(r["scenario"] for r in rows) == sorted(SCENARIOS)
    assert {r["protocol"] for r in rows} == {"modbus", "dnp3", "iec104"}


# -- what tshark sees in each interval matches the scenario --------------------------------------
def voltages(rows, protocol: str, source: str) -> list[float]:
    """Bus voltage samples (kV) an outstation reported: Modbus IR 0, DNP3 AI 0, IEC-104 IOA 1001."""
    out = []
    for r in rows:
        if r["ip.src"] != source:
            continue
        if protocol == "modbus" and ints(r["modbus.func_code"]) == [4] and r["modbus.regnum16"]:
            nums, vals = ints(r["modbus.regnum16"]), ints(r["modbus.regval_uint16"])
            out += [v / 1000 for n, v in zip(nums, vals) if n == 0]
        elif protocol == "dnp3" and r["dnp3.al.ana.int"]:
            objs, values = split_multi(r["dnp3.al.obj"]), ints(r["dnp3.al.ana.int"])
            if objs == ["0x2001"]:  # analog change events only: indices align with values
                out += [v / 1000 for i, v in zip(ints(r["dnp3.al.point_index"]), values) if i == 0]
            elif "0x1e01" in objs:  # integrity response: the first g30 point is the voltage
                out.append(values[0] / 1000)
        elif protocol == "iec104" and r["iec60870_asdu.float"] and set(ints(r["iec60870_asdu.typeid"])) <= {13, 36}:
            ioas, floats = ints(r["iec60870_asdu.ioa"]), [float(v) for v in split_multi(r["iec60870_asdu.float"])]
            out += [v for i, v in zip(ioas, floats) if i == 1001]
    return out


@needs_tshark
@pytest.mark.parametrize("name", BUNDLED)
def test_each_interval_shows_its_scenario(name):
    rows = dissected(name)
    for label in labels(name):
        proto, src, dst, scenario = label["protocol"], label["src"], label["dst"], label["scenario"]
        inside = list(between(rows, label))
        layer = {"modbus": "modbus.func_code", "dnp3": "dnp3.ctl.prifunc", "iec104": "iec60870_104.type"}[proto]
        assert any(r[layer] for r in inside), f"{scenario}: no {proto} in its interval"
        sent = [r for r in inside if r["ip.src"] == src]
        modbus_fc = {fc for r in sent for fc in ints(r["modbus.func_code"])}
        dnp3_fc = {fc for r in sent for fc in ints(r["dnp3.al.func"])}
        types = {t for r in sent for t in ints(r["iec60870_asdu.typeid"])}
        codes = {"modbus": modbus_fc, "dnp3": dnp3_fc, "iec104": types}[proto]
        context = f"{name}: {scenario} {label['start_ts']}"
        if scenario == "recon":
            syns = [r for r in sent if r["tcp.flags.syn"] in ("1", "True") and r["ip.src"] == ATTACKER]
            assert len({r["ip.dst"] for r in syns}) >= 2, context
            assert {"modbus": {43} <= modbus_fc, "dnp3": 1 in dnp3_fc and any(
                "9" in split_multi(r["dnp3.ctl.prifunc"]) for r in sent), "iec104": 100 in types}[proto], context
        elif scenario == "unauthorised_write":
            assert src == ATTACKER and codes & WRITES[proto], context
        elif scenario == "setpoint_manipulation":
            assert src == MASTER and codes & WRITES[proto], context
            values = {"modbus": [v for r in sent for v in modbus_written(r)],
                      "dnp3": [v for r in sent for v in ints(r["dnp3.al.anaout.int"])],
                      "iec104": [round(float(v) * 1000) for r in sent for v in split_multi(r["iec60870_asdu.float"])]}
            writes = sum(1 for r in sent if set(ints(r[{"modbus": "modbus.func_code", "dnp3": "dnp3.al.func",
                                                         "iec104": "iec60870_asdu.typeid"}[proto]])) & WRITES[proto])
            assert 14500 in values[proto] or writes >= 10, context
        elif scenario == "dangerous_function":
            assert {"modbus": 8 in modbus_fc, "dnp3": bool(dnp3_fc & {13, 14, 18, 21}),
                    "iec104": 105 in types}[proto], context
        elif scenario == "flood":
            seconds = (us(label["end_ts"]) - us(label["start_ts"])) / 1e6
            assert len(sent) / seconds >= 100, context
        elif scenario == "mitm":
            assert {r["eth.src"] for r in inside} == {ATTACKER_MAC}, context
            before = [r for r in rows if {r["ip.src"], r["ip.dst"]} == {src, dst} and r["us"] < us(label["start_ts"])]
            assert ATTACKER_MAC not in {r["eth.src"] for r in before}
            if proto == "iec104":
                def repeats(rs):
                    seen, n = set(), 0
                    for r in rs:
                        if r["ip.src"] == dst:
                            for ns in ints(r["iec60870_104.tx"]):
                                n += ns in seen
                                seen.add(ns)
                    return n
                assert repeats(inside) > 0 and repeats(before) == 0, context
        elif scenario == "measurement_spoofing":
            lo = us(label["start_ts"])
            baseline = voltages([r for r in rows if lo - 300e6 <= r["us"] < lo], proto, src)
            spoofed = voltages(inside, proto, src)
            assert spoofed and len(set(baseline)) >= 2, context
            if "frozen" in label["description"]:
                assert len(set(spoofed)) == 1, context
            else:
                assert statistics.median(spoofed) - statistics.median(baseline) > 0.3, context


# -- benign traffic looks like a plant --------------------------------------------------------------
@needs_tshark
@pytest.mark.parametrize("name", BUNDLED)
def test_benign_part_is_realistic(name):
    rows = dissected(name)
    first_attack = min(us(r["start_ts"]) for r in labels(name))
    benign = [r for r in rows if r["us"] < first_attack]
    protocols = ("modbus", "dnp3", "iec104") if name == "mixed" else (name,)
    assert any(r["tcp.flags.syn"] in ("1", "True") for r in benign)
    assert any(r["tcp.reassembled_in"] for r in benign), "some PDU is split over two segments"
    if "modbus" in protocols:
        assert any(len(ints(r["modbus.func_code"])) >= 2 for r in benign), "two ADUs in one segment"
        assert any(r["tcp.analysis.keep_alive"] for r in benign)
        assert any(r["tcp.flags.fin"] in ("1", "True") for r in benign)
        master_writes = [r for r in benign if r["ip.src"] == MASTER and set(ints(r["modbus.func_code"])) & {6, 16}]
        assert master_writes, "the legitimate master writes in the learning part too"
        values = [v for r in master_writes for v in modbus_written(r)]
        assert values and all(v <= 11200 for v in values), "legitimate writes stay in their normal range"
    if "dnp3" in protocols:
        fcs = {fc for r in benign for fc in ints(r["dnp3.al.func"])}
        assert {0, 1, 2, 20, 129, 130} <= fcs  # confirm, read, write (time, IIN), enable unsol., responses
        assert any("0x3201" in r["dnp3.al.obj"] for r in benign), "time sync (g50v1)"
        assert any(len(split_multi(r["dnp3.ctl.prifunc"])) >= 2 for r in benign), "two link frames in a segment"
        assert any(r["ip.src"] == MASTER and 5 in ints(r["dnp3.al.func"]) for r in benign)
    if "iec104" in protocols:
        kinds = {t for r in benign for t in ints(r["iec60870_104.type"])}
        assert kinds == {0, 1, 3}, "I, S and U frames"
        causes = {c for r in benign for c in ints(r["iec60870_asdu.causetx"])}
        assert {1, 3, 6, 7, 10, 20} <= causes
        assert any(len(ints(r["iec60870_104.type"])) >= 2 for r in benign), "several APDUs in one segment"
    # periodic polls with small jitter: the master's requests to one outstation come on a steady cycle
    first = next(r for r in benign if r["ip.src"] == MASTER and (r["modbus.func_code"] or r["dnp3.al.func"]
                                                                   or r["iec60870_104.type"]))
    assert first["us"] - benign[0]["us"] < 5e6


# -- CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--duration", "ten"], ["--attacks", "recon,bogus"], ["--protocols", "profinet"],
                                 ["--duration", "5m"], ["--start", "yesterday"], ["--seed", "-1"]])
def test_bad_input_exits_2(bad, tmp_path, capsys):
    assert main(["simulate", "-o", str(tmp_path / "x.pcap"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("otwatch simulate: ") and err.count("\n") == 1


def test_missing_directory_exits_2(tmp_path):
    assert main(["simulate", "-o", str(tmp_path / "no" / "x.pcap"), "--attacks", "none", "--duration", "1m"]) == 2


def test_json_summary_and_custom_labels(tmp_path, capsys):
    out, lab = tmp_path / "s.pcap", tmp_path / "truth.csv"
    assert main(["simulate", "-o", str(out), "--labels", str(lab), "--protocols", "dnp3", "--duration", "5m",
                 "--attacks", "recon,flood", "--seed", "9", "--start", "2026-03-01T00:00:00Z", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pcap"] == str(out) and summary["labels"] == str(lab)
    assert sorted(a["scenario"] for a in summary["attacks"]) == ["flood", "recon"]
    assert summary["frames"] == len(list(dpkt.pcap.Reader(open(out, "rb"))))
    with open(lab, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["scenario"] for r in rows] == [a["scenario"] for a in summary["attacks"]]
    assert all(us(r["start_ts"]) >= 1772323200_000000 + 150e6 for r in rows)  # after half of 5 min
