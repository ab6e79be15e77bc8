"""Request floods: requests per second from a client to a server against what that pair, that server or
the plant as a whole did while learning (a denial of service, ATT&CK for ICS T0814).

The cycle model's ``cycle.burst`` judges one *known* channel (one function) against its own
maximum; a flood from a host that never talked, or spread over many functions, has no channel to
compare with.  This model keeps the largest number of requests seen in one second

- per (client, server, protocol) pair,
- per (server, protocol), all clients together,
- for the whole plant (the busiest pair),

and in monitoring compares each pair-second with the most specific one it has: ``max(4 * learned,
learned + 20)`` requests.  A new client is judged against what its server took from everybody, a
new server against the busiest pair of the plant, and nothing at all against 20 per second.

>>> import numpy as np
>>> from parsers.events import EventBuilder, StreamContext, PROTO_MODBUS
>>> b = EventBuilder()
>>> for t in range(60):  # the master polls once a second
...     _ = b.pdu(StreamContext(ts=t * 10**9, src=1, dst=2), PROTO_MODBUS, function=3, unit=1, address=0, count=2)
>>> fm = FloodModel(); fm.learn(b.build()); fm.finish_learning()
>>> for i in range(500):  # another host: 500 reads in one second
...     _ = b.pdu(StreamContext(ts=100 * 10**9 + i * 10**6, src=9, dst=2), PROTO_MODBUS, function=3, unit=1,
...               address=0, count=2)
>>> [(f.rule, f.count, f.threshold) for f in fm.findings(b.build())]
[('cycle.flood', 500, 21.0)]
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, KIND_PDU, EventBatch

from .features import NS, channel_of, hash_columns
from .findings import Finding, ip_text, protocol_text

FLOOR = 20  # requests in one second that never count as a flood by themselves


def _limit(learned):
    return np.maximum(4 * learned, learned + FLOOR)


class FloodModel:
    name = "cycle"

    def __init__(self, capacity: int = 20_000):
        self.capacity = capacity
        self.pair: dict[int, int] = {}
        self.server: dict[int, int] = {}
        self.plant = 0
        self._tables = None

    @staticmethod
    def _keys(ev: EventBatch):
        client, server = channel_of(ev)
        return client, server, hash_columns(12, client, server, ev.protocol), hash_columns(13, server, ev.protocol)

    @staticmethod
    def _requests(ev: EventBatch) -> EventBatch:
        return ev.select((ev.kind == KIND_PDU) & (ev.direction == DIR_REQUEST))

    def _per_second(self, keys, ts):
        uk, first, n = np.unique(hash_columns(keys, ts // NS), return_index=True, return_counts=True)
        return keys[first], n, first

    # -- learning ------------------------------------------------------------------------------
    def learn(self, ev: EventBatch) -> None:
        ev = self._requests(ev)
        if len(ev) == 0:
            return
        _, _, pk, sk = self._keys(ev)
        for keys, table in ((pk, self.pair), (sk, self.server)):
            k, n, _ = self._per_second(keys, ev.ts)
            # the largest count per key in this batch, then merged into the (bounded) table
            order = np.lexsort((n, k))
            k, n = k[order], n[order]
            last = np.r_[k[1:] != k[:-1], True]
            for key, m in zip(k[last].tolist(), n[last].tolist()):
                if key in table:
                    table[key] = max(table[key], m)
                elif len(table) < self.capacity:
                    table[key] = m
        self.plant = max(self.plant, max(self.pair.values(), default=0))
        self._tables = None

    def finish_learning(self) -> None:
        self._tables = None

    def _sorted(self):
        if self._tables is None:
            def arr(d):
                k = np.array(sorted(d), dtype=np.int64)
                return k, np.array([d[x] for x in k.tolist()], dtype=np.int64)
            self._tables = (arr(self.pair), arr(self.server))
        return self._tables

    @staticmethod
    def _lookup(table, keys):
        k, v = table
        if k.shape[0] == 0:
            return np.full(keys.shape[0], -1, np.int64)
        i = np.minimum(np.searchsorted(k, keys), k.shape[0] - 1)
        return np.where(k[i] == keys, v[i], -1)

    # -- monitoring ----------------------------------------------------------------------------
    def findings(self, ev: EventBatch) -> list:
        ev = self._requests(ev)
        if len(ev) == 0:
            return []
        client, server, pk, sk = self._keys(ev)
        k, n, first = self._per_second(pk, ev.ts)
        pairs, servers = self._sorted()
        learned_pair = self._lookup(pairs, k)
        learned_server = self._lookup(servers, sk[first])
        # the most specific reference there is: the pair, else the server, else the busiest pair
        ref = np.where(learned_pair >= 0, learned_pair, np.where(learned_server >= 0, learned_server, self.plant))
        limit = _limit(ref)
        out = []
        seen = set()
        for q in np.flatnonzero(n > limit).tolist():
            key = int(k[q])
            if key in seen:  # one finding per pair and batch (its busiest second)
                continue
            seen.add(key)
            rows = np.flatnonzero(pk == key)
            r = int(first[q])
            sec = ev.ts[rows] // NS
            busiest = int(np.bincount(sec - sec.min()).max())
            c, s, p = ip_text(client[r]), ip_text(server[r]), int(ev.protocol[r])
            basis = ("this pair" if learned_pair[q] >= 0 else f"{s} from all clients" if learned_server[q] >= 0
                     else "the busiest pair of the plant")
            out.append(Finding(
                rule="cycle.flood", detector=self.name, severity="high",
                first_ts=int(ev.ts[rows].min()), last_ts=int(ev.ts[rows].max()), src=int(client[r]),
                dst=int(server[r]), protocol=p, entity=f"{c}>{s}/{p}/flood",
                message=(f"{c} sent {busiest} {protocol_text(p)} requests in one second to {s} (at most "
                         f"{int(ref[q])} per second for {basis} during the baseline): a flood, denial of service"),
                technique="T0814", count=int(rows.shape[0]), score=float(busiest), threshold=float(limit[q]),
                fields={"requests_per_s": busiest, "baseline_per_s": int(ref[q]), "basis": basis},
                sport=int(ev.sport[r]), dport=int(ev.dport[r])))
        return out

    # -- persistence ---------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict]:
        return {}, {"pair": {str(k): v for k, v in self.pair.items()},
                    "server": {str(k): v for k, v in self.server.items()}, "plant": self.plant}

    @classmethod
    def from_state(cls, arrays, meta) -> "FloodModel":
        m = cls()
        m.pair = {int(k): int(v) for k, v in meta.get("pair", {}).items()}
        m.server = {int(k): int(v) for k, v in meta.get("server", {}).items()}
        m.plant = int(meta.get("plant", 0))
        return m
