"""Function classes: what a PDU does, in five words shared by Modbus, DNP3 and IEC 60870-5-104.

``read`` (fetch process data), ``write`` (change stored values or settings), ``control`` (operate
the process or the device: commands, restarts, start/stop), ``diagnostic`` (identification,
counters, tests, time), ``file`` (file transfer), and ``other`` for everything that is none of
these: DNP3 responses and confirms, link-layer-only DNP3 frames, IEC 104 S and U frames,
authentication, and codes the standards do not define.

The lookup is one ``uint8`` table per protocol, indexed with the event ``function`` column, so a
whole event batch is classified with one fancy-indexing step (:func:`function_class`).  A few codes
depend on their sub-function (Modbus FC 8 diagnostics, FC 90 UMAS); for these the table holds
:data:`CLASS_BY_FLAGS` and the parser's own ``is_control``/``is_write`` flags decide, falling back
to :data:`FLAG_FALLBACK`.

>>> import numpy as np
>>> from parsers.events import PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104
>>> proto = np.array([PROTO_MODBUS, PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104, PROTO_IEC104])
>>> fc = np.array([3, 16, 5, 45, 513])
>>> [CLASS_NAMES[c] for c in function_class(proto, fc)]
['read', 'write', 'control', 'control', 'other']
"""

from __future__ import annotations

import numpy as np

from parsers.events import PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS

CLASS_OTHER, CLASS_READ, CLASS_WRITE, CLASS_CONTROL, CLASS_DIAGNOSTIC, CLASS_FILE = range(6)
CLASS_NAMES = {CLASS_OTHER: "other", CLASS_READ: "read", CLASS_WRITE: "write", CLASS_CONTROL: "control",
               CLASS_DIAGNOSTIC: "diagnostic", CLASS_FILE: "file"}
CLASS_CODES = {v: k for k, v in CLASS_NAMES.items()}
N_CLASSES = len(CLASS_NAMES)
#: table entry meaning "the event's is_control / is_write flags decide"
CLASS_BY_FLAGS = 255

#: size of every table: covers Modbus FCs (0-127), DNP3 application (0-255) and link-only codes
#: (1000-1115), IEC 104 type ids (0-255) and S/U codes (512-519).  Codes outside map to "other".
TABLE_SIZE = 2048


def _table(entries: dict) -> np.ndarray:
    t = np.full(TABLE_SIZE, CLASS_OTHER, dtype=np.uint8)
    for cls, codes in entries.items():
        t[list(codes)] = cls
    return t


# Modbus Application Protocol v1.1b3 §5.1 (public function code table) and §6.
MODBUS = _table({
    CLASS_READ: (1, 2, 3, 4, 24),                  # read coils/inputs/registers, read FIFO queue
    CLASS_WRITE: (5, 6, 15, 16, 22, 23),           # write single/multiple, mask write, read/write
    CLASS_DIAGNOSTIC: (7, 11, 12, 17, 43),         # §5.1 "Diagnostics" group; 43/14 device id
    CLASS_FILE: (20, 21),                          # read/write file record
    CLASS_BY_FLAGS: (8, 90),                       # FC 8 sub-functions, UMAS (vendor, Schneider)
})
# IEEE 1815-2012 clause 4.2.2.5, table 4-4.
DNP3 = _table({
    CLASS_READ: (1,),                              # READ
    CLASS_WRITE: (2, 9, 10, 19, 22),               # WRITE, FREEZE_CLEAR(_NR), SAVE_CONFIG, ASSIGN_CLASS
    CLASS_CONTROL: (3, 4, 5, 6, 7, 8, 11, 12,      # SELECT/OPERATE/DIRECT_OPERATE(_NR), freezes
                    13, 14, 15, 16, 17, 18,        # restarts, INITIALIZE_*, START/STOP_APPL
                    20, 21, 31),                   # (DIS)ENABLE_UNSOLICITED, ACTIVATE_CONFIG
    CLASS_DIAGNOSTIC: (23, 24),                    # DELAY_MEASURE, RECORD_CURRENT_TIME
    CLASS_FILE: range(25, 31),                     # OPEN/CLOSE/DELETE_FILE, GET_FILE_INFO, AUTH/ABORT
})
# IEC 60870-5-101 §7.2.1.1 type ids (with the -104 §8 additions).
IEC104 = _table({
    CLASS_READ: (*range(1, 41), 100, 101, 102),    # monitor direction; interrogations, read command
    CLASS_CONTROL: (45, 46, 47, 58, 59, 60, 105),  # single/double/step commands, reset process
    CLASS_WRITE: (48, 49, 50, 51, 61, 62, 63, 64,  # set-points, bitstring commands
                  103, 110, 111, 112, 113),        # clock synchronisation, parameters
    CLASS_DIAGNOSTIC: (70, 104, 106, 107),         # end of initialisation, test, delay acquisition
    CLASS_FILE: range(120, 128),                   # file transfer
})

