"""DNP3 over TCP (port 20000): a master polling outstations, unsolicited events, commands, attacks.

Layouts follow IEEE 1815-2012: data link frames (clause 9.2: 0x0564 start, length, control,
destination, source, a CRC after the header and after every 16 octets of user data), the
transport function (clause 8.2: one octet FIN/FIR/SEQ), and application fragments (clause 4.2:
request header = control + function code, response header adds the two IIN octets; object
headers = group, variation, qualifier, range; clause 4.2.2.7 qualifier codes).

>>> crc16(bytes.fromhex("056405c001000004")).to_bytes(2, "little").hex()
'e921'
>>> link_frame(0xC4, 10, 1, bytes(20)).hex()[:20]
'056419c40a000100da8f'
"""

from __future__ import annotations

import struct

from .common import ATTACKER, MASTER, REPLAY_S, Attack, Context, Conversation, port_scan, replay_lag
from .plant import Feeder

PORT = 20000
MASTER_ADDRESS = 1

# Application function codes (clause 4.2.2.5)
CONFIRM, READ, WRITE, SELECT, OPERATE, DIRECT_OPERATE = 0, 1, 2, 3, 4, 5
COLD_RESTART, WARM_RESTART, ENABLE_UNSOLICITED, DISABLE_UNSOLICITED = 13, 14, 20, 21
RESPONSE, UNSOLICITED_RESPONSE = 129, 130
FUNCTION_NAMES = {0: "confirm", 1: "read", 2: "write", 3: "select", 4: "operate", 5: "direct_operate",
                  13: "cold_restart", 14: "warm_restart", 20: "enable_unsolicited", 21: "disable_unsolicited",
                  129: "response", 130: "unsolicited_response"}

# Link layer control octets (clause 9.2.4.1.3): DIR, PRM, FCV/DFC, function.
LINK_USER_DATA_FROM_MASTER = 0xC4  # DIR=1 PRM=1 FC=4 unconfirmed user data
LINK_USER_DATA_FROM_OUTSTATION = 0x44  # DIR=0 PRM=1 FC=4
LINK_STATUS_REQUEST = 0xC9  # DIR=1 PRM=1 FC=9 request link status
LINK_STATUS = 0x0B  # DIR=0 PRM=0 FC=11 link status (secondary)

# Application control (clause 4.2.2.4) and IIN bits (clause 4.2.2.6)
FIR, FIN, CON, UNS = 0x80, 0x40, 0x20, 0x10
IIN1_BROADCAST, IIN1_CLASS1, IIN1_CLASS2, IIN1_NEED_TIME, IIN1_RESTART = 0x01, 0x02, 0x04, 0x10, 0x80
IIN2_NO_FUNC = 0x01

ONLINE = 0x01  # point flags (clause 11.9.5): ONLINE; binary state is bit 7
CROB_SUCCESS, CROB_NO_SELECT = 0, 2

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0xA6BC if _c & 1 else _c >> 1  # x^16+x^13+x^12+x^11+x^10+x^8+x^6+x^5+x^2+1, reflected
    _CRC_TABLE.append(_c)


def crc16(data: bytes) -> int:
    """The DNP3 link CRC (clause 9.2.5), sent low octet first."""
    crc = 0
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return ~crc & 0xFFFF


def link_frame(control: int, destination: int, source: int, user_data: bytes = b"") -> bytes:
    """One data link frame: header block + CRC, then 16-octet data blocks each followed by its CRC."""
    header = struct.pack("<BBBBHH", 0x05, 0x64, 5 + len(user_data), control, destination, source)
    out = [header, struct.pack("<H", crc16(header))]
    for i in range(0, len(user_data), 16):
        block = user_data[i:i + 16]
        out += [block, struct.pack("<H", crc16(block))]
    return b"".join(out)


