"""IEC 60870-5-104 traffic (port 2404): a controlling station and RTUs, with attacks.

APCI per IEC 60870-5-104 clause 5 (start 0x68, APDU length, four control octets: I format with
N(S)/N(R), S format acknowledgements, U format STARTDT/STOPDT/TESTFR) and the t2/t3/w rules of
clause 5.2 (acknowledge after w = 8 I-frames or t2 = 10 s, TESTFR after t3 = 20 s idle).  ASDUs
per IEC 60870-5-101 clause 7 with the 104 field sizes of clause 9 (two-octet cause of transmission
and common address, three-octet information object address); elements per 101 clause 7.2.6.

>>> apci_i(3, 5, b"").hex(), apci_s(9).hex(), apci_u(STARTDT_ACT).hex()
('680406000a00', '680401001200', '680407000000')
>>> asdu(C_IC_NA_1, 6, 1, [(0, bytes([20]))]).hex()
'64010600010000000014'
"""

from __future__ import annotations

import struct
import time as _time

from .common import ATTACKER, MASTER, REPLAY_S, Attack, Context, Conversation, port_scan, replay_lag
from .plant import Feeder

PORT = 2404
W, T2, T3 = 8, 10.0, 20.0  # clause 5.2 / 9.6 defaults (k = 12 is never reached here)

# U-format functions (clause 5.3)
STARTDT_ACT, STARTDT_CON, STOPDT_ACT, STOPDT_CON, TESTFR_ACT, TESTFR_CON = 0x07, 0x0B, 0x13, 0x23, 0x43, 0x83

# Type identifications (101 clause 7.2.1.1)
M_SP_NA_1, M_DP_NA_1, M_ME_NC_1, M_IT_NA_1, M_DP_TB_1, M_ME_TF_1 = 1, 3, 13, 15, 31, 36
C_DC_NA_1, C_SE_NC_1, C_IC_NA_1, C_CI_NA_1, C_RD_NA_1, C_CS_NA_1, C_RP_NA_1 = 46, 50, 100, 101, 102, 103, 105
TYPE_NAMES = {1: "M_SP_NA_1", 3: "M_DP_NA_1", 13: "M_ME_NC_1", 15: "M_IT_NA_1", 31: "M_DP_TB_1", 36: "M_ME_TF_1",
              46: "C_DC_NA_1", 50: "C_SE_NC_1", 100: "C_IC_NA_1", 101: "C_CI_NA_1", 102: "C_RD_NA_1",
              103: "C_CS_NA_1", 105: "C_RP_NA_1"}

# Causes of transmission (101 clause 7.2.3)
PERIODIC, SPONTANEOUS, REQUEST, ACTIVATION, ACT_CON, ACT_TERM, RETURN_REMOTE, INROGEN, REQCOGEN = \
    1, 3, 5, 6, 7, 10, 11, 20, 37

MEASURANDS = {1001: "voltage_kv", 1002: "current_a", 1003: "power_mw", 1004: "frequency_hz", 1005: "temperature_c"}
DEADBANDS = {1001: 0.025, 1002: 4.0, 1003: 0.1, 1004: 0.02, 1005: 0.4}
BREAKER_IOA, COMMAND_IOA, SETPOINT_IOA, COUNTER_IOA = 2001, 5001, 6001, 4001


def apci_i(ns: int, nr: int, asdu_bytes: bytes) -> bytes:
    """I format: control octets 1-2 = N(S) << 1, octets 3-4 = N(R) << 1 (clause 5.1, Figure 6)."""
    return struct.pack("<BBHH", 0x68, 4 + len(asdu_bytes), (ns << 1) & 0xFFFE, (nr << 1) & 0xFFFE) + asdu_bytes


def apci_s(nr: int) -> bytes:
    """S format: 0x01 0x00 then N(R) << 1 (clause 5.1, Figure 7)."""
    return struct.pack("<BBHH", 0x68, 4, 0x0001, (nr << 1) & 0xFFFE)


