"""The event batch: one schema shared by the Modbus, DNP3 and IEC 60870-5-104 parsers.

Every parsed PDU becomes one row of ``kind == KIND_PDU``; every process value a PDU carries (a
register in a Modbus read response, a DNP3 object point, an IEC-104 information object) becomes one
row of ``kind == KIND_POINT`` with the ``pdu_id`` of the PDU that carried it.  Feature extraction
reads these columns without knowing which protocol wrote them.

Strings are small integer codes (``protocol``, ``status``, ``reason``); the tables below turn them
back into text at the edges (CLI output, alert messages).

Columns (all NumPy, one value per row): see ``SCHEMA`` below, the one table that defines them --
the event dtype, the defaults of EventBuilder.pdu / .point and of the batch paths'
``parsers.batch.rows`` all come from it; the table is printed here::

"""

from __future__ import annotations

import math
import struct

import numpy as np

PROTO_NONE, PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104 = 0, 1, 2, 3
PROTOCOL_NAMES = {PROTO_NONE: "other", PROTO_MODBUS: "modbus", PROTO_DNP3: "dnp3", PROTO_IEC104: "iec104"}
PROTOCOL_CODES = {v: k for k, v in PROTOCOL_NAMES.items()}

DIR_REQUEST, DIR_RESPONSE = 0, 1
DIRECTION_NAMES = {DIR_REQUEST: "request", DIR_RESPONSE: "response"}

KIND_PDU, KIND_POINT = 0, 1
KIND_NAMES = {KIND_PDU: "pdu", KIND_POINT: "point"}

STATUS_OK, STATUS_EXCEPTION, STATUS_MALFORMED, STATUS_UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = {STATUS_OK: "ok", STATUS_EXCEPTION: "exception", STATUS_MALFORMED: "malformed", STATUS_UNKNOWN: "unknown"}

# Why a row (or a skipped run of bytes) is not OK.  Parsers count these; they never raise.
REASON_NAMES = {
    0: "none",
    1: "truncated",
    2: "bad_length",
    3: "bad_crc",
    4: "unknown_function",
    5: "gap",
    6: "seq_gap",
    7: "seq_repeat",
    8: "bad_header",
    9: "unknown_object",
    10: "unpaired",
    11: "resync",
    12: "too_large",
}
REASON_CODES = {v: k for k, v in REASON_NAMES.items()}
(REASON_NONE, REASON_TRUNCATED, REASON_BAD_LENGTH, REASON_BAD_CRC, REASON_UNKNOWN_FUNCTION, REASON_GAP,
 REASON_SEQ_GAP, REASON_SEQ_REPEAT, REASON_BAD_HEADER, REASON_UNKNOWN_OBJECT, REASON_UNPAIRED,
 REASON_RESYNC, REASON_TOO_LARGE) = range(13)

# Modbus point spaces (Modbus Application Protocol v1.1b3 §4.3 data model).
MB_COIL, MB_DISCRETE_INPUT, MB_INPUT_REGISTER, MB_HOLDING_REGISTER = 0, 1, 3, 4

# -- the schema -------------------------------------------------------------------------------
#
# What a row holds where the parser says nothing: CONTEXT, the stream context of the chunk (parsers
# copy it); SET, written by the builder (protocol, kind, pdu_id); SAME, a point row copies its
# PDU's value; REQUIRED, the parser always gives it; else the value itself.
CONTEXT, SET, SAME, REQUIRED = "context", "set", "same", "required"