def dnp3_time(epoch_seconds: float) -> bytes:
    """DNP3 absolute time: 48-bit milliseconds since 1970-01-01 UTC, little-endian (clause 11.9.2)."""
    return int(round(epoch_seconds * 1000)).to_bytes(6, "little")


# Object headers and objects (clause 4.2.2.7; object definitions in clause 11 / Annex A).
def class_header(variation: int) -> bytes:
    """g60vN with qualifier 0x06 (all points): class 0 (v1) and class 1/2/3 events (v2/v3/v4)."""
    return bytes([60, variation, 0x06])


def range_header(group: int, variation: int, start: int, stop: int) -> bytes:
    return bytes([group, variation, 0x00, start, stop])  # qualifier 0x00: 8-bit start/stop indices


def binary_inputs(states: list[bool]) -> bytes:
    """g1v2 binary input with flags."""
    return range_header(1, 2, 0, len(states) - 1) + bytes(ONLINE | (0x80 if s else 0) for s in states)


def binary_output_status(states: list[bool]) -> bytes:
    """g10v2 binary output status with flags."""
    return range_header(10, 2, 0, len(states) - 1) + bytes(ONLINE | (0x80 if s else 0) for s in states)


def analog_inputs(values: list[int]) -> bytes:
    """g30v1 32-bit analog input with flag."""
    return range_header(30, 1, 0, len(values) - 1) + b"".join(struct.pack("<Bi", ONLINE, v) for v in values)


def counters(values: list[int]) -> bytes:
    """g20v1 32-bit counter with flag."""
    return range_header(20, 1, 0, len(values) - 1) + b"".join(struct.pack("<BI", ONLINE, v & 0xFFFFFFFF) for v in values)


def binary_events(events: list[tuple[int, bool, float]]) -> bytes:
    """g2v2 binary input event with absolute time; qualifier 0x17 (8-bit count, 8-bit index prefix)."""
    body = b"".join(bytes([i, ONLINE | (0x80 if s else 0)]) + dnp3_time(t) for i, s, t in events)
    return bytes([2, 2, 0x17, len(events)]) + body


def analog_events(events: list[tuple[int, int]]) -> bytes:
    """g32v1 32-bit analog change event without time; qualifier 0x28 (16-bit count and index)."""
    body = b"".join(struct.pack("<HBi", i, ONLINE, v) for i, v in events)
    return bytes([32, 1, 0x28]) + struct.pack("<H", len(events)) + body


def time_write(epoch_seconds: float) -> bytes:
    """g50v1 time and date, qualifier 0x07 (8-bit quantity) = 1."""
    return bytes([50, 1, 0x07, 1]) + dnp3_time(epoch_seconds)


def clear_restart() -> bytes:
    """g80v1 internal indications, index 7 (DEVICE_RESTART) written to 0."""
    return bytes([80, 1, 0x00, 7, 7, 0x00])


def crob(index: int, code: int, status: int = 0, on_ms: int = 100) -> bytes:
    """g12v1 control relay output block, qualifier 0x28, one object (Annex A, group 12)."""
    return bytes([12, 1, 0x28]) + struct.pack("<HHBBIIB", 1, index, code, 1, on_ms, 0, status)


def analog_output(index: int, value: int, status: int = 0) -> bytes:
    """g41v2 16-bit analog output block, qualifier 0x28, one object."""
    return bytes([41, 2, 0x28]) + struct.pack("<HHhB", 1, index, value, status)


def time_delay(ms: int) -> bytes:
    """g52v2 time delay fine, qualifier 0x07 count 1 (cold/warm restart response)."""
    return bytes([52, 2, 0x07, 1]) + struct.pack("<H", ms)


# g12v1 control code octet: trip/close code in bits 7-6 (TCC 2 = TRIP, 1 = CLOSE), op type PULSE_ON (1).
TRIP, CLOSE = 0x81, 0x41


