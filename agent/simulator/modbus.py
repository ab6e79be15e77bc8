"""Modbus/TCP traffic: PLCs that answer, a SCADA master, an HMI and an engineering workstation.

Byte layouts follow the *Modbus Messaging on TCP/IP Implementation Guide v1.0b* (MBAP header,
clause 3.1.3) and the *Modbus Application Protocol Specification v1.1b3* (function codes, clause 6;
exception responses, clause 7).  PDUs are written with ``struct`` because scapy 2.8's contrib
layer cannot hold a legal 125-register read response.

>>> adu(1, 1, read_request(3, 0, 2)).hex()
'000100000006010300000002'
>>> registers_response(3, [1, 2]).hex()
'030400010002'
"""

from __future__ import annotations

import struct

from .common import ATTACKER, ENGINEERING, HMI, MASTER, REPLAY_S, Attack, Context, Conversation, port_scan, replay_lag
from .plant import Feeder

PORT = 502
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit + PDU), unit id

FUNCTION_NAMES = {1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers",
                  4: "read_input_registers", 5: "write_single_coil", 6: "write_single_register",
                  8: "diagnostics", 15: "write_multiple_coils", 16: "write_multiple_registers",
                  43: "encapsulated_interface"}
SUPPORTED = tuple(FUNCTION_NAMES)
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE, GATEWAY_TARGET_FAILED = 1, 2, 3, 11

# Function-code sweep probes with the request body each code needs (MAP 6.14 FC 20 one sub-request,
# MAP 6.18 FC 24 FIFO pointer); codes without a defined body are sent bare.
SWEEP_PROBES = {20: bytes([20, 7, 6, 0, 1, 0, 0, 0, 1]), 24: bytes([24, 0, 0])}