#: (name, dtype, PDU row default, point row default, meaning), in column order
SCHEMA = (
    ("ts", "i8", CONTEXT, CONTEXT, "ns since the epoch of the frame that completed the PDU"),
    ("frame", "i8", CONTEXT, CONTEXT, "1-based number of that frame in its capture (Wireshark's frame.number)"),
    ("protocol", "u1", SET, SET, "PROTO_MODBUS / PROTO_DNP3 / PROTO_IEC104"),
    ("src", "u4", CONTEXT, CONTEXT, "IPv4 address (IPv6 hosts are interned, see parsers.decode.AddressBook)"),
    ("dst", "u4", CONTEXT, CONTEXT, "IPv4 address"),
    ("sport", "u2", CONTEXT, CONTEXT, "transport port"),
    ("dport", "u2", CONTEXT, CONTEXT, "transport port"),
    ("flow", "u4", CONTEXT, CONTEXT, "flow id from reassembly (stable while the flow lives)"),
    ("transport", "u1", CONTEXT, CONTEXT, "6 TCP, 17 UDP"),
    ("direction", "u1", CONTEXT, SAME,
     "DIR_REQUEST (master/client/controlling station -> outstation) or DIR_RESPONSE"),
    ("kind", "u1", SET, SET, "KIND_PDU or KIND_POINT"),
    ("pdu_id", "i8", SET, SET, "running id of the PDU; point rows carry their PDU's id"),
    ("function", "i2", REQUIRED, SAME, "Modbus FC (without 0x80), DNP3 application FC, IEC-104 type id or U/S code"),
    ("subfunction", "i4", -1, -1, "Modbus FC 8 sub-function / FC 43 MEI type; -1 when none"),
    ("cause", "i2", -1, -1, "IEC-104 cause of transmission, Modbus exception code; -1 when none"),
    ("unit", "i4", -1, SAME, "Modbus unit id, DNP3 outstation address, IEC-104 common address"),
    ("peer_unit", "i4", -1, SAME, "DNP3 master address; -1 when none"),
    ("seq", "i4", -1, SAME, "Modbus transaction id, DNP3 application SEQ, IEC-104 N(S) (S-frame: -1)"),
    ("ack", "i4", -1, -1, "IEC-104 N(R); -1 when none"),
    ("address", "i8", -1, REQUIRED, "start register / point index / IOA (point rows: the point's own address)"),
    ("count", "i4", 0, 1, "quantity requested / objects carried"),
    ("object", "i2", -1, -1, "point space: Modbus table (MB_COIL..), DNP3 group, IEC-104 type id"),
    ("variation", "i2", -1, -1, "DNP3 variation; -1 otherwise"),
    ("value", "f8", math.nan, REQUIRED, "the point value (NaN on PDU rows)"),
    ("quality", "i4", -1, -1, "DNP3 flags / IEC-104 quality descriptor / DNP3 IIN on responses; -1 none"),
    ("length", "i4", 0, 0, "PDU length in bytes (whole ADU/APDU/link frame)"),
    ("is_write", "?", False, False, "the PDU changes device state (writes, set-points)"),
    ("is_control", "?", False, False, "the PDU operates the process or the device (commands, restarts, stops)"),
    ("status", "u1", STATUS_OK, STATUS_OK, "STATUS_OK / STATUS_EXCEPTION / STATUS_MALFORMED / STATUS_UNKNOWN"),
    ("reason", "u1", REASON_NONE, REASON_NONE, "REASON_* code saying why a row is not OK (REASON_NONE when it is)"),
)
EVENT_DTYPE = np.dtype([(name, dtype) for name, dtype, *_ in SCHEMA])
COLUMNS = tuple(EVENT_DTYPE.names)
#: columns copied from the chunk's stream context
CONTEXT_COLUMNS = tuple(name for name, _, pdu, _, _ in SCHEMA if pdu == CONTEXT)
#: columns a point row copies from its PDU row (unless the parser says otherwise)
SHARED_COLUMNS = tuple(name for name, _, _, point, _ in SCHEMA if point == SAME)
#: the values of a PDU row / a point row where the parser says nothing
PDU_DEFAULTS = {name: pdu for name, _, pdu, _, _ in SCHEMA if pdu not in (CONTEXT, SET, SAME, REQUIRED)}
POINT_DEFAULTS = {name: point for name, _, _, point, _ in SCHEMA if point not in (CONTEXT, SET, SAME, REQUIRED)}
# One row packed exactly as EVENT_DTYPE lays it out (packed, native order): turning a list of row
# tuples into a batch is then one struct pack per row and one frombuffer, several times faster than
# np.array(list_of_tuples, EVENT_DTYPE).
_STRUCT_CODES = {"i8": "q", "u1": "B", "u2": "H", "u4": "I", "i2": "h", "i4": "i", "f8": "d", "?": "?"}
ROW = struct.Struct("=" + "".join(_STRUCT_CODES[dtype] for _, dtype, *_ in SCHEMA))
assert ROW.size == EVENT_DTYPE.itemsize
if __doc__:  # None under python -OO
    __doc__ += "\n".join(f"    {name:<12}{dtype:<4} {meaning}" for name, dtype, _, _, meaning in SCHEMA) + "\n"


