"""The protocol-session model (models/sessions.py): each rule on event batches built row by row, the
same rules quiet on conforming traffic, and on the bundled and public captures."""

import json

import numpy as np
import pytest

from agent.pipeline import parse_file
from models.scoring import read_labels
from models.sessions import SessionModel
from parsers.events import (
    DIR_REQUEST, DIR_RESPONSE, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, REASON_SEQ_REPEAT, EventBatch, EventBuilder,
    StreamContext,
)
from tests.conftest import PROJECT_PCAPS, SHARED_PCAPS, needs_shared

NS = 10**9
MASTER, OTHER, SERVER = 0x0A000010, 0x0A000042, 0x0A000020
FIR_FIN = 0b1100


class Rows:
    """PDU rows of one capture, written in time order."""

    def __init__(self):
        self.b = EventBuilder()

    def pdu(self, proto, t, direction, client, server, function, **kw):
        (c, cp), (s, sp) = client, server
        src, dst, sport, dport = (c, s, cp, sp) if direction == DIR_REQUEST else (s, c, sp, cp)
        ctx = StreamContext(ts=int(t * NS), src=src, dst=dst, sport=sport, dport=dport)
        self.b.pdu(ctx, proto, function=function, direction=direction, **kw)

    def build(self) -> EventBatch:
        return self.b.build()


def rules(findings) -> list:
    return sorted({f.rule.split(".", 1)[1] for f in findings})


def learned(rows: Rows) -> SessionModel:
    m = SessionModel()
    m.learn(rows.build())
    m.finish_learning()
    return m


# -- Modbus ------------------------------------------------------------------------------------------

def modbus_poll(r, t0, n, tid0=0, client=(MASTER, 40000), period=1.0):
    for i in range(n):
        t = t0 + i * period
        r.pdu(PROTO_MODBUS, t, DIR_REQUEST, client, (SERVER, 502), 3, seq=(tid0 + i) % 65536)
        r.pdu(PROTO_MODBUS, t + 0.01, DIR_RESPONSE, client, (SERVER, 502), 3, seq=(tid0 + i) % 65536)


def test_modbus_transaction_id_jump_and_unanswered_response():
    r = Rows()
    modbus_poll(r, 0, 60)
    m = learned(r)
    modbus_poll(r, 60, 10, tid0=60)
    assert m.findings(r.build()) == []  # the same counting: nothing
    modbus_poll(r, 70, 3, tid0=4000)  # the client's ids jump by 3931 (69 -> 4000)
    f = m.findings(r.build())
    assert rules(f) == ["seq_jump"] and "jumped by 3931" in f[0].message and f[0].src == MASTER
    r.pdu(PROTO_MODBUS, 80, DIR_RESPONSE, (MASTER, 40000), (SERVER, 502), 3, seq=17)  # answers nothing
    f = m.findings(r.build())
    assert rules(f) == ["response_without_request"] and f[0].severity == "high" and f[0].technique == "T0856"


def test_modbus_counter_that_wraps_in_eight_bits_is_not_a_jump():
    r = Rows()
    modbus_poll(r, 0, 60, tid0=150)
    m = learned(r)
    for i in range(30):  # 210 ... 255, then 0: the client counts in one octet
        t, tid = 60 + i, (210 + i) % 256
        r.pdu(PROTO_MODBUS, t, DIR_REQUEST, (MASTER, 40000), (SERVER, 502), 3, seq=tid)
        r.pdu(PROTO_MODBUS, t + 0.01, DIR_RESPONSE, (MASTER, 40000), (SERVER, 502), 3, seq=tid)
    assert m.findings(r.build()) == []


def test_modbus_session_showing_no_request_is_not_judged():
    """A device on the server port that opens the connection and talks first, or requests the parser
    could not read: a session without a visible request has nothing to match its responses against."""
    r = Rows()
    modbus_poll(r, 0, 60)
    m = learned(r)
    for i in range(5):
        r.pdu(PROTO_MODBUS, 60 + i, DIR_RESPONSE, (MASTER, 40009), (SERVER, 502), 1, seq=1)
    assert m.findings(r.build()) == []


