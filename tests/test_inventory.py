"""AssetInventory on real captures: frame facts and polling periods against tshark, bounds, persistence
(a restart in the middle gives the same result as one pass), learning and new-asset reports, function
classes of conversations, and the ``otwatch assets`` command in every format."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from collections import Counter, defaultdict

import numpy as np
import pytest

from agent.assets_cmd import build_inventory, format_dot
from agent.cli import main
from agent.pipeline import Pipeline
from agent.sources import CaptureReader
from models.function_classes import CLASS_NAMES, function_class
from models.inventory import AssetInventory, InventoryLimits
from parsers.events import PROTO_MODBUS
from parsers.frames import FrameBatch
from tests.conftest import SHARED_PCAPS, needs_shared, needs_tshark
from tests.tshark import split_multi, tshark_fields

MB_TEST = "modbus/iti_modbus_test.pcap"  # 6 hosts, several cyclic Modbus conversations
MB_MIXED = "modbus/zeek_modbus-and-non-modbus-p502.pcap"  # Modbus plus hosts that speak only other things
MB_ICSNPP = "modbus/icsnpp_modbus_example.pcap"  # nearly every public function code
IEC_MISC = "iec104/iti_javarmi_and_iec_misc.pcap"


def run_inventory(files, inventory=None, batches_before_swap=None):
    """Replay ``files`` with an inventory; optionally persist and restore it after N batches."""
    pipeline = Pipeline()
    inv = inventory or AssetInventory()
    inv.attach(pipeline)
    n = 0
    for f in files:
        for batch in CaptureReader(f, block_size=8192):  # small blocks: many batches
            inv.observe_events(pipeline.process(batch))
            inv.refresh_identities()
            n += 1
            if batches_before_swap is not None and n == batches_before_swap:
                data = json.loads(json.dumps(inv.to_dict()))
                pipeline.frame_observers.remove(inv.observe_frames)
                inv = AssetInventory.from_dict(data, book=pipeline.book).attach(pipeline)
    inv.observe_events(pipeline.finish())
    inv.refresh_identities()
    return inv, n


# -- frame facts against tshark ------------------------------------------------------------------------
@needs_shared
@needs_tshark
@pytest.mark.parametrize("capture", [MB_TEST, MB_MIXED, IEC_MISC])
def test_frames_bytes_and_macs_match_tshark(capture):
    pcap = SHARED_PCAPS / capture
    rows = tshark_fields(pcap, ["ip.src", "ip.dst", "eth.src", "frame.len"], display_filter="ip && !icmp")
    out_frames, out_bytes, in_frames, macs = Counter(), Counter(), Counter(), defaultdict(set)
    for r in rows:
        src, dst = r["ip.src"].split(",")[-1], r["ip.dst"].split(",")[-1]
        out_frames[src] += 1
        out_bytes[src] += int(r["frame.len"])
        in_frames[dst] += 1
        macs[src].add(r["eth.src"])
    inv, _ = build_inventory([pcap])
    ours = {a["address"]: a for a in inv.assets() if ":" not in a["address"]}
    assert set(ours) == set(out_frames)
    for addr, a in ours.items():
        assert a["frames_out"] == out_frames[addr], addr
        assert a["bytes_out"] == out_bytes[addr], addr
        assert a["frames_in"] == in_frames[addr], addr
        assert set(a["macs"]) >= macs[addr] - {""}, addr


@needs_shared
@needs_tshark
def test_non_ics_assets_are_marked():
    pcap = SHARED_PCAPS / MB_MIXED
    ics_talkers = {r["ip.src"] for r in tshark_fields(pcap, ["ip.src"], display_filter="mbtcp")}
    ics_talkers |= {r["ip.dst"] for r in tshark_fields(pcap, ["ip.dst"], display_filter="mbtcp")}
    inv, _ = build_inventory([pcap])
    non_ics = {a["address"] for a in inv.assets() if not a["ics"]}
    assert non_ics, "the capture has hosts that speak no Modbus"
    assert non_ics.isdisjoint(ics_talkers)
    assert {a["address"] for a in inv.assets() if a["ics"]} <= ics_talkers
    counts = inv.counts()
    assert counts["assets"]["other"]["none"] == len(non_ics)


# -- polling period against tshark ---------------------------------------------------------------------
@needs_shared
@needs_tshark
def test_polling_period_matches_tshark_request_intervals():
    pcap = SHARED_PCAPS / MB_TEST
    rows = tshark_fields(pcap, ["ip.src", "ip.dst", "frame.time_epoch", "mbtcp.unit_id", "modbus.func_code",
                                "modbus.reference_num", "modbus.word_cnt", "_ws.col.Info"], display_filter="mbtcp")
    last, intervals = {}, defaultdict(list)
    for r in rows:
        if "Query" not in r["_ws.col.Info"]:
            continue
        conv = (r["ip.src"], r["ip.dst"])
        sig = conv + (r["mbtcp.unit_id"], r["modbus.func_code"], r["modbus.reference_num"], r["modbus.word_cnt"])
        t = float(r["frame.time_epoch"])
        if sig in last:
            intervals[conv].append(t - last[sig])
        last[sig] = t
    inv, _ = build_inventory([pcap])
    tight = 0
    for c in inv.conversations():
        theirs = intervals.get((c["client"], c["server"]), [])[-64:]  # we keep the last 64
        if len(theirs) < 20:
            continue
        median = statistics.median(theirs)
        share = sum(abs(x - median) <= 0.25 * median for x in theirs) / len(theirs)
        if abs(share - 0.6) > 0.1:  # not borderline: the same verdict
            assert c["cyclic"] == (share >= 0.6), c
        if sum(abs(x - median) <= 0.05 * median for x in theirs) >= 0.9 * len(theirs):
            # a clean poll cycle: the same period within 1 %
            assert c["cyclic"] and c["polling_period_s"] == pytest.approx(median, rel=0.01), c
            tight += 1
    assert tight >= 3


# -- function classes of a conversation -----------------------------------------------------------------
@needs_shared
@needs_tshark
def test_conversation_classes_follow_tshark_function_codes():
    pcap = SHARED_PCAPS / MB_ICSNPP
    rows = tshark_fields(pcap, ["modbus.func_code"], display_filter="modbus && ip.src == 127.0.0.1")
    expected = Counter()
    for r in rows:
        for fc in split_multi(r["modbus.func_code"]):
            fc = int(fc)
            if fc == 8:
                continue  # sub-function dependent: checked in test_function_classes_by_flags
            cls = function_class(np.array([PROTO_MODBUS]), np.array([fc]))[0]
            expected[CLASS_NAMES[int(cls)]] += 1
    inv, _ = build_inventory([pcap])
    (conv,) = [c for c in inv.conversations() if c["client"] == "127.0.0.1"]
    got = Counter(conv["classes"])
    got["diagnostic"] -= sum(int(k) for f, k in conv["functions"].items() if f == "8")
    assert +got == +expected
    assert set(conv["classes"]) == {"read", "write", "diagnostic", "file"}


def test_function_classes_by_flags():
    p = np.array([PROTO_MODBUS] * 4)
    f = np.array([8, 8, 90, 90])
    cls = function_class(p, f, is_write=np.array([False, True, False, False]),
                         is_control=np.array([False, False, False, True]))
    assert [CLASS_NAMES[int(c)] for c in cls] == ["diagnostic", "write", "read", "control"]
    # codes outside the tables and unreadable rows are "other", never an index error
    assert function_class(np.array([1, 2, 3, 0]), np.array([-1, 5000, 300, 3])).tolist() == [0, 0, 0, 0]


# -- bounds ------------------------------------------------------------------------------------------------
@needs_shared
def test_bounds_refuse_and_count(capsys):
    pcap = SHARED_PCAPS / "modbus/iti_mb2.pcap"  # 38 assets, many conversations
    full, _ = build_inventory([pcap])
    assert len(full.assets()) > 10 and len(full.conversations()) > 5
    small, _ = build_inventory([pcap], InventoryLimits(max_assets=5, max_conversations=3, max_values=2))
    assert len(small.assets()) == 5 and len(small.conversations()) == 3
    d = small.counts()["dropped"]
    assert d["assets"] == len(full.assets()) - 5
    assert d["conversations"] > 0 and d["conversation_pdus"] > 0 and d["asset_frames"] > 0
    for a in small.assets():
        assert len(a["macs"]) <= 2
        for r in a["roles"]:
            assert len(r["units"]) <= 2
    assert main(["assets", str(pcap), "--max-assets", "5", "--max-conversations", "3"]) == 0
    out = capsys.readouterr().out
    assert "inventory bounds reached" in out and f"{d['assets']} new assets refused" in out


# -- persistence ---------------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("capture", [MB_TEST, "dnp3/itifw_dataset_exchange.pcap", IEC_MISC])
def test_restore_mid_capture_gives_the_same_inventory(capture):
    pcap = SHARED_PCAPS / capture
    one, n = run_inventory([pcap])
    assert n >= 1
    two, _ = run_inventory([pcap], batches_before_swap=max(1, n // 2))
    assert two.assets() == one.assets()
    assert two.conversations() == one.conversations()
    again = AssetInventory.from_dict(json.loads(json.dumps(one.to_dict())))
    assert again.to_dict() == one.to_dict()


def test_from_dict_rejects_other_data():
    with pytest.raises(ValueError):
        AssetInventory.from_dict({"assets": []})
    with pytest.raises(ValueError):
        AssetInventory.from_dict({"format": "otwatch-inventory", "version": 99})


# -- learning and new assets -----------------------------------------------------------------------------------
@needs_shared
def test_new_assets_and_conversations_after_learning():
    pipeline = Pipeline()
    inv = AssetInventory().attach(pipeline)
    seen = []
    inv.on_new.append(lambda kind, key: seen.append(kind))
    first = SHARED_PCAPS / "modbus/ndpi_modbus.pcap"
    second = SHARED_PCAPS / "dnp3/itifw_read_and_response.pcap"
    for b in CaptureReader(first):
        inv.observe_events(pipeline.process(b))
    inv.observe_events(pipeline.finish())
    baseline = {a["address"] for a in inv.assets()}
    inv.end_learning()
    assert inv.pop_new() == []
    boundary = int(pipeline.stats.last_ts) + 1
    for b in CaptureReader(second):
        inv.observe_events(pipeline.process(b))
    inv.observe_events(pipeline.finish())
    new = inv.pop_new()
    new_assets = {n["record"]["address"] for n in new if n["kind"] == "asset"}
    new_convs = [n["record"] for n in new if n["kind"] == "conversation"]
    assert new_assets == {a["address"] for a in inv.assets()} - baseline and new_assets
    assert [c["protocol"] for c in new_convs] == ["dnp3"]
    assert Counter(seen) == Counter(n["kind"] for n in new)
    assert inv.pop_new() == []
    since = inv.new_since(boundary)
    assert {a["address"] for a in since["assets"]} == new_assets


# -- link layer (synthetic: no shared capture has VLAN tags) ---------------------------------------------------
def test_vlan_mac_and_services_from_frames():
    from scapy.all import IP, TCP, Dot1Q, Ether, raw

    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    frames = [
        raw(Ether(src=a, dst=b) / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=502, flags="S")),
        raw(Ether(src=b, dst=a) / Dot1Q(vlan=7) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=502, dport=40000, flags="SA")),
        raw(Ether(src=a, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="10.0.0.255") / TCP(sport=1, dport=2)),
    ]
    pipeline = Pipeline()
    inv = AssetInventory().attach(pipeline)
    inv.observe_events(pipeline.process(FrameBatch.from_frames(frames, ts=[1, 2, 3])))
    by = {x["address"]: x for x in inv.assets()}
    assert set(by) == {"10.0.0.1", "10.0.0.2"}  # the broadcast address sends nothing: no asset
    assert by["10.0.0.1"]["macs"] == [a] and by["10.0.0.2"]["macs"] == [b]
    assert by["10.0.0.1"]["vlans"] == [7]
    assert by["10.0.0.2"]["services"] == ["tcp/502"] and by["10.0.0.1"]["services"] == []
    assert by["10.0.0.1"]["frames_out"] == 2 and by["10.0.0.2"]["frames_in"] == 1
    assert not by["10.0.0.1"]["ics"]  # a handshake is not a Modbus PDU


# -- the command ---------------------------------------------------------------------------------------------------
@needs_shared
def test_cli_formats(tmp_path, capsys):
    pcap = str(SHARED_PCAPS / MB_ICSNPP)
    inv, _ = build_inventory([SHARED_PCAPS / MB_ICSNPP])
    assert main(["assets", pcap, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["assets"] == inv.assets() and data["conversations"] == inv.conversations()
    assert data["counts"]["assets"]["modbus"] == {"client": 2, "server": 2}  # 127.0.0.1 is both

    out = tmp_path / "assets.csv"
    assert main(["assets", pcap, "--format", "csv", "-o", str(out)]) == 0
    assets_part, convs_part = out.read_bytes().decode().split("\r\n\r\n")
    assets = list(csv.DictReader(io.StringIO(assets_part)))
    convs = list(csv.DictReader(io.StringIO(convs_part)))
    assert [r["address"] for r in assets] == [a["address"] for a in inv.assets()]
    assert convs[0]["protocol"] == "modbus" and convs[0]["port"] == "502"

    assert main(["assets", pcap]) == 0
    table = capsys.readouterr().out
    assert "Zeek Modbus Test" in table and "modbus client" in table and "read=" in table

    assert main(["assets", pcap, "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph") and '"127.0.0.1" -> "127.0.0.1"' in dot


def test_cli_bad_input(tmp_path, capsys):
    assert main(["assets", str(tmp_path / "missing.pcap")]) == 2
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    assert main(["assets", str(bad)]) == 2
    assert "not a pcap" in capsys.readouterr().err


@needs_shared
@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot (apt-get install graphviz)")
@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_render_picture(tmp_path, suffix, magic):
    pic = tmp_path / f"map{suffix}"
    pcap = str(SHARED_PCAPS / MB_TEST)
    assert main(["assets", pcap, "--format", "json", "-o", str(tmp_path / "a.json"), "--render", str(pic)]) == 0
    assert pic.read_bytes().startswith(magic)
    if suffix == ".svg":
        inv, _ = build_inventory([SHARED_PCAPS / MB_TEST])
        text = pic.read_text()
        for c in inv.conversations():  # every conversation's endpoints are drawn
            assert c["client"] in text and c["server"] in text
        assert format_dot(inv.assets(), inv.conversations()).count("->") == len(inv.conversations())
