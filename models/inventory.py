"""Passive asset inventory and communication map, built from frame batches and event batches.

One :class:`AssetInventory` answers "what is on the network, and who talks to whom?":

- an **asset** per IP address that sends (MACs and VLANs the link layer shows, frames and bytes in
  and out, first/last seen, TCP services it answers on) with, per ICS protocol, its **role**
  (Modbus client/server, DNP3 master/outstation, IEC 104 controlling/controlled station), the unit
  ids / link addresses / common addresses seen with that role, the function codes or type ids it
  sends and receives, and the identity the protocol reveals (Modbus 43/14 and 17, DNP3 group 0);
  assets that speak no ICS protocol are kept too and marked ``"ics": false``;
- a **conversation** per (client, server, protocol, transport, port) with function classes
  (:mod:`models.function_classes`), function codes, units, request/response counts, first/last
  seen and the polling period when the requests are cyclic.

Work per batch is vectorised: the rows are grouped with ``np.unique`` over the keys (address,
protocol, role, function...) and only the *distinct* keys of a batch are merged, one dict update
each, into bounded tables.  Tables refuse new keys when full and count what they refused
(``dropped``), so memory stays bounded whatever the traffic.

Roles come from the parsers' ``direction`` column (the protocol's own notion: DNP3 function codes
and the DIR bit, the Modbus/IEC 104 server port), so a DNP3 outstation that opens the TCP
connection is still the outstation.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS, DIR_RESPONSE
>>> out = EventBuilder()
>>> for t in range(5):
...     ctx = StreamContext(ts=t * 10**9, src=0x0A000001, dst=0x0A000002, sport=40000, dport=502)
...     _ = out.pdu(ctx, PROTO_MODBUS, function=3, unit=1, address=0, count=2, length=12)
...     ctx = StreamContext(ts=t * 10**9 + 5, src=0x0A000002, dst=0x0A000001, sport=502, dport=40000)
...     _ = out.pdu(ctx, PROTO_MODBUS, function=3, unit=1, direction=DIR_RESPONSE, length=13)
>>> inv = AssetInventory()
>>> inv.observe_events(out.build())
>>> [(a["address"], [r["role"] for r in a["roles"]]) for a in inv.assets()]
[('10.0.0.1', ['client']), ('10.0.0.2', ['server'])]
>>> c = inv.conversations()[0]
>>> c["client"], c["server"], c["port"], c["classes"], c["polling_period_s"]
('10.0.0.1', '10.0.0.2', 502, {'read': 10}, 1.0)
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

import numpy as np

from parsers.decode import (L3_NONE, SKIP_BAD_IP, SKIP_TRUNC_L2, SKIP_TRUNC_L3, TCP_ACK, TCP_SYN, AddressBook,
                            format_mac)
from parsers.events import (DIR_REQUEST, KIND_PDU, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS, PROTOCOL_CODES,
                            PROTOCOL_NAMES, REASON_TOO_LARGE, STATUS_EXCEPTION, STATUS_MALFORMED)

from .function_classes import CLASS_NAMES, N_CLASSES, function_class

ICS_PROTOCOLS = (PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104)
ROLE_CLIENT, ROLE_SERVER = 0, 1
#: (protocol, role) -> the protocol's own word for the role
ROLE_NAMES = {
    (PROTO_MODBUS, ROLE_CLIENT): "client", (PROTO_MODBUS, ROLE_SERVER): "server",
    (PROTO_DNP3, ROLE_CLIENT): "master", (PROTO_DNP3, ROLE_SERVER): "outstation",
    (PROTO_IEC104, ROLE_CLIENT): "controlling", (PROTO_IEC104, ROLE_SERVER): "controlled",
}
ROLE_CODES = {(PROTOCOL_NAMES[p], name): (p, r) for (p, r), name in ROLE_NAMES.items()}
TRANSPORT_NAMES = {6: "tcp", 17: "udp"}
TRANSPORT_CODES = {v: k for k, v in TRANSPORT_NAMES.items()}

# Codes that are session upkeep, not polling: IEC 104 S/U frames (>= 512), DNP3 link-only frames
# (>= 1000).  They are left out of the polling-period intervals.
POLL_FUNCTION_LIMIT = {PROTO_MODBUS: 256, PROTO_DNP3: 256, PROTO_IEC104: 256}

#: IANA port of each protocol (index: protocol code): Modbus 502, DNP3 20000, IEC 104 2404
STANDARD_PORT = np.array([0, 502, 20000, 2404], dtype=np.int64)

_BAD_FRAME = (SKIP_TRUNC_L2, SKIP_TRUNC_L3, SKIP_BAD_IP)
_U64 = np.uint64
FORMAT_VERSION = 1


@dataclass
class InventoryLimits:
    """Bounds on what the inventory keeps (all configurable)."""

    max_assets: int = 4096
    max_conversations: int = 16384
    #: distinct values kept per record and field (MACs, VLANs, units, function codes, services)
    max_values: int = 64
    #: request intervals kept per conversation for the polling period (a ring)
    max_intervals: int = 64
    #: request signatures whose last time is remembered (for intervals across batches)
    max_request_keys: int = 65536
    #: new assets/conversations queued for :meth:`AssetInventory.pop_new` after learning
    max_new: int = 1024
    #: cyclic when at least this many intervals ...
    min_intervals: int = 4
    #: ... and this share of them lies within ``jitter`` (relative) of the median
    cyclic_share: float = 0.6
    jitter: float = 0.25


class _Role:
    __slots__ = ("units", "pdus", "first", "last")

    def __init__(self, first: int):
        self.units: set = set()
        self.pdus = 0
        self.first = first
        self.last = first


class _Asset:
    __slots__ = ("address", "macs", "vlans", "services", "first", "last", "frames_in", "frames_out",
                 "bytes_in", "bytes_out", "frames_by_protocol", "roles", "sent", "received", "identity")

    def __init__(self, address: int, first: int):
        self.address = address
        self.macs: set = set()
        self.vlans: set = set()
        self.services: set = set()  # (transport, port) the asset answered a TCP handshake on
        self.first = first
        self.last = first
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = 0
        self.frames_by_protocol: dict = {}  # protocol code -> frames sent or received
        self.roles: dict = {}  # (protocol, role) -> _Role
        self.sent: dict = {}  # (protocol, function) -> PDUs sent
        self.received: dict = {}
        self.identity: dict = {}  # protocol name -> {unit: {field: value}}


class _Conversation:
    __slots__ = ("key", "first", "last", "requests", "responses", "bytes", "exceptions", "malformed",
                 "classes", "functions", "units", "intervals", "n_intervals")

    def __init__(self, key: tuple, first: int):
        self.key = key  # (client, server, protocol, transport, port)
        self.first = first
        self.last = first
        self.requests = self.responses = self.bytes = self.exceptions = self.malformed = 0
        self.classes = [0] * N_CLASSES
        self.functions: dict = {}  # function -> PDUs
        self.units: set = set()
        self.intervals: np.ndarray | None = None  # ring of request intervals (ns)
        self.n_intervals = 0  # intervals ever pushed

    def push_intervals(self, values: np.ndarray, size: int) -> None:
        if self.intervals is None:
            self.intervals = np.zeros(size, dtype=np.int64)
        size = self.intervals.shape[0]
        values = values[-size:]
        pos = np.arange(self.n_intervals, self.n_intervals + values.shape[0]) % size
        self.intervals[pos] = values
        self.n_intervals += values.shape[0]

    def kept_intervals(self) -> np.ndarray:
        if self.intervals is None:
            return np.zeros(0, dtype=np.int64)
        return self.intervals[: min(self.n_intervals, self.intervals.shape[0])]


def _unique_rows(*cols):
    """Distinct rows of equal-length integer columns (sorted, first column first), and the row
    index of every input row: ``np.unique(axis=0)`` done with ``np.lexsort``, several times faster.

    >>> u, inv = _unique_rows([2, 1, 2], [5, 7, 5])
    >>> u.tolist(), inv.tolist()
    ([[1, 7], [2, 5]], [1, 0, 1])
    """
    a = [np.asarray(c).astype(np.int64) for c in cols]
    n = a[0].shape[0]
    if n == 0:
        return np.zeros((0, len(a)), dtype=np.int64), np.zeros(0, dtype=np.intp)
    order = np.lexsort(a[::-1])
    s = [c[order] for c in a]
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for c in s:
        change[1:] |= c[1:] != c[:-1]
    group = np.cumsum(change) - 1
    inv = np.empty(n, dtype=np.intp)
    inv[order] = group
    u = np.stack([c[change] for c in s], axis=1)
    return u, inv


def _group_min_max(inv: np.ndarray, n: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, inv, ts)
    np.maximum.at(hi, inv, ts)
    return lo, hi


def _mix(*cols) -> np.ndarray:
    """64-bit hash of equal-length integer columns (collisions only merge two polling signatures)."""
    h = np.full(np.shape(cols[0]), 0x9E3779B97F4A7C15, dtype=_U64)
    with np.errstate(over="ignore"):
        for c in cols:
            h ^= np.asarray(c).astype(np.int64).view(_U64) + _U64(0x632BE59BD9B4E019)
            h *= _U64(0xBF58476D1CE4E5B9)
            h ^= h >> _U64(31)
    return h


def is_unicast_ipv4(addr: np.ndarray) -> np.ndarray:
    """Not 0.0.0.0, not multicast (224/4), not the limited broadcast.  IPv6 ids (240/5) pass.

    >>> is_unicast_ipv4(np.array([0x0A000001, 0, 0xE0000001, 0xFFFFFFFF], np.uint32)).tolist()
    [True, False, False, False]
    """
    a = np.asarray(addr, dtype=np.uint32)
    return (a != 0) & ((a < 0xE0000000) | (a >= 0xF0000000)) & (a != 0xFFFFFFFF)


def _seconds(ns: int) -> float:
    return round(ns / 1e9, 6)


def _ns(seconds: float) -> int:
    return int(round(float(seconds) * 1e9))


class AssetInventory:
    """Assets and conversations seen so far (see the module docstring).

    ``format_address`` turns an address column value into text (pass the pipeline's
    ``AddressBook.format`` so interned IPv6 addresses print); :meth:`attach` does that and
    registers the frame observer.
    """

    def __init__(self, limits: InventoryLimits | None = None, format_address=None):
        self.limits = limits or InventoryLimits()
        self.format_address = format_address or AddressBook().format
        self._assets: dict[int, _Asset] = {}
        self._conversations: dict[tuple, _Conversation] = {}
        self._last_request: dict[int, int] = {}  # polling signature -> ts of its last request
        self._refused_assets: set = set()
        self._refused_conversations: set = set()
        #: what the bounds made us leave out
        self.dropped = {"assets": 0, "asset_frames": 0, "conversations": 0, "conversation_pdus": 0,
                        "values": 0, "request_keys": 0, "new": 0}
        #: while True, new assets/conversations are baseline; afterwards they are reported
        self.learning = True
        self._new: list = []  # ("asset", address) / ("conversation", key) created after learning
        #: callables ``(kind, record)`` called for each asset/conversation created after learning
        self.on_new: list = []
        self._parsers = None

    # -- wiring ------------------------------------------------------------------------------------
    def attach(self, pipeline) -> "AssetInventory":
        """Observe ``pipeline``'s frames, print its addresses, and read its parsers' identity tables
        in :meth:`refresh_identities`.  Events still have to be passed to :meth:`observe_events`."""
        self.format_address = pipeline.book.format
        self._parsers = pipeline.registry.parsers
        pipeline.frame_observers.append(self.observe_frames)
        return self

    def end_learning(self) -> None:
        """From now on every new asset or conversation is queued for :meth:`pop_new`."""
        self.learning = False

    # -- bounded tables ---------------------------------------------------------------------------
    def _asset(self, address: int, ts: int, n_rows: int = 0) -> _Asset | None:
        a = self._assets.get(address)
        if a is None:
            if len(self._assets) >= self.limits.max_assets:
                if address not in self._refused_assets:
                    self.dropped["assets"] += 1
                    if len(self._refused_assets) < 65536:
                        self._refused_assets.add(address)
                self.dropped["asset_frames"] += n_rows
                return None
            a = self._assets[address] = _Asset(address, ts)
            self._announce("asset", address)
        return a

    def _conversation(self, key: tuple, ts: int, n_rows: int) -> _Conversation | None:
        c = self._conversations.get(key)
        if c is None:
            if len(self._conversations) >= self.limits.max_conversations:
                if key not in self._refused_conversations:
                    self.dropped["conversations"] += 1
                    if len(self._refused_conversations) < 65536:
                        self._refused_conversations.add(key)
                self.dropped["conversation_pdus"] += n_rows
                return None
            c = self._conversations[key] = _Conversation(key, ts)
            self._announce("conversation", key)
        return c

    def _announce(self, kind: str, key) -> None:
        if self.learning:
            return
        if len(self._new) < self.limits.max_new:
            self._new.append((kind, key))
        else:
            self.dropped["new"] += 1
        if self.on_new:
            # The record is read when called: first-seen facts are filled in by the caller's merge,
            # so callbacks get the key now and fetch details through record().
            for cb in self.on_new:
                cb(kind, key)

    def _add_value(self, s: set, value) -> None:
        if value in s:
            return
        if len(s) >= self.limits.max_values:
            self.dropped["values"] += 1
            return
        s.add(value)

    def _add_count(self, d: dict, key, n: int) -> None:
        if key in d:
            d[key] += n
        elif len(d) >= self.limits.max_values:
            self.dropped["values"] += 1
        else:
            d[key] = n

    # -- frames -----------------------------------------------------------------------------------
    def observe_frames(self, batch, dec, proto) -> None:
        """Whole-frame facts of one batch (a ``Pipeline.frame_observers`` callable): addresses that
        send, MACs, VLANs, frames and bytes in and out, ICS protocols by frame, TCP services."""
        ok = (dec.l3 != L3_NONE) & ~np.isin(dec.skip, _BAD_FRAME)
        if not ok.any():
            return
        src, dst = dec.src[ok], dec.dst[ok]
        ts = batch.ts[ok]
        size = batch.wirelen[ok].astype(np.int64)
        proto = np.asarray(proto)[ok].astype(np.int64)

        # Senders become assets (an address nobody hears from, e.g. a scan target, does not).
        sender = is_unicast_ipv4(src)
        u, inv = _unique_rows(src[sender])
        if u.shape[0]:
            n = u.shape[0]
            frames = np.bincount(inv, minlength=n)
            nbytes = np.bincount(inv, weights=size[sender], minlength=n)
            lo, hi = _group_min_max(inv, n, ts[sender])
            for i, addr in enumerate(u[:, 0].tolist()):
                a = self._asset(addr, int(lo[i]), int(frames[i]))
                if a is None:
                    continue
                a.frames_out += int(frames[i])
                a.bytes_out += int(nbytes[i])
                a.first = min(a.first, int(lo[i]))
                a.last = max(a.last, int(hi[i]))

        # Receivers: counted on assets that exist (sent something now or before).
        u, inv = _unique_rows(dst)
        if u.shape[0]:
            n = u.shape[0]
            frames = np.bincount(inv, minlength=n)
            nbytes = np.bincount(inv, weights=size, minlength=n)
            assets = self._assets
            for i, addr in enumerate(u[:, 0].tolist()):
                a = assets.get(addr)
                if a is not None:
                    a.frames_in += int(frames[i])
                    a.bytes_in += int(nbytes[i])

        # Frames per protocol, either side: (address, protocol) pairs.
        both = np.concatenate([src, dst])
        u, inv = _unique_rows(both, np.concatenate([proto, proto]))
        if u.shape[0]:
            frames = np.bincount(inv, minlength=u.shape[0])
            for (addr, code), k in zip(u.tolist(), frames.tolist()):
                a = self._assets.get(addr)
                if a is not None:
                    a.frames_by_protocol[code] = a.frames_by_protocol.get(code, 0) + k

        # Link layer: source MAC and outer VLAN of each sender; unicast destination MACs.
        mac = dec.src_mac[ok]
        dmac = dec.dst_mac[ok]
        vlan = dec.vlan[ok]
        has_mac = mac != 0
        dst_unicast = (dmac != 0) & ((dmac >> _U64(40)) & _U64(1) == 0)
        pairs_addr = np.concatenate([src[has_mac], dst[dst_unicast]])
        pairs_mac = np.concatenate([mac[has_mac], dmac[dst_unicast]]).view(np.int64)
        u, _ = _unique_rows(pairs_addr, pairs_mac)
        for addr, m in u.tolist():
            a = self._assets.get(addr)
            if a is not None:
                self._add_value(a.macs, m)
        tagged = vlan != 0
        if tagged.any():
            u, _ = _unique_rows(src[tagged], vlan[tagged])
            for addr, v in u.tolist():
                a = self._assets.get(addr)
                if a is not None:
                    self._add_value(a.vlans, v)

        # Services: a SYN+ACK from the asset says it listens on its source port (RFC 9293 §3.5).
        flags = dec.tcp_flags[ok]
        synack = (dec.l4[ok] == 6) & ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))
        if synack.any():
            u, _ = _unique_rows(src[synack], dec.sport[ok][synack])
            for addr, port in u.tolist():
                a = self._assets.get(addr)
                if a is not None:
                    self._add_value(a.services, (6, port))

    # -- events -----------------------------------------------------------------------------------
    def observe_events(self, events) -> None:
        """PDU rows of one event batch: roles, units, function codes, conversations, polling."""
        if len(events) == 0:
            return
        # Rows without a function are frames we could not read (bad CRC, bad length): their
        # addresses are not to be trusted, except for fragments refused only for their size.
        readable = (events.function >= 0) | (events.reason == REASON_TOO_LARGE)
        keep = (events.kind == KIND_PDU) & readable & np.isin(events.protocol, ICS_PROTOCOLS)
        if not keep.any():
            return
        ev = events.select(keep)
        ts = ev.ts
        protocol = ev.protocol.astype(np.int64)
        function = ev.function.astype(np.int64)
        is_req = ev.direction == DIR_REQUEST
        client = np.where(is_req, ev.src, ev.dst).astype(np.int64)
        server = np.where(is_req, ev.dst, ev.src).astype(np.int64)
        # The server's port, unless only the client side uses the protocol's standard port (a DNP3
        # outstation that opens the connection to its master's port 20000).
        server_port = np.where(is_req, ev.dport, ev.sport).astype(np.int64)
        client_port = np.where(is_req, ev.sport, ev.dport).astype(np.int64)
        std = STANDARD_PORT[protocol]
        port = np.where((client_port == std) & (server_port != std), client_port, server_port)
        transport = ev.transport.astype(np.int64)
        cls = function_class(protocol, function, ev.is_write, ev.is_control).astype(np.int64)

        self._observe_roles(ev, ts, protocol, function, client, server)
        self._observe_conversations(ev, ts, protocol, function, is_req, client, server, port, transport, cls)

    def _observe_roles(self, ev, ts, protocol, function, client, server) -> None:
        n = len(ev)
        # One row per (address, protocol, role, unit): the client side, then the server side.
        # Units: the server's unit id / outstation address / common address; for a DNP3 master its
        # own link address (peer_unit); for Modbus and IEC 104 clients the units they address.
        addr = np.concatenate([client, server])
        proto2 = np.concatenate([protocol, protocol])
        role = np.repeat(np.array([ROLE_CLIENT, ROLE_SERVER]), n)
        client_unit = np.where(protocol == PROTO_DNP3, ev.peer_unit, ev.unit)
        unit = np.concatenate([client_unit, ev.unit]).astype(np.int64)
        ts2 = np.concatenate([ts, ts])
        u, inv = _unique_rows(addr, proto2, role)
        m = u.shape[0]
        pdus = np.bincount(inv, minlength=m)
        lo, hi = _group_min_max(inv, m, ts2)
        roles = []
        for i, (a_, p_, r_) in enumerate(u.tolist()):
            a = self._asset(a_, int(lo[i]), int(pdus[i]))
            if a is None:
                roles.append(None)
                continue
            a.first = min(a.first, int(lo[i]))
            a.last = max(a.last, int(hi[i]))
            r = a.roles.get((p_, r_))
            if r is None:
                r = a.roles[(p_, r_)] = _Role(int(lo[i]))
            r.pdus += int(pdus[i])
            r.first = min(r.first, int(lo[i]))
            r.last = max(r.last, int(hi[i]))
            roles.append(r)
        has_unit = unit >= 0
        if has_unit.any():
            uu, _ = _unique_rows(inv[has_unit], unit[has_unit])
            for i, un in uu.tolist():
                if roles[i] is not None:
                    self._add_value(roles[i].units, un)

        # Function codes sent (by src) and received (by dst).
        for column, attr in ((ev.src, "sent"), (ev.dst, "received")):
            uf, invf = _unique_rows(column, protocol, function)
            counts = np.bincount(invf, minlength=uf.shape[0])
            for (a_, p_, f_), k in zip(uf.tolist(), counts.tolist()):
                a = self._assets.get(a_)
                if a is not None and f_ >= 0:
                    self._add_count(getattr(a, attr), (p_, f_), k)

    def _observe_conversations(self, ev, ts, protocol, function, is_req, client, server, port, transport,
                               cls) -> None:
        u, inv = _unique_rows(client, server, protocol, transport, port)
        m = u.shape[0]
        rows = np.bincount(inv, minlength=m)
        requests = np.bincount(inv, weights=is_req, minlength=m)
        nbytes = np.bincount(inv, weights=np.maximum(ev.length, 0), minlength=m)
        exceptions = np.bincount(inv, weights=ev.status == STATUS_EXCEPTION, minlength=m)
        malformed = np.bincount(inv, weights=ev.status == STATUS_MALFORMED, minlength=m)
        by_class = np.bincount(inv * N_CLASSES + cls, minlength=m * N_CLASSES).reshape(m, N_CLASSES)
        lo, hi = _group_min_max(inv, m, ts)
        convs = []
        for i, key in enumerate(u.tolist()):
            c = self._conversation(tuple(key), int(lo[i]), int(rows[i]))
            convs.append(c)
            if c is None:
                continue
            c.first = min(c.first, int(lo[i]))
            c.last = max(c.last, int(hi[i]))
            c.requests += int(requests[i])
            c.responses += int(rows[i] - requests[i])
            c.bytes += int(nbytes[i])
            c.exceptions += int(exceptions[i])
            c.malformed += int(malformed[i])
            for k, v in enumerate(by_class[i].tolist()):
                c.classes[k] += v
        uf, invf = _unique_rows(inv, function)
        counts = np.bincount(invf, minlength=uf.shape[0])
        for (i, f_), k in zip(uf.tolist(), counts.tolist()):
            if convs[i] is not None and f_ >= 0:
                self._add_count(convs[i].functions, f_, k)
        unit = ev.unit.astype(np.int64)
        has_unit = unit >= 0
        if has_unit.any():
            uu, _ = _unique_rows(inv[has_unit], unit[has_unit])
            for i, un in uu.tolist():
                if convs[i] is not None:
                    self._add_value(convs[i].units, un)
        self._observe_polling(ev, ts, protocol, function, is_req, inv, convs)

    def _observe_polling(self, ev, ts, protocol, function, is_req, inv, convs) -> None:
        """Intervals between repeats of the same request (same conversation, unit, function,
        object, address, count): a poll cycle that reads several blocks yields one period."""
        limit = np.zeros(4, dtype=np.int64)
        for p, lim in POLL_FUNCTION_LIMIT.items():
            limit[p] = lim
        poll = is_req & (function >= 0) & (function < limit[protocol])
        if not poll.any():
            return
        # Request rows: src is the client, dst the server; the key must hold across batches.
        sig = _mix(ev.src[poll], ev.dst[poll], protocol[poll], ev.dport[poll],
                   ev.unit[poll], function[poll], ev.object[poll], ev.address[poll], ev.count[poll])
        conv = inv[poll]
        t = ts[poll]
        order = np.lexsort((t, sig))
        sig, conv, t = sig[order], conv[order], t[order]
        same = sig[1:] == sig[:-1]
        d = np.diff(t)
        # Interval from the last request of the same signature in an earlier batch.
        first_of_group = np.concatenate([[True], ~same])
        last_of_group = np.concatenate([~same, [True]])
        prev = np.zeros(int(first_of_group.sum()), dtype=np.int64)
        firsts = np.flatnonzero(first_of_group)
        table = self._last_request
        sig_list = sig[firsts].tolist()
        for j, s in enumerate(sig_list):
            prev[j] = table.get(s, -1)
        carried = prev >= 0
        iv_conv = np.concatenate([conv[1:][same], conv[firsts][carried]])
        iv = np.concatenate([d[same], t[firsts][carried] - prev[carried]]).astype(np.int64)
        for s, last in zip(sig[last_of_group].tolist(), t[last_of_group].tolist()):
            if s in table or len(table) < self.limits.max_request_keys:
                table[s] = last
            else:
                self.dropped["request_keys"] += 1
        positive = iv > 0
        iv_conv, iv = iv_conv[positive], iv[positive]
        if iv.shape[0] == 0:
            return
        order = np.argsort(iv_conv, kind="stable")
        iv_conv, iv = iv_conv[order], iv[order]
        starts = np.flatnonzero(np.concatenate([[True], iv_conv[1:] != iv_conv[:-1]]))
        for s, e in zip(starts.tolist(), np.append(starts[1:], iv.shape[0]).tolist()):
            c = convs[int(iv_conv[s])]
            if c is not None:
                c.push_intervals(iv[s:e], self.limits.max_intervals)

    # -- identities -------------------------------------------------------------------------------
    def refresh_identities(self, parsers=None) -> None:
        """Copy what devices said about themselves from the parsers' side tables (Modbus
        ``device_ids``, DNP3 ``device_attributes``; the attached pipeline's parsers by default).
        Cheap enough to call once per second or at the end of a capture."""
        parsers = parsers if parsers is not None else self._parsers
        if not parsers:
            return
        mb = getattr(parsers.get(PROTO_MODBUS), "device_ids", None)
        dn = getattr(parsers.get(PROTO_DNP3), "device_attributes", None)
        self.observe_identities(modbus_device_ids=mb, dnp3_device_attributes=dn)

    def observe_identities(self, modbus_device_ids: dict | None = None,
                           dnp3_device_attributes: dict | None = None) -> None:
        """Merge identity tables keyed by ``(server address, unit)`` into the assets."""
        for name, table in (("modbus", modbus_device_ids), ("dnp3", dnp3_device_attributes)):
            for (addr, unit), info in (table or {}).items():
                a = self._assets.get(int(addr))
                if a is None:
                    continue
                entry = {k: v for k, v in info.items() if k not in ("frame", "objects")}
                if "objects" in info:
                    entry["objects"] = {str(k): v for k, v in info["objects"].items()}
                per_unit = a.identity.setdefault(name, {})
                if str(unit) in per_unit or len(per_unit) < self.limits.max_values:
                    per_unit[str(unit)] = entry
                else:
                    self.dropped["values"] += 1

    # -- records ----------------------------------------------------------------------------------
    def _asset_record(self, a: _Asset) -> dict:
        roles = []
        for (p, r), role in sorted(a.roles.items()):
            roles.append({"protocol": PROTOCOL_NAMES[p], "role": ROLE_NAMES[(p, r)],
                          "units": sorted(role.units), "pdus": role.pdus,
                          "first_seen": _seconds(role.first), "last_seen": _seconds(role.last)})

        def functions(d: dict) -> dict:
            out: dict = {}
            for (p, f), k in sorted(d.items()):
                out.setdefault(PROTOCOL_NAMES[p], {})[str(f)] = k
            return out

        return {
            "address": self.format_address(a.address),
            "ics": bool(a.roles),
            "macs": [format_mac(m) for m in sorted(a.macs)],
            "vlans": sorted(a.vlans),
            "roles": roles,
            "first_seen": _seconds(a.first), "last_seen": _seconds(a.last),
            "frames_in": a.frames_in, "frames_out": a.frames_out,
            "bytes_in": a.bytes_in, "bytes_out": a.bytes_out,
            "frames_by_protocol": {PROTOCOL_NAMES.get(p, f"unknown-{p}"): k
                                   for p, k in sorted(a.frames_by_protocol.items())},
            "services": [f"{TRANSPORT_NAMES.get(t, t)}/{port}" for t, port in sorted(a.services)],
            "functions_sent": functions(a.sent),
            "functions_received": functions(a.received),
            "identity": a.identity,
        }

    def _conversation_record(self, c: _Conversation, persist: bool = False) -> dict:
        client, server, p, t, port = c.key
        period, cyclic = self.polling_period(c)
        rec = {
            "client": self.format_address(client), "server": self.format_address(server),
            "protocol": PROTOCOL_NAMES[p], "transport": TRANSPORT_NAMES.get(t, str(t)), "port": port,
            "client_role": ROLE_NAMES[(p, ROLE_CLIENT)], "server_role": ROLE_NAMES[(p, ROLE_SERVER)],
            "first_seen": _seconds(c.first), "last_seen": _seconds(c.last),
            "requests": c.requests, "responses": c.responses, "bytes": c.bytes,
            "exceptions": c.exceptions, "malformed": c.malformed,
            "classes": {CLASS_NAMES[k]: v for k, v in enumerate(c.classes) if v},
            "functions": {str(f): k for f, k in sorted(c.functions.items())},
            "units": sorted(c.units),
            "polling_period_s": period, "cyclic": cyclic,
        }
        if persist:
            kept = c.kept_intervals()
            if c.intervals is not None and c.n_intervals > c.intervals.shape[0]:
                kept = np.roll(kept, -(c.n_intervals % c.intervals.shape[0]))  # oldest first
            rec["intervals_ns"] = kept.tolist()
        return rec

    def polling_period(self, c: _Conversation) -> tuple[float | None, bool]:
        """(median request interval in seconds, whether the requests are cyclic).  The period is
        given only when cyclic: at least ``min_intervals`` intervals, ``cyclic_share`` of them
        within ``jitter`` of the median."""
        iv = c.kept_intervals()
        lim = self.limits
        if iv.shape[0] < lim.min_intervals:
            return None, False
        med = float(np.median(iv))
        if med <= 0:
            return None, False
        near = np.abs(iv - med) <= lim.jitter * med
        if near.mean() < lim.cyclic_share:
            return None, False
        return round(med / 1e9, 6), True

    def assets(self) -> list[dict]:
        """One record per asset, ordered by address."""
        return [self._asset_record(a) for _, a in sorted(self._assets.items())]

    def conversations(self) -> list[dict]:
        """One record per conversation, ordered by client, server, protocol, port."""
        return [self._conversation_record(c) for _, c in sorted(self._conversations.items())]

    def record(self, kind: str, key) -> dict | None:
        """The current record of one asset (key: address) or conversation (key tuple)."""
        if kind == "asset":
            a = self._assets.get(key)
            return None if a is None else self._asset_record(a)
        c = self._conversations.get(key)
        return None if c is None else self._conversation_record(c)

    def pop_new(self) -> list[dict]:
        """Assets and conversations first seen after :meth:`end_learning` and not yet popped:
        ``[{"kind": "asset" | "conversation", "record": {...}}, ...]`` in order of discovery."""
        out = [{"kind": kind, "record": self.record(kind, key)} for kind, key in self._new]
        self._new = []
        return [o for o in out if o["record"] is not None]

    def new_since(self, ts_ns: int) -> dict:
        """Records first seen at or after ``ts_ns`` (e.g. the end of learning)."""
        return {
            "assets": [self._asset_record(a) for _, a in sorted(self._assets.items()) if a.first >= ts_ns],
            "conversations": [self._conversation_record(c) for _, c in sorted(self._conversations.items())
                              if c.first >= ts_ns],
        }

    def conversation_keys(self) -> list[tuple]:
        """``(client, server, protocol, transport, port)`` of every conversation, as column values
        (the keys the allow-list matches event rows against)."""
        return sorted(self._conversations)

    def counts(self) -> dict:
        """Numbers for metrics: assets by protocol and role (assets with no ICS role under
        ``other/none``), conversations by protocol, totals, and what the bounds dropped.

        No per-asset labels: the keys are small fixed sets (protocol, role)."""
        assets = {PROTOCOL_NAMES[p]: {ROLE_NAMES[(p, r)]: 0 for r in (ROLE_CLIENT, ROLE_SERVER)}
                  for p in ICS_PROTOCOLS}
        assets["other"] = {"none": 0}
        for a in self._assets.values():
            if not a.roles:
                assets["other"]["none"] += 1
            for p, r in a.roles:
                assets[PROTOCOL_NAMES[p]][ROLE_NAMES[(p, r)]] += 1
        convs = {PROTOCOL_NAMES[p]: 0 for p in ICS_PROTOCOLS}
        for key in self._conversations:
            convs[PROTOCOL_NAMES[key[2]]] += 1
        return {"assets": assets, "conversations": convs, "assets_total": len(self._assets),
                "conversations_total": len(self._conversations), "dropped": dict(self.dropped)}

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything needed to carry on after a restart, as JSON-ready data."""
        return {
            "format": "otwatch-inventory", "version": FORMAT_VERSION,
            "limits": asdict(self.limits), "learning": self.learning, "dropped": dict(self.dropped),
            "assets": self.assets(),
            "conversations": [self._conversation_record(c, persist=True)
                              for _, c in sorted(self._conversations.items())],
            # last time of each request signature, so intervals across a restart are not lost
            "request_times": [[s, t] for s, t in self._last_request.items()],
        }

    @classmethod
    def from_dict(cls, data: dict, book: AddressBook | None = None,
                  limits: InventoryLimits | None = None) -> "AssetInventory":
        """Rebuild an inventory from :meth:`to_dict` output.  IPv6 addresses are interned in
        ``book`` (pass the pipeline's, so ids match its event columns).  Raises ``ValueError`` on
        data that is not an inventory."""
        if not isinstance(data, dict) or data.get("format") != "otwatch-inventory":
            raise ValueError("not an otwatch inventory")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"inventory format version {data.get('version')!r} is not {FORMAT_VERSION}")
        book = book if book is not None else AddressBook()
        if limits is None:
            known = InventoryLimits.__dataclass_fields__
            limits = InventoryLimits(**{k: v for k, v in data.get("limits", {}).items() if k in known})
        inv = cls(limits, format_address=book.format)
        inv.learning = bool(data.get("learning", True))
        for k, v in data.get("dropped", {}).items():
            inv.dropped[k] = int(v)

        def address(text: str) -> int:
            ip = ipaddress.ip_address(text)
            return int(ip) if ip.version == 4 else book.intern(ip.packed)

        for r in data.get("assets", []):
            a = _Asset(address(r["address"]), _ns(r["first_seen"]))
            a.last = _ns(r["last_seen"])
            a.macs = {int(m.replace(":", ""), 16) for m in r.get("macs", [])}
            a.vlans = set(r.get("vlans", []))
            a.services = {(TRANSPORT_CODES.get(s.split("/")[0], 0), int(s.split("/")[1]))
                          for s in r.get("services", [])}
            a.frames_in, a.frames_out = int(r["frames_in"]), int(r["frames_out"])
            a.bytes_in, a.bytes_out = int(r["bytes_in"]), int(r["bytes_out"])
            a.frames_by_protocol = {PROTOCOL_CODES.get(p, 0): int(k) for p, k in r["frames_by_protocol"].items()}
            for role in r.get("roles", []):
                p, rc = ROLE_CODES[(role["protocol"], role["role"])]
                ro = _Role(_ns(role["first_seen"]))
                ro.last = _ns(role["last_seen"])
                ro.pdus = int(role["pdus"])
                ro.units = set(role["units"])
                a.roles[(p, rc)] = ro
            for attr in ("sent", "received"):
                d = getattr(a, attr)
                for pname, funcs in r.get(f"functions_{attr}", {}).items():
                    for f, k in funcs.items():
                        d[(PROTOCOL_CODES[pname], int(f))] = int(k)
            a.identity = r.get("identity", {})
            inv._assets[a.address] = a
        for r in data.get("conversations", []):
            p = PROTOCOL_CODES[r["protocol"]]
            key = (address(r["client"]), address(r["server"]), p, TRANSPORT_CODES.get(r["transport"], 0),
                   int(r["port"]))
            c = _Conversation(key, _ns(r["first_seen"]))
            c.last = _ns(r["last_seen"])
            for f in ("requests", "responses", "bytes", "exceptions", "malformed"):
                setattr(c, f, int(r[f]))
            for name, k in r["classes"].items():
                c.classes[next(code for code, n in CLASS_NAMES.items() if n == name)] = int(k)
            c.functions = {int(f): int(k) for f, k in r["functions"].items()}
            c.units = set(r["units"])
            iv = np.asarray(r.get("intervals_ns", []), dtype=np.int64)
            if iv.shape[0]:
                c.push_intervals(iv, limits.max_intervals)
            inv._conversations[key] = c
        inv._last_request = {int(s): int(t) for s, t in data.get("request_times", [])}
        return inv