class Station:
    """One end's link/transport/application counters on one connection."""

    def __init__(self, address: int, peer: int, from_master: bool):
        self.address, self.peer, self.from_master = address, peer, from_master
        self.transport_seq = 0
        self.app_seq = 0
        self.unsolicited_seq = 0

    def frame(self, apdu: bytes, destination: int | None = None) -> bytes:
        """Wrap a (single-fragment, <= 249 octets) APDU in a transport segment and a link frame."""
        tpdu = bytes([0xC0 | self.transport_seq]) + apdu  # FIN | FIR | SEQ
        self.transport_seq = (self.transport_seq + 1) & 0x3F
        control = LINK_USER_DATA_FROM_MASTER if self.from_master else LINK_USER_DATA_FROM_OUTSTATION
        return link_frame(control, self.peer if destination is None else destination, self.address, tpdu)

    def request(self, function: int, objects: bytes = b"", seq: int | None = None,
                destination: int | None = None) -> bytes:
        if seq is None:
            seq, self.app_seq = self.app_seq, (self.app_seq + 1) & 0x0F
        return self.frame(bytes([FIR | FIN | seq, function]) + objects, destination)

    def response(self, seq: int, iin: int, objects: bytes = b"", confirm: bool = False,
                 unsolicited: bool = False) -> bytes:
        control = FIR | FIN | (CON if confirm else 0) | (UNS if unsolicited else 0) | seq
        function = UNSOLICITED_RESPONSE if unsolicited else RESPONSE
        return self.frame(bytes([control, function, iin >> 8, iin & 0xFF]) + objects)


class Outstation:
    """A DNP3 outstation (bay controller) with its points mapped onto a feeder."""

    def __init__(self, ctx: Context, octet: int, feeder: Feeder, address: int):
        self.ctx, self.octet, self.feeder, self.address = ctx, octet, feeder, address
        self.deadbands = (15, 40, 60, 5, 10)  # V, A x10, kW, mHz, 0.1 degC

    def analogs(self, t: float, kind: str = "") -> list[int]:
        f = self.feeder
        t = f.at(t, kind)  # a replay reports the measurements of an earlier read of this kind
        return [round(f.voltage_kv.value(t) * 1000), round(f.current_a.value(t) * 10), round(f.power_kw(t)),
                round(f.frequency_hz.value(t) * 1000), round(f.temperature_c.value(t) * 10)]

    def binaries(self, t: float) -> list[bool]:
        return [b.value(t) for b in self.feeder.breakers] + [True]  # + local/remote switch in remote

    def static_data(self, t: float) -> bytes:
        f = self.feeder
        return (binary_inputs(self.binaries(t)) + binary_output_status([b.value(t) for b in f.breakers])
                + analog_inputs(self.analogs(t, "integrity")) + counters([f.energy_kwh.value(t), 17 + len(f.breakers[2].changes)]))

    def epoch(self, t: float) -> float:
        return self.ctx.start_epoch + t


