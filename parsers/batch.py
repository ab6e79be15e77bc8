"""Reading a whole list of chunks at once: the shared pieces of the parsers' batch paths.

A parser's ``feed`` reads one chunk with Python per PDU.  Its ``feed_batch`` reads all chunks the
pipeline made from one frame batch together: the chunk bytes are joined into one buffer, PDU
boundaries are found by a compiled walk over that buffer, header fields are gathered with NumPy for
all PDUs at once, and the rows are written as whole arrays.  Anything unusual (a partial PDU held
from an earlier chunk, a bad header, a function the batch path does not read) goes to ``feed`` or
to the parser's per-PDU code, in order, so the rows are exactly those ``feed`` would write (tests
compare both paths row by row on every capture).

>>> from parsers.base import Chunk
>>> cols = ChunkColumns([Chunk(b"ab", ts=5, flow=1), Chunk(b"cde", ts=6, flow=2, direction=1)])
>>> cols.buf[:5].tobytes(), cols.start.tolist(), cols.end.tolist(), cols.direction.tolist()
(b'abcde', [0, 2], [2, 5], [0, 1])
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from .base import ChunkTable
from .events import (
    CONTEXT_COLUMNS, EVENT_DTYPE, KIND_PDU, KIND_POINT, PDU_DEFAULTS, POINT_DEFAULTS, REASON_GAP, REASON_TRUNCATED,
    SHARED_COLUMNS,
)

def compiled(fn):
    """``fn`` compiled by Numba, cached on disk so only the first run pays the compilation (the
    cache lives in ``__pycache__`` beside the source, or in ``$NUMBA_CACHE_DIR``; the agent's
    service sets that to its cache directory).  Where no cache directory is writable it is
    compiled in every process instead; where Numba is missing, ``fn`` itself (its plain-Python
    twin).  Numba is imported here, when a walk is compiled, not when this module is: the edge
    path (pure NumPy, ``parsers.modbus_batch.frame_simple``) never loads it (~160 MB)."""
    try:  # Numba is installed with PyOD
        import numba
    except Exception:  # pragma: no cover - exercised only where numba is missing
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


PADDING = 64


class ChunkColumns:
    """The chunks of one batch as columns: ``buf`` (all their bytes, joined), ``start``/``end``
    (each chunk's bytes in ``buf``), the stream context of each chunk and its ``gap`` and
    ``datagram`` flags.

    With ``held`` (a parser's bytes held per ``(flow, direction)`` from earlier chunks: a partial
    PDU; anything with ``pop(key, None)``, such as the parser's own dict), the bytes are laid out
    stream by stream instead: for each stream the held bytes (taken
    out of ``held``), then its chunks in order, so a PDU split over chunks is contiguous in ``buf``.
    ``layout`` lists the chunks in that order, ``head[c]`` is where chunk ``c``'s stream bytes begin
    (before ``start[c]`` when held bytes precede it) and ``stream_first[k]`` says whether
    ``layout[k]`` opens its stream.
    """

    __slots__ = ("chunks", "raw", "buf", "start", "end", "head", "layout", "stream_first", "ts", "frame", "src",
                 "dst", "sport", "dport", "flow", "transport", "direction", "gap", "datagram", "tags")

    def __init__(self, chunks, tags=None, held: dict | None = None):
        self.chunks = chunks
        n = len(chunks)
        table = chunks if isinstance(chunks, ChunkTable) else None
        if table is not None:  # columns already (reassembly's array path)
            for name in ("ts", "frame", "flow", "direction", "gap", "datagram", "src", "dst", "sport", "dport",
                         "transport"):
                setattr(self, name, getattr(table, name))
            keys = self.flow.astype(np.int64) * 2 + self.direction
        else:
            for name, dtype in (("ts", np.int64), ("frame", np.int64), ("flow", np.uint32), ("direction", np.uint8),
                                ("gap", bool), ("datagram", bool)):
                setattr(self, name, np.fromiter(map(attrgetter(name), chunks), dtype=dtype, count=n))
            # Addresses, ports and transport are those of the flow and direction: read them once per
            # stream, not once per chunk.
            keys = self.flow.astype(np.int64) * 2 + self.direction
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            per_stream = np.array([(c.src, c.dst, c.sport, c.dport, c.transport)
                                   for c in [chunks[i] for i in first.tolist()]], dtype=np.int64).reshape(-1, 5)
            for j, (name, dtype) in enumerate((("src", np.uint32), ("dst", np.uint32), ("sport", np.uint16),
                                               ("dport", np.uint16), ("transport", np.uint8))):
                setattr(self, name, per_stream[:, j].astype(dtype)[inverse])
        if table is not None:
            lens = table.end - table.start
        else:
            datas = [c.data for c in chunks]
            lens = np.fromiter(map(len, datas), dtype=np.int64, count=n)
        if held is None:
            self.layout = np.arange(n)
            self.stream_first = np.ones(n, dtype=bool)
            extra = np.zeros(n, np.int64)
            tails = {}
        else:
            self.layout = np.argsort(keys, kind="stable")
            sorted_keys = keys[self.layout]
            self.stream_first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] if n else np.zeros(0, bool)
            extra = np.zeros(n, np.int64)  # held bytes laid out before each chunk (layout order)
            tails = {}  # layout position -> held bytes
            if held:
                flow, direction = self.flow[self.layout], self.direction[self.layout]
                for k in np.flatnonzero(self.stream_first).tolist():
                    tail = held.pop((int(flow[k]), int(direction[k])), None)
                    if tail:
                        tails[k] = bytes(tail)
                        extra[k] = len(tail)
        # zero padding after the last chunk: header fields can be gathered for every PDU without
        # bounds checks (a parser only uses a field when the PDU's length says it is there)
        if table is not None:
            joined = table.joined(None if held is None else self.layout)
            if tails:  # the held bytes go in before their stream's first chunk
                at = sorted(tails)
                cut = (np.cumsum(lens[self.layout]) - lens[self.layout])[at]
                parts = np.split(joined, cut)
                pieces = [parts[0].tobytes()]
                for k, part in zip(at, parts[1:]):
                    pieces += [tails[k], part.tobytes()]
                self.raw = b"".join(pieces) + bytes(PADDING)
            else:
                self.raw = joined.tobytes() + bytes(PADDING)
        else:
            pieces = datas if held is None else [datas[i] for i in self.layout.tolist()]
            for k, tail in tails.items():
                pieces[k] = tail + bytes(pieces[k])
            self.raw = b"".join(pieces) + bytes(PADDING)
        self.buf = np.frombuffer(self.raw, dtype=np.uint8)
        piece_end = np.cumsum(lens[self.layout] + extra)
        self.start = np.empty(n, np.int64)
        self.end = np.empty(n, np.int64)
        self.head = np.empty(n, np.int64)
        self.end[self.layout] = piece_end
        self.start[self.layout] = piece_end - lens[self.layout]
        self.head[self.layout] = piece_end - lens[self.layout] - extra
        #: each chunk's order tag (EventBuilder.set_tag), or None when the caller keeps order itself
        self.tags = None if tags is None else np.asarray(tags, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chunks)

    def u16(self, pos: np.ndarray) -> np.ndarray:
        """Big-endian 16-bit words at byte positions ``pos`` of ``buf``."""
        b = self.buf
        return (b[pos].astype(np.int64) << 8) | b[pos + 1]


# Defaults and shared columns: parsers.events.SCHEMA.
_COLUMN_TYPES = [(name, EVENT_DTYPE[name]) for name in EVENT_DTYPE.names]


def rows(cols: ChunkColumns, chunk: np.ndarray, protocol: int, first_pdu_id: int, pdu: dict,
         n_points: np.ndarray | None = None, point: dict | None = None) -> tuple[dict, np.ndarray]:
    """The rows of a run of PDUs, as columns: each PDU row followed by its ``n_points`` point rows.

    ``chunk`` is the chunk of each PDU (its stream context comes from there); ``pdu`` and ``point``
    map column names to values (arrays of one value per PDU / per point, PDU by PDU, or scalars),
    over the defaults of EventBuilder.pdu / .point; point rows copy direction, function, unit,
    peer_unit and seq from their PDU unless ``point`` says otherwise.  ``pdu_id`` counts from
    ``first_pdu_id``.  Returns (columns, index of the PDU each row belongs to).
    """
    n = chunk.shape[0]
    if n_points is None or not n_points.any():
        return _pdu_rows(cols, chunk, protocol, first_pdu_id, pdu), np.arange(n)
    point = point or {}
    per_pdu = n_points + 1
    owner = np.repeat(np.arange(n), per_pdu)
    total = owner.shape[0]
    pdu_row = np.cumsum(per_pdu) - per_pdu
    point_row = np.ones(total, dtype=bool)
    point_row[pdu_row] = False
    point_row = np.flatnonzero(point_row)
    src_chunk = chunk[owner]
    out = {name: getattr(cols, name)[src_chunk] for name in CONTEXT_COLUMNS if name not in pdu}
    out["protocol"] = np.full(total, protocol, np.uint8)
    out["kind"] = np.full(total, KIND_POINT, np.uint8)
    out["kind"][pdu_row] = KIND_PDU
    out["pdu_id"] = owner + first_pdu_id
    for name, dtype in _COLUMN_TYPES:
        if name in out:
            continue
        pv = pdu[name] if name in pdu else PDU_DEFAULTS[name]
        if name in point:
            qv = point[name]
        elif name in SHARED_COLUMNS:
            out[name] = np.asarray(pv, dtype=dtype)[owner] if np.ndim(pv) else np.full(total, pv, dtype)
            continue
        else:
            qv = POINT_DEFAULTS[name]
        col = np.empty(total, dtype)
        col[pdu_row] = pv
        col[point_row] = qv
        out[name] = col
    return out, owner


def _pdu_rows(cols: ChunkColumns, chunk: np.ndarray, protocol: int, first_pdu_id: int, pdu: dict) -> dict:
    """``rows`` without point rows: every column straight from ``pdu`` or the defaults."""
    n = chunk.shape[0]
    out = {name: getattr(cols, name)[chunk] for name in CONTEXT_COLUMNS if name not in pdu}
    out["protocol"] = np.full(n, protocol, np.uint8)
    out["kind"] = np.full(n, KIND_PDU, np.uint8)
    out["pdu_id"] = np.arange(first_pdu_id, first_pdu_id + n)
    for name, dtype in _COLUMN_TYPES:
        if name not in out:
            v = pdu[name] if name in pdu else PDU_DEFAULTS[name]
            out[name] = np.ascontiguousarray(v, dtype=dtype) if np.ndim(v) else np.full(n, v, dtype)
    return out


def count_dropped(out, protocol: int, dropped: np.ndarray, counted: np.ndarray | None = None) -> None:
    """Count what a stream walk dropped (``dropped`` per chunk: 1 a gap dropped held bytes, 2 a
    datagram had bytes left over) as ``gap`` / ``truncated`` errors, for the chunks ``counted``
    (all when None: chunks that go to ``feed`` instead count their own)."""
    if not dropped.any():
        return
    for flag, reason in ((1, REASON_GAP), (2, REASON_TRUNCATED)):
        hit = dropped == flag
        n = int(np.count_nonzero(hit if counted is None else hit & counted))
        if n:
            out.count_error(protocol, reason, n)


def point_offsets(n_points: np.ndarray) -> np.ndarray:
    """For each point row (PDU by PDU), its index within its PDU: 0, 1, ..., n - 1.

    >>> point_offsets(np.array([2, 0, 3])).tolist()
    [0, 1, 0, 1, 2]
    """
    total = int(n_points.sum())
    return np.arange(total) - np.repeat(np.cumsum(n_points) - n_points, n_points)