def apci_u(function: int) -> bytes:
    """U format: one function bit set in octet 1, the rest zero (clause 5.1, Figure 8)."""
    return bytes([0x68, 4, function, 0, 0, 0])


def asdu(type_id: int, cause: int, common_address: int, objects: list[tuple[int, bytes]],
         negative: bool = False, originator: int = 0) -> bytes:
    """Data unit identifier (type, VSQ with SQ=0, COT + originator, CA) and information objects."""
    cot = cause | (0x40 if negative else 0)
    head = struct.pack("<BBBBH", type_id, len(objects), cot, originator, common_address)
    return head + b"".join(ioa.to_bytes(3, "little") + element for ioa, element in objects)


def cp56time2a(epoch_seconds: float) -> bytes:
    """CP56Time2a (101 clause 7.2.6.18): ms, minute, hour, day + day of week, month, year (UTC, no DST)."""
    whole = int(epoch_seconds)
    tm = _time.gmtime(whole)
    ms = tm.tm_sec * 1000 + int(round((epoch_seconds - whole) * 1000)) % 1000
    return struct.pack("<HBBBBB", ms, tm.tm_min, tm.tm_hour, tm.tm_mday | ((tm.tm_wday + 1) << 5), tm.tm_mon,
                       tm.tm_year % 100)


def float_element(value: float, qds: int = 0) -> bytes:
    """Short floating point (IEEE 754) + QDS (101 clause 7.2.6.8, 7.2.6.3)."""
    return struct.pack("<fB", value, qds)


def double_point(closed: bool) -> bytes:
    """DIQ (101 clause 7.2.6.2): DPI 2 = ON (closed), 1 = OFF (open)."""
    return bytes([2 if closed else 1])


class Rtu:
    """An RTU: its common address and the feeder its IOAs read."""

    def __init__(self, ctx: Context, octet: int, feeder: Feeder, common_address: int):
        self.ctx, self.octet, self.feeder, self.ca = ctx, octet, feeder, common_address

    def measurands(self, t: float, kind: str = "") -> dict[int, float]:
        f = self.feeder
        t = f.at(t, kind)  # a replay reports the measurements of an earlier read of this kind
        return {1001: f.voltage_kv.value(t), 1002: f.current_a.value(t), 1003: f.power_kw(t) / 1000.0,
                1004: f.frequency_hz.value(t), 1005: f.temperature_c.value(t)}

    def measurand_objects(self, t: float, ioas=None) -> list[tuple[int, bytes]]:
        values = self.measurands(t, "cyclic")
        return [(ioa, float_element(values[ioa])) for ioa in (ioas or values)]

    def breaker_objects(self, t: float) -> list[tuple[int, bytes]]:
        return [(BREAKER_IOA + i, double_point(b.value(t))) for i, b in enumerate(self.feeder.breakers)]

    def single_points(self) -> list[tuple[int, bytes]]:
        return [(3001, b"\x01"), (3002, b"\x00")]  # local/remote in remote, no alarm

    def counter_object(self, t: float, sequence: int) -> list[tuple[int, bytes]]:
        """BCR (101 clause 7.2.6.9): 32-bit counter + sequence number."""
        return [(COUNTER_IOA, struct.pack("<iB", self.feeder.energy_kwh.value(t) & 0x7FFFFFFF, sequence & 0x1F))]

    def epoch(self, t: float) -> float:
        return self.ctx.start_epoch + t