#: [protocol, function] -> class; row 0 (non-ICS) is all "other"
CLASS_TABLE = np.stack([np.full(TABLE_SIZE, CLASS_OTHER, np.uint8), MODBUS, DNP3, IEC104])
assert CLASS_TABLE.shape[0] == max(PROTO_MODBUS, PROTO_DNP3, PROTO_IEC104) + 1

#: class of a CLASS_BY_FLAGS code whose PDU is neither control nor write
FLAG_FALLBACK = {(PROTO_MODBUS, 8): CLASS_DIAGNOSTIC, (PROTO_MODBUS, 90): CLASS_READ}


def function_class(protocol, function, is_write=None, is_control=None) -> np.ndarray:
    """Class code per row of equal-length ``protocol`` and ``function`` arrays (event columns).

    Codes that depend on their sub-function use ``is_control`` then ``is_write`` (when given),
    else :data:`FLAG_FALLBACK`.

    >>> import numpy as np
    >>> p = np.array([PROTO_MODBUS] * 3); f = np.array([8, 8, 90])
    >>> [CLASS_NAMES[c] for c in function_class(p, f, is_write=np.array([1, 0, 0], bool),
    ...                                         is_control=np.array([1, 0, 0], bool))]
    ['control', 'diagnostic', 'read']
    """
    protocol = np.asarray(protocol).astype(np.intp)
    function = np.asarray(function).astype(np.intp)
    ok = (function >= 0) & (function < TABLE_SIZE) & (protocol >= 0) & (protocol < CLASS_TABLE.shape[0])
    out = np.where(ok, CLASS_TABLE[np.where(ok, protocol, 0), np.where(ok, function, 0)], CLASS_OTHER)
    out = out.astype(np.uint8)
    flagged = out == CLASS_BY_FLAGS
    if flagged.any():
        resolved = np.full(int(flagged.sum()), CLASS_OTHER, np.uint8)
        fp, ff = protocol[flagged], function[flagged]
        for (p, f), cls in FLAG_FALLBACK.items():
            resolved[(fp == p) & (ff == f)] = cls
        if is_write is not None:
            resolved[np.asarray(is_write)[flagged]] = CLASS_WRITE
        if is_control is not None:
            resolved[np.asarray(is_control)[flagged]] = CLASS_CONTROL
        out[flagged] = resolved
    return out


#: Link and transport mechanics, not functions a user calls: IEC-104 S frames and STARTDT/TESTFR U
#: frames (sent when the t1-t3 timers and the k/w counters say so, IEC 60870-5-104 §5), DNP3 link-only
#: frames (1000+/1100+: link status, ACK, reset link) and application CONFIRM (function 0).  The allow-list
#: learns who exchanges them (a new talker is still new) but never reports one as a "new function".
#: STOPDT (515/516) is left out on purpose: stopping data transfer is an act, not a timer.
MECHANICS = {PROTO_IEC104: (512, 513, 514, 517, 518), PROTO_DNP3: (0,)}


def is_mechanics(protocol, function) -> np.ndarray:
    """Per row: the PDU is protocol mechanics (see :data:`MECHANICS`).

    >>> is_mechanics(np.array([PROTO_IEC104, PROTO_IEC104, PROTO_DNP3, PROTO_DNP3, PROTO_MODBUS]),
    ...              np.array([512, 515, 1009, 3, 0])).tolist()
    [True, False, True, False, False]
    """
    protocol = np.asarray(protocol)
    function = np.asarray(function)
    out = (protocol == PROTO_DNP3) & (function >= 1000)
    for p, codes in MECHANICS.items():
        out |= (protocol == p) & np.isin(function, codes)
    return out


def event_classes(events) -> np.ndarray:
    """Class code per row of an :class:`~parsers.events.EventBatch` (PDU and point rows alike)."""
    return function_class(events.protocol, events.function, events.is_write, events.is_control)


def class_name(code: int) -> str:
    """>>> class_name(2), class_name(9)
    ('write', 'unknown-9')
    """
    return CLASS_NAMES.get(int(code), f"unknown-{int(code)}")