class Dnp3Session(Conversation):
    """A client connection (master or attacker) to one outstation, with both ends' state."""

    def __init__(self, ctx: Context, client: int, outstation: Outstation, name: str, master_address: int, **kw):
        super().__init__(ctx, ctx.connection(client, outstation.octet, PORT, name, **kw), name)
        self.out = outstation
        self.m = Station(master_address, outstation.address, True)
        self.o = Station(outstation.address, master_address, False)
        self.iin = IIN1_RESTART | IIN1_NEED_TIME  # (IIN1 << 8) | IIN2
        self.iin <<= 8
        self.selected: tuple | None = None

    def latency(self) -> float:
        return self.delay(0.006, 0.014)

    def transact(self, t: float, function: int, objects: bytes = b"", destination: int | None = None,
                 answer=None, split: bool = False, with_link_status: bool = False) -> float:
        """Send a request; the outstation answers (``answer(seq) -> (objects, iin_extra, confirm)``).

        ``split``: the response leaves in two TCP segments (link header, then the data blocks);
        ``with_link_status``: a link status request rides in the same segment as the request and
        the link status in the same segment as the response (two link frames per segment).
        """
        seq = self.m.app_seq
        request = self.m.request(function, objects, destination=destination)
        if destination is not None and destination != self.out.address:
            return self.conn.send(t, 0, request)  # broadcast or wrong address: no response
        latency = self.latency()
        objs, extra_iin, confirm = answer(seq, t + latency) if answer else (b"", 0, False)
        response = self.o.response(seq, self.iin | extra_iin, objs, confirm=confirm)
        if with_link_status:
            request = link_frame(LINK_STATUS_REQUEST, self.out.address, self.m.address) + request
            response = link_frame(LINK_STATUS, self.m.address, self.out.address) + response
        t = self.conn.exchange(t, request, response, latency, split_at=10 if split else 0)
        if confirm:  # the master confirms an event response (clause 4.4.2)
            t = self.conn.send(t + 0.003 + 0.004 * self.rng.random(), 0, self.m.request(CONFIRM, seq=seq))
        return t

    def link_status(self, t: float, destination: int | None = None) -> float:
        destination = self.out.address if destination is None else destination
        request = link_frame(LINK_STATUS_REQUEST, destination, self.m.address)
        if destination != self.out.address:
            return self.conn.send(t, 0, request)
        return self.conn.exchange(t, request, link_frame(LINK_STATUS, self.m.address, self.out.address), 0.003)

    def static_answer(self, seq, t):
        return self.out.static_data(t), 0, False