def test_modbus_responses_only_capture_is_not_judged():
    """A capture that shows one direction only has no requests to match: nothing is flagged."""
    r = Rows()
    for i in range(40):
        r.pdu(PROTO_MODBUS, i, DIR_RESPONSE, (MASTER, 40000), (SERVER, 502), 3, seq=i)
    m = learned(r)
    for i in range(40, 60):
        r.pdu(PROTO_MODBUS, i, DIR_RESPONSE, (MASTER, 40000), (SERVER, 502), 3, seq=i * 7)
    assert m.findings(r.build()) == []


def test_modbus_second_session_from_the_same_host_but_not_a_reconnect_or_another_client():
    r = Rows()
    modbus_poll(r, 0, 60)
    m = learned(r)
    modbus_poll(r, 60, 10, tid0=60)  # the client reconnects: the old session stopped before
    modbus_poll(r, 70, 10, client=(MASTER, 40001))
    modbus_poll(r, 70.5, 10, client=(OTHER, 50000))  # another client at the same time: normal for Modbus
    assert m.findings(r.build()) == []
    modbus_poll(r, 80, 10, tid0=10, client=(MASTER, 40001))
    modbus_poll(r, 80.5, 10, client=(MASTER, 40002))  # a second session of the same host, both talking
    f = [x for x in m.findings(r.build()) if x.rule == "sessions.second_session"]
    assert len(f) == 1 and f[0].sport == 40002 and f[0].technique == "T0848"


# -- DNP3 --------------------------------------------------------------------------------------------

def dnp3_poll(r, t0, n, seq0=0, client=(MASTER, 41000), period=1.0):
    for i in range(n):
        t, s = t0 + i * period, (seq0 + i) % 16
        r.pdu(PROTO_DNP3, t, DIR_REQUEST, client, (SERVER, 20000), 1, seq=s, subfunction=FIR_FIN, unit=10)
        r.pdu(PROTO_DNP3, t + 0.02, DIR_RESPONSE, client, (SERVER, 20000), 129, seq=s, subfunction=FIR_FIN, unit=10)


def dnp3_command(r, t, fc, seq, client=(MASTER, 41000), index=3):
    r.pdu(PROTO_DNP3, t, DIR_REQUEST, client, (SERVER, 20000), fc, seq=seq, subfunction=FIR_FIN, unit=10, obj=12,
          address=index)
    r.pdu(PROTO_DNP3, t + 0.02, DIR_RESPONSE, client, (SERVER, 20000), 129, seq=seq, subfunction=FIR_FIN, unit=10)


@pytest.fixture
def dnp3_model():
    r = Rows()
    dnp3_poll(r, 0, 40)
    dnp3_command(r, 40, 3, 8)  # SELECT then OPERATE: the channel uses select-before-operate
    dnp3_command(r, 41, 4, 9)
    dnp3_poll(r, 42, 20, seq0=10)
    return learned(r), r


def test_dnp3_conforming_traffic_raises_nothing(dnp3_model):
    m, r = dnp3_model
    dnp3_poll(r, 62, 10, seq0=14)
    dnp3_command(r, 72, 3, 8)
    dnp3_command(r, 74, 4, 9)  # 2 s after its SELECT
    r.pdu(PROTO_DNP3, 75, DIR_RESPONSE, (MASTER, 41000), (SERVER, 20000), 130, seq=3, subfunction=0b1111, unit=10)
    r.pdu(PROTO_DNP3, 75.1, DIR_REQUEST, (MASTER, 41000), (SERVER, 20000), 0, seq=3, subfunction=FIR_FIN, unit=10)
    assert m.findings(r.build()) == []


def test_dnp3_response_that_answers_no_request(dnp3_model):
    m, r = dnp3_model
    dnp3_poll(r, 62, 2, seq0=14)
    r.pdu(PROTO_DNP3, 65, DIR_RESPONSE, (MASTER, 41000), (SERVER, 20000), 129, seq=9, subfunction=FIR_FIN, unit=10)
    f = m.findings(r.build())
    assert rules(f) == ["response_without_request"] and "SEQ 9" in f[0].message and f[0].dst == SERVER


def test_dnp3_request_sequence_jump(dnp3_model):
    m, r = dnp3_model
    dnp3_poll(r, 62, 2, seq0=14)
    dnp3_poll(r, 64, 2, seq0=7)  # 15 -> 7
    f = m.findings(r.build())
    assert rules(f) == ["seq_jump"] and "went back by 8" in f[0].message