class Iec104Session(Conversation):
    """One connection: side 0 the controlling station (master or attacker), side 1 the RTU."""

    def __init__(self, ctx: Context, client: int, rtu: Rtu, name: str, **kw):
        super().__init__(ctx, ctx.connection(client, rtu.octet, PORT, name, **kw), name)
        self.rtu = rtu
        self.vs = [0, 0]  # send state variable per side
        self.vr = [0, 0]  # receive state variable per side
        self.unacked = [0, 0]  # I-frames received and not yet acknowledged, per receiving side
        self.mitm = False
        self.mitm_frames = 0  # RTU sends relayed by a man in the middle: every other one duplicated

    def i_frame(self, frm: int, asdu_bytes: bytes) -> bytes:
        apdu = apci_i(self.vs[frm], self.vr[frm], asdu_bytes)
        self.vs[frm] = (self.vs[frm] + 1) & 0x7FFF
        self.vr[1 - frm] = (self.vr[1 - frm] + 1) & 0x7FFF
        self.unacked[frm] = 0  # our N(R) acknowledged everything we had received
        self.unacked[1 - frm] += 1
        return apdu

    def send_i(self, t: float, frm: int, asdus: list[bytes], split: bool = False) -> float:
        """Several ASDUs from one side: each its own APDU, all in one TCP segment (coalesced)."""
        payload = b"".join(self.i_frame(frm, a) for a in asdus)
        if split and len(payload) > 8:
            t = self.conn.send_split(t, frm, payload, 6)
        else:
            t = self.conn.send(t, frm, payload)
        return self.after_send(t, frm)

    def after_send(self, t: float, frm: int) -> float:
        if self.unacked[1 - frm] >= W:  # the receiver acknowledges after w I-frames (clause 5.2)
            t = self.send_s(t + 0.002 + 0.003 * self.rng.random(), 1 - frm)
        return t

    def send_s(self, t: float, frm: int) -> float:
        self.unacked[frm] = 0
        return self.conn.send(t, frm, apci_s(self.vr[frm]))

    def u_exchange(self, t: float, act: int, con: int, frm: int = 0) -> float:
        return self.conn.exchange(t, apci_u(act), apci_u(con), 0.002 + 0.004 * self.rng.random(), frm=frm)

    def latency(self) -> float:
        return self.delay(0.004, 0.012)

    def command(self, t: float, type_id: int, ioa: int, element: bytes, terminate: bool = True,
                ca: int | None = None) -> float:
        """Activation from the controlling station; confirmation (and termination) from the RTU."""
        ca = self.rtu.ca if ca is None else ca
        t = self.send_i(t, 0, [asdu(type_id, ACTIVATION, ca, [(ioa, element)])])
        t = self.send_i(t + self.latency(), 1, [asdu(type_id, ACT_CON, ca, [(ioa, element)])])
        if terminate:
            t = self.send_i(t + 0.02 + 0.02 * self.rng.random(), 1, [asdu(type_id, ACT_TERM, ca, [(ioa, element)])])
        return t

    def interrogation(self, t: float, ca: int | None = None) -> float:
        """C_IC_NA_1 station interrogation (QOI 20): act con, data with COT 20 in one segment, act term."""
        rtu, ca = self.rtu, self.rtu.ca if ca is None else ca
        t = self.send_i(t, 0, [asdu(C_IC_NA_1, ACTIVATION, ca, [(0, bytes([20]))])])
        t = self.send_i(t + self.latency(), 1, [asdu(C_IC_NA_1, ACT_CON, ca, [(0, bytes([20]))])])
        data = [asdu(M_ME_NC_1, INROGEN, rtu.ca, rtu.measurand_objects(t)),
                asdu(M_DP_NA_1, INROGEN, rtu.ca, rtu.breaker_objects(t)),
                asdu(M_SP_NA_1, INROGEN, rtu.ca, rtu.single_points()),
                asdu(C_IC_NA_1, ACT_TERM, ca, [(0, bytes([20]))])]
        return self.send_i(t + 0.015 + 0.01 * self.rng.random(), 1, data)


