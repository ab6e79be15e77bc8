"""Modbus/TCP parser against Wireshark, field by field, on every public Modbus capture.

tshark runs once per capture with ``-T fields`` (tests/tshark.py; much faster than pyshark, which
builds a Python object per packet and layer).  Our events come from ``agent.pipeline.parse_file``.
Rows are paired by frame number and by order within the frame: for every PDU we compute the values
tshark 4.0 shows for it (which fields it displays depends on the function code and on whether it is
a request or a response) and compare them position by position with tshark's per-frame lists.

agreement = agreeing values / compared values (a value present on one side only disagrees).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from parsers.events import (
    DIR_REQUEST, KIND_PDU, KIND_POINT, PROTO_MODBUS, REASON_TRUNCATED, STATUS_EXCEPTION,
)
from tests.conftest import PROJECT_PCAPS, SHARED_PCAPS, manifest_rows, needs_shared, needs_tshark
from tests.tshark import split_multi, tshark_fields

FIELDS = [
    "mbtcp.trans_id", "mbtcp.unit_id", "mbtcp.len", "modbus.func_code", "modbus.exception_code",
    "modbus.reference_num", "modbus.bit_cnt", "modbus.word_cnt", "modbus.read_reference_num",
    "modbus.read_word_cnt", "modbus.write_reference_num", "modbus.write_word_cnt", "modbus.regnum16",
    "modbus.regval_uint16", "modbus.bitnum", "modbus.bitval", "modbus.data", "modbus.and_mask",
    "modbus.or_mask", "modbus.diagnostic_code", "modbus.mei", "modbus.read_device_id",
    "modbus.object_id", "modbus.num_objects", "modbus.request_frame",
]

# Frames where we find Modbus PDUs that tshark does not dissect, each with its reason.  All are TCP
# segments tshark flags as (spurious) retransmissions: their bytes were never seen before in the
# capture (the original was not captured), so our reassembly delivers them once; tshark's TCP
# analysis does not hand retransmitted segments to the Modbus dissector.  The test checks that
# tshark does flag each of them.
RETRANSMISSION_EXTRA_FRAMES = {
    "modbus/iti_mb2.pcap": {1131, 3674, 13176},
    "modbus/zeek_modbusBig.pcap": {3150},
    # A fuzzed TCP stream (random seq/ack numbers): tshark calls these retransmissions too.
    "modbus/zeek_fuzz-72.pcap": {19, 21, 25, 26, 27},
}
# Frames where we find a PDU tshark does not, for another reason (capture -> {frame: reason}).
RESYNC_EXTRA_FRAMES = {
    "modbus/zeek_fuzz-72.pcap": {
        7: "frame 6 declares MBAP length 4 but carries 6 bytes; the 2 spare bytes plus frame 7 make a "
           "header with length 0.  tshark gives up on the stream there; we count bad_header, resynchronise "
           "on the ADU that starts 2 bytes later and read frame 7's PDU (FC 34)",
    },
}

# Fuzzed captures whose TCP sequence numbers are random: the pipeline's reassembly holds segments
# that follow a hole and releases them at a later frame, so our PDUs carry the releasing frame's
# number (e.g. zeek_fuzz-1011 frame 5's request is reported at frame 6).  tshark dissects each
# segment where it is.  For these we check that every PDU tshark finds (transaction id, function)
# is among ours, not frame numbers or per-frame values.
FRAME_ATTRIBUTION_DIFFERS = {
    "modbus/zeek_fuzz-1011.pcap": "segment after a hole (frame 5) released at frame 6",
    "modbus/zeek_fuzz-72.pcap": "random seq/ack numbers: held segments released at later frames",
}

# Values where we deliberately differ from tshark: (capture, field) -> (number of values, reason).
# The test asserts each count exactly, so an explanation cannot silently cover new differences.
EXPLAINED_FIELD_DISAGREEMENTS: dict = {
    ("modbus/iti_mb2.pcap", "modbus.regnum16"): (
        125, "frame 3008 answers requests 22506-22509, which travel only in frame 1131, a segment tshark "
             "treats as a retransmission and does not dissect: tshark cannot pair the responses and "
             "numbers their registers from 0, we number them from the requests' start address"),
    ("modbus/digitalbond_modbus_test_data_part2.pcap", "modbus.data"): (
        1, "frame 45: FC 15 request with quantity 0 and byte count 0: tshark prints '<MISSING>' for the "
           "empty coil list, we emit no point"),
    ("modbus/digitalbond_modbus_test_data_part2.pcap", "modbus.and_mask"): (
        1, "frame 62: FC 22 request cut after address and AND mask: tshark shows the AND mask, we emit "
           "no point for an incomplete mask write (the PDU row is malformed/truncated)"),
    ("modbus/zeek_4sics_geeklounge_151022_min.pcap", "modbus.write_word_cnt"): (
        1, "frame 1: malformed FC 23 (write quantity 8466, byte count 191): tshark shows the declared "
           "quantity, we report the 95 whole registers present (as point rows)"),
    ("modbus/zeek_4sics_geeklounge_151022_min.pcap", "modbus.data"): (
        1, "frame 1: same PDU; tshark shows all 191 data bytes, we decode 95 whole registers (190 bytes)"),
}


def _pipeline():
    from agent.pipeline import Pipeline

    return Pipeline()


def parse(path):
    from agent.pipeline import parse_file

    ev = parse_file(path, _pipeline())
    return ev.select(ev.protocol == PROTO_MODBUS)


def _hex16(v) -> str:
    return "%04x" % int(v)


BASE_FIELDS = ("mbtcp.trans_id", "mbtcp.unit_id", "mbtcp.len", "modbus.func_code", "modbus.exception_code")
# Which tshark fields we compare for each (function, is request).  tshark shows more (the raw
# "data" of unknown and diagnostic PDUs, the echoed value of a write response, masks echoed by a
# FC 22 response, FC 43 object lists, which the device-id test below checks): those values we do
# not carry in events and do not compare.
COMPARED = {
    (1, True): ("reference_num", "bit_cnt"), (2, True): ("reference_num", "bit_cnt"),
    (3, True): ("reference_num", "word_cnt"), (4, True): ("reference_num", "word_cnt"),
    (5, True): ("reference_num", "data"), (6, True): ("reference_num", "data"),
    (15, True): ("reference_num", "bit_cnt", "data"),
    (16, True): ("reference_num", "word_cnt", "regnum16", "regval_uint16"),
    (22, True): ("reference_num", "and_mask", "or_mask"),
    (23, True): ("read_reference_num", "read_word_cnt", "write_reference_num", "write_word_cnt", "data"),
    (24, True): ("reference_num",), (8, True): ("diagnostic_code",),
    (43, True): ("mei", "read_device_id", "object_id"),
    (1, False): ("bitnum", "bitval"), (2, False): ("bitnum", "bitval"),
    (3, False): ("regnum16", "regval_uint16"), (4, False): ("regnum16", "regval_uint16"),
    (5, False): ("reference_num",), (6, False): ("reference_num",), (22, False): ("reference_num",),
    (15, False): ("reference_num", "bit_cnt"), (16, False): ("reference_num", "word_cnt"),
    (23, False): ("data",), (24, False): ("word_cnt",), (8, False): ("diagnostic_code",),
    (43, False): ("mei", "num_objects"),
}
VALUE_FIELDS = ("modbus.regnum16", "modbus.regval_uint16", "modbus.bitnum", "modbus.bitval")


def compared_fields(pdu: dict) -> set[str]:
    if pdu["status"] == STATUS_EXCEPTION:
        return set(BASE_FIELDS)
    extra = COMPARED.get((pdu["function"], pdu["direction"] == DIR_REQUEST), ())
    return set(BASE_FIELDS) | {"modbus." + f for f in extra}


def expected_fields(pdu: dict, points: list[dict]) -> dict[str, list[str]]:
    """The values tshark 4.0 displays for one of our PDU rows (field -> list of strings)."""
    f: dict[str, list[str]] = defaultdict(list)
    fc, req = pdu["function"], pdu["direction"] == DIR_REQUEST
    f["mbtcp.trans_id"].append(str(pdu["seq"]))
    f["mbtcp.unit_id"].append(str(pdu["unit"]))
    f["mbtcp.len"].append(str(pdu["length"] - 6))
    f["modbus.func_code"].append(str(fc))
    if pdu["status"] == STATUS_EXCEPTION:
        f["modbus.exception_code"].append(str(pdu["cause"]))
        return f
    addr, count = pdu["address"], pdu["count"]
    values = [p["value"] for p in points]
    addrs = [p["address"] for p in points]
    if req:
        if fc in (1, 2, 3, 4, 5, 6, 15, 16, 22, 24) and addr >= 0:
            f["modbus.reference_num"].append(str(addr))
        if fc in (1, 2, 15) and addr >= 0:
            f["modbus.bit_cnt"].append(str(count))
        if fc in (3, 4, 16) and addr >= 0:
            f["modbus.word_cnt"].append(str(count))
        if fc == 5 and values:
            v = values[0]
            f["modbus.data"].append("ff00" if v == 1 else "0000" if v == 0 else _hex16(v))
        if fc == 6 and values:
            f["modbus.data"].append(_hex16(values[0]))
        if fc == 15 and values:
            bits = np.array(values, dtype=np.uint8)
            f["modbus.data"].append(np.packbits(bits, bitorder="little").tobytes().hex())
        if fc == 16:
            f["modbus.regnum16"] += [str(a) for a in addrs]
            f["modbus.regval_uint16"] += [str(int(v)) for v in values]
        if fc == 22 and points:
            f["modbus.and_mask"].append("0x%04x" % points[0]["quality"])
            f["modbus.or_mask"].append("0x%04x" % int(values[0]))
        if fc == 23 and addr >= 0:
            f["modbus.read_reference_num"].append(str(addr))
            f["modbus.read_word_cnt"].append(str(count))
            if addrs:
                f["modbus.write_reference_num"].append(str(addrs[0]))
                f["modbus.write_word_cnt"].append(str(len(addrs)))
                f["modbus.data"].append("".join(_hex16(v) for v in values))
    else:
        if fc in (1, 2):
            f["modbus.bitnum"] += [str(a) for a in addrs]
            f["modbus.bitval"] += [str(int(v)) for v in values]
        if fc in (3, 4):
            f["modbus.regnum16"] += [str(a) for a in addrs]
            f["modbus.regval_uint16"] += [str(int(v)) for v in values]
        if fc in (5, 6, 15, 16, 22) and addr >= 0:
            f["modbus.reference_num"].append(str(addr))
        if fc == 15 and addr >= 0:
            f["modbus.bit_cnt"].append(str(count))
        if fc == 16 and addr >= 0:
            f["modbus.word_cnt"].append(str(count))
        if fc == 23 and points:
            f["modbus.data"].append("".join(_hex16(v) for v in values))
        if fc == 24 and pdu["address"] >= -1 and pdu["status"] == 0:
            f["modbus.word_cnt"].append(str(count))
    if fc == 8 and pdu["subfunction"] >= 0:
        f["modbus.diagnostic_code"].append(str(pdu["subfunction"]))
    if fc == 43 and pdu["subfunction"] >= 0:
        f["modbus.mei"].append(str(pdu["subfunction"]))
        if pdu["subfunction"] == 14 and req and addr >= 0:
            f["modbus.read_device_id"].append(str(count))
            f["modbus.object_id"].append(str(addr))
        if pdu["subfunction"] == 14 and not req and pdu["reason"] != REASON_TRUNCATED:
            f["modbus.num_objects"].append(str(count))
    return f


def compare(path: Path, skip_frames=frozenset()) -> dict:
    """Agreement of our events with tshark on one capture (``skip_frames`` left out of the values)."""
    ev = parse(path)
    recs = ev.to_records()
    pdus = recs[recs["kind"] == KIND_PDU]
    points_by_pdu: dict = defaultdict(list)
    for p in recs[recs["kind"] == KIND_POINT]:
        points_by_pdu[int(p["pdu_id"])].append({n: p[n].item() for n in ("address", "value", "quality")})
    ours: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    fields_of: dict[int, set] = defaultdict(set)
    points_in: dict[int, int] = defaultdict(int)
    for row in pdus:
        pdu = {n: row[n].item() for n in ("function", "direction", "seq", "unit", "length", "status", "cause",
                                          "address", "count", "subfunction", "reason")}
        frame = int(row["frame"])
        pts = points_by_pdu.get(int(row["pdu_id"]), [])
        points_in[frame] += len(pts)
        fields_of[frame] |= compared_fields(pdu)
        for k, vals in expected_fields(pdu, pts).items():
            ours[frame][k] += vals
    theirs = {int(r["frame.number"]): {k: split_multi(r[k]) for k in FIELDS} for r in
              tshark_fields(path, FIELDS, "mbtcp")}
    compared = agreed = 0
    by_field: dict = defaultdict(lambda: [0, 0])
    examples: dict = {}
    unpaired_values = 0
    for frame in sorted((set(ours) | set(theirs)) - set(skip_frames)):
        a, b = ours.get(frame, {}), theirs.get(frame, {})
        fields = fields_of[frame] if frame in ours else FIELDS
        for field in FIELDS:
            if field not in fields:
                continue
            va, vb = a.get(field, []), b.get(field, [])
            if field in VALUE_FIELDS and not points_in[frame] and not b.get("modbus.request_frame"):
                # Explained: a response whose request is not in the capture.  tshark numbers its
                # values from address 0; we emit no point rows (the real addresses are unknown).
                unpaired_values += len(vb)
                continue
            n = max(len(va), len(vb))
            if not n:
                continue
            ok = sum(1 for x, y in zip(va, vb) if _same(x, y))
            compared += n
            agreed += ok
            by_field[field][0] += n
            by_field[field][1] += ok
            if ok < n and field not in examples:
                examples[field] = (frame, va[:6], vb[:6])
    return {
        "our_frames": set(ours), "tshark_frames": set(theirs), "compared": compared, "agreed": agreed,
        "by_field": dict(by_field), "examples": examples, "pdus": len(pdus),
        "tshark_pdus": sum(len(t["mbtcp.trans_id"]) for t in theirs.values()),
        "unpaired_values": unpaired_values,
    }


def _same(x: str, y: str) -> bool:
    if x == y:
        return True
    try:
        return math.isclose(float(int(x, 0)), float(int(y, 0)))
    except ValueError:
        return False


def _captures():
    rows = [r for r in manifest_rows() if int(r["tshark_modbus_frames"] or 0) > 0]
    return [pytest.param(r, id=Path(r["file"]).stem) for r in rows]


@needs_shared
@needs_tshark
@pytest.mark.parametrize("row", _captures())
def test_agrees_with_tshark(row):
    path = SHARED_PCAPS / row["file"]
    if row["file"] in FRAME_ATTRIBUTION_DIFFERS:
        ev = parse(path)
        pd = ev.select(ev.kind == KIND_PDU)
        ours = sorted(zip(pd.seq.tolist(), pd.function.tolist()))
        theirs = [(int(t), int(f)) for r in tshark_fields(path, ["mbtcp.trans_id", "modbus.func_code"], "mbtcp")
                  for t, f in zip(split_multi(r["mbtcp.trans_id"]), split_multi(r["modbus.func_code"]))]
        remaining = list(ours)
        for pdu in theirs:
            assert pdu in remaining, f"tshark PDU {pdu} not found"
            remaining.remove(pdu)
        return
    retransmitted = RETRANSMISSION_EXTRA_FRAMES.get(row["file"], set())
    explained = retransmitted | set(RESYNC_EXTRA_FRAMES.get(row["file"], {}))
    res = compare(path, explained)
    extra = res["our_frames"] - res["tshark_frames"]
    missing = res["tshark_frames"] - res["our_frames"]
    assert not missing, f"tshark finds Modbus in frames we do not: {sorted(missing)[:10]}"
    assert extra == explained, f"unexplained extra frames {sorted(extra - explained)[:10]}"
    if retransmitted:
        flagged = {int(r["frame.number"]) for r in tshark_fields(
            path, [], "tcp.analysis.retransmission || tcp.analysis.spurious_retransmission")}
        assert retransmitted <= flagged
    # MANIFEST: the number of frames tshark decodes as Modbus.
    assert len(res["our_frames"] - explained) == int(row["tshark_modbus_frames"])
    allowed = 0
    for (capture, field), (n, _why) in EXPLAINED_FIELD_DISAGREEMENTS.items():
        if capture == row["file"]:
            total, ok = res["by_field"].get(field, (0, 0))
            assert total - ok == n, f"{field}: {total - ok} disagreements, {n} explained"
            allowed += n
    agreement = (res["agreed"] + allowed) / max(res["compared"], 1)
    detail = {k: v for k, v in res["by_field"].items() if v[0] != v[1]}
    assert agreement >= 0.999, f"agreement {agreement:.5f}; fields {detail}; examples {res['examples']}"


@needs_tshark
@pytest.mark.parametrize("path", sorted(PROJECT_PCAPS.glob("*.pcap")), ids=lambda p: p.stem)
def test_project_captures_agree_with_tshark(path):
    res = compare(path)
    # Captures without Modbus (dnp3.pcap, iec104.pcap) check that we find none where tshark finds none.
    assert res["our_frames"] == res["tshark_frames"]
    agreement = res["agreed"] / res["compared"] if res["compared"] else 1.0
    assert agreement >= 0.999, (res["by_field"], res["examples"])


@needs_shared
@needs_tshark
@pytest.mark.parametrize("name", ["icsnpp_modbus_example", "digitalbond_modbus_test_data_part1"])
def test_device_identification_table_matches_tshark(name):
    """FC 43/14 objects and FC 17 server ids land in ``parser.device_ids`` as tshark reads them."""
    path = SHARED_PCAPS / "modbus" / f"{name}.pcap"
    pipeline = _pipeline()
    from agent.pipeline import parse_file

    parse_file(path, pipeline)
    parser = pipeline.registry.parsers[PROTO_MODBUS]
    ours_strings = sorted(v for entry in parser.device_ids.values() for v in entry["objects"].values())
    ours_server_ids = sorted(e["server_id"] for e in parser.device_ids.values() if "server_id" in e)
    rows = tshark_fields(path, ["modbus.object_str_value", "modbus.data", "modbus.func_code"],
                         "modbus.func_code == 43 || modbus.func_code == 17", aggregator="\x1f")
    theirs_strings = sorted({v for r in rows for v in split_multi(r["modbus.object_str_value"], "\x1f")})
    theirs_server_ids = sorted({r["modbus.data"][2:] for r in rows
                                if r["modbus.func_code"] == "17" and r["modbus.data"]})
    assert ours_strings == theirs_strings
    assert set(ours_server_ids) == set(theirs_server_ids)
    assert ours_strings or ours_server_ids
