"""Spoofing, man-in-the-middle and reconnaissance seen at layers 2-4, without any ICS parsing.

The detector reads the decoded columns of every frame (ARP included, before the ICS-only filter)
and learns, while the engine learns:

- **who owns an address**: per VLAN, the MAC that announces each IPv4 address in its own ARP
  frames (like arpwatch), the addresses each MAC announces, and which MACs are routers (they
  source IPv4 frames for many addresses);
- **each host's initial TTL class** (64, 128 or 255: the operating system's stack; a host on the
  segment always sends its own class);
- **services and habits**: ports that answered a SYN or carried ICS traffic, and the ports each
  client usually opens connections to (a master reconnecting to all its outstations is no scan);
- **how many addresses each MAC asks for in ARP** in a window.

After learning it raises, per batch, one :class:`~models.findings.Finding` per rule and attacker:

================ ================================================================= ========
rule             what                                                              ATT&CK
================ ================================================================= ========
wire.arp_spoof   an ARP frame moves a known IP to another MAC, a MAC that owns an  T0830
                 address claims another, or an ARP frame is sent on another's
                 behalf (source MAC differs from the ARP sender)
wire.mac_change  a known IP sends from a MAC that is not its own and not a router   T0830
                 (alternating with its own MAC: a relay)
wire.relay       the same IP packet seen twice with a different source MAC or TTL   T0830
wire.ttl_change  a host's frames carry another initial-TTL class than learned, or   T0830
                 two classes alternate (two stacks use the address)
wire.port_scan   one source probes many TCP ports of one host (SYNs, RSTs back)     T0840
wire.host_sweep  one source opens TCP connections to many hosts on unusual ports    T0846
wire.arp_sweep   one MAC asks ARP for many addresses in a short time                T0846
================ ================================================================= ========

Every table is bounded (``capacity``); what does not fit is counted in ``overflow``.  Addresses
first seen after learning are learned as they appear (a new station is not an alert); an address
that is already owned is never rebound to a MAC that contradicts it, unless the owner has been
silent for ``rebind_s`` (a replaced device), and even then the move is reported.

>>> from scapy.all import ARP, Ether, raw
>>> from parsers.decode import decode
>>> from parsers.frames import FrameBatch
>>> real, evil = "02:00:00:00:00:0a", "02:00:00:00:00:66"
>>> def arp(mac, ip, t):
...     b = FrameBatch.from_frames([raw(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=mac, psrc=ip,
...                                 pdst="10.0.0.1"))], ts=[t * 10**9])
...     return WireFrames.from_decoded(b, decode(b))
>>> w = WireDetector(); w.learn(arp(real, "10.0.0.10", 0)); w.learn(arp(evil, "10.0.0.66", 1)); w.finish_learning()
>>> [f.rule for f in w.findings(arp(real, "10.0.0.10", 100))], [f.rule for f in w.findings(arp(evil, "10.0.0.10", 101))]
([], ['wire.arp_spoof'])
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import SimpleNamespace

import numpy as np

from parsers.decode import (ARP_REQUEST, L3_IPV4, L4_TCP, L4_UDP, SKIP_FRAGMENT, SKIP_OK, SKIP_OTHER_L4,
                            TCP_ACK, TCP_RST, TCP_SYN, format_mac)

from .features import hash_columns
from .findings import Finding, ip_text

NS = 1_000_000_000
RULES = ("wire.arp_spoof", "wire.mac_change", "wire.relay", "wire.ttl_change", "wire.port_scan", "wire.host_sweep",
         "wire.arp_sweep")
# Which frames carry usable L3 columns: decoded, or IP with an L4 the decoder does not read.
_L3_OK = (SKIP_OK, SKIP_OTHER_L4, SKIP_FRAGMENT)
_GROUP_BIT = np.uint64(1 << 40)  # I/G bit of a MAC address: multicast/broadcast
_I64 = np.int64
_RELAY_COLS = ("ts", "vlan", "src", "dst", "src_mac", "ttl")  # what a relayed copy is compared on


@dataclass
class WireFrames:
    """The columns of a frame batch the wire detector reads (IP and ARP frames only).

    Small enough to keep for a whole capture (``otwatch eval`` parses once and replays into
    several engines)."""

    ts: np.ndarray
    vlan: np.ndarray
    src_mac: np.ndarray
    dst_mac: np.ndarray
    l3: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    ttl: np.ndarray
    ip_id: np.ndarray
    l4: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    flags: np.ndarray
    seq: np.ndarray
    ack: np.ndarray
    plen: np.ndarray
    ics: np.ndarray  # bool: the frame belongs to a Modbus/DNP3/IEC-104 flow
    arp_op: np.ndarray
    arp_sha: np.ndarray
    arp_spa: np.ndarray
    arp_tpa: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @classmethod
    def from_decoded(cls, batch, dec, proto=None) -> "WireFrames":
        keep = (dec.arp_op != 0) | ((dec.l3 != 0) & np.isin(dec.skip, _L3_OK))
        rows = np.flatnonzero(keep)
        ics = np.zeros(rows.shape[0], bool) if proto is None else np.asarray(proto)[rows] != 0
        return cls(ts=batch.ts[rows], vlan=dec.vlan[rows], src_mac=dec.src_mac[rows], dst_mac=dec.dst_mac[rows],
                   l3=dec.l3[rows], src=dec.src[rows], dst=dec.dst[rows], ttl=dec.ttl[rows], ip_id=dec.ip_id[rows],
                   l4=dec.l4[rows], sport=dec.sport[rows], dport=dec.dport[rows], flags=dec.tcp_flags[rows],
                   seq=dec.seq[rows], ack=dec.ack[rows], plen=dec.payload_len[rows].astype(np.int32), ics=ics,
                   arp_op=dec.arp_op[rows], arp_sha=dec.arp_sha[rows], arp_spa=dec.arp_spa[rows],
                   arp_tpa=dec.arp_tpa[rows])

    def select(self, idx) -> "WireFrames":
        return WireFrames(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


class _Table:
    """Sorted int64 keys with parallel value columns, at most ``capacity`` keys (the rest counted)."""

    def __init__(self, columns: dict, capacity: int):
        self.dtypes = dict(columns)
        self.capacity = int(capacity)
        self.keys = np.empty(0, _I64)
        self.cols = {k: np.zeros(0, d) for k, d in self.dtypes.items()}
        self.overflow = 0

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def find(self, keys) -> np.ndarray:
        keys = np.asarray(keys, _I64)
        if self.keys.shape[0] == 0 or keys.shape[0] == 0:
            return np.full(keys.shape[0], -1)
        i = np.minimum(np.searchsorted(self.keys, keys), self.keys.shape[0] - 1)
        return np.where(self.keys[i] == keys, i, -1)

    def at(self, col: str, pos) -> np.ndarray:
        """``col`` at positions from :meth:`find`; 0/False where the key is absent (pos -1)."""
        pos = np.asarray(pos)
        out = np.zeros(pos.shape[0], self.dtypes[col])
        ok = pos >= 0
        out[ok] = self.cols[col][pos[ok]]
        return out

    def insert(self, keys, **values) -> None:
        """Add keys not present yet (first occurrence wins); values are per-key arrays or scalars."""
        keys = np.asarray(keys, _I64)
        if keys.shape[0] == 0:
            return
        uk, first = np.unique(keys, return_index=True)
        new = self.find(uk) < 0
        room = max(self.capacity - len(self), 0)
        if np.count_nonzero(new) > room:
            self.overflow += int(np.count_nonzero(new)) - room
            new[np.flatnonzero(new)[room:]] = False
        if not new.any():
            return
        pick = first[new]
        allk = np.concatenate([self.keys, uk[new]])
        order = np.argsort(allk, kind="stable")
        self.keys = allk[order]
        for k, d in self.dtypes.items():
            v = values.get(k, 0)
            v = np.asarray(v)[pick] if np.ndim(v) else np.full(pick.shape[0], v)
            self.cols[k] = np.concatenate([self.cols[k], v.astype(d)])[order]

    def to_arrays(self, prefix: str) -> dict:
        out = {f"{prefix}.keys": self.keys}
        out.update({f"{prefix}.{k}": v for k, v in self.cols.items()})
        return out

    def load(self, arrays: dict, prefix: str) -> None:
        if f"{prefix}.keys" not in arrays:
            return
        self.keys = np.asarray(arrays[f"{prefix}.keys"], _I64)
        for k, d in self.dtypes.items():
            self.cols[k] = np.asarray(arrays[f"{prefix}.{k}"], d)


def _ip_key(vlan, ip) -> np.ndarray:
    return (np.asarray(vlan).astype(_I64) << 32) | np.asarray(ip).astype(_I64)


def _mac_key(vlan, mac) -> np.ndarray:
    return (np.asarray(vlan).astype(_I64) << 48) | np.asarray(mac).astype(np.uint64).astype(_I64)


def _port_key(ip, port) -> np.ndarray:
    return (np.asarray(ip).astype(_I64) << 16) | np.asarray(port).astype(_I64)


def _ttl_class(ttl) -> np.ndarray:
    """Bit of the initial TTL a received TTL comes from: 1 = 64, 2 = 128, 4 = 255 (0: below 33, a
    TTL-limited probe or multicast, not a stack's default)."""
    t = np.asarray(ttl).astype(np.int64)
    return np.where(t <= 32, 0, np.where(t <= 64, 1, np.where(t <= 128, 2, 4))).astype(np.uint8)


_CLASS_TEXT = {1: "64", 2: "128", 4: "255"}


def _mask_text(mask: int) -> str:
    return "/".join(v for k, v in _CLASS_TEXT.items() if mask & k) or "none"


def _unicast_ipv4(ip) -> np.ndarray:
    ip = np.asarray(ip).astype(np.int64)
    return (ip != 0) & (ip < 0xE0000000)


def _groups(*cols):
    """Unique rows of ``cols`` and, per row, the index of its group."""
    keys = hash_columns(*cols)
    uk, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    return first, inv.reshape(-1), uk.shape[0]


class WireDetector:
    """Learns who is who on the wire, then reports spoofing, relays and scans (see module doc)."""

    name = "wire"

    def __init__(self, capacity: int = 65536, rebind_s: float = 3600.0, router_min_ips: int = 4,
                 relay_window_s: float = 1.0, ttl_flap_s: float = 600.0, scan_window_s: float = 10.0,
                 scan_ports: int = 10, sweep_hosts: int = 10, arp_sweep_targets: int = 16):
        self.capacity = int(capacity)
        self.rebind_ns = int(rebind_s * NS)
        self.router_min_ips = int(router_min_ips)
        self.relay_ns = int(relay_window_s * NS)
        self.ttl_flap_ns = int(ttl_flap_s * NS)
        self.ttl_min_frames = 3  # within ttl_run_ns: a spoofer's connection is several frames
        self.ttl_run_ns = 60 * NS
        # an address first seen after learning adopts its class once it sent only that class for this long
        self.ttl_adopt_frames, self.ttl_adopt_ns = 20, 300 * NS
        self.scan_ns = max(int(scan_window_s * NS), 1)
        self.scan_ports = int(scan_ports)
        self.sweep_hosts = int(sweep_hosts)
        self.arp_sweep_targets = int(arp_sweep_targets)
        self.learning = True
        # (vlan, ip) -> the MAC that announces it in ARP; shared: two MACs did so while learning (a cluster)
        # cand: another MAC claiming the address since cand_first; it takes over only once the owner has
        # been silent since then for rebind_s (a replaced device), never while the owner still speaks
        self.owner = _Table({"mac": np.uint64, "last": _I64, "shared": bool, "cand": np.uint64, "cand_first": _I64},
                            capacity)
        # (vlan, mac) -> the first address it announced; multi: it announced several while learning;
        # router: it sourced IPv4 frames for many addresses while learning; arp_max: most addresses it
        # asked for in one window while learning
        self.station = _Table({"ip": np.uint32, "multi": bool, "router": bool, "arp_max": np.int32}, capacity)
        self.ip_macs = _Table({}, capacity * 4)  # hash(vlan, mac, ip) of IPv4 sources while learning
        # odd_n/odd_first: frames of an unexpected class in the current run (one corrupted frame is no stack)
        # solo_*: the current run of frames of one class only, for an address first seen after learning
        self.ttl = _Table({"learned": np.uint8, "seen": np.uint8, "t64": _I64, "t128": _I64, "t255": _I64,
                           "odd_n": np.int32, "odd_first": _I64, "solo_cls": np.uint8, "solo_n": np.int64,
                           "solo_first": _I64}, capacity)
        self.services = _Table({}, capacity * 4)  # (ip, port) that answered a SYN or carried ICS traffic
        self.habits = _Table({}, capacity * 4)  # (client ip, port) the client opens connections to
        self.ics_hosts = _Table({}, capacity)
        # sliding state (last two windows): unique probe rows and ARP request rows
        self._probes = np.zeros((0, 4), _I64)  # src, dst, port, bucket
        self._asks = np.zeros((0, 4), _I64)  # vlan, mac, target ip, bucket
        self._recent = None  # columns (_RELAY_COLS and packet key) of the last relay window
        self._mac_src_rows = np.zeros((0, 3), _I64)  # distinct (vlan, mac, source ip) while learning
        self.counts = {"frames": 0, "arp": 0}

    def _station_ip(self, v, mac, ip, mark_multi: bool) -> None:
        """Record that ``mac`` announced ``ip`` in ARP (the address it owns)."""
        mk = _mac_key(v, mac)
        self.station.insert(mk, ip=ip)
        sp = self.station.find(mk)
        ok = sp >= 0
        sp, ip = sp[ok], np.asarray(ip)[ok]
        owned = self.owner.find(_ip_key(np.asarray(v)[ok], self.station.cols["ip"][sp]))
        mine = owned >= 0
        mine[mine] = self.owner.cols["mac"][owned[mine]] == np.asarray(mac)[ok][mine]
        # an address seen only in IP frames (not announced by this MAC) gives way to the announced one
        self.station.cols["ip"][sp[~mine]] = ip[~mine]
        if mark_multi:
            self.station.cols["multi"][sp[mine & (self.station.cols["ip"][sp] != ip)]] = True

    # -- shared bookkeeping --------------------------------------------------------------------------
    def size(self) -> int:
        return len(self.owner) + len(self.station) + len(self.ttl) + len(self.services) + len(self.habits)

    def overflow(self) -> int:
        return sum(t.overflow for t in (self.owner, self.station, self.ip_macs, self.ttl, self.services, self.habits,
                                        self.ics_hosts))

    def _note_ics(self, wf: WireFrames) -> None:
        if wf.ics.any():
            self.ics_hosts.insert(np.concatenate([wf.src[wf.ics], wf.dst[wf.ics]]).astype(_I64))

    def _is_ics(self, ip) -> np.ndarray:
        return self.ics_hosts.find(np.asarray(ip).astype(_I64)) >= 0

    def _host(self, vlan: int, mac: int) -> str:
        """'00:10:18:cb:8c:13 (192.168.10.66)' -- the MAC and the address it owns, if known."""
        i = int(self.station.find(_mac_key([vlan], [mac]))[0])
        ip = int(self.station.cols["ip"][i]) if i >= 0 else 0
        return format_mac(mac) + (f" ({ip_text(ip)})" if ip else "")

    def _ip_of_mac(self, vlan: int, mac: int) -> int:
        i = int(self.station.find(_mac_key([vlan], [mac]))[0])
        return int(self.station.cols["ip"][i]) if i >= 0 else 0

    def _arp_rows(self, wf: WireFrames) -> np.ndarray:
        sha = wf.arp_sha
        return (wf.arp_op != 0) & (wf.arp_spa != 0) & (sha != 0) & ((sha & _GROUP_BIT) == 0)

    def _ip_rows(self, wf: WireFrames) -> np.ndarray:
        return (wf.l3 == L3_IPV4) & (wf.src_mac != 0) & ((wf.src_mac & _GROUP_BIT) == 0) & _unicast_ipv4(wf.src)

    def _unicast_dst(self, wf: WireFrames) -> np.ndarray:
        has_mac = wf.dst_mac != 0
        v4 = wf.l3 == L3_IPV4
        ip_ok = np.where(v4, _unicast_ipv4(wf.dst) & ((wf.dst & 0xFF) != 0xFF), True)
        return np.where(has_mac, (wf.dst_mac & _GROUP_BIT) == 0, True) & ip_ok

    # -- learning ------------------------------------------------------------------------------------
    def learn(self, wf: WireFrames) -> None:
        if len(wf) == 0:
            return
        self.counts["frames"] += len(wf)
        self._note_ics(wf)
        arp = self._arp_rows(wf)
        self.counts["arp"] += int(np.count_nonzero(wf.arp_op != 0))
        if arp.any():
            v, ip, mac, ts = wf.vlan[arp], wf.arp_spa[arp], wf.arp_sha[arp], wf.ts[arp]
            ik = _ip_key(v, ip)
            self.owner.insert(ik, mac=mac, last=ts)
            pos = self.owner.find(ik)
            other = self.owner.cols["mac"][pos] != mac
            self.owner.cols["shared"][pos[other]] = True
            np.maximum.at(self.owner.cols["last"], pos, ts)
            self._station_ip(v, mac, ip, mark_multi=True)
        ipr = self._ip_rows(wf)
        if ipr.any():
            self.ip_macs.insert(hash_columns(wf.vlan[ipr], wf.src_mac[ipr], wf.src[ipr]))
            # a MAC's address for naming it, until its own ARP says otherwise
            self.station.insert(_mac_key(wf.vlan[ipr], wf.src_mac[ipr]), ip=wf.src[ipr])
            # distinct (vlan, mac, src) rows, counted per MAC at the end of learning
            rows = np.stack([wf.vlan[ipr].astype(_I64), wf.src_mac[ipr].astype(np.uint64).astype(_I64),
                             wf.src[ipr].astype(_I64)], axis=1)
            both = np.unique(np.concatenate([self._mac_src_rows, rows]), axis=0)
            self._mac_src_rows = both[: self.capacity * 4]
            pos = self.owner.find(_ip_key(wf.vlan[ipr], wf.src[ipr]))
            mine = pos >= 0
            mine[mine] = self.owner.cols["mac"][pos[mine]] == wf.src_mac[ipr][mine]
            np.maximum.at(self.owner.cols["last"], pos[mine], wf.ts[ipr][mine])
        self._learn_ttl(wf)
        tcp = wf.l4 == L4_TCP
        synack = tcp & ((wf.flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))
        self.services.insert(np.concatenate([_port_key(wf.src[synack], wf.sport[synack]),
                                             _port_key(wf.dst[wf.ics], wf.dport[wf.ics]),
                                             _port_key(wf.src[wf.ics], wf.sport[wf.ics])]))
        syn = tcp & ((wf.flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
        self.habits.insert(_port_key(wf.src[syn], wf.dport[syn]))
        self._arp_sweeps(wf, learning=True)

    def _learn_ttl(self, wf: WireFrames) -> None:
        rows = self._ttl_rows(wf)
        if not rows.any():
            return
        src, cls, ts = wf.src[rows].astype(_I64), _ttl_class(wf.ttl[rows]), wf.ts[rows]
        self.ttl.insert(src)
        pos = self.ttl.find(src)
        ok = pos >= 0
        np.bitwise_or.at(self.ttl.cols["learned"], pos[ok], cls[ok])
        self._ttl_seen(pos[ok], cls[ok], ts[ok])

    def _ttl_rows(self, wf: WireFrames) -> np.ndarray:
        return (((wf.l4 == L4_TCP) | (wf.l4 == L4_UDP)) & (wf.src != 0) & self._unicast_dst(wf)
                & (_ttl_class(wf.ttl) != 0))

    def _ttl_seen(self, pos, cls, ts) -> None:
        np.bitwise_or.at(self.ttl.cols["seen"], pos, cls)
        for bit, col in ((1, "t64"), (2, "t128"), (4, "t255")):
            m = cls == bit
            np.maximum.at(self.ttl.cols[col], pos[m], ts[m])

    def finish_learning(self) -> None:
        """Routers: MACs that sourced IPv4 frames for ``router_min_ips`` addresses or more."""
        rows = self._mac_src_rows
        if rows.shape[0]:
            macs, n = np.unique(rows[:, :2], axis=0, return_counts=True)
            r = macs[n >= self.router_min_ips]
            if r.shape[0]:
                pos = self.station.find(_mac_key(r[:, 0], r[:, 1].astype(np.uint64)))
                self.station.cols["router"][pos[pos >= 0]] = True
        self._mac_src_rows = np.zeros((0, 3), _I64)
        self.learning = False

    # -- monitoring ----------------------------------------------------------------------------------
    def findings(self, wf: WireFrames) -> list:
        if len(wf) == 0:
            return []
        if self.learning:
            self.finish_learning()
        self.counts["frames"] += len(wf)
        self.counts["arp"] += int(np.count_nonzero(wf.arp_op != 0))
        self._note_ics(wf)
        out: list[Finding] = []
        out += self._arp_findings(wf)
        out += self._mac_findings(wf)
        out += self._relay_findings(wf)
        out += self._ttl_findings(wf)
        out += self._scan_findings(wf)
        out += self._arp_sweeps(wf, learning=False)
        return out

    def _finding(self, rule, severity, technique, rows, wf, src, dst, entity, message, fields) -> Finding:
        return Finding(rule=rule, detector="wire", severity=severity, first_ts=int(wf.ts[rows].min()),
                       last_ts=int(wf.ts[rows].max()), src=int(src), dst=int(dst), protocol=0, entity=entity,
                       message=message, technique=technique, count=int(rows.shape[0]), fields=fields)

    def _arp_findings(self, wf: WireFrames) -> list:
        arp = np.flatnonzero(self._arp_rows(wf))
        if arp.shape[0] == 0:
            return []
        v, spa, sha, eth, ts = wf.vlan[arp], wf.arp_spa[arp], wf.arp_sha[arp], wf.src_mac[arp], wf.ts[arp]
        pos = self.owner.find(_ip_key(v, spa))
        has = pos >= 0
        owner = self.owner.at("mac", pos)
        shared = self.owner.at("shared", pos)
        last = self.owner.at("last", pos)
        sp = self.station.find(_mac_key(v, sha))
        st_ip = self.station.at("ip", sp)
        op = self.owner.find(_ip_key(v, st_ip))
        st_ip = np.where((op >= 0) & (self.owner.at("mac", op) == sha), st_ip, 0)  # by its ARP
        st_free = self.station.at("multi", sp) | self.station.at("router", sp)
        moved = has & ~shared & (sha != owner)
        silent = np.zeros(moved.shape[0], bool)
        if moved.any():  # per owned address, its first contradicting row in this slice
            mv = np.flatnonzero(moved)
            up, k = np.unique(pos[mv], return_index=True)
            i = mv[k]
            c = self.owner.cols
            restart = (c["cand"][up] != sha[i]) | (c["last"][up] >= c["cand_first"][up])
            c["cand"][up[restart]], c["cand_first"][up[restart]] = sha[i][restart], ts[i][restart]
            # the owner went quiet when the new MAC appeared and stayed so: a replaced device
            take = ~restart & (ts[i] - c["cand_first"][up] > self.rebind_ns)
            c["mac"][up[take]], c["last"][up[take]] = sha[i][take], ts[i][take]
            silent[mv] = np.isin(pos[mv], up[take]) & (sha[mv] == self.owner.at("mac", pos[mv]))
        claims = ~has & (st_ip != 0) & (st_ip != spa) & ~st_free
        forged = (eth != 0) & (eth != sha)
        consistent = has & (sha == owner)
        np.maximum.at(self.owner.cols["last"], pos[consistent], ts[consistent])
        # new stations: learned as they appear, not reported
        fresh = ~has & ~claims & ~forged
        if fresh.any():
            self.owner.insert(_ip_key(v[fresh], spa[fresh]), mac=sha[fresh], last=ts[fresh])
            self._station_ip(v[fresh], sha[fresh], spa[fresh], mark_multi=False)
        bad = moved | claims | forged
        if not bad.any():
            return []
        attacker = np.where(forged & ~moved & ~claims, eth, sha)
        out = []
        b = np.flatnonzero(bad)
        first, inv, n = _groups(v[b], attacker[b], spa[b])
        ics = self._is_ics(spa[b])
        for g in range(n):
            rows_g = b[inv == g]
            j = int(b[first[g]])
            vl, att, victim = int(v[j]), int(attacker[j]), int(spa[j])
            frames = arp[rows_g]
            real = int(owner[j]) if has[j] else 0
            is_ics = bool(ics[first[g]])
            host = self._host(vl, att)
            if moved[j]:
                why = (f"ARP {'replies' if (wf.arp_op[frames] == 2).any() else 'frames'} from {host} say "
                       f"{ip_text(victim)} is at {format_mac(int(sha[j]))}; it belongs to {format_mac(real)}")
                why += (f" (silent for the last {(int(ts[j]) - int(last[j])) / NS / 3600:.1f} h: a replaced "
                        "device, or an attacker taking over an address nobody uses; learned from now on)") if silent[j] else \
                    " (ARP spoofing: traffic to that address now goes through the attacker)"
            elif claims[j]:
                why = (f"{host} now also claims {ip_text(victim)} in ARP (ARP spoofing: a host taking over "
                       "another's address)")
            else:
                why = (f"{format_mac(att)} sends ARP frames on behalf of {format_mac(int(sha[j]))} announcing "
                       f"{ip_text(victim)} (forged ARP: the sender address is not the frame's source)")
            sev = ("high" if is_ics else "medium") if (moved[j] and not silent[j]) or claims[j] else "medium"
            if is_ics:
                why += "; it is an ICS host"
            out.append(self._finding(
                "wire.arp_spoof", sev, "T0830", frames, wf, self._ip_of_mac(vl, att), victim,
                f"{ip_text(victim)}@{format_mac(att)}", why,
                {"attacker_mac": format_mac(att), "victim_ip": ip_text(victim),
                 "victim_mac": format_mac(real) if real else "", "vlan": vl, "arp_frames": int(frames.shape[0])}))
        return out

    def _mac_findings(self, wf: WireFrames) -> list:
        ipr = np.flatnonzero(self._ip_rows(wf))
        if ipr.shape[0] == 0:
            return []
        v, src, mac, ts = wf.vlan[ipr], wf.src[ipr], wf.src_mac[ipr], wf.ts[ipr]
        pos = self.owner.find(_ip_key(v, src))
        has = pos >= 0
        owner = self.owner.at("mac", pos)
        shared = self.owner.at("shared", pos)
        mine = has & (mac == owner)
        np.maximum.at(self.owner.cols["last"], pos[mine], ts[mine])
        sp = self.station.find(_mac_key(v, mac))
        router = self.station.at("router", sp)
        bad = has & ~shared & ~mine & ~router
        if not bad.any():
            return []
        b = np.flatnonzero(bad)
        first, inv, n = _groups(v[b], mac[b], src[b])
        ics = self._is_ics(src[b])
        out = []
        for g in range(n):
            rows_g = b[inv == g]
            j = int(b[first[g]])
            vl, att, victim, real = int(v[j]), int(mac[j]), int(src[j]), int(owner[j])
            alternating = bool(np.any(mine & (src == victim) & (v == vl))) or \
                int(ts[rows_g].min()) - int(self.owner.cols["last"][pos[j]]) < 10 * NS
            host = self._host(vl, att)
            why = (f"{ip_text(victim)} sends from {host}, not from its own MAC {format_mac(real)}"
                   + (": both MACs carry its traffic (a relay in the middle, e.g. after ARP spoofing)"
                      if alternating else " (its address is used by another device)")
                   + ("; it is an ICS host" if ics[first[g]] else ""))
            out.append(self._finding(
                "wire.mac_change", "high" if ics[first[g]] else "medium", "T0830", ipr[rows_g], wf,
                self._ip_of_mac(vl, att), victim, f"{ip_text(victim)}@{format_mac(att)}", why,
                {"attacker_mac": format_mac(att), "victim_ip": ip_text(victim), "victim_mac": format_mac(real),
                 "alternating": alternating, "vlan": vl}))
        return out

    def _relay_findings(self, wf: WireFrames) -> list:
        cand = (wf.l3 == L3_IPV4) & ((wf.l4 == L4_TCP) | (wf.l4 == L4_UDP)) & (wf.src_mac != 0)
        # an IP id of 0 with nothing else to tell packets apart would pair unrelated datagrams
        cand &= (wf.ip_id != 0) | ((wf.l4 == L4_TCP) & ((wf.plen > 0) | ((wf.flags & TCP_SYN) != 0)))
        rows = np.flatnonzero(cand)
        u = lambda c: c[rows].astype(_I64)  # noqa: E731
        # the packet's identity, packed into four words before hashing (vlan 12, ip id 16, l4 8 bits)
        keys = hash_columns((u(wf.src) << 32) | u(wf.dst), (u(wf.vlan) << 32) | (u(wf.ip_id) << 8) | u(wf.l4),
                            (u(wf.sport) << 48) | (u(wf.dport) << 32) | u(wf.seq), (u(wf.ack) << 32) | u(wf.plen))
        cur = {"key": keys, **{c: getattr(wf, c)[rows] for c in _RELAY_COLS}}
        prev = self._recent
        allc = cur if prev is None else {c: np.concatenate([prev[c], cur[c]]) for c in cur}
        n_prev = 0 if prev is None else prev["ts"].shape[0]
        if allc["ts"].shape[0]:  # keep the last window for the next slice
            keep = allc["ts"] >= int(allc["ts"].max()) - self.relay_ns
            self._recent = {c: v[keep] for c, v in allc.items()}
        if allc["ts"].shape[0] < 2 or rows.shape[0] == 0:
            return []
        allw = SimpleNamespace(**allc)
        allk = allc["key"]
        order = np.lexsort((allw.ts, allk))
        k, t = allk[order], allw.ts[order]
        same = (k[1:] == k[:-1]) & (t[1:] - t[:-1] <= self.relay_ns)
        a, b = order[:-1][same], order[1:][same]
        differ = (allw.src_mac[a] != allw.src_mac[b]) | (allw.ttl[a] != allw.ttl[b])
        a, b = a[differ], b[differ]
        new = b >= n_prev  # report each pair once: when its second copy arrives
        a, b = a[new], b[new]
        if a.shape[0] == 0:
            return []
        # the relaying MAC: the later copy's, unless that one is the address's own MAC
        pos = self.owner.find(_ip_key(allw.vlan[b], allw.src[b]))
        own = self.owner.at("mac", pos)
        relay = np.where(allw.src_mac[b] == own, allw.src_mac[a], allw.src_mac[b])
        sp = self.station.find(_mac_key(allw.vlan[b], relay))
        router = self.station.at("router", sp)
        a, b, relay = a[~router], b[~router], relay[~router]
        if a.shape[0] == 0:
            return []
        first, inv, n = _groups(allw.vlan[b], relay)
        out = []
        for g in range(n):
            bb, aa = b[inv == g], a[inv == g]
            j, i = int(bb[0]), int(aa[0])
            vl, att = int(allw.vlan[j]), int(relay[first[g]])
            pairs = sorted({(ip_text(allw.src[x]), ip_text(allw.dst[x])) for x in bb[:50].tolist()})
            victims = [p for pair in pairs for p in pair]
            ttl_a, ttl_b = int(allw.ttl[i]), int(allw.ttl[j])
            why = (f"the same IP packets ({len(bb)}, e.g. {pairs[0][0]} to {pairs[0][1]}) were seen twice within "
                   f"{self.relay_ns / NS:g} s, once from {format_mac(int(allw.src_mac[i]))} (TTL {ttl_a}) and again "
                   f"from {format_mac(int(allw.src_mac[j]))} (TTL {ttl_b}): {self._host(vl, att)} relays traffic "
                   "between these hosts (man in the middle)")
            victim = int(allw.dst[j]) if int(allw.dst[j]) != self._ip_of_mac(vl, att) else int(allw.src[j])
            sel = np.r_[aa, bb]
            out.append(Finding(
                rule="wire.relay", detector="wire", severity="high", first_ts=int(allw.ts[sel].min()),
                last_ts=int(allw.ts[sel].max()), src=self._ip_of_mac(vl, att), dst=victim, protocol=0,
                entity=f"relay@{format_mac(att)}", message=why, technique="T0830", count=int(bb.shape[0]),
                fields={"attacker_mac": format_mac(att), "pairs": [f"{s}>{d}" for s, d in pairs[:10]],
                        "victims": sorted(set(victims))[:20], "ttl": [ttl_a, ttl_b], "vlan": vl}))
        return out

    def _ttl_findings(self, wf: WireFrames) -> list:
        rows = np.flatnonzero(self._ttl_rows(wf))
        if rows.shape[0] == 0:
            return []
        src, cls, ts = wf.src[rows].astype(_I64), _ttl_class(wf.ttl[rows]), wf.ts[rows]
        pos = self.ttl.find(src)
        if (pos < 0).any():
            self.ttl.insert(src[pos < 0])
            pos = self.ttl.find(src)
        learned = self.ttl.at("learned", pos)
        # the common case, a host sending its learned class, needs nothing more
        look = (pos >= 0) & ((learned == 0) | ((cls & learned) == 0))
        if not look.any():
            return []
        rows, src, cls, ts, pos, learned = rows[look], src[look], cls[look], ts[look], pos[look], learned[look]
        # before this batch: when was each class last seen for the address
        last = np.stack([self.ttl.cols[c][pos] for c in ("t64", "t128", "t255")], axis=1)
        self._ttl_seen(pos, cls, ts)
        bit_idx = np.where(cls == 1, 0, np.where(cls == 2, 1, 2))
        other_recent = np.zeros(rows.shape[0], bool)
        for k in range(3):
            other_recent |= (bit_idx != k) & (last[:, k] > 0) & (ts - last[:, k] <= self.ttl_flap_ns)
        # classes seen in this batch for the address, to catch alternation inside one batch
        first, inv, n = _groups(src)
        batch_mask = np.zeros(n, np.uint8)
        np.bitwise_or.at(batch_mask, inv, cls)
        mixed = np.bitwise_count(batch_mask[inv]) > 1 if hasattr(np, "bitwise_count") else \
            np.isin(batch_mask[inv], (3, 5, 6, 7))
        bad = np.where(learned != 0, (cls & learned) == 0, other_recent | mixed)
        self._ttl_adopt(pos[first], batch_mask, inv, ts, learned[first])
        if not bad.any():
            return []
        b = np.flatnonzero(bad)
        first, inv, n = _groups(src[b])
        out = []
        for g in range(n):
            sel = b[inv == g]
            j = int(sel[0])
            p, c = int(pos[j]), self.ttl.cols
            if ts[j] - c["odd_first"][p] > self.ttl_run_ns:
                c["odd_n"][p], c["odd_first"][p] = 0, ts[j]
            c["odd_n"][p] += sel.shape[0]
            if c["odd_n"][p] < self.ttl_min_frames:
                continue
            victim, c, lm = int(src[j]), int(cls[j]), int(learned[j])
            fr = rows[sel]
            ttl_vals = sorted(set(wf.ttl[fr].tolist()))[:5]
            if lm:
                why = (f"{ip_text(victim)} sends with TTL {'/'.join(map(str, ttl_vals))} (initial {_CLASS_TEXT[c]}), "
                       f"learned initial TTL {_mask_text(lm)}: another network stack sends as this host (spoofed "
                       "source or a relay)")
            else:
                seen = int(self.ttl.cols["seen"][pos[j]])
                why = (f"{ip_text(victim)} sends with initial TTL {_mask_text(seen)} alternately: two network stacks "
                       "use this address (spoofed source or a relay)")
            macs = sorted({format_mac(int(m)) for m in wf.src_mac[fr][:50].tolist() if m})
            if macs:
                why += f"; frames from {', '.join(macs[:3])}"
            is_ics = bool(self._is_ics([victim])[0])
            # the sender: the MAC's own host when the frames do not come from the address's own MAC
            own = self.owner.find(_ip_key(wf.vlan[fr[:1]], [victim]))[0]
            sender = victim
            if own >= 0:
                other = wf.src_mac[fr][wf.src_mac[fr] != self.owner.cols["mac"][own]]
                if other.shape[0]:
                    sender = self._ip_of_mac(int(wf.vlan[fr[0]]), int(other[0])) or victim
            out.append(self._finding(
                "wire.ttl_change", "high" if is_ics else "medium", "T0830", fr, wf,
                sender, victim if sender != victim else int(wf.dst[fr[0]]), f"{ip_text(victim)}/ttl", why,
                {"ttl": ttl_vals, "learned_initial_ttl": _mask_text(lm), "macs": macs[:5], "ics_host": is_ics}))
        return out

    def _ttl_adopt(self, gpos, gmask, inv, ts, glearned) -> None:
        """Addresses first seen after learning: a class sent alone for ``ttl_adopt_ns`` (and
        ``ttl_adopt_frames`` frames) becomes the address's learned class, so a later impostor of another
        class is reported when it starts, not when the owner comes back."""
        c = self.ttl.cols
        n_g = np.bincount(inv, minlength=gpos.shape[0])
        t_first = np.full(gpos.shape[0], np.iinfo(np.int64).max)
        t_last = np.zeros(gpos.shape[0], np.int64)
        np.minimum.at(t_first, inv, ts)
        np.maximum.at(t_last, inv, ts)
        single = (gmask == 1) | (gmask == 2) | (gmask == 4)
        same = single & (c["solo_cls"][gpos] == gmask)
        c["solo_n"][gpos] = np.where(same, c["solo_n"][gpos] + n_g, np.where(single, n_g, 0))
        c["solo_first"][gpos] = np.where(same, c["solo_first"][gpos], np.where(single, t_first, 0))
        c["solo_cls"][gpos] = np.where(single, gmask, 0)
        adopt = ((glearned == 0) & single & (c["solo_n"][gpos] >= self.ttl_adopt_frames)
                 & (t_last - c["solo_first"][gpos] >= self.ttl_adopt_ns))
        c["learned"][gpos[adopt]] = gmask[adopt]

    def _scan_findings(self, wf: WireFrames) -> list:
        tcp = wf.l4 == L4_TCP
        syn = tcp & ((wf.flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
        # a RST answering a SYN to a closed port has sequence number 0 (RFC 9293 §3.10.7.1); an aborted
        # connection's RST carries its own sequence number and is no probe answer
        rst = tcp & ((wf.flags & (TCP_RST | TCP_ACK)) == (TCP_RST | TCP_ACK)) & (wf.seq == 0)
        # probes: (scanner, target, port) from SYNs out and RSTs back
        src = np.concatenate([wf.src[syn], wf.dst[rst]]).astype(_I64)
        dst = np.concatenate([wf.dst[syn], wf.src[rst]]).astype(_I64)
        port = np.concatenate([wf.dport[syn], wf.sport[rst]]).astype(_I64)
        ts = np.concatenate([wf.ts[syn], wf.ts[rst]])
        frames = np.concatenate([np.flatnonzero(syn), np.flatnonzero(rst)])
        if src.shape[0]:
            usual = (self.services.find(_port_key(dst, port)) >= 0) | (self.habits.find(_port_key(src, port)) >= 0)
            src, dst, port, ts, frames = src[~usual], dst[~usual], port[~usual], ts[~usual], frames[~usual]
        now_b = int(wf.ts.max()) // self.scan_ns
        if src.shape[0] == 0:  # nothing new: only forget old windows
            if self._probes.shape[0]:
                self._probes = self._probes[self._probes[:, 3] >= now_b - 1]
            return []
        rows = np.stack([src, dst, port, ts // self.scan_ns], axis=1) if src.shape[0] else np.zeros((0, 4), _I64)
        allr = np.unique(np.concatenate([self._probes, rows]), axis=0)
        allr = allr[allr[:, 3] >= now_b - 1][: self.capacity * 4]
        self._probes = allr
        if src.shape[0] == 0:
            return []
        out = []
        # one source, one target, many ports (over this and the previous window)
        pairs = np.unique(allr[:, :3], axis=0)
        sd, nports = np.unique(pairs[:, :2], axis=0, return_counts=True)
        hot = sd[nports >= self.scan_ports]
        hot_n = nports[nports >= self.scan_ports]
        for (s, d), k in zip(hot.tolist(), hot_n.tolist()):
            m = (src == s) & (dst == d)
            if not m.any():
                continue
            is_ics = bool(self._is_ics([d])[0])
            fr = frames[m]
            ports = np.unique(port[m])
            why = (f"{ip_text(s)} probed {k} TCP ports of {ip_text(d)} within {2 * self.scan_ns / NS:g} s "
                   f"(e.g. {', '.join(map(str, ports[:8].tolist()))}): a port scan"
                   + ("; the target is an ICS host" if is_ics else ""))
            out.append(self._finding("wire.port_scan", "high" if is_ics else "medium", "T0840", fr, wf, s, d,
                                     f"{ip_text(s)}>{ip_text(d)}", why,
                                     {"ports": int(k), "sample_ports": ports[:20].tolist(), "ics_host": is_ics}))
        # one source, many targets
        hosts = np.unique(allr[:, :2], axis=0)
        s_u, nhosts = np.unique(hosts[:, 0], return_counts=True)
        for s, k in zip(s_u[nhosts >= self.sweep_hosts].tolist(), nhosts[nhosts >= self.sweep_hosts].tolist()):
            m = src == s
            if not m.any():
                continue
            targets = np.unique(hosts[hosts[:, 0] == s][:, 1])
            n_ics = int(np.count_nonzero(self._is_ics(targets)))
            why = (f"{ip_text(s)} opened TCP connections to {k} hosts on ports they do not usually serve within "
                   f"{2 * self.scan_ns / NS:g} s (e.g. {', '.join(ip_text(t) for t in targets[:5].tolist())}): "
                   "a host sweep" + (f"; {n_ics} of them ICS hosts" if n_ics else ""))
            out.append(self._finding("wire.host_sweep", "high" if n_ics else "medium", "T0846", frames[m], wf, s, 0,
                                     f"{ip_text(s)}>many", why,
                                     {"hosts": int(k), "sample_hosts": [ip_text(t) for t in targets[:20].tolist()],
                                      "ics_hosts": n_ics}))
        return out

    def _arp_sweeps(self, wf: WireFrames, learning: bool) -> list:
        req = (wf.arp_op == ARP_REQUEST) & (wf.arp_sha != 0) & (wf.arp_tpa != wf.arp_spa)
        if not req.any() and not self._asks.shape[0]:
            return []
        rows = np.stack([wf.vlan[req].astype(_I64), wf.arp_sha[req].astype(np.uint64).astype(_I64),
                         wf.arp_tpa[req].astype(_I64), wf.ts[req] // self.scan_ns], axis=1)
        if learning:
            # most distinct addresses each MAC asked for in one window (a learning batch may span hours)
            if not rows.shape[0]:
                return []
            per = np.unique(rows, axis=0)
            wins, nw = np.unique(per[:, [0, 1, 3]], axis=0, return_counts=True)
            macs, inv = np.unique(wins[:, :2], axis=0, return_inverse=True)
            n = np.zeros(macs.shape[0], np.int64)
            np.maximum.at(n, inv.reshape(-1), nw)
            mk = _mac_key(macs[:, 0], macs[:, 1].astype(np.uint64))
            self.station.insert(mk, ip=0)
            pos = self.station.find(mk)
            ok = pos >= 0
            np.maximum.at(self.station.cols["arp_max"], pos[ok], n[ok].astype(np.int32))
            return []
        now_b = int(wf.ts.max()) // self.scan_ns
        allr = np.unique(np.concatenate([self._asks, rows]), axis=0)
        allr = allr[allr[:, 3] >= now_b - 1][: self.capacity * 4]
        self._asks = allr
        if not req.any():
            return []
        pairs = np.unique(allr[:, :3], axis=0)
        macs, n = np.unique(pairs[:, :2], axis=0, return_counts=True)
        mk = _mac_key(macs[:, 0], macs[:, 1].astype(np.uint64))
        pos = self.station.find(mk)
        learned = self.station.at("arp_max", pos)
        limit = np.maximum(self.arp_sweep_targets, 2 * learned)
        out = []
        for (vl, mac), k in zip(macs[n >= limit].tolist(), n[n >= limit].tolist()):
            targets = np.unique(pairs[(pairs[:, 0] == vl) & (pairs[:, 1] == mac)][:, 2])
            mac &= 0xFFFFFFFFFFFFFFFF
            m = req & (wf.arp_sha == np.uint64(mac)) & (wf.vlan == vl)
            if not m.any():
                continue
            n_ics = int(np.count_nonzero(self._is_ics(targets)))
            why = (f"{self._host(vl, mac)} asked ARP for {k} addresses within {2 * self.scan_ns / NS:g} s "
                   f"(e.g. {', '.join(ip_text(t) for t in targets[:5].tolist())}): an ARP sweep looking for hosts"
                   + (f"; {n_ics} of them ICS hosts" if n_ics else ""))
            out.append(self._finding("wire.arp_sweep", "high" if n_ics else "medium", "T0846", np.flatnonzero(m), wf,
                                     self._ip_of_mac(vl, mac), 0, f"arp>{format_mac(mac)}", why,
                                     {"attacker_mac": format_mac(mac), "addresses": int(k), "vlan": vl,
                                      "sample_targets": [ip_text(t) for t in targets[:20].tolist()]}))
        return out

    # -- persistence ---------------------------------------------------------------------------------
    _TABLES = ("owner", "station", "ip_macs", "ttl", "services", "habits", "ics_hosts")

    def to_state(self) -> tuple[dict, dict]:
        arrays = {}
        for name in self._TABLES:
            arrays.update(getattr(self, name).to_arrays(f"wire.{name}"))
        if self.learning:
            arrays["wire.mac_src_rows"] = getattr(self, "_mac_src_rows", np.zeros((0, 3), _I64))
        meta = {"learning": self.learning, "capacity": self.capacity, "rebind_s": self.rebind_ns / NS,
                "router_min_ips": self.router_min_ips, "relay_window_s": self.relay_ns / NS,
                "ttl_flap_s": self.ttl_flap_ns / NS, "scan_window_s": self.scan_ns / NS,
                "scan_ports": self.scan_ports, "sweep_hosts": self.sweep_hosts,
                "arp_sweep_targets": self.arp_sweep_targets,
                "overflow": {name: getattr(self, name).overflow for name in self._TABLES}}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "WireDetector":
        w = cls(**{k: meta[k] for k in ("capacity", "rebind_s", "router_min_ips", "relay_window_s", "ttl_flap_s",
                                        "scan_window_s", "scan_ports", "sweep_hosts", "arp_sweep_targets")})
        for name in cls._TABLES:
            t = getattr(w, name)
            t.load(arrays, f"wire.{name}")
            t.overflow = int(meta.get("overflow", {}).get(name, 0))
        w.learning = bool(meta["learning"])
        if w.learning and "wire.mac_src_rows" in arrays:
            w._mac_src_rows = np.asarray(arrays["wire.mac_src_rows"], _I64).reshape(-1, 3)
        return w

    def health(self) -> dict:
        return {"wire_hosts": len(self.owner), "wire_stations": len(self.station), "wire_overflow": self.overflow()}