class Master(Iec104Session):
    """Controlling station and the RTU's spontaneous/cyclic reporting on one connection."""

    def __init__(self, ctx: Context, rtu: Rtu, offset: float):
        super().__init__(ctx, MASTER, rtu, f"iec104-master:{rtu.octet}")
        self.offset = offset
        self.sent = rtu.measurands(0.0)
        self.sent_breakers = [b.value(0.0) for b in rtu.feeder.breakers]
        self.counter_seq = 0
        self.last_command: bytes | None = None
        self.replay_apdu: bytes | None = None

    def start(self, t: float) -> float:
        t = self.conn.connect(t + self.offset)
        t = self.u_exchange(t + 0.01, STARTDT_ACT, STARTDT_CON)
        t = self.command(t + 0.02, C_CS_NA_1, 0, cp56time2a(self.rtu.epoch(t + 0.02)), terminate=False)
        t = self.interrogation(t + 0.05)
        t = self.send_s(t + 0.01, 0)
        self.every("spontaneous", t + 1.0, 2.0)
        self.every("cyclic", t + 5.0, 30.0, jitter=0.002)
        self.every("counters", t + 120.0, 900.0)
        self.every("clock", t + 1800.0, 1800.0)
        self.once("setpoint", t + self.rng.uniform(120, 360))
        self.once("command", t + self.rng.uniform(300, 700))
        self.once("testfr", t + T3)
        for breaker in self.rtu.feeder.breakers:
            for when in breaker.changes:
                self.once(f"spontaneous@{when:.3f}", when + 0.01)
        return t

    def __getattr__(self, name):
        if name.startswith("on_spontaneous@"):
            return self.on_spontaneous
        raise AttributeError(name)

    def rtu_sends(self, t: float, asdus: list[bytes], split: bool = False) -> float:
        """RTU data to the master; the master acknowledges after w frames or t2; resets t3."""
        if self.mitm:
            self.mitm_frames += 1
        if self.mitm and len(asdus) >= 2 and self.mitm_frames % 2:
            # A relay that buffers badly: two APDUs delivered in the wrong order (N(S) k+1 before k).
            first, second = self.i_frame(1, asdus[0]), self.i_frame(1, asdus[1])
            t = self.conn.send(t, 1, second + first)
            asdus = asdus[2:]
            t = self.after_send(t, 1)
            if not asdus:
                return self.ack_timers(t)
        if self.mitm and self.mitm_frames % 2 == 0:
            apdu = self.i_frame(1, asdus[0])
            t = self.conn.send(t, 1, apdu)
            t = self.conn.send(t + 0.0005 + 0.002 * self.rng.random(), 1, apdu)  # the same N(S) twice
            t = self.after_send(t, 1)
            asdus = asdus[1:]
            if not asdus:
                return self.ack_timers(t)
        t = self.send_i(t, 1, asdus, split=split)
        return self.ack_timers(t)

    def ack_timers(self, t: float) -> float:
        if self.unacked[0] and "t2" not in self.timers:
            self.once("t2", t + T2)
        self.timers["testfr"] = [t + T3, None, 0.0]
        return t

    def on_t2(self, t: float) -> float:
        return self.send_s(t, 0) if self.unacked[0] else t

    def on_testfr(self, t: float) -> float:
        t = self.u_exchange(t, TESTFR_ACT, TESTFR_CON)
        self.once("testfr", t + T3)
        return t

    def on_spontaneous(self, t: float) -> float:
        """Spontaneous (COT 3) time-tagged measurands past their deadband, breaker changes with time."""
        rtu, asdus = self.rtu, []
        breakers = [b.value(t) for b in rtu.feeder.breakers]
        changed = [(BREAKER_IOA + i, double_point(s) + cp56time2a(rtu.epoch(t - 0.01)))
                   for i, (s, r) in enumerate(zip(breakers, self.sent_breakers)) if s != r]
        self.sent_breakers = breakers
        if changed:
            asdus.append(asdu(M_DP_TB_1, SPONTANEOUS, rtu.ca, changed))
        now = rtu.measurands(t)
        for ioa, value in now.items():
            if abs(value - self.sent[ioa]) > DEADBANDS[ioa]:
                self.sent[ioa] = value
                asdus.append(asdu(M_ME_TF_1, SPONTANEOUS, rtu.ca, [(ioa, float_element(value) + cp56time2a(rtu.epoch(t)))]))
        if not asdus:
            return t
        return self.rtu_sends(t, asdus)

    def on_cyclic(self, t: float) -> float:
        """Periodic/cyclic measurands (COT 1), occasionally split over two segments by the RTU's stack."""
        self.sent.update(self.rtu.measurands(t))
        return self.rtu_sends(t, [asdu(M_ME_NC_1, PERIODIC, self.rtu.ca, self.rtu.measurand_objects(t))],
                              split=self.rng.random() < 0.05)

    def on_counters(self, t: float) -> float:
        """C_CI_NA_1 general counter request (QCC 5): act con, M_IT_NA_1 with COT 37, act term."""
        rtu = self.rtu
        t = self.send_i(t, 0, [asdu(C_CI_NA_1, ACTIVATION, rtu.ca, [(0, bytes([5]))])])
        t = self.rtu_sends(t + self.latency(), [asdu(C_CI_NA_1, ACT_CON, rtu.ca, [(0, bytes([5]))])])
        self.counter_seq += 1
        return self.rtu_sends(t + 0.02, [asdu(M_IT_NA_1, REQCOGEN, rtu.ca, rtu.counter_object(t, self.counter_seq)),
                                         asdu(C_CI_NA_1, ACT_TERM, rtu.ca, [(0, bytes([5]))])])

    def on_clock(self, t: float) -> float:
        return self.ack_timers(self.command(t, C_CS_NA_1, 0, cp56time2a(self.rtu.epoch(t)), terminate=False))

    def on_setpoint(self, t: float) -> float:
        """C_SE_NC_1 voltage setpoint within 10.8-11.2 kV, direct execute (QOS S/E = 0)."""
        self.once("setpoint", t + self.rng.uniform(400, 800))
        return self.setpoint(t, round(self.rng.uniform(10.8, 11.2), 2))

    def setpoint(self, t: float, kv: float) -> float:
        element = float_element(kv, 0)
        self.last_command = asdu(C_SE_NC_1, ACTIVATION, self.rtu.ca, [(SETPOINT_IOA, element)])
        self.replay_apdu = apci_i(self.vs[0], self.vr[0], self.last_command)
        return self.ack_timers(self.command(t, C_SE_NC_1, SETPOINT_IOA, element, terminate=False))

    def on_command(self, t: float) -> float:
        """C_DC_NA_1 select (S/E = 1) then execute on capacitor-bank breaker 3; return information COT 11."""
        self.once("command", t + self.rng.uniform(700, 1200))
        breaker = self.rtu.feeder.breakers[2]
        dcs = 1 if breaker.value(t) else 2  # DCS 1 = OFF (open), 2 = ON (close)
        t = self.command(t, C_DC_NA_1, COMMAND_IOA + 2, bytes([0x80 | dcs]), terminate=False)
        t = self.command(t + 0.3 + 0.2 * self.rng.random(), C_DC_NA_1, COMMAND_IOA + 2, bytes([dcs]))
        breaker.toggle_at(t + 0.05)
        self.sent_breakers[2] = not self.sent_breakers[2]
        info = [(BREAKER_IOA + 2, double_point(breaker.value(t + 0.06)) + cp56time2a(self.rtu.epoch(t + 0.05)))]
        return self.rtu_sends(t + 0.08, [asdu(M_DP_TB_1, RETURN_REMOTE, self.rtu.ca, info)])


