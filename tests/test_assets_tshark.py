"""The asset inventory against Wireshark, on every public ICS capture.

For each capture tshark runs once (``-T fields``, tests/tshark.py) and we derive from *its*
dissection who is client and who is server of every ICS conversation, by evidence that does not
come from our code:

- Modbus/TCP: tshark's "Query" / "Response" verdict per frame (Info column): a query goes from
  client to server; port = the server's TCP port; units = ``mbtcp.unit_id``.
- DNP3: the data-link DIR bit (IEEE 1815-2012 §9.2.4.1.3.1: 1 = frame from the master); master
  link address = ``dnp3.src`` of its frames, outstation address = ``dnp3.dst`` (and vice versa).
  Our parser decides by the application function code instead, so this is an independent check.
- IEC 60870-5-104: the content of each ASDU (-101 §7.2.1.1, §7.2.3): process information in monitor
  direction (type ids 1-44, 70) and confirmations/terminations of commands (COT 7, 9, 10, 44-47) are
  sent by the controlled station; commands in control direction (45-69, 100-113) with COT
  activation/deactivation (6, 8) by the controlling station.  Our parser decides by the TCP
  connection (client = controlling), so this is an independent check too.  Units = common address.

Then compared, per capture: the set of conversations (protocol, client, server, server port), the
set of (address, protocol, role) and the units seen per role.  Identities are compared for the
captures with Modbus FC 43/14 and FC 17 responses and DNP3 group 0 responses: every object
tshark shows (id, string value, conformity level; FC 17 data) and every DNP3 device attribute.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from agent.assets_cmd import build_inventory
from parsers.dnp3_objects import attribute_name
from tests.conftest import SHARED_PCAPS, manifest_rows, needs_shared, needs_tshark
from tests.tshark import split_multi, tshark_fields

pytestmark = [needs_shared, needs_tshark]

FIELDS = ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport",
          "mbtcp.unit_id", "_ws.col.Info", "dnp3.ctl.dir", "dnp3.src", "dnp3.dst",
          "iec60870_asdu.typeid", "iec60870_asdu.causetx", "iec60870_asdu.addr", "dnp3.al.func", "dnp3.al.obj"]
ROLE_WORDS = {"modbus": ("client", "server"), "dnp3": ("master", "outstation"),
              "iec104": ("controlling", "controlled")}

# IEC 60870-5-101 §7.2.1.1: types sent in monitor direction; §7.2.3 causes.
IEC_MONITOR_TYPES = set(range(1, 45)) | {70}
IEC_CONTROL_TYPES = set(range(45, 70)) | set(range(100, 114))
IEC_COT_FROM_CONTROLLING = {6, 8}  # activation, deactivation
IEC_COT_FROM_CONTROLLED = {7, 9, 10, 44, 45, 46, 47}  # confirmations, termination, negative replies

# Differences we understand, per capture: (kind, item) -> reason.  Asserted exactly, so a new
# difference fails the test and an explained one that disappears fails it too.
EXPLAINED: dict = {
    "iec104/ndpi_iec104_logfile.pcap": {
        ("ours_only_conversation", ("iec104", "10.119.105.26", "10.175.211.3", 2404)):
            "this connection carries one S frame and no ASDU: nothing in its content says who controls; "
            "we take the TCP server (port 2404) as the controlled station, tshark's content gives no role",
    },
}

CAPTURES = [r["file"] for r in manifest_rows()]


def _addr(row: dict, side: str) -> str:
    return row[f"ip.{side}"] or row[f"ipv6.{side}"]


def _ports(row: dict) -> tuple[int, int]:
    sp = row["tcp.srcport"] or row["udp.srcport"]
    dp = row["tcp.dstport"] or row["udp.dstport"]
    return int(sp or 0), int(dp or 0)


# The conversation's port (docs/assets.md): the server's port, unless only the client side uses
# the protocol's IANA port (a DNP3 outstation that connects to its master's port 20000).
STANDARD_PORT = {"modbus": 502, "dnp3": 20000, "iec104": 2404}


def _conv(protocol, client, server, client_port, server_port):
    std = STANDARD_PORT[protocol]
    port = client_port if client_port == std and server_port != std else server_port
    return (protocol, client, server, port)


def _int(v: str) -> int:
    return int(v, 0)


TSHARK_DISSECTORS = {"modbus": "mbtcp", "dnp3": "dnp3", "iec104": "iec60870_104"}


def decode_as(learned_ports: dict) -> list[str]:
    """tshark ``-d`` options for the ports our registry found by content (DNP3 on 20001...): tshark
    dissects only standard ports (and a few heuristics), so we tell it where to look; what it then
    shows about roles is still its own reading of the bytes."""
    out = []
    for (transport, port), name in sorted(learned_ports.items()):
        out += ["-d", f"{'tcp' if transport == 6 else 'udp'}.port=={port},{TSHARK_DISSECTORS[name]}"]
    return out


_CACHE: dict = {}


def capture_data(capture: str):
    """(our inventory, tshark field rows) for one capture, computed once per test session."""
    if capture not in _CACHE:
        pcap = SHARED_PCAPS / capture
        inventory, pipeline = build_inventory([pcap])
        learned = {k: pipeline.registry.name(code) for k, code in pipeline.registry.learned_ports.items()}
        rows = tshark_fields(pcap, FIELDS, display_filter="mbtcp || dnp3 || iec60870_104", extra=decode_as(learned))
        _CACHE[capture] = (inventory, rows)
    return _CACHE[capture]


def tshark_roles(rows) -> tuple[set, dict]:
    """(conversations {(protocol, client, server, port)}, units {(address, protocol, role): set})."""
    convs: set = set()
    units: dict = defaultdict(set)
    for r in rows:
        src, dst = _addr(r, "src"), _addr(r, "dst")
        # Tunnelled frames (IP in IP) show two addresses: the inner one is last.
        src, dst = src.split(",")[-1], dst.split(",")[-1]
        sport, dport = _ports(r)
        info = r["_ws.col.Info"]
        if r["mbtcp.unit_id"] and ("Query" in info) != ("Response" in info):
            client, server, cport, sport_ = (src, dst, sport, dport) if "Query" in info else (dst, src, dport, sport)
            convs.add(_conv("modbus", client, server, cport, sport_))
            for u in split_multi(r["mbtcp.unit_id"]):
                units[(client, "modbus", "client")].add(int(u))
                units[(server, "modbus", "server")].add(int(u))
        dirs = split_multi(r["dnp3.ctl.dir"])
        for d, s_link, d_link in zip(dirs, split_multi(r["dnp3.src"]), split_multi(r["dnp3.dst"])):
            from_master = d in ("1", "True")
            master, outstation, mport, oport = (src, dst, sport, dport) if from_master else (dst, src, dport, sport)
            m_addr, o_addr = (s_link, d_link) if from_master else (d_link, s_link)
            convs.add(_conv("dnp3", master, outstation, mport, oport))
            units[(master, "dnp3", "master")].add(int(m_addr))
            units[(outstation, "dnp3", "outstation")].add(int(o_addr))
        for t, cot, ca in zip(split_multi(r["iec60870_asdu.typeid"]), split_multi(r["iec60870_asdu.causetx"]),
                              split_multi(r["iec60870_asdu.addr"])):
            t, cot = _int(t), _int(cot)
            if t in IEC_MONITOR_TYPES or (t in IEC_CONTROL_TYPES and cot in IEC_COT_FROM_CONTROLLED):
                controlling, controlled, cport, sport_ = dst, src, dport, sport
            elif t in IEC_CONTROL_TYPES and cot in IEC_COT_FROM_CONTROLLING:
                controlling, controlled, cport, sport_ = src, dst, sport, dport
            else:
                continue
            convs.add(_conv("iec104", controlling, controlled, cport, sport_))
            units[(controlling, "iec104", "controlling")].add(_int(ca))
            units[(controlled, "iec104", "controlled")].add(_int(ca))
    return convs, dict(units)


def our_roles(inventory) -> tuple[set, dict]:
    convs = {(c["protocol"], c["client"], c["server"], c["port"]) for c in inventory.conversations()}
    units = {}
    for a in inventory.assets():
        for r in a["roles"]:
            units[(a["address"], r["protocol"], r["role"])] = set(r["units"])
    return convs, units


@pytest.mark.parametrize("capture", CAPTURES)
def test_conversation_roles_match_tshark(capture):
    inventory, rows = capture_data(capture)
    t_convs, t_units = tshark_roles(rows)
    o_convs, o_units = our_roles(inventory)
    found = {}
    for c in t_convs - o_convs:
        found[("tshark_only_conversation", c)] = None
    for c in o_convs - t_convs:
        found[("ours_only_conversation", c)] = None
    for key in set(t_units) | set(o_units):
        t, o = t_units.get(key, set()), o_units.get(key, set())
        if t != o or key not in o_units:
            found[("units", key, tuple(sorted(t)), tuple(sorted(o)))] = None
    explained = EXPLAINED.get(capture, {})
    assert set(found) == set(explained), f"{capture}: unexplained differences {sorted(set(found) - set(explained))}; " \
                                         f"explained but gone {sorted(set(explained) - set(found))}"
    # Something was compared: every capture in the manifest has ICS traffic tshark dissects.
    assert t_convs or capture in EXPLAINED


# -- identities ---------------------------------------------------------------------------------------
def _has_identity_traffic(row: dict) -> bool:
    summary = row.get("tshark_content_summary", "")
    if row["protocol"] == "modbus":
        return " 17:" in summary or " 43:" in summary
    return row["protocol"] == "dnp3"


# (capture) -> {(server, unit): reason}: identities tshark shows that we deliberately do not record.
IDENTITY_EXPLAINED = {
    "modbus/emreekin_encapsulated_transport.pcap": {
        ("127.0.0.1", 1): "frame 6: the 43/14 response is 3 octets (MEI, code, conformity level 0) with no "
                          "more-follows, next-object or object count: tshark shows conformity 0 and flags the "
                          "packet malformed; our parser rejects the truncated response, so there is no identity",
    },
}
IDENTITY_CAPTURES = [r["file"] for r in manifest_rows() if _has_identity_traffic(r)]
MODBUS_ID_FIELDS = ["ip.src", "ipv6.src", "mbtcp.unit_id", "_ws.col.Info", "modbus.func_code", "modbus.mei",
                    "modbus.exception_code", "modbus.conformity_level", "modbus.object_id",
                    "modbus.object_str_value", "modbus.object_value", "modbus.data"]


def tshark_modbus_identities(pcap) -> dict:
    """{(server address, unit): {"objects": {id: value}, "conformity_level": n, "server_id": hex}}
    from the FC 43/14 and FC 17 responses tshark shows (exception responses carry none)."""
    out: dict = {}
    rows = tshark_fields(pcap, MODBUS_ID_FIELDS, display_filter="modbus.func_code == 43 || modbus.func_code == 17")
    for r in rows:
        if "Response" not in r["_ws.col.Info"] or r["modbus.exception_code"]:
            continue
        key = (_addr(r, "src"), int(split_multi(r["mbtcp.unit_id"])[0]))
        fc = int(split_multi(r["modbus.func_code"])[0])
        entry = out.setdefault(key, {})
        if fc == 17 and r["modbus.data"]:
            entry["server_id"] = r["modbus.data"][2:]  # tshark's data starts with the byte count
        elif fc == 43 and r["modbus.mei"] == "14":
            entry["conformity_level"] = _int(r["modbus.conformity_level"])
            strings = iter(split_multi(r["modbus.object_str_value"]))
            raws = iter(split_multi(r["modbus.object_value"]))
            objects = entry.setdefault("objects", {})
            for oid in split_multi(r["modbus.object_id"]):
                oid = int(oid)
                objects[str(oid)] = next(strings) if oid < 0x80 else next(raws).replace(":", "")
    return out


def _walk_attributes(node, out: list) -> None:
    """Group-0 objects in tshark's JSON tree: (variation, value) in order of appearance."""
    if isinstance(node, list):
        items = node
    else:
        return
    pending = None
    for key, value in items:
        if key == "dnp3.al.obj":
            obj = _int(value)
            pending = obj & 0xFF if obj < 256 else None
        elif key == "dnp3.al.obj_tree" and pending is not None:
            vals = []
            _collect_da(value, vals)
            out.extend((pending, v) for v in vals)
            pending = None
        elif isinstance(value, list):
            _walk_attributes(value, out)


