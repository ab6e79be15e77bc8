"""The allow-list baseline: who talks to whom, with which functions, writing and reading what.

During learning every request/response PDU adds its keys to four tables, each key the int64 hash of
a few columns (:func:`models.features.hash_columns`):

============ ===================================================================== ==============
table        key                                                                   alert when new
============ ===================================================================== ==============
talker       client, server, protocol                                              high
function     client, server, protocol, unit, direction, function, sub-function     high
write        client, server, protocol, unit, function, object, start address       high
read         client, server, protocol, unit, function, object, start address, count medium
============ ===================================================================== ==============

Monitoring is one ``np.searchsorted`` per table over the batch.  A row is reported under the first
table (in the order above) where it is new, so one new host gives one alert, not four.

**Poisoning resistance.** An entry seen fewer than ``min_count`` times, or only within one burst
(all sightings within ``min_span_s``), stays *provisional*: it still alerts, at low severity, until
an operator approves it (``otwatch baseline approve``).  Revoked entries alert as if never learned.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS
>>> b = EventBuilder()
>>> for t in range(5):
...     _ = b.pdu(StreamContext(ts=t * 100 * 10**9, src=1, dst=2), PROTO_MODBUS, function=3, unit=1, address=0, count=2)
>>> al = AllowList(); al.learn(b.build())
>>> _ = b.pdu(StreamContext(ts=600 * 10**9, src=1, dst=2), PROTO_MODBUS, function=6, unit=1, address=7, count=1,
...           is_write=True)
>>> ev = b.build(); al.score(ev).tolist()
[1.0]
>>> [f.rule for f in al.findings(ev, al.score(ev))]
['allowlist.new_function']
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, KIND_PDU, PROTO_MODBUS, EventBatch

from .features import channel_of, hash_columns
from .findings import Finding, function_text, ip_text, protocol_text
from .function_classes import CLASS_CONTROL, event_classes, is_mechanics

TABLES = ("talker", "function", "write", "read")
ROLE_TABLES = tuple(f"{t}_role" for t in TABLES)
CODE_NEW_PEER = 8  # classify(): a known client talks to a server of its protocol it never talked to
# Review items (provisional entries, a known client's new peer) are reported once each, the first time they
# are used in monitoring, in one low-severity incident per client host (all protocols): an operator reviews
# them (`otwatch baseline show/approve/revoke`) rather than seeing a periodic job re-alert at every run.
SEVERITY_NEW = {"peer": "low", "talker": "high", "function": "high", "write": "high", "read": "medium"}
# Modbus FC 8 sub-functions and DNP3/IEC-104 functions that restart, stop or silence a device.
RESTART_FUNCTIONS = {
    (PROTO_MODBUS, 8): {1, 4},  # restart communications, force listen only (MB v1.1b3 §6.8.1)
}
DNP3_RESTART = {13, 14, 18, 21}  # cold/warm restart, stop application, disable unsolicited (1815 §4.4)
IEC104_RESET = {105}  # C_RP_NA_1 reset process (IEC 60870-5-104 §7.2.6.27)

INFO_CAP = 5000  # entries per table with a description for `baseline show` (~0.6 kB each; the rest: key only)
STATUS_TRUSTED, STATUS_PROVISIONAL, STATUS_APPROVED, STATUS_REVOKED = 0, 1, 2, 3
STATUS_NAMES = {0: "trusted", 1: "provisional", 2: "approved", 3: "revoked"}


def row_keys(ev: EventBatch) -> dict:
    """The key of every row in each table (int64), and the mask of rows each table applies to."""
    client, server = channel_of(ev)
    sub = np.where((ev.protocol == PROTO_MODBUS) & np.isin(ev.function, (8, 43)), ev.subfunction, -1)
    req = ev.direction == DIR_REQUEST
    has_addr = req & (ev.address >= 0)
    return {
        "talker": (hash_columns(client, server, ev.protocol), np.ones(len(ev), bool)),
        "function": (hash_columns(1, client, server, ev.protocol, ev.unit, ev.direction, ev.function, sub),
                     np.ones(len(ev), bool)),
        "write": (hash_columns(2, client, server, ev.protocol, ev.unit, ev.function, ev.object, ev.address),
                  req & ev.is_write),
        "read": (hash_columns(3, client, server, ev.protocol, ev.unit, ev.function, ev.object, ev.address, ev.count),
                 has_addr & ~ev.is_write),
        # the point a write targets whatever the function (SELECT then OPERATE of one point is one item),
        # and the (pair, function, object) whose written address range is learned
        "write_point": (hash_columns(9, client, server, ev.protocol, ev.unit, ev.object, ev.address), req & ev.is_write),
        "write_range": (hash_columns(10, client, server, ev.protocol, ev.unit, ev.function, ev.object),
                        req & ev.is_write & (ev.address >= 0)),
        # the same items for the client with any server of the protocol (its role)
        "talker_role": (hash_columns(7, client, ev.protocol), np.ones(len(ev), bool)),
        "function_role": (hash_columns(4, client, ev.protocol, ev.direction, ev.function, sub), np.ones(len(ev), bool)),
        "write_role": (hash_columns(5, client, ev.protocol, ev.function, ev.object, ev.address), req & ev.is_write),
        "read_role": (hash_columns(6, client, ev.protocol, ev.function, ev.object, ev.address, ev.count),
                      has_addr & ~ev.is_write),
    }


class Table:
    """Sorted keys with per-key count, first/last seen (ns), status and a description for review."""

    def __init__(self):
        self.keys = np.empty(0, np.int64)
        self.count = np.empty(0, np.int64)
        self.first = np.empty(0, np.int64)
        self.last = np.empty(0, np.int64)
        self.status = np.empty(0, np.int8)
        self.info: dict[int, dict] = {}  # key -> fields for `baseline show`

    def __len__(self):
        return int(self.keys.shape[0])

    def find(self, keys: np.ndarray) -> np.ndarray:
        if self.keys.shape[0] == 0:
            return np.full(keys.shape[0], -1)
        i = np.minimum(np.searchsorted(self.keys, keys), self.keys.shape[0] - 1)
        return np.where(self.keys[i] == keys, i, -1)

    def add(self, keys, ts, info_of, cap: int) -> int:
        """Fold keys into the table; returns how many new keys did not fit under ``cap``."""
        uk, first_i, inv = np.unique(keys, return_index=True, return_inverse=True)
        n = np.bincount(inv)
        tmin = np.full(uk.shape[0], np.iinfo(np.int64).max)
        tmax = np.zeros(uk.shape[0], np.int64)
        np.minimum.at(tmin, inv, ts)
        np.maximum.at(tmax, inv, ts)
        pos = self.find(uk)
        old = pos >= 0
        self.count[pos[old]] += n[old]
        self.first[pos[old]] = np.minimum(self.first[pos[old]], tmin[old])
        self.last[pos[old]] = np.maximum(self.last[pos[old]], tmax[old])
        fresh = np.flatnonzero(~old)
        new = fresh[: max(cap - len(self), 0)]
        if new.shape[0]:
            for j in new[: max(INFO_CAP - len(self.info), 0)].tolist():  # keys never seen before: few after
                self.info[int(uk[j])] = info_of(int(first_i[j]))              # the first minutes
            keys_all = np.concatenate([self.keys, uk[new]])
            order = np.argsort(keys_all, kind="stable")
            self.keys = keys_all[order]
            self.count = np.concatenate([self.count, n[new]])[order]
            self.first = np.concatenate([self.first, tmin[new]])[order]
            self.last = np.concatenate([self.last, tmax[new]])[order]
            self.status = np.concatenate([self.status, np.zeros(new.shape[0], np.int8)])[order]
        return int(fresh.shape[0] - new.shape[0])

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("keys", "count", "first", "last", "status")}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str, info: dict) -> "Table":
        t = cls()
        for k in ("keys", "count", "first", "last", "status"):
            setattr(t, k, np.asarray(arrays[f"{prefix}.{k}"]))
        t.info = {int(k): v for k, v in info.items()}
        return t


class AllowList:
    """Learned talkers, functions, written and read ranges; monitoring flags what is new."""

    name = "allowlist"

    def __init__(self, min_count: int = 3, min_span_s: float = 60.0, capacity: int = 20_000):
        self.min_count = int(min_count)
        self.min_span_s = float(min_span_s)
        # A plant has hundreds of talkers and thousands of items, not tens of thousands: past this many
        # entries per table new items are counted (``overflow``), not learned -- a spoofed flood while
        # learning must neither exhaust memory nor become the baseline (the engine says so in one alert)
        self.capacity = int(capacity)
        self.tables = {t: Table() for t in TABLES + ROLE_TABLES}
        self.reported: set = set()  # review items already reported in monitoring
        self.overflow = 0  # items not learned because their table was full
        self.write_ranges: dict[int, list] = {}  # (pair, function, object) -> [lowest, highest] address written

    # -- learning ------------------------------------------------------------------------------
    def learn(self, ev: EventBatch) -> None:
        ev = ev.select(ev.kind == KIND_PDU)
        if len(ev) == 0:
            return
        keys = row_keys(ev)
        rk, rm = keys.pop("write_range")
        keys.pop("write_point")
        if rm.any():  # written address range per (pair, function, object): few keys, a dict is fine
            rows = np.flatnonzero(rm)
            for key, a in zip(rk[rows].tolist(), ev.address[rows].tolist()):
                lo_hi = self.write_ranges.get(key)
                if lo_hi is not None:
                    lo_hi[0], lo_hi[1] = min(lo_hi[0], a), max(lo_hi[1], a)
                elif len(self.write_ranges) < self.capacity:
                    self.write_ranges[key] = [a, a]
        for name, (k, m) in keys.items():
            if m.any():
                rows = np.flatnonzero(m)
                self.overflow += self.tables[name].add(k[rows], ev.ts[rows],
                                                       lambda i, rows=rows: _describe(ev, int(rows[i])), self.capacity)

    def finish_learning(self) -> None:
        """Mark entries seen rarely or in one burst provisional (approved/revoked ones keep their status)."""
        for t in self.tables.values():
            if len(t) == 0:
                continue
            rare = (t.count < self.min_count) | ((t.last - t.first) < self.min_span_s * 1e9)
            keep = (t.status == STATUS_APPROVED) | (t.status == STATUS_REVOKED)
            t.status = np.where(keep, t.status, np.where(rare, STATUS_PROVISIONAL, STATUS_TRUSTED)).astype(np.int8)

    # -- monitoring ----------------------------------------------------------------------------
    def classify(self, ev: EventBatch) -> np.ndarray:
        """Per row: index of the first table where the row is new (0..3), or 4 + table index where it
        hits a provisional entry, or -1 when everything is known.  PDU rows only; point rows get -1."""
        out = np.full(len(ev), -1, np.int64)
        if len(ev) == 0:
            return out
        pdu = ev.kind == KIND_PDU
        mechanics = is_mechanics(ev.protocol, ev.function)
        control = ev.is_control | (event_classes(ev) == CLASS_CONTROL)
        keys = row_keys(ev)
        prov_out = np.full(len(ev), -1, np.int64)
        pair_ok = np.zeros(len(ev), bool)
        for ti, name in enumerate(TABLES):
            k, m = keys[name]
            m = m & pdu & (out < 0)
            if ti > 0:  # an S frame, a TESTFR or a DNP3 confirm is never a "new function"
                m &= ~mechanics
            if ti == 1:
                # what a client does is in its requests; an answer echoes the request (IEC-104 ACT_CON of a
                # command, a Modbus response) or reports process data, which the process model judges
                m &= ev.direction == DIR_REQUEST
            if not m.any():
                continue
            rows = np.flatnonzero(m)
            st = self._status(name, k[m])
            role_st = self._status(name + "_role", keys[name + "_role"][0][m])
            role_ok = (role_st == STATUS_TRUSTED) | (role_st == STATUS_APPROVED)
            new = st == STATUS_REVOKED
            prov = st == STATUS_PROVISIONAL
            if ti == 0:
                pair_ok[rows] = ~new & ~prov
                out[rows[new & role_ok]] = CODE_NEW_PEER  # known client, new server: low severity
                new &= ~role_ok
            else:
                # an item the client uses with other servers of the protocol generalises to a known pair
                known_role = role_ok & pair_ok[rows]
                new &= ~known_role
                prov &= ~known_role
                # a trusted pair's rare reads, writes and diagnostics (an operator's occasional setpoint, a
                # clock sync) wait silently for review in `baseline show`; its rare controls still alert
                prov &= ~pair_ok[rows] | control[rows]
            if ti == 2:
                # an operator commanding the neighbour of a breaker it commands (same trusted pair, same
                # trusted function, same object, an address within the learned range widened by its span
                # or 2) is operations, not a new target; a far address or a new function still alerts
                fst = self._status("function", keys["function"][0][rows])
                fn_ok = (fst == STATUS_TRUSTED) | (fst == STATUS_APPROVED)
                near = self._near_written(keys["write_range"][0][rows], ev.address[rows])
                quiet = pair_ok[rows] & fn_ok & near
                new &= ~quiet
                prov &= ~quiet
            out[rows[new]] = ti
            p = rows[prov & ~new]
            prov_out[p] = np.where(prov_out[p] < 0, 4 + ti, prov_out[p])
        return np.where(out >= 0, out, prov_out)

    def _near_written(self, range_keys: np.ndarray, address: np.ndarray) -> np.ndarray:
        out = np.zeros(range_keys.shape[0], bool)
        for i, (k, a) in enumerate(zip(range_keys.tolist(), address.tolist())):
            lo_hi = self.write_ranges.get(k)
            if lo_hi is not None and a >= 0:
                pad = max(lo_hi[1] - lo_hi[0], 2)
                out[i] = lo_hi[0] - pad <= a <= lo_hi[1] + pad
        return out

    def _status(self, name: str, keys: np.ndarray) -> np.ndarray:
        """Status of each key in a table; never-seen keys read as revoked."""
        t = self.tables[name]
        pos = t.find(keys)
        if len(t) == 0:
            return np.full(keys.shape[0], STATUS_REVOKED, np.int8)
        return np.where(pos >= 0, t.status[np.maximum(pos, 0)], STATUS_REVOKED).astype(np.int8)

    def score(self, ev: EventBatch) -> np.ndarray:
        """1 for a row new to the baseline, 0.5 for one that hits a provisional entry, else 0."""
        c = self.classify(ev)
        return np.where(c < 0, 0.0, np.where(c < 4, 1.0, 0.5))

    def findings(self, ev: EventBatch, scores: np.ndarray | None = None, cls: np.ndarray | None = None) -> list:
        cls = self.classify(ev) if cls is None else cls
        hit = np.flatnonzero(cls >= 0)
        if hit.shape[0] == 0:
            return []
        client, server = channel_of(ev)
        keys = row_keys(ev)
        # a review item (provisional entry, new peer) is reported the first time it is used in
        # monitoring; later uses wait in `baseline show` for the operator's decision
        review = (cls[hit] >= 4) | (cls[hit] == CODE_NEW_PEER)
        if review.any():
            tk = np.empty(hit.shape[0], np.int64)
            for ci in np.unique(cls[hit][review]).tolist():
                m = cls[hit] == ci
                table = "talker" if ci == CODE_NEW_PEER else "write_point" if ci % 4 == 2 else TABLES[ci % 4]
                tk[m] = hash_columns(ci, keys[table][0][hit[m]])
            seen = review & np.isin(tk, np.fromiter(self.reported, np.int64, len(self.reported)))
            if len(self.reported) > self.capacity:  # bounded (a known client sweeping new peers)
                self.reported.clear()
            self.reported.update(tk[review & ~seen].tolist())
            hit = hit[~seen]
            if hit.shape[0] == 0:
                return []
        out = []
        # group: the talker rule by new pair (each new target of a host is its own finding), the others
        # by key
        gk = np.empty(hit.shape[0], np.int64)
        for ci in np.unique(cls[hit]).tolist():
            m = cls[hit] == ci
            name = TABLES[ci % 4] if ci != CODE_NEW_PEER else "talker"
            # one finding per new pair, per peer, or per item of the client's role (all servers together)
            gk[m] = hash_columns(ci, client[hit[m]], server[hit[m]], ev.protocol[hit[m]]) if name == "talker" else \
                hash_columns(ci, keys[name][0][hit[m]]) if ci == CODE_NEW_PEER else \
                hash_columns(ci, keys[name + "_role"][0][hit[m]])
        ug, first_i, inv = np.unique(gk, return_index=True, return_inverse=True)
        for g in range(ug.shape[0]):  # one per distinct new item in the batch
            rows = hit[inv == g]
            r = int(rows[0])
            ci = int(cls[r])
            if ci == CODE_NEW_PEER:
                out.append(self._finding(ev, rows, r, "peer", False, client, server))
            else:
                out.append(self._finding(ev, rows, r, TABLES[ci % 4], ci >= 4, client, server))
        # escalation: what a new talker does is reported function by function (a restart after a
        # read, a write after a scan), each its own finding, not hidden in the talker's count
        esc = hit[(cls[hit] == 0) & (ev.direction[hit] == DIR_REQUEST) & ~is_mechanics(ev.protocol[hit],
                                                                                        ev.function[hit])]
        if esc.shape[0]:
            fk = keys["function_role"][0][esc]
            uf, inv = np.unique(fk, return_inverse=True)
            for g in range(uf.shape[0]):
                rows = esc[inv == g]
                out.append(self._finding(ev, rows, int(rows[0]), "function", False, client, server))
        return out

    def _finding(self, ev, rows, r, table, provisional, client, server) -> Finding:
        proto, fn, sub = int(ev.protocol[r]), int(ev.function[r]), int(ev.subfunction[r])
        c, s = ip_text(client[r]), ip_text(server[r])
        unit, addr = int(ev.unit[r]), int(ev.address[r])
        ptxt = protocol_text(proto)
        fields = {"function": fn, "unit": unit, "address": addr, "count": int(ev.count[r]),
                  "frame": int(ev.frame[r]), "table": table}
        if proto == PROTO_MODBUS and fn in (8, 43):
            fields["subfunction"] = sub
        ftxt = function_text(proto, fn, sub if proto == PROTO_MODBUS else -1)
        technique = _technique(ev, rows, table)
        servers = sorted({ip_text(x) for x in server[rows].tolist()})
        if table == "peer":
            entity = f"{c}/new_peer"  # one review incident per client
            what = f"{c} talked {ptxt} to {s}"
            never = f"{c} talks {ptxt} to other devices but never to this one during the baseline"
        elif table == "talker":
            entity = f"{c}>{s}/{ev.protocol[r]}"
            what = f"{c} talked {ptxt} to {s}"
            never = "this pair never talked during the baseline"
            fields["servers"] = servers
        elif table == "function":
            entity = f"{c}/{proto}/d{int(ev.direction[r])}/f{fn}.{sub}"
            what = f"{c} sent {ptxt} {ftxt} to {', '.join(servers)}" if ev.direction[r] == DIR_REQUEST else \
                f"{', '.join(servers)} answered {c} with {ptxt} {ftxt}"
            never = "this function was never used between them during the baseline"
        elif table == "write":
            entity = f"{c}/{proto}/w.{int(ev.object[r])}.{addr}"  # SELECT and OPERATE of a point: one incident
            what = f"{c} wrote address {addr} on {', '.join(servers)} unit {unit} with {ptxt} {ftxt}"
            never = "this host never wrote there during the baseline"
        else:
            entity = f"{c}/{proto}/r{fn}.{int(ev.object[r])}.{addr}.{int(ev.count[r])}"
            what = f"{c} read {int(ev.count[r])} items from address {addr} on {', '.join(servers)} with {ftxt}"
            never = "this range was never read by this host during the baseline"
        if provisional:
            never = "seen only rarely or in one burst during the baseline (provisional, not yet approved)"
            entity = f"{c}/provisional"  # one review incident per client
        review = provisional or table == "peer"
        if review:
            fields["items"] = [what]
        severity = "low" if provisional else SEVERITY_NEW[table]
        if not provisional and technique in ("T0816", "T0855") and table not in ("read", "peer"):
            severity = "critical" if table in ("talker", "function") and technique == "T0816" else "high"
        return Finding(
            rule=f"allowlist.{'provisional_' if provisional else 'new_'}{table}", detector=self.name,
            severity=severity, first_ts=int(ev.ts[rows].min()), last_ts=int(ev.ts[rows].max()),
            src=int(client[r]), dst=int(server[r]) if len(servers) == 1 else 0,
            protocol=proto, entity=entity, message=f"{what}; {never}", technique=technique,
            count=int(rows.shape[0]), fields=fields, provisional=provisional,
            # src/dst are client/server whichever way the PDU went: the ports must follow them
            sport=int(ev.sport[r] if ev.direction[r] == DIR_REQUEST else ev.dport[r]),
            dport=int(ev.dport[r] if ev.direction[r] == DIR_REQUEST else ev.sport[r]))

    # -- review --------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        out = []
        for name, t in self.tables.items():
            for i in range(len(t)):
                k = int(t.keys[i])
                info = dict(t.info.get(k, {}))
                info["pdu_count"] = info.pop("count", None)  # the PDU's own count field
                out.append({**info, "id": f"{name}:{k & 0xFFFFFFFFFFFFFFFF:016x}", "table": name,
                            "status": STATUS_NAMES[int(t.status[i])], "count": int(t.count[i]),
                            "first_ts": int(t.first[i]), "last_ts": int(t.last[i])})
        return out

    def set_status(self, entry_id: str, status: int) -> bool:
        name, _, hexkey = entry_id.partition(":")
        t = self.tables.get(name)
        if t is None or not hexkey:
            return False
        key = np.array([int(hexkey, 16)], dtype=np.uint64).view(np.int64)
        pos = int(t.find(key)[0])
        if pos < 0:
            return False
        t.status[pos] = status
        return True

    def provisional_count(self) -> int:
        return int(sum(np.count_nonzero(t.status == STATUS_PROVISIONAL) for t in self.tables.values()))

    def size(self) -> int:
        return int(sum(len(t) for t in self.tables.values()))

    def to_state(self) -> tuple[dict, dict]:
        arrays, meta = {}, {"min_count": self.min_count, "min_span_s": self.min_span_s, "info": {},
                            "capacity": self.capacity, "overflow": self.overflow,
                            "write_ranges": {str(k): v for k, v in self.write_ranges.items()}}
        for name, t in self.tables.items():
            arrays.update(t.to_arrays(f"allowlist.{name}"))
            meta["info"][name] = {str(k): v for k, v in t.info.items()}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "AllowList":
        al = cls(min_count=meta["min_count"], min_span_s=meta["min_span_s"],
                 capacity=meta.get("capacity", 20_000))
        al.overflow = int(meta.get("overflow", 0))
        al.write_ranges = {int(k): list(v) for k, v in meta.get("write_ranges", {}).items()}
        for name in TABLES + ROLE_TABLES:
            al.tables[name] = Table.from_arrays(arrays, f"allowlist.{name}", meta["info"].get(name, {}))
        return al


def _technique(ev, rows, table) -> str:
    proto = int(ev.protocol[rows[0]])
    fns = set(ev.function[rows].tolist())
    subs = set(ev.subfunction[rows].tolist())
    if proto == PROTO_MODBUS and 8 in fns and subs & RESTART_FUNCTIONS[(PROTO_MODBUS, 8)]:
        return "T0816"
    if proto == 2 and fns & DNP3_RESTART:
        return "T0816"
    if proto == 3 and fns & IEC104_RESET:
        return "T0816"
    if ev.is_control[rows].any():
        return "T0855"
    if ev.is_write[rows].any():
        return "T0836" if table == "write" else "T0855"
    if proto == PROTO_MODBUS and 43 in fns:
        return "T0888"
    return "T0846"


def _describe(ev: EventBatch, r: int) -> dict:
    client, server = (ev.src[r], ev.dst[r]) if ev.direction[r] == DIR_REQUEST else (ev.dst[r], ev.src[r])
    proto = int(ev.protocol[r])
    return {"client": ip_text(client), "server": ip_text(server), "protocol": protocol_text(proto),
            "unit": int(ev.unit[r]), "direction": "request" if ev.direction[r] == DIR_REQUEST else "response",
            "function": function_text(proto, int(ev.function[r]), int(ev.subfunction[r])
                                      if proto == PROTO_MODBUS else -1),
            "object": int(ev.object[r]), "address": int(ev.address[r]), "count": int(ev.count[r])}
