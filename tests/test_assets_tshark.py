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
          "iec60870_asdu.typeid", "iec60870_asdu.causetx", "iec60870_asdu.addr"]
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


def tshark_roles(pcap, extra=()) -> tuple[set, dict]:
    """(conversations {(protocol, client, server, port)}, units {(address, protocol, role): set})."""
    convs: set = set()
    units: dict = defaultdict(set)
    rows = tshark_fields(pcap, FIELDS, display_filter="mbtcp || dnp3 || iec60870_104", extra=list(extra))
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
    pcap = SHARED_PCAPS / capture
    inventory, pipeline = build_inventory([pcap])
    learned = {k: pipeline.registry.name(code) for k, code in pipeline.registry.learned_ports.items()}
    t_convs, t_units = tshark_roles(pcap, decode_as(learned))
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