class Master(Dnp3Session):
    """SCADA master: startup sequence, 10 s event polls, 60 s integrity polls, time sync, commands."""

    def __init__(self, ctx: Context, outstation: Outstation, offset: float):
        super().__init__(ctx, MASTER, outstation, f"dnp3-master:{outstation.octet}", MASTER_ADDRESS)
        self.offset = offset
        self.reported = outstation.analogs(0.0)
        self.reported_binaries = outstation.binaries(0.0)
        self.last_operate: bytes | None = None
        self.pending_select: tuple | None = None

    def start(self, t: float) -> float:
        t = self.conn.connect(t + self.offset)
        # The outstation announces its restart with a null unsolicited response (clause 5.1.1.1.1).
        t = self.unsolicited(t + 0.05, b"")
        t = self.transact(t + 0.05, READ, class_header(2) + class_header(3) + class_header(4) + class_header(1),
                          answer=self.integrity_answer)
        t = self.transact(t + 0.02, WRITE, clear_restart())
        self.iin &= ~(IIN1_RESTART << 8)
        t = self.transact(t + 0.02, WRITE, time_write(self.out.epoch(t)))
        self.iin &= ~(IIN1_NEED_TIME << 8)
        t = self.transact(t + 0.02, ENABLE_UNSOLICITED, class_header(2))
        self.every("events", t + 2.0, 10.0, jitter=0.005)
        self.every("integrity", t + 60.0, 60.0, jitter=0.005)
        self.every("link", t + 31.0, 30.0, jitter=0.05)
        self.every("need_time", t + 1200.0, 1200.0)
        self.once("setpoint", t + self.rng.uniform(90, 300))
        self.once("command", t + self.rng.uniform(240, 600))
        for breaker in self.out.feeder.breakers:  # changes caused by others (e.g. an attacker's command)
            for when in breaker.changes:
                self.once(f"unsolicited@{when:.3f}", when + 0.02)
        return t

    def integrity_answer(self, seq, t):
        self.reported = self.out.analogs(t, "integrity")
        return self.out.static_data(t), 0, False

    def event_answer(self, seq, t):
        now = self.out.analogs(t, "events")
        events = [(i, v) for i, (v, r, db) in enumerate(zip(now, self.reported, self.out.deadbands)) if abs(v - r) > db]
        for i, v in events:
            self.reported[i] = v
        if not events:
            return b"", 0, False
        return analog_events(events), 0, True

    def unsolicited(self, t: float, objects: bytes) -> float:
        seq = self.o.unsolicited_seq
        self.o.unsolicited_seq = (seq + 1) & 0x0F
        t = self.conn.send(t, 1, self.o.response(seq, self.iin, objects, confirm=True, unsolicited=True))
        latency = 0.004 + 0.006 * self.rng.random()
        return self.conn.send(t + latency, 0, self.m.frame(bytes([FIR | FIN | UNS | seq, CONFIRM])))

    def __getattr__(self, name):
        if name.startswith("on_unsolicited@"):
            return self.on_breaker_change
        raise AttributeError(name)

    def on_breaker_change(self, t: float) -> float:
        now = self.out.binaries(t)
        events = [(i, s, t - 0.02) for i, (s, r) in enumerate(zip(now, self.reported_binaries)) if s != r]
        self.reported_binaries = now
        if not events:
            return t
        return self.unsolicited(t, binary_events(events))

    def on_events(self, t: float) -> float:
        return self.transact(t, READ, class_header(2) + class_header(3) + class_header(4), answer=self.event_answer)

    def on_integrity(self, t: float) -> float:
        return self.transact(t, READ, class_header(2) + class_header(3) + class_header(4) + class_header(1),
                             answer=self.integrity_answer, split=self.rng.random() < 0.15)

    def on_link(self, t: float) -> float:
        """Link status keep-alive (clause 9.2.6.2), sometimes in the same segment as an event poll."""
        if self.rng.random() < 0.3:
            return self.transact(t, READ, class_header(2) + class_header(3) + class_header(4),
                                 answer=self.event_answer, with_link_status=True)
        return self.link_status(t)

    def on_need_time(self, t: float) -> float:
        """The outstation's clock needs setting again (IIN1.4); the master writes the time."""
        self.iin |= IIN1_NEED_TIME << 8
        t = self.on_events(t)
        t = self.transact(t + 0.02, WRITE, time_write(self.out.epoch(t + 0.02)))
        self.iin &= ~(IIN1_NEED_TIME << 8)
        return t

    def on_setpoint(self, t: float) -> float:
        """Direct operate of the voltage setpoint (g41v2 index 0) within 10800-11200 V."""
        self.once("setpoint", t + self.rng.uniform(360, 720))
        value = self.rng.randrange(10800, 11201, 50)
        return self.operate(t, DIRECT_OPERATE, analog_output(0, value))

    def operate(self, t: float, function: int, objects: bytes) -> float:
        if function in (OPERATE, DIRECT_OPERATE):
            self.last_operate = objects
        return self.transact(t, function, objects, answer=lambda seq, when: (objects, 0, False))

    def on_command(self, t: float) -> float:
        """Select-before-operate of capacitor-bank breaker 2 (trip or close), then its event arrives."""
        self.once("command", t + self.rng.uniform(600, 1100))
        breaker = self.out.feeder.breakers[2]
        code = TRIP if breaker.value(t) else CLOSE
        t = self.operate(t, SELECT, crob(2, code))
        t = self.operate(t + 0.2 + 0.1 * self.rng.random(), OPERATE, crob(2, code))
        breaker.toggle_at(t + 0.08)
        return self.on_breaker_change(t + 0.1)