def test_dnp3_operate_without_select_and_direct_operate(dnp3_model):
    m, r = dnp3_model
    dnp3_poll(r, 62, 2, seq0=14)
    dnp3_command(r, 64, 3, 0, index=3)
    dnp3_command(r, 65, 4, 1, index=4)  # OPERATE of another point than the one selected
    dnp3_command(r, 80, 3, 2)
    dnp3_command(r, 95, 4, 3)  # 15 s after its SELECT: beyond the select timeout
    dnp3_command(r, 96, 5, 4)  # DIRECT_OPERATE on a select-before-operate channel
    f = m.findings(r.build())
    assert rules(f) == ["direct_operate", "operate_without_select"]
    op = [x for x in f if x.rule == "sessions.operate_without_select"][0]
    assert op.count == 2 and op.severity == "high" and op.technique == "T0855"


def test_dnp3_second_master(dnp3_model):
    m, r = dnp3_model
    dnp3_poll(r, 62, 10, seq0=14)
    dnp3_poll(r, 64.5, 2, client=(OTHER, 52000))  # a rogue master while the master keeps polling
    f = m.findings(r.build())
    assert rules(f) == ["second_session"]
    assert f[0].src == OTHER and f[0].severity == "high" and "another host" in f[0].message


# -- IEC 60870-5-104 ---------------------------------------------------------------------------------

class Iec:
    """A controlling station (client) and a controlled station keeping their N(S)/N(R) honestly."""

    def __init__(self, r, client=(MASTER, 42000)):
        self.r, self.client, self.ns, self.nr = r, client, [0, 0], [0, 0]

    def i(self, t, side, type_id=13, cot=3, ioa=100, ns=None, nr=None):
        self.nr[side] = self.ns[1 - side]
        self.r.pdu(PROTO_IEC104, t, side, self.client, (SERVER, 2404), type_id, cause=cot, address=ioa,
                   seq=self.ns[side] if ns is None else ns, ack=self.nr[side] if nr is None else nr, unit=1)
        self.ns[side] = (self.ns[side] + 1) % 32768

    def s(self, t, side):
        self.nr[side] = self.ns[1 - side]
        self.r.pdu(PROTO_IEC104, t, side, self.client, (SERVER, 2404), 512, ack=self.nr[side])

    def u(self, t, side, code):
        self.r.pdu(PROTO_IEC104, t, side, self.client, (SERVER, 2404), code)

    def normal(self, t0, seconds):
        for k in range(seconds):
            t = t0 + k
            for j in range(4):
                self.i(t + j * 0.1, DIR_RESPONSE)  # spontaneous reports
            self.s(t + 0.5, DIR_REQUEST)  # acknowledged in an S-frame
            if k % 20 == 0:
                self.u(t + 0.6, DIR_REQUEST, 517)  # TESTFR act / con
                self.u(t + 0.61, DIR_RESPONSE, 518)
            if k % 30 == 5:  # an operator command: activation, confirmation, termination
                self.i(t + 0.7, DIR_REQUEST, 45, 6, 2000)
                self.i(t + 0.75, DIR_RESPONSE, 45, 7, 2000)
                self.i(t + 0.8, DIR_RESPONSE, 45, 10, 2000)


@pytest.fixture
def iec_model():
    r = Rows()
    st = Iec(r)
    st.normal(0, 120)
    return learned(r), r, st


def test_iec104_conforming_traffic_raises_nothing(iec_model):
    m, r, st = iec_model
    st.normal(120, 60)
    assert m.findings(r.build()) == []


def test_iec104_confirmation_without_activation_and_testfr_con_without_act(iec_model):
    m, r, st = iec_model
    st.normal(120, 2)
    st.i(123, DIR_RESPONSE, 45, 7, 2001)  # ACT_CON of a command never sent
    st.u(124, DIR_RESPONSE, 518)
    f = m.findings(r.build())
    assert rules(f) == ["response_without_request"] and f[0].count == 2 and f[0].technique == "T0856"