class EventBatch:
    """Columns of parsed events.  ``batch.function`` etc. are contiguous NumPy arrays.

    >>> b = EventBatch.empty()
    >>> len(b), b.ts.dtype.name
    (0, 'int64')
    """

    __slots__ = ("_cols", "errors")

    def __init__(self, records: np.ndarray, errors: dict | None = None):
        self._cols = {name: np.ascontiguousarray(records[name]) for name in COLUMNS}
        #: counts of bytes/PDUs a parser could not read: {(protocol_code, reason_code): n}
        self.errors = dict(errors or {})

    def __getattr__(self, name):
        try:
            return self._cols[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self._cols[name]

    def __len__(self) -> int:
        return int(self._cols["ts"].shape[0])

    @classmethod
    def from_columns(cls, columns: dict, errors: dict | None = None) -> "EventBatch":
        """A batch from one contiguous array per column (all of COLUMNS, equal lengths)."""
        out = object.__new__(cls)
        out._cols = {name: columns[name] for name in COLUMNS}
        out.errors = dict(errors or {})
        return out

    @classmethod
    def empty(cls) -> "EventBatch":
        return cls(np.zeros(0, dtype=EVENT_DTYPE))

    @classmethod
    def concat(cls, batches) -> "EventBatch":
        batches = list(batches)
        if not batches:
            return cls.empty()
        errors: dict = {}
        for b in batches:
            for k, v in b.errors.items():
                errors[k] = errors.get(k, 0) + v
        return cls.from_columns({name: np.concatenate([b._cols[name] for b in batches]) for name in COLUMNS}, errors)

    def select(self, mask) -> "EventBatch":
        out = object.__new__(EventBatch)
        out._cols = {k: v[mask] for k, v in self._cols.items()}
        out.errors = dict(self.errors)
        return out

    def to_records(self) -> np.ndarray:
        rec = np.empty(len(self), dtype=EVENT_DTYPE)
        for name in COLUMNS:
            rec[name] = self._cols[name]
        return rec

    @property
    def pdus(self) -> "EventBatch":
        return self.select(self._cols["kind"] == KIND_PDU)

    @property
    def points(self) -> "EventBatch":
        return self.select(self._cols["kind"] == KIND_POINT)


class StreamContext:
    """Where a piece of stream data came from; parsers copy it into every row they emit."""

    __slots__ = ("ts", "frame", "src", "dst", "sport", "dport", "flow", "transport", "direction")

    def __init__(self, ts=0, frame=0, src=0, dst=0, sport=0, dport=0, flow=0, transport=6, direction=0):
        self.ts, self.frame, self.src, self.dst = ts, frame, src, dst
        self.sport, self.dport, self.flow, self.transport, self.direction = sport, dport, flow, transport, direction


_NAN = math.nan


class EventBuilder:
    """Collects rows from a parser's slow path and turns them into an :class:`EventBatch`.

    >>> out = EventBuilder()
    >>> ctx = StreamContext(ts=5, frame=1, src=1, dst=2, sport=1000, dport=502)
    >>> pid = out.pdu(ctx, PROTO_MODBUS, function=3, unit=1, address=0, count=2, length=12)
    >>> _ = out.point(ctx, PROTO_MODBUS, pid, function=3, unit=1, address=0, value=7.0,
    ...               obj=MB_HOLDING_REGISTER)
    >>> b = out.build()
    >>> b.kind.tolist(), b.pdu_id.tolist(), float(b.value[1])
    ([0, 1], [0, 0], 7.0)
    """

    def __init__(self, first_pdu_id: int = 0):
        #: rows not yet turned into arrays: tuples in COLUMNS order.  Parsers on a hot path may
        #: append such tuples here directly (with an id from :meth:`take_pdu_id`).
        self.rows: list[tuple] = []
        self._blocks: list[np.ndarray] = []  # rows already turned into arrays, in order
        self._block_rows = 0  # rows in self._blocks
        # Order tags: (first row, tag or per-row tag array) in row order; empty when nobody tags.
        self._marks: list = []
        self.next_pdu_id = first_pdu_id
        self.errors: dict = {}

    def __len__(self) -> int:
        return len(self.rows) + self._block_rows

    # -- order tags: parsers that read a whole list of chunks at once ---------------------------
    #
    # The pipeline hands each protocol parser all of its chunks of a batch together
    # (``parse_chunks``), so rows arrive grouped by protocol.  Each chunk carries a tag (its place
    # in the batch); build() sorts rows by tag, stably, so the batch reads in chunk order exactly
    # as if the chunks had been fed one by one, and renumbers pdu_id in that order.

    def set_tag(self, tag: int) -> None:
        """Rows appended from now on (until the next tag) belong to the chunk tagged ``tag``."""
        self._marks.append((len(self.rows) + self._block_rows, tag))

    def add_columns(self, columns: dict, tags: np.ndarray | None = None) -> None:
        """Append finished rows given as columns (one array per name in COLUMNS, as a vectorised
        parser writes them), with the tag of each row; rows appended after them keep the last tag."""
        self._flush_rows()
        n = columns["ts"].shape[0]
        if tags is not None and len(tags):
            self._marks.append((self._block_rows, tags))
            self._marks.append((self._block_rows + n, int(tags[-1])))
        self._blocks.append(columns)
        self._block_rows += n

    def take_pdu_id(self) -> int:
        """The next PDU id, for a parser that appends its own row tuples to :attr:`rows`."""
        pid = self.next_pdu_id
        self.next_pdu_id = pid + 1
        return pid

    def pdu(self, ctx: StreamContext, protocol: int, *, function: int, direction: int | None = None,
            subfunction: int = -1, cause: int = -1, unit: int = -1, peer_unit: int = -1, seq: int = -1,
            ack: int = -1, address: int = -1, count: int = 0, obj: int = -1, variation: int = -1,
            quality: int = -1, length: int = 0, is_write: bool = False, is_control: bool = False,
            status: int = STATUS_OK, reason: int = REASON_NONE) -> int:
        """Append one PDU row and return its ``pdu_id``."""
        pid = self.next_pdu_id
        self.next_pdu_id += 1
        self.rows.append((
            ctx.ts, ctx.frame, protocol, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow, ctx.transport,
            ctx.direction if direction is None else direction, KIND_PDU, pid, function, subfunction, cause,
            unit, peer_unit, seq, ack, address, count, obj, variation, _NAN, quality, length, is_write,
            is_control, status, reason,
        ))
        if reason != REASON_NONE:
            self.count_error(protocol, reason)
        return pid

    def point(self, ctx: StreamContext, protocol: int, pdu_id: int, *, function: int, address: int,
              value: float, direction: int | None = None, unit: int = -1, peer_unit: int = -1,
              obj: int = -1, variation: int = -1, quality: int = -1, cause: int = -1, seq: int = -1,
              is_write: bool = False, is_control: bool = False) -> None:
        """Append one process-value row belonging to PDU ``pdu_id``."""
        self.rows.append((
            ctx.ts, ctx.frame, protocol, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow, ctx.transport,
            ctx.direction if direction is None else direction, KIND_POINT, pdu_id, function, -1, cause,
            unit, peer_unit, seq, -1, address, 1, obj, variation, value, quality, 0, is_write, is_control,
            STATUS_OK, REASON_NONE,
        ))

    def points(self, ctx: StreamContext, protocol: int, pdu_id: int, *, function: int, addresses, values,
               direction: int | None = None, unit: int = -1, peer_unit: int = -1, obj=-1, variation=-1,
               quality=-1, cause: int = -1, seq: int = -1, is_write: bool = False,
               is_control: bool = False) -> None:
        """Append many point rows of one PDU at once (a register block, a run of DNP3 points).

        ``addresses`` and ``values`` are equal-length arrays; ``obj``, ``variation`` and ``quality``
        may be scalars or arrays of the same length.  Rows keep their order relative to
        :meth:`pdu` and :meth:`point` calls.

        >>> import numpy as np
        >>> out = EventBuilder()
        >>> ctx = StreamContext(ts=1)
        >>> pid = out.pdu(ctx, PROTO_MODBUS, function=3)
        >>> out.points(ctx, PROTO_MODBUS, pid, function=3, addresses=np.arange(3), values=np.array([5., 6., 7.]))
        >>> out.build().value[1:].tolist()
        [5.0, 6.0, 7.0]
        """
        n = len(addresses)
        if n == 0:
            return
        d = ctx.direction if direction is None else direction
        template = ROW.pack(ctx.ts, ctx.frame, protocol, ctx.src, ctx.dst, ctx.sport, ctx.dport, ctx.flow,
                            ctx.transport, d, KIND_POINT, pdu_id, function, -1, cause, unit, peer_unit, seq, -1,
                            0, 1, 0, 0, 0.0, 0, 0, is_write, is_control, STATUS_OK, REASON_NONE)
        block = np.frombuffer(bytearray(template * n), dtype=EVENT_DTYPE)
        block["address"] = addresses
        block["value"] = values
        block["object"] = obj
        block["variation"] = variation
        block["quality"] = quality
        self._flush_rows()
        self._blocks.append(block)
        self._block_rows += n

    def _flush_rows(self) -> None:
        rows = self.rows
        if rows:
            pack = ROW.pack
            try:
                block = np.frombuffer(bytearray(b"".join([pack(*r) for r in rows])), dtype=EVENT_DTYPE)
            except struct.error:  # a value struct refuses: let NumPy convert (or raise) as it always did
                block = np.array(rows, dtype=EVENT_DTYPE)
            self._blocks.append(block)
            self._block_rows += block.shape[0]
            self.rows = []

    def count_error(self, protocol: int, reason: int, n: int = 1) -> None:
        """Count bytes or PDUs that could not be read (no row is emitted for them)."""
        key = (protocol, reason)
        self.errors[key] = self.errors.get(key, 0) + n

    def build(self) -> EventBatch:
        """Return the rows collected so far as a batch and start afresh."""
        self._flush_rows()
        blocks = self._blocks
        if all(isinstance(b, np.ndarray) for b in blocks):
            if not blocks:
                recs = np.zeros(0, dtype=EVENT_DTYPE)
            elif len(blocks) == 1:
                recs = blocks[0]
            else:  # joining bytes is much cheaper than np.concatenate of structured arrays
                recs = np.frombuffer(bytearray(b"".join([b.tobytes() for b in blocks])), dtype=EVENT_DTYPE)
            columns = {name: np.ascontiguousarray(recs[name]) for name in COLUMNS}
        else:  # some blocks are columns already (vectorised parsers): join column by column
            parts = [b if isinstance(b, dict) else {name: b[name] for name in COLUMNS} for b in blocks]
            columns = {name: np.concatenate([b[name] for b in parts]) for name in COLUMNS}
        if self._marks:
            columns = self._in_tag_order(columns)
        batch = EventBatch.from_columns(columns, self.errors)
        self._blocks = []
        self._block_rows = 0
        self._marks = []
        self.errors = {}
        return batch

    def _in_tag_order(self, columns: dict) -> dict:
        n = columns["ts"].shape[0]
        marks = self._marks
        tags = np.empty(n, dtype=np.int64)
        tags[: marks[0][0]] = -1  # rows before the first tag: no chunk claimed them, keep them first
        for i, (start, tag) in enumerate(marks):
            end = marks[i + 1][0] if i + 1 < len(marks) else n
            if end > start:
                tags[start:end] = tag if np.ndim(tag) == 0 else tag[: end - start]
        if n < 2 or not (tags[1:] < tags[:-1]).any():
            return columns
        order = np.argsort(tags, kind="stable")
        columns = {name: col[order] for name, col in columns.items()}
        # pdu_id is a running number in row order: renumber, and point rows follow their PDU
        ids = columns["pdu_id"]
        old = ids[columns["kind"] == KIND_PDU]
        if old.size:
            first = int(old.min())
            new_id = np.full(int(old.max()) - first + 1, -1, dtype=np.int64)
            new_id[old - first] = first + np.arange(old.size)
            inside = (ids >= first) & (ids - first < new_id.size)
            mapped = new_id[np.where(inside, ids - first, 0)]
            columns["pdu_id"] = np.where(inside & (mapped >= 0), mapped, ids)
        return columns
