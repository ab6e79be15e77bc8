"""Point spaces: which process value a row's address names, shared by every model of process values.

A point is (server, protocol, unit, space, address).  The *space* says which numbering an address lives
in: a Modbus table, a DNP3 point type (static, event and command groups of one type share their
indices), an IEC-104 common address (an IOA names one point whatever type reports it), except commands.
:mod:`models.process` and :mod:`models.relations` both key their tables this way; this module is the one
home of that fact, so neither imports the other for it.
"""

from __future__ import annotations

import numpy as np

from parsers.events import DIR_REQUEST, PROTO_DNP3, PROTO_IEC104, EventBatch

from .features import hash_columns


# DNP3 groups that report the same point (IEEE 1815-2012 Table 9): static, event and command
# objects of one point space share their index; g12 (CROB) carries control codes, not values.
_DNP3_SPACE = {1: 1, 2: 1, 3: 3, 4: 3, 10: 10, 11: 10, 20: 20, 21: 20, 22: 20, 23: 20,
               30: 30, 31: 30, 32: 30, 33: 30, 34: 30, 40: 40, 41: 40, 42: 40, 43: 40}
_DNP3_LUT = np.arange(256, dtype=np.int64)
for _g, _s in _DNP3_SPACE.items():
    _DNP3_LUT[_g] = _s


def point_space(ev: EventBatch) -> np.ndarray:
    """The point space a row's address lives in: Modbus table; DNP3 group family; IEC-104: one space
    per common address (an IOA names one point whatever type reports it, IEC 60870-5-101 §7.2.5),
    except commands (type ids 45-69), whose IOAs are their own."""
    return space_of(ev.object, ev.protocol)


def space_of(obj: np.ndarray, protocol: np.ndarray) -> np.ndarray:
    """:func:`point_space` from the object and protocol columns."""
    obj = obj.astype(np.int64)
    dnp = _DNP3_LUT[np.clip(obj, 0, 255)]
    iec = np.where((obj >= 45) & (obj <= 69), obj, 0)
    return np.where(protocol == PROTO_DNP3, dnp, np.where(protocol == PROTO_IEC104, iec, obj))


def point_keys(ev: EventBatch, rows: np.ndarray | None = None):
    """(server, point key, role key) of every row, or of ``rows`` (indices) without copying the batch."""
    col = (lambda c: ev[c]) if rows is None else (lambda c: ev[c][rows])  # noqa: E731
    protocol, address = col("protocol"), col("address")
    server = np.where(col("direction") == DIR_REQUEST, col("dst"), col("src"))
    space = space_of(col("object"), protocol)
    key = hash_columns(21, server, protocol, col("unit"), space, address)
    role = hash_columns(22, protocol, space, address)
    return server, key, role