class Dnp3Network:
    def __init__(self, ctx: Context, octets: tuple[int, ...]):
        self.ctx = ctx
        self.outstations = [Outstation(ctx, o, ctx.plant.feeder(f"dnp3-{o}"), 10 + i) for i, o in enumerate(octets)]
        self.masters = {o.octet: Master(ctx, o, 0.11 + 0.173 * i) for i, o in enumerate(self.outstations)}
        self.standalone: list = []

    def inject(self, attack: Attack) -> None:
        out = self.outstations[attack.index % len(self.outstations)]
        attack.src, attack.dst = self.ctx.host(ATTACKER).ip, self.ctx.host(out.octet).ip
        getattr(self, "_" + attack.scenario)(attack, out)

    def run(self, t_end: float) -> None:
        for fn in self.standalone:
            fn()
        for master in self.masters.values():
            master.run(0.0, t_end)

    def _session(self, attack: Attack, out: Outstation) -> Dnp3Session:
        session = Dnp3Session(self.ctx, ATTACKER, out, f"dnp3-attack:{attack.index}:{out.octet}", 3,
                              client_ack_delay=0.0002)
        session.iin = 0
        return session

    def _attacker(self, attack: Attack, out: Outstation, body) -> None:
        def go():
            session = self._session(attack, out)
            with self.ctx.cap.tagged(attack):
                t = session.conn.connect(attack.t)
                t = body(session, t + 0.05)
                session.conn.close(t + 0.1)
        self.standalone.append(go)

    def _recon(self, attack: Attack, out: Outstation) -> None:
        rng = self.ctx.rng(f"attack:{attack.index}")
        attack.dst = ""
        attack.description = ("SYN scan, then from a new host: DNP3 link-address scan with link status requests, "
                              "an integrity poll of every outstation and a broadcast read")
        targets = [o.octet for o in self.outstations]

        def go():
            with self.ctx.cap.tagged(attack):
                t = port_scan(self.ctx, ATTACKER, targets, {o: (PORT,) for o in targets},
                              (502, 20000, 2404, 102, 80, 22), attack.t, rng)
                for o in self.outstations:
                    session = self._session(attack, o)
                    t = session.conn.connect(t + 0.3)
                    for address in range(1, o.address + 1):
                        t = session.link_status(t + 0.05, destination=address)
                    t = session.transact(t + 0.05, READ, class_header(1), answer=session.static_answer)
                    t = session.transact(t + 0.05, READ, class_header(1), destination=0xFFFF)
                    t = session.conn.close(t + 0.2)
        self.standalone.append(go)

    def _unauthorised_write(self, attack: Attack, out: Outstation) -> None:
        attack.description = f"new host trips breaker 0 of {attack.dst} with select/operate (g12v1 CROB)"

        def body(s, t):
            echo = lambda seq, when: (crob(0, TRIP), 0, False)  # noqa: E731 - the outstation echoes the block
            t = s.transact(t, SELECT, crob(0, TRIP), answer=echo)
            t = s.transact(t + 0.3, OPERATE, crob(0, TRIP), answer=echo)
            if out.feeder.breakers[0].value(t):
                out.feeder.breakers[0].toggle_at(t)
            return t
        self._attacker(attack, out, body)

    def _dangerous_function(self, attack: Attack, out: Outstation) -> None:
        attack.description = f"new host disables unsolicited reporting (FC 21) then cold-restarts (FC 13) {attack.dst}"

        def body(s, t):
            t = s.transact(t, DISABLE_UNSOLICITED, class_header(2) + class_header(3) + class_header(4))
            t = s.transact(t + 0.8, COLD_RESTART, answer=lambda seq, when: (time_delay(5000), 0, False))
            return t
        self._attacker(attack, out, body)

    def _flood(self, attack: Attack, out: Outstation) -> None:
        attack.description = f"request flood: ~150 integrity polls/s for 4 s against {attack.dst}"

        def body(s, t):
            end = t + 4.0
            while t < end:
                t = s.transact(t + 0.0005, READ, class_header(1), answer=s.static_answer)
            return t
        self._attacker(attack, out, body)

    def _setpoint_manipulation(self, attack: Attack, out: Outstation) -> None:
        master = self.masters[out.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("out_of_range", "rapid_writes"))
        attack.description = (f"legitimate master direct-operates voltage setpoint 14500 V (normal 10800-11200) on "
                              f"{attack.dst}, restored 20 s later" if attack.variant == "out_of_range" else
                              f"legitimate master direct-operates the voltage setpoint 24 times in 3 s on {attack.dst}")

        def body(t):
            if attack.variant == "out_of_range":
                t = master.operate(t, DIRECT_OPERATE, analog_output(0, 14500))
                t = master.on_integrity(t + 2.0)
                return master.operate(t + 18.0, DIRECT_OPERATE, analog_output(0, 11000))
            for i in range(24):
                t = master.operate(t + 0.1 + 0.03 * master.rng.random(), DIRECT_OPERATE,
                                   analog_output(0, 10800 + (i * 173) % 400))
            return t
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))

    def _mitm(self, attack: Attack, out: Outstation) -> None:
        master = self.masters[out.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.description = (f"ARP-spoofing relay between master and {attack.dst}: +20-60 ms latency and jitter, "
                              f"frames from the attacker's MAC, an old OPERATE replayed with its old sequence number")
        duration = min(40.0, attack.budget * 0.8)

        def replay(conv, t):
            objects = master.last_operate or analog_output(0, 11000)
            old_seq = (master.m.app_seq - 5) & 0x0F
            if objects[0] == 12:  # an OPERATE without its SELECT is refused (status NO_SELECT)
                refused = objects[:-1] + bytes([CROB_NO_SELECT])
                answer = lambda seq, when: (refused, 0, False)  # noqa: E731
                function = OPERATE
            else:
                answer = lambda seq, when: (objects, 0, False)  # noqa: E731
                function = DIRECT_OPERATE
            request = master.m.request(function, objects, seq=old_seq)
            latency = master.latency()
            objs, _, _ = answer(old_seq, t)
            return master.conn.exchange(t, request, master.o.response(old_seq, master.iin, objs), latency)
        master.relabel(attack, duration, mitm_mac=self.ctx.host(ATTACKER).mac)
        master.hook(attack.t + duration * 0.6, replay)

    def _measurement_spoofing(self, attack: Attack, out: Outstation) -> None:
        master = self.masters[out.octet]
        attack.src, attack.dst = self.ctx.host(out.octet).ip, self.ctx.host(MASTER).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("freeze", "step"))
        duration = min(90.0, attack.budget * 0.85)
        out.feeder.voltage_kv.overrides.append((attack.t, attack.t + duration, attack.variant, 0.45))
        attack.description = (f"{attack.src} reports a {'frozen' if attack.variant == 'freeze' else 'stepped (+450 V)'}"
                              f" bus voltage (g30 index 0) for {duration:.0f} s while current and power move on")
        master.relabel(attack, duration)

    def _replayed_state(self, attack: Attack, out: Outstation) -> None:
        master = self.masters[out.octet]
        attack.src, attack.dst = self.ctx.host(out.octet).ip, self.ctx.host(MASTER).ip
        duration = min(REPLAY_S, attack.budget * 0.85)
        lag = replay_lag(out.feeder, attack.t, duration)
        out.feeder.replay = (attack.t, attack.t + duration, lag)
        attack.description = (f"{attack.src} reports the analog inputs (g30/g32) it reported {lag / 60:.0f} min earlier, "
                              f"for {duration:.0f} s (binaries and counters live; both splices seamless)")
        master.relabel(attack, duration)

    def _operate_out_of_order(self, attack: Attack, out: Outstation) -> None:
        master = self.masters[out.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.description = (f"the master's session OPERATEs breaker 2 of {attack.dst} (g12v1 CROB) without the "
                              f"SELECT it always sends first; a lenient outstation executes it")

        def body(t):
            breaker = out.feeder.breakers[2]
            code = TRIP if breaker.value(t) else CLOSE
            t = master.operate(t, OPERATE, crob(2, code))
            breaker.toggle_at(t + 0.08)
            return master.on_breaker_change(t + 0.1)
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))