def test_iec104_command_without_confirmation(iec_model):
    m, r, st = iec_model
    st.normal(120, 2)
    st.i(122.5, DIR_REQUEST, 45, 6, 3000)  # a single command the station never confirms
    st.i(122.6, DIR_REQUEST, 46, 6, 3000)  # a type it never confirmed while learning: not judged
    st.i(122.7, DIR_REQUEST, 45, 6, 3001)  # refused (unknown IOA): answered all the same
    st.i(122.8, DIR_RESPONSE, 45, 47, 3001)
    st.normal(123, 20)
    f = m.findings(r.build())
    assert rules(f) == ["unconfirmed_command"] and "type 45 (IOA 3000)" in f[0].message and f[0].count == 1


def test_iec104_sequence_numbers(iec_model):
    m, r, st = iec_model
    st.normal(120, 2)
    st.s(122.5, DIR_REQUEST)
    r.pdu(PROTO_IEC104, 122.6, DIR_REQUEST, st.client, (SERVER, 2404), 512, ack=(st.ns[1] + 40) % 32768)
    f = m.findings(r.build())
    assert rules(f) == ["seq_jump"] and "never sent" in f[0].message
    st.normal(123, 2)
    # an I-frame the parser found repeating an earlier N(S) (a replay)
    r.pdu(PROTO_IEC104, 126, DIR_RESPONSE, st.client, (SERVER, 2404), 13, cause=3, seq=st.ns[1] - 3,
          ack=st.ns[0], reason=REASON_SEQ_REPEAT)
    f = m.findings(r.build())
    assert rules(f) == ["seq_jump"] and "repeats an earlier N(S)" in f[0].message


def test_iec104_k_exceeded(iec_model):
    m, r, st = iec_model
    st.normal(120, 2)
    for j in range(20):  # 20 I-frames with no acknowledgement: k is 12 (and 4 were seen while learning)
        st.i(123 + j * 0.01, DIR_RESPONSE)
    f = m.findings(r.build())
    assert rules(f) == ["flow_control"] and f[0].count == 20 - 12


# -- state, captures ---------------------------------------------------------------------------------

def test_state_round_trip_keeps_what_was_learned(dnp3_model):
    m, r = dnp3_model
    arrays, meta = m.to_state()
    m2 = SessionModel.from_state(arrays, json.loads(json.dumps(meta)))
    dnp3_poll(r, 62, 2, seq0=14)
    dnp3_command(r, 64, 5, 0)
    assert rules(m2.findings(r.build())) == ["direct_operate"]


def _first_attack(name):
    return min(lab.start_ts for lab in read_labels(PROJECT_PCAPS / f"{name}.labels.csv"))


@pytest.mark.parametrize("name", ["modbus", "dnp3", "iec104", "mixed"])
def test_bundled_benign_part_raises_nothing_and_attacks_are_seen(name):
    ev = parse_file(PROJECT_PCAPS / f"{name}.pcap")
    attack = int(_first_attack(name) * NS)
    t0 = int(ev.ts.min())
    learn_until = t0 + (attack - t0) // 2
    m = SessionModel()
    m.learn(ev.select(ev.ts < learn_until))
    m.finish_learning()
    benign, later = [], []
    for a in range(learn_until, int(ev.ts.max()) + 1, 5 * NS):  # 5 s slices, as the engine cuts them
        part = ev.select((ev.ts >= a) & (ev.ts < a + 5 * NS))
        (benign if a + 5 * NS <= attack else later).extend(m.findings(part))
    assert benign == [], [f.message for f in benign]
    if name in ("dnp3", "iec104"):  # the attacker's own sessions to the outstations
        assert any(f.rule == "sessions.second_session" and f.src == 0x0A140042 for f in later)


@needs_shared
@pytest.mark.parametrize("path", ["iec104/emreekin_local_simulator.pcap", "iec104/emreekin_local_vinci104.pcap",
                                  "iec104/emreekin_104ipvalue.pcap", "iec104/iti_090813_diverse.pcap",
                                  "dnp3/emreekin_dnp3value.pcap", "modbus/digitalbond_modbus_test_data_part2.pcap"])
def test_public_captures_raise_nothing(path):
    ev = parse_file(SHARED_PCAPS / path)
    t0, t1 = int(ev.ts.min()), int(ev.ts.max())
    m = SessionModel()
    half = t0 + (t1 - t0) // 2
    m.learn(ev.select(ev.ts < half))
    m.finish_learning()
    f = m.findings(ev.select(ev.ts >= half))
    assert f == [], [x.message for x in f]
