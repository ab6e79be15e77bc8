"""Which parser reads which traffic: by transport port, and by content for flows on other ports.

The protocol modules are listed explicitly in :func:`default_specs` (no discovery by naming).  Each
module gives its default server ports, transports, a ``looks_like(payload)`` signature test and a
parser class.

Port lookup is vectorised: one 65,536-entry table per transport maps a port to a protocol code and
is indexed with the whole ``dport``/``sport`` columns at once.  Content detection is the slow path:
frames of unknown flows whose first payload bytes pass a cheap vectorised pre-filter (DNP3 starts
0x05 0x64, IEC-104 starts 0x68, an MBAP header has protocol id 0) are tested with the modules'
``looks_like``.  A flow found that way teaches the table its server port (DNP3 on 20001 is common),
up to ``max_learned_ports``; flows that fail a few tests are remembered as "other" in a bounded
table so they are not tested again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .decode import L4_TCP, L4_UDP, Decoded
from .frames import FrameBatch


@dataclass(frozen=True)
class ProtocolSpec:
    code: int
    name: str
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]
    looks_like: Callable[[bytes], bool]
    parser_factory: Callable[[], object]


def default_specs() -> list[ProtocolSpec]:
    """The three ICS protocols otwatch reads, with their standard ports."""
    from . import dnp3, iec104, modbus
    from .events import PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS

    specs = []
    for code, mod, cls in ((PROTO_MODBUS, modbus, "ModbusParser"), (PROTO_DNP3, dnp3, "Dnp3Parser"),
                           (PROTO_IEC104, iec104, "Iec104Parser")):
        ports = tuple(mod.DEFAULT_PORTS)
        specs.append(ProtocolSpec(
            code=code, name=mod.__name__.rsplit(".", 1)[-1],
            tcp_ports=ports if "tcp" in mod.TRANSPORTS else (),
            udp_ports=ports if "udp" in mod.TRANSPORTS else (),
            looks_like=mod.looks_like, parser_factory=getattr(mod, cls)))
    return specs


class Registry:
    """Assigns frames to protocols and owns one parser instance per protocol."""

    def __init__(self, specs: list[ProtocolSpec] | None = None, *, ports: dict[str, list[int]] | None = None,
                 detect_by_content: bool = True, max_learned_ports: int = 64, max_remembered_flows: int = 65536):
        self.specs = {s.code: s for s in (specs if specs is not None else default_specs())}
        self.parsers = {code: s.parser_factory() for code, s in self.specs.items()}
        self.tcp_map = np.zeros(65536, dtype=np.uint8)
        self.udp_map = np.zeros(65536, dtype=np.uint8)
        for code, s in self.specs.items():
            tcp = s.tcp_ports
            udp = s.udp_ports
            if ports and s.name in ports:  # configured ports replace the defaults
                tcp = tuple(ports[s.name]) if s.tcp_ports else ()
                udp = tuple(ports[s.name]) if s.udp_ports else ()
            self.tcp_map[list(tcp)] = code
            self.udp_map[list(udp)] = code
        self.detect_by_content = detect_by_content
        self.max_learned_ports = max_learned_ports
        self.learned_ports: dict[tuple[int, int], int] = {}  # (transport, port) -> protocol
        self._other: OrderedDict[tuple, int] = OrderedDict()  # flow key -> failed tests
        self._max_remembered = max_remembered_flows

    def name(self, code: int) -> str:
        return self.specs[code].name if code in self.specs else "other"

    def classify(self, batch: FrameBatch, dec: Decoded) -> tuple[np.ndarray, np.ndarray]:
        """Protocol code per frame (0 = not ICS) and whether the destination is the server side."""
        tcp = dec.l4 == L4_TCP
        udp = dec.l4 == L4_UDP
        by_d = np.where(tcp, self.tcp_map[dec.dport], np.where(udp, self.udp_map[dec.dport], 0))
        by_s = np.where(tcp, self.tcp_map[dec.sport], np.where(udp, self.udp_map[dec.sport], 0))
        proto = np.where(by_d != 0, by_d, by_s).astype(np.uint8)
        server_is_dst = by_d != 0
        if self.detect_by_content and self.specs:
            self._detect(batch, dec, proto, server_is_dst, tcp | udp)
        return proto, server_is_dst

    # -- content detection (slow path) -----------------------------------------------------------
    def _detect(self, batch, dec, proto, server_is_dst, l4ok) -> None:
        cand = l4ok & (proto == 0) & (dec.payload_len >= 6)
        if not cand.any():
            return
        buf = batch.buf
        po = dec.payload_off
        last = max(buf.shape[0] - 1, 0)
        b0 = buf[np.clip(po, 0, last)]
        b1 = buf[np.clip(po + 1, 0, last)]
        b2 = buf[np.clip(po + 2, 0, last)]
        b3 = buf[np.clip(po + 3, 0, last)]
        cand &= ((b0 == 0x05) & (b1 == 0x64)) | (b0 == 0x68) | ((b2 == 0) & (b3 == 0))
        for i in np.flatnonzero(cand):
            transport = int(dec.l4[i])
            a = (int(dec.src[i]), int(dec.sport[i]))
            b = (int(dec.dst[i]), int(dec.dport[i]))
            key = (transport, a, b) if a <= b else (transport, b, a)
            if key in self._other and self._other[key] >= 3:
                continue
            # A learned port may have been taught earlier in this same batch.
            table = self.tcp_map if transport == L4_TCP else self.udp_map
            code = int(table[b[1]] or table[a[1]])
            if not code:
                off = int(po[i])
                payload = buf[off: off + int(dec.payload_len[i])].tobytes()
                code = next((c for c, s in self.specs.items() if _safe_looks_like(s.looks_like, payload)), 0)
            if code:
                server_port = min(a[1], b[1])
                proto[i] = code
                server_is_dst[i] = b[1] == server_port
                self._learn_port(transport, server_port, code)
                self._other.pop(key, None)
            else:
                self._other[key] = self._other.get(key, 0) + 1
                self._other.move_to_end(key)
                while len(self._other) > self._max_remembered:
                    self._other.popitem(last=False)
        # Frames of flows whose port was learned above but came earlier without payload (ACKs).
        tcp = dec.l4 == L4_TCP
        udp = dec.l4 == L4_UDP
        if self.learned_ports:
            by_d = np.where(tcp, self.tcp_map[dec.dport], np.where(udp, self.udp_map[dec.dport], 0))
            by_s = np.where(tcp, self.tcp_map[dec.sport], np.where(udp, self.udp_map[dec.sport], 0))
            late = (proto == 0) & ((by_d != 0) | (by_s != 0))
            proto[late] = np.where(by_d[late] != 0, by_d[late], by_s[late])
            server_is_dst[late] = by_d[late] != 0

    def _learn_port(self, transport: int, port: int, code: int) -> None:
        key = (transport, port)
        if key in self.learned_ports or len(self.learned_ports) >= self.max_learned_ports:
            return
        table = self.tcp_map if transport == L4_TCP else self.udp_map
        if table[port] == 0:
            table[port] = code
            self.learned_ports[key] = code


def _safe_looks_like(fn, payload: bytes) -> bool:
    try:
        return bool(fn(payload))
    except Exception:  # a signature test must never take the pipeline down
        return False