class Iec104Network:
    def __init__(self, ctx: Context, octets: tuple[int, ...]):
        self.ctx = ctx
        self.rtus = [Rtu(ctx, o, ctx.plant.feeder(f"iec104-{o}"), 1 + i) for i, o in enumerate(octets)]
        self.masters = {r.octet: Master(ctx, r, 0.07 + 0.151 * i) for i, r in enumerate(self.rtus)}
        self.standalone: list = []

    def inject(self, attack: Attack) -> None:
        rtu = self.rtus[attack.index % len(self.rtus)]
        attack.src, attack.dst = self.ctx.host(ATTACKER).ip, self.ctx.host(rtu.octet).ip
        getattr(self, "_" + attack.scenario)(attack, rtu)

    def run(self, t_end: float) -> None:
        for fn in self.standalone:
            fn()
        for master in self.masters.values():
            master.run(0.0, t_end)

    def _session(self, attack: Attack, rtu: Rtu) -> Iec104Session:
        return Iec104Session(self.ctx, ATTACKER, rtu, f"iec104-attack:{attack.index}:{rtu.octet}",
                             client_ack_delay=0.0002)

    def _attacker(self, attack: Attack, rtu: Rtu, body) -> None:
        def go():
            s = self._session(attack, rtu)
            with self.ctx.cap.tagged(attack):
                t = s.conn.connect(attack.t)
                t = s.u_exchange(t + 0.02, STARTDT_ACT, STARTDT_CON)
                t = body(s, t + 0.1)
                if s.unacked[0]:
                    t = s.send_s(t + 0.01, 0)
                t = s.u_exchange(t + 0.05, STOPDT_ACT, STOPDT_CON)
                s.conn.close(t + 0.05)
        self.standalone.append(go)

    def _recon(self, attack: Attack, rtu: Rtu) -> None:
        rng = self.ctx.rng(f"attack:{attack.index}")
        attack.dst = ""
        attack.description = ("SYN scan, then from a new host: STARTDT and a broadcast station interrogation "
                              "(C_IC_NA_1, CA 65535) of every RTU")
        targets = [r.octet for r in self.rtus]

        def go():
            with self.ctx.cap.tagged(attack):
                t = port_scan(self.ctx, ATTACKER, targets, {o: (PORT,) for o in targets},
                              (502, 20000, 2404, 102, 80, 22), attack.t, rng)
                for r in self.rtus:
                    s = self._session(attack, r)
                    t = s.conn.connect(t + 0.3)
                    t = s.u_exchange(t + 0.02, STARTDT_ACT, STARTDT_CON)
                    t = s.interrogation(t + 0.05, ca=0xFFFF)
                    t = s.send_s(t + 0.01, 0)
                    t = s.u_exchange(t + 0.05, STOPDT_ACT, STOPDT_CON)
                    t = s.conn.close(t + 0.05)
        self.standalone.append(go)

    def _unauthorised_write(self, attack: Attack, rtu: Rtu) -> None:
        attack.description = f"new host opens breaker 1 of {attack.dst} with a direct-execute C_DC_NA_1"

        def body(s, t):
            t = s.command(t, C_DC_NA_1, COMMAND_IOA, bytes([1]))
            if rtu.feeder.breakers[0].value(t):
                rtu.feeder.breakers[0].toggle_at(t)
            return t
        self._attacker(attack, rtu, body)

    def _dangerous_function(self, attack: Attack, rtu: Rtu) -> None:
        attack.description = f"new host sends reset process C_RP_NA_1 (QRP 1, general reset) to {attack.dst}"

        def body(s, t):
            return s.command(t, C_RP_NA_1, 0, bytes([1]), terminate=False)
        self._attacker(attack, rtu, body)

    def _flood(self, attack: Attack, rtu: Rtu) -> None:
        attack.description = f"request flood: ~150 read commands (C_RD_NA_1) per second for 4 s against {attack.dst}"

        def body(s, t):
            end, ioas = t + 4.0, list(MEASURANDS)
            i = 0
            while t < end:
                ioa = ioas[i % len(ioas)]
                i += 1
                t = s.send_i(t + 0.0005, 0, [asdu(C_RD_NA_1, REQUEST, rtu.ca, [(ioa, b"")])])
                t = s.send_i(t + 0.003 + 0.003 * s.rng.random(), 1,
                             [asdu(M_ME_NC_1, REQUEST, rtu.ca, rtu.measurand_objects(t, [ioa]))])
            return t
        self._attacker(attack, rtu, body)

    def _setpoint_manipulation(self, attack: Attack, rtu: Rtu) -> None:
        master = self.masters[rtu.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("out_of_range", "rapid_writes"))
        attack.description = (f"legitimate master sends C_SE_NC_1 voltage setpoint 14.5 kV (normal 10.8-11.2) to "
                              f"{attack.dst}, restored 20 s later" if attack.variant == "out_of_range" else
                              f"legitimate master sends 24 C_SE_NC_1 setpoints in 3 s to {attack.dst}")

        def body(t):
            if attack.variant == "out_of_range":
                t = master.setpoint(t, 14.5)
                t = master.setpoint(t + 20.0, 11.0)
            else:
                for i in range(24):
                    t = master.setpoint(t + 0.1 + 0.03 * master.rng.random(), 10.8 + ((i * 173) % 400) / 1000)
            return master.send_s(t + 0.05, 1) if master.unacked[1] else t
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))

    def _mitm(self, attack: Attack, rtu: Rtu) -> None:
        master = self.masters[rtu.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.description = (f"ARP-spoofing relay between master and {attack.dst}: +20-60 ms latency and jitter, "
                              f"duplicated and re-ordered N(S), the master's last setpoint APDU replayed verbatim")
        duration = min(45.0, attack.budget * 0.8)

        def replay(conv, t):
            apdu = master.replay_apdu or apci_i(0, 0, asdu(C_SE_NC_1, ACTIVATION, rtu.ca,
                                                          [(SETPOINT_IOA, float_element(11.0))]))
            return master.conn.send(t, 0, apdu)  # old N(S)/N(R): the RTU's counters do not move

        def set_mitm(on):
            def mark(conv):
                conv.mitm = on
            return mark
        master.relabel(attack, duration, mitm_mac=self.ctx.host(ATTACKER).mac, on_begin=set_mitm(True),
                       on_end=set_mitm(False))
        master.hook(attack.t + duration * 0.6, replay)

    def _measurement_spoofing(self, attack: Attack, rtu: Rtu) -> None:
        master = self.masters[rtu.octet]
        attack.src, attack.dst = self.ctx.host(rtu.octet).ip, self.ctx.host(MASTER).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("freeze", "step"))
        duration = min(90.0, attack.budget * 0.85)
        rtu.feeder.voltage_kv.overrides.append((attack.t, attack.t + duration, attack.variant, 0.45))
        attack.description = (f"{attack.src} reports a {'frozen' if attack.variant == 'freeze' else 'stepped (+0.45 kV)'}"
                              f" bus voltage (IOA 1001) for {duration:.0f} s while current and power move on")
        master.relabel(attack, duration)

    def _replayed_state(self, attack: Attack, rtu: Rtu) -> None:
        master = self.masters[rtu.octet]
        attack.src, attack.dst = self.ctx.host(rtu.octet).ip, self.ctx.host(MASTER).ip
        duration = min(REPLAY_S, attack.budget * 0.85)
        lag = replay_lag(rtu.feeder, attack.t, duration)
        rtu.feeder.replay = (attack.t, attack.t + duration, lag)
        attack.description = (f"{attack.src} reports the measurands (IOA 1001-1005) it reported {lag / 60:.0f} min "
                              f"earlier, for {duration:.0f} s (breakers and counters live; both splices seamless)")
        master.relabel(attack, duration)

    def _operate_out_of_order(self, attack: Attack, rtu: Rtu) -> None:
        master = self.masters[rtu.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.description = (f"the master's session executes C_DC_NA_1 on breaker 3 of {attack.dst} without the "
                              f"select (S/E = 1) it always sends first; the RTU executes it")

        def body(t):
            breaker = rtu.feeder.breakers[2]
            dcs = 1 if breaker.value(t) else 2
            t = master.command(t, C_DC_NA_1, COMMAND_IOA + 2, bytes([dcs]))
            breaker.toggle_at(t + 0.05)
            master.sent_breakers[2] = not master.sent_breakers[2]
            info = [(BREAKER_IOA + 2, double_point(breaker.value(t + 0.06)) + cp56time2a(rtu.epoch(t + 0.05)))]
            return master.rtu_sends(t + 0.08, [asdu(M_DP_TB_1, RETURN_REMOTE, rtu.ca, info)])
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))