def _collect_da(node, vals: list) -> None:
    for key, value in node:
        if isinstance(value, list):
            _collect_da(value, vals)
        elif key.startswith("dnp3.al.da.") and key != "dnp3.al.da.length":
            vals.append(value)


def tshark_dnp3_attributes(pcap) -> dict:
    """{(outstation address, link source): {attribute variation: value}} from responses."""
    import json
    import subprocess

    cmd = ["tshark", "-n", "-r", str(pcap), "-Y", "dnp3.al.func >= 129 && dnp3.al.obj < 256", "-T", "json"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    out: dict = {}
    for packet in json.loads(text or "[]", object_pairs_hook=lambda p: p):
        layers = dict(dict(packet)["_source"])["layers"]
        layers = dict(layers)
        ip = dict(layers.get("ip", layers.get("ipv6", [])))
        src = ip.get("ip.src") or ip.get("ipv6.src")
        dnp3 = layers["dnp3"]
        link_src = next(int(v) for k, v in _flatten(dnp3) if k == "dnp3.src")
        found: list = []
        _walk_attributes(dnp3, found)
        entry = out.setdefault((src, link_src), {})
        for variation, value in found:
            entry[variation] = value
    return out


def _flatten(node):
    for key, value in node:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield key, value


def _same_value(tshark_value: str, ours) -> bool:
    if isinstance(ours, (int, float)):
        return float(tshark_value) == float(ours)
    return str(ours) == tshark_value


@pytest.mark.parametrize("capture", IDENTITY_CAPTURES)
def test_identities_match_tshark(capture):
    pcap = SHARED_PCAPS / capture
    inventory, rows = capture_data(capture)
    ours = {a["address"]: a["identity"] for a in inventory.assets() if a["identity"]}
    if capture.startswith("modbus/"):
        theirs = tshark_modbus_identities(pcap)
        ours_mb = {(addr, int(u)): info for addr, ident in ours.items() for u, info in ident.get("modbus", {}).items()}
        for key in IDENTITY_EXPLAINED.get(capture, {}):
            assert key in theirs and key not in ours_mb, (capture, key)
            del theirs[key]
        assert set(ours_mb) == set(theirs), capture
        for key, t in theirs.items():
            o = ours_mb[key]
            if "server_id" in t:
                assert o["server_id"] == t["server_id"], (capture, key)
            if "conformity_level" in t:
                assert o["conformity_level"] == t["conformity_level"], (capture, key)
                assert o.get("objects", {}) == t.get("objects", {}), (capture, key)
    else:
        # Only captures where tshark shows a group 0 object in a response need its object tree.
        has_g0 = any(_int(o) < 256 and any(int(f) >= 129 for f in split_multi(r["dnp3.al.func"]))
                     for r in rows for o in split_multi(r["dnp3.al.obj"]))
        theirs = tshark_dnp3_attributes(pcap) if has_g0 else {}
        ours_dn = {(addr, int(u)): info for addr, ident in ours.items() for u, info in ident.get("dnp3", {}).items()}
        assert set(ours_dn) == set(theirs), capture
        for key, t in theirs.items():
            o = ours_dn[key]
            assert set(o) == {attribute_name(v) for v in t}, (capture, key)
            for variation, value in t.items():
                assert _same_value(value, o[attribute_name(variation)]), (capture, key, variation)


def test_identity_captures_cover_both_protocols():
    """The identity comparison is not vacuous: tshark shows device identification in these."""
    if not manifest_rows():
        pytest.skip("no shared captures")
    mb = tshark_modbus_identities(SHARED_PCAPS / "modbus/icsnpp_modbus_example.pcap")
    assert {k: sorted(v) for k, v in mb.items()} == {("127.0.0.1", 1): ["conformity_level", "objects"],
                                                    ("127.0.0.1", 2): ["server_id"]}
    assert tshark_modbus_identities(SHARED_PCAPS / "modbus/digitalbond_modbus_test_data_part1.pcap")
    assert tshark_dnp3_attributes(SHARED_PCAPS / "dnp3/itifw_dataset_exchange.pcap")