SETPOINT_REG, CURRENT_LIMIT_REG, RAMP_REG = 0, 1, 2
SETPOINT_DEFAULT, SETPOINT_RANGE = 11000, (10800, 11200)  # volts


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    """MBAP header (Implementation Guide 3.1.3) + PDU."""
    return MBAP.pack(tid & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


def read_request(fc: int, address: int, quantity: int) -> bytes:
    """FC 1/2/3/4 request (MAP 6.1-6.4): starting address, quantity."""
    return struct.pack(">BHH", fc, address, quantity)


def registers_response(fc: int, values: list[int]) -> bytes:
    """FC 3/4 response (MAP 6.3, 6.4): byte count = 2 x N, registers big-endian."""
    return struct.pack(f">BB{len(values)}H", fc, 2 * len(values), *[v & 0xFFFF for v in values])


def bits_response(fc: int, bits: list[bool]) -> bytes:
    """FC 1/2 response (MAP 6.1, 6.2): bits packed LSB first, padded with zeros."""
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            packed[i // 8] |= 1 << (i % 8)
    return struct.pack(">BB", fc, len(packed)) + bytes(packed)


def write_single(fc: int, address: int, value: int) -> bytes:
    """FC 5 (value 0xFF00/0x0000) and FC 6 request; the normal response echoes it (MAP 6.5, 6.6)."""
    return struct.pack(">BHH", fc, address, value & 0xFFFF)


def write_multiple_request(address: int, values: list[int]) -> bytes:
    """FC 16 request (MAP 6.12)."""
    return struct.pack(f">BHHB{len(values)}H", 16, address, len(values), 2 * len(values), *values)


def diagnostics(sub_function: int, data: int = 0) -> bytes:
    """FC 8 request/echo (MAP 6.8): sub-function, data."""
    return struct.pack(">BHH", 8, sub_function, data)


def device_id_request(code: int = 1, object_id: int = 0) -> bytes:
    """FC 43 / MEI 14 Read Device Identification (MAP 6.21)."""
    return struct.pack(">BBBB", 43, 14, code, object_id)


def exception_response(fc: int, code: int) -> bytes:
    """Exception response (MAP 7): function code + 0x80, exception code."""
    return struct.pack(">BB", fc | 0x80, code)


class Plc:
    """A PLC behind one IP answering Modbus requests from the state of its feeder."""

    def __init__(self, ctx: Context, octet: int, feeder: Feeder, unit: int = 1):
        self.ctx, self.octet, self.feeder, self.unit = ctx, octet, feeder, unit
        self.vendor = (b"Schneider Electric", b"M251", b"V5.1.9.34") if octet % 2 else \
            (b"Siemens AG", b"S7-1200 MB", b"V4.5.2")
        # (start, end) of force-listen-only periods.  Conversations are generated one after another,
        # not in time order, so device state must be looked up by time, never kept as "now".
        self.listen_only: list[tuple[float, float]] = []

    def input_registers(self, t: float) -> list[int]:
        f = self.feeder
        energy = f.energy_kwh.value(t)
        breakers = sum(1 << i for i, b in enumerate(f.breakers) if b.value(t))
        m = f.at(t, "input")  # the measurements' time (a replay reports old ones; counters and clock stay live)
        return [round(f.voltage_kv.value(m) * 1000), round(f.current_a.value(m) * 10), round(f.power_kw(m)),
                round(f.frequency_hz.value(m) * 100), round(f.temperature_c.value(m) * 10), breakers,
                (energy >> 16) & 0xFFFF, energy & 0xFFFF, 0x0001, int(t) & 0xFFFF]

    def holding_registers(self, t: float, address: int, quantity: int) -> list[int]:
        f = self.feeder
        table = {SETPOINT_REG: f.setpoint(t, SETPOINT_REG, SETPOINT_DEFAULT),
                 CURRENT_LIMIT_REG: f.setpoint(t, CURRENT_LIMIT_REG, 800), RAMP_REG: f.setpoint(t, RAMP_REG, 50),
                 3: 1, 4: 0, 5: 30, 6: 120, 7: 11000, 8: 400, 9: 7}
        return [table.get(a, (a * 37 + self.octet * 11) & 0xFFFF) for a in range(address, address + quantity)]

    def coils(self, t: float, quantity: int) -> list[bool]:
        f = self.feeder
        bits = [b.value(t) for b in f.breakers] + [False, True, False, False]
        return (bits + [False] * quantity)[:quantity]

    def answer(self, t: float, pdu: bytes, unit: int) -> bytes | None:
        """The response PDU to a request PDU, or None when the PLC stays silent."""
        if any(start <= t < end for start, end in self.listen_only):
            return None  # FC 8/04 force listen only: no responses until restarted
        fc = pdu[0]
        if unit not in (self.unit, 0xFF):
            return exception_response(fc, GATEWAY_TARGET_FAILED)
        if fc not in SUPPORTED:
            return exception_response(fc, ILLEGAL_FUNCTION)
        if fc in (1, 2, 3, 4):
            address, quantity = struct.unpack(">HH", pdu[1:5])
            limit = 2000 if fc < 3 else 125
            if not 1 <= quantity <= limit:
                return exception_response(fc, ILLEGAL_VALUE)
            if fc == 4:
                regs = self.input_registers(t)
                if address + quantity > len(regs):
                    return exception_response(fc, ILLEGAL_ADDRESS)
                return registers_response(fc, regs[address:address + quantity])
            if fc == 3:
                return registers_response(fc, self.holding_registers(t, address, quantity))
            return bits_response(fc, self.coils(t, quantity))
        if fc == 5:
            address, value = struct.unpack(">HH", pdu[1:5])
            if address < len(self.feeder.breakers) and (value == 0xFF00) != self.feeder.breakers[address].value(t):
                self.feeder.breakers[address].toggle_at(t)
            return pdu
        if fc == 6:
            address, value = struct.unpack(">HH", pdu[1:5])
            self.feeder.write(t, address, value)
            return pdu
        if fc == 16:
            address, quantity = struct.unpack(">HH", pdu[1:5])
            for i in range(quantity):
                self.feeder.write(t, address + i, struct.unpack(">H", pdu[6 + 2 * i:8 + 2 * i])[0])
            return pdu[:5]
        if fc == 8:
            sub = struct.unpack(">H", pdu[1:3])[0]
            if sub == 4:
                self.listen_only.append((t, t + 10.0))  # until its watchdog restarts it
                return None
            return pdu
        if fc == 43:
            vendor, product, revision = self.vendor
            objects = b"".join(struct.pack(">BB", i, len(v)) + v for i, v in enumerate((vendor, product, revision)))
            # MEI 14 response: code, conformity level 0x01 (basic, stream), more follows 0, next id 0, count
            return struct.pack(">BBBBBBB", 43, 14, pdu[2], 0x01, 0, 0, 3) + objects
        return exception_response(fc, ILLEGAL_FUNCTION)


class ModbusClient(Conversation):
    """A client (master, HMI, workstation or attacker) talking to one PLC over one connection."""

    def __init__(self, ctx: Context, client: int, plc: Plc, name: str, **kw):
        super().__init__(ctx, ctx.connection(client, plc.octet, PORT, name, **kw), name)
        self.plc = plc
        self.tid = self.rng.randrange(0, 5000)

    def next_tid(self) -> int:
        self.tid = (self.tid + 1) & 0xFFFF
        return self.tid

    def transact(self, t: float, pdu: bytes, unit: int | None = None, split: bool = False) -> float:
        unit = self.plc.unit if unit is None else unit
        tid = self.next_tid()
        latency = self.delay(0.003, 0.009)
        answer = self.plc.answer(t + latency, pdu, unit)
        response = adu(tid, unit, answer) if answer is not None else None
        return self.conn.exchange(t, adu(tid, unit, pdu), response, latency,
                                  split_at=9 if split and response and len(response) > 11 else 0)

    def pipelined(self, t: float, pdus: list[bytes]) -> float:
        """Two requests in one segment (different transaction ids); the PLC answers both in one segment."""
        unit = self.plc.unit
        tids = [self.next_tid() for _ in pdus]
        latency = self.delay(0.004, 0.008)
        requests = b"".join(adu(tid, unit, p) for tid, p in zip(tids, pdus))
        answers = [self.plc.answer(t + latency, p, unit) for p in pdus]
        responses = b"".join(adu(tid, unit, a) for tid, a in zip(tids, answers) if a is not None)
        return self.conn.exchange(t, requests, responses or None, latency)


class Master(ModbusClient):
    """SCADA master: a 2 s measurement cycle, a slower setpoint read, occasional setpoint writes."""

    def __init__(self, ctx: Context, plc: Plc, offset: float):
        super().__init__(ctx, MASTER, plc, f"modbus-master:{plc.octet}")
        self.offset = offset
        self.last_write: bytes | None = None

    def start(self, t: float) -> float:
        t = self.conn.connect(t + self.offset)
        self.every("cycle", t + 0.2, 2.0, jitter=0.004)
        self.every("setpoints", t + 1.1, 10.0, jitter=0.004)
        self.once("write", t + self.rng.uniform(60, 200))
        return t

    def on_cycle(self, t: float) -> float:
        pdus = [read_request(4, 0, 10), read_request(1, 0, 16)]
        if self.rng.random() < 0.04:
            return self.pipelined(t, pdus)
        t = self.transact(t, pdus[0], split=self.rng.random() < 0.03)
        return self.transact(t + 0.002 + 0.003 * self.rng.random(), pdus[1])

    def on_setpoints(self, t: float) -> float:
        return self.transact(t, read_request(3, 0, 10))

    def on_write(self, t: float) -> float:
        """An operator moves the voltage setpoint within its normal band, or retunes limits (FC 16)."""
        self.once("write", t + self.rng.uniform(300, 660))
        if self.rng.random() < 0.75:
            current = self.plc.feeder.setpoint(t, SETPOINT_REG, SETPOINT_DEFAULT)
            value = min(max(current + self.rng.choice((-100, -50, 50, 100)), SETPOINT_RANGE[0]), SETPOINT_RANGE[1])
            pdu = write_single(6, SETPOINT_REG, value)
        else:
            pdu = write_multiple_request(CURRENT_LIMIT_REG, [self.rng.randrange(780, 821, 5),
                                                             self.rng.randrange(40, 61, 5)])
        self.last_write = pdu
        return self.transact(t, pdu)


class Hmi(ModbusClient):
    """Operator HMI: reads the same values every 5 s for its displays; never writes."""

    def __init__(self, ctx: Context, plc: Plc):
        super().__init__(ctx, HMI, plc, f"modbus-hmi:{plc.octet}")

    def start(self, t: float) -> float:
        t = self.conn.connect(t + 0.8)
        self.every("display", t + 0.3, 5.0, jitter=0.01)
        return t

    def on_display(self, t: float) -> float:
        t = self.transact(t, read_request(3, 0, 10))
        return self.transact(t + 0.001, read_request(4, 0, 10))


class Workstation(ModbusClient):
    """Engineering workstation: opens a session now and then, reads the configuration block, idles
    with TCP keep-alives, closes.  A fresh connection object per session."""

    def __init__(self, ctx: Context, plcs: list[Plc]):
        super().__init__(ctx, ENGINEERING, plcs[0], "modbus-eng:0")
        self.plcs, self.session = plcs, 0

    def run(self, t0: float, t_end: float) -> None:
        t = t0 + self.rng.uniform(90, 240)
        while t < t_end:
            self.plc = self.plcs[self.session % len(self.plcs)]
            self.conn = self.ctx.connection(ENGINEERING, self.plc.octet, PORT, f"modbus-eng:{self.session}")
            self.session += 1
            t = self.conn.connect(t)
            # 125 registers: the largest legal read (MAP 6.3); often split by the PLC's stack.
            t = self.transact(t + 0.05, read_request(3, 100, 125), split=self.rng.random() < 0.5)
            t = self.transact(t + self.rng.uniform(0.5, 2.0), read_request(3, 225, 60))
            idle_end = t + self.rng.uniform(100, 200)
            while t + 45 < idle_end:
                t = self.conn.keepalive(t + 45, 0)
            t = self.transact(idle_end, read_request(3, 0, 10))
            t = self.conn.close(t + 0.5)
            t += self.rng.uniform(420, 720)


class ModbusNetwork:
    """The Modbus part of the substation and the attacks against it."""

    def __init__(self, ctx: Context, octets: tuple[int, ...]):
        self.ctx = ctx
        self.plcs = [Plc(ctx, o, ctx.plant.feeder(f"modbus-{o}")) for o in octets]
        self.masters = {p.octet: Master(ctx, p, 0.05 + 0.137 * i) for i, p in enumerate(self.plcs)}
        self.hmi = Hmi(ctx, self.plcs[0])
        self.workstation = Workstation(ctx, self.plcs)
        self.standalone: list = []

    def victim(self, attack: Attack) -> Plc:
        # The HMI reads plcs[0]; conversation-level attacks pick another PLC so only one pair is touched.
        return self.plcs[(attack.index % (len(self.plcs) - 1)) + 1] if len(self.plcs) > 1 else self.plcs[0]

    def inject(self, attack: Attack) -> None:
        plc = self.victim(attack)
        attack.dst = self.ctx.host(plc.octet).ip
        attack.src = self.ctx.host(ATTACKER).ip
        getattr(self, "_" + attack.scenario)(attack, plc)

    def run(self, t_end: float) -> None:
        for fn in self.standalone:  # attacks first: their writes are then visible to the pollers
            fn()
        for master in self.masters.values():
            master.run(0.0, t_end)
        self.hmi.run(0.0, t_end)
        self.workstation.run(0.0, t_end)

    # -- attacks ---------------------------------------------------------------------------------
    def _attacker(self, attack: Attack, plc: Plc, body) -> None:
        def go():
            client = ModbusClient(self.ctx, ATTACKER, plc, f"modbus-attack:{attack.index}", client_ack_delay=0.0002)
            with self.ctx.cap.tagged(attack):
                t = client.conn.connect(attack.t)
                t = body(client, t + 0.05)
                client.conn.close(t + 0.1)
        self.standalone.append(go)

    def _recon(self, attack: Attack, plc: Plc) -> None:
        rng = self.ctx.rng(f"attack:{attack.index}")
        attack.dst = ""
        attack.variant = rng.choice(("unit_id_scan", "function_sweep"))
        attack.description = (f"SYN scan of the PLC subnet, then Modbus read device identification (FC 43/14) "
                              f"and a {attack.variant.replace('_', ' ')} against {self.ctx.host(plc.octet).ip}")
        targets = [p.octet for p in self.plcs]

        def go():
            with self.ctx.cap.tagged(attack):
                t = port_scan(self.ctx, ATTACKER, targets, {o: (PORT, 80) for o in targets},
                              (502, 20000, 2404, 102, 80, 22), attack.t, rng)
                client = ModbusClient(self.ctx, ATTACKER, plc, f"modbus-attack:{attack.index}",
                                      client_ack_delay=0.0002)
                t = client.conn.connect(t + 0.5)
                t = client.transact(t + 0.05, device_id_request(1, 0))
                if attack.variant == "unit_id_scan":
                    for unit in range(0, 32):
                        t = client.transact(t + 0.02 + 0.01 * rng.random(), read_request(3, 0, 1), unit=unit)
                else:
                    for fc in range(1, 45):
                        if fc in (5, 6, 8, 15, 16, 21, 22, 23, 43):
                            continue  # a careful sweep skips functions that would change state
                        pdu = SWEEP_PROBES.get(fc, read_request(fc, 0, 1) if fc <= 4 else bytes([fc]))
                        t = client.transact(t + 0.02 + 0.01 * rng.random(), pdu)
                client.conn.close(t + 0.1)
        self.standalone.append(go)

    def _unauthorised_write(self, attack: Attack, plc: Plc) -> None:
        attack.description = (f"new host writes the voltage setpoint (FC 6), forces breaker coil 0 open (FC 5) "
                              f"and rewrites limits (FC 16) on {self.ctx.host(plc.octet).ip}")

        def body(client, t):
            t = client.transact(t, read_request(3, 0, 10))
            t = client.transact(t + 0.3, write_single(6, SETPOINT_REG, 11150))
            t = client.transact(t + 0.4, write_single(5, 0, 0x0000))
            return client.transact(t + 0.4, write_multiple_request(CURRENT_LIMIT_REG, [1150, 200]))
        self._attacker(attack, plc, body)

    def _dangerous_function(self, attack: Attack, plc: Plc) -> None:
        attack.description = (f"Modbus diagnostics FC 8: restart communications (sub 1) then force listen only "
                              f"mode (sub 4) on {self.ctx.host(plc.octet).ip}")

        def body(client, t):
            t = client.transact(t, diagnostics(0, 0xA537))  # return query data: is it there?
            t = client.transact(t + 0.5, diagnostics(1, 0x0000))
            return client.transact(t + 1.0, diagnostics(4, 0x0000))
        self._attacker(attack, plc, body)

    def _flood(self, attack: Attack, plc: Plc) -> None:
        attack.description = f"request flood: ~400 Modbus reads/s for 4 s against {self.ctx.host(plc.octet).ip}"

        def body(client, t):
            end = t + 4.0
            while t < end:
                if client.rng.random() < 0.5:
                    t = client.pipelined(t + 0.0003, [read_request(3, 0, 125), read_request(4, 0, 10)])
                else:
                    t = client.transact(t + 0.0003, read_request(3, 0, 125))
            return t
        self._attacker(attack, plc, body)

    def _setpoint_manipulation(self, attack: Attack, plc: Plc) -> None:
        master = self.masters[plc.octet]
        attack.src, attack.dst = self.ctx.host(MASTER).ip, self.ctx.host(plc.octet).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("out_of_range", "rapid_writes"))
        if attack.variant == "out_of_range":
            attack.description = (f"legitimate master writes voltage setpoint 14500 V (normal 10800-11200) to "
                                  f"{attack.dst}; operator restores it 20 s later")
        else:
            attack.description = f"legitimate master writes the voltage setpoint 24 times in 3 s to {attack.dst}"

        def body(t):
            before = plc.feeder.setpoint(t, SETPOINT_REG, SETPOINT_DEFAULT)
            if attack.variant == "out_of_range":
                t = master.transact(t, write_single(6, SETPOINT_REG, 14500))
                t = master.transact(t + 2.0, read_request(3, 0, 10))
                t = master.transact(t + 18.0, write_single(6, SETPOINT_REG, before))
            else:
                for i in range(24):
                    value = SETPOINT_RANGE[0] + (i * 173) % 400
                    t = master.transact(t + 0.1 + 0.03 * master.rng.random(), write_single(6, SETPOINT_REG, value))
                t = master.transact(t + 0.2, write_single(6, SETPOINT_REG, before))
            return t
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))

    def _mitm(self, attack: Attack, plc: Plc) -> None:
        master = self.masters[plc.octet]
        attack.src, attack.dst = self.ctx.host(MASTER).ip, self.ctx.host(plc.octet).ip
        attack.description = (f"ARP-spoofing relay between master and {attack.dst}: +20-60 ms latency and jitter, "
                              f"relayed frames from the attacker's MAC, the master's last write replayed")
        duration = min(40.0, attack.budget * 0.8)

        def replay(conv, t):
            pdu = master.last_write or write_single(6, SETPOINT_REG, SETPOINT_DEFAULT)
            return master.transact(t, pdu)
        master.relabel(attack, duration, mitm_mac=self.ctx.host(ATTACKER).mac)
        master.hook(attack.t + duration * 0.6, replay)

    def _measurement_spoofing(self, attack: Attack, plc: Plc) -> None:
        master = self.masters[plc.octet]
        attack.src, attack.dst = self.ctx.host(plc.octet).ip, self.ctx.host(MASTER).ip
        attack.variant = self.ctx.rng(f"attack:{attack.index}").choice(("freeze", "step"))
        duration = min(60.0, attack.budget * 0.8)
        amount = 0.0 if attack.variant == "freeze" else 0.45
        plc.feeder.voltage_kv.overrides.append((attack.t, attack.t + duration, attack.variant, amount))
        attack.description = (f"{attack.src} reports a {'frozen' if attack.variant == 'freeze' else 'stepped (+450 V)'}"
                              f" bus voltage (input register 0) for {duration:.0f} s while the process moves on")
        master.relabel(attack, duration)

    def _replayed_state(self, attack: Attack, plc: Plc) -> None:
        master = self.masters[plc.octet]
        attack.src, attack.dst = self.ctx.host(plc.octet).ip, self.ctx.host(MASTER).ip
        duration = min(REPLAY_S, attack.budget * 0.85)
        lag = replay_lag(plc.feeder, attack.t, duration)
        plc.feeder.replay = (attack.t, attack.t + duration, lag)
        attack.description = (f"{attack.src} answers the master's input-register reads with the voltage, current, "
                              f"power, frequency and temperature it reported {lag / 60:.0f} min earlier, for "
                              f"{duration:.0f} s (breakers, energy counter and clock live; both splices seamless)")
        master.relabel(attack, duration)

    def _operate_out_of_order(self, attack: Attack, plc: Plc) -> None:
        master = self.masters[plc.octet]
        attack.src = self.ctx.host(MASTER).ip
        attack.description = (f"the master's session walks the voltage setpoint of {attack.dst} in three in-band FC 6 "
                              f"writes within 1.5 s (its writes come one at a time, minutes apart)")

        def body(t):
            value = plc.feeder.setpoint(t, SETPOINT_REG, SETPOINT_DEFAULT)
            step = 50 if value < sum(SETPOINT_RANGE) / 2 else -50
            for _ in range(3):
                value = min(max(value + step, SETPOINT_RANGE[0]), SETPOINT_RANGE[1])
                t = master.transact(t + 0.4 + 0.1 * master.rng.random(), write_single(6, SETPOINT_REG, value))
            return t
        master.hook(attack.t, lambda conv, t: conv.tagged_block(attack, t, body))
