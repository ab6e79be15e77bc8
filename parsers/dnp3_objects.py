"""DNP3 application-layer tables: function codes, qualifiers and the object library.

Everything here is data taken from IEEE 1815-2012: function codes (clause 4.2.2.5 and table
4-4), the object header qualifier (clause 4.2.2.7.3), internal indications (clause 4.2.2.6) and
the fixed object sizes and layouts of Annex A (the object library).  ``parsers.dnp3`` does the
walking; this module says how long an object is and where its value and flags sit.

>>> FUNCTION_NAMES[5], function_name(77)
('DIRECT_OPERATE', 'unknown-77')
>>> OBJECTS[(30, 1)].size, OBJECTS[(30, 1)].struct.format
(5, '<Bi')
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- Application function codes (IEEE 1815-2012 clause 4.2.2.5, table 4-4) -------------------
FUNCTION_NAMES = {
    0: "CONFIRM", 1: "READ", 2: "WRITE", 3: "SELECT", 4: "OPERATE", 5: "DIRECT_OPERATE",
    6: "DIRECT_OPERATE_NR", 7: "IMMED_FREEZE", 8: "IMMED_FREEZE_NR", 9: "FREEZE_CLEAR",
    10: "FREEZE_CLEAR_NR", 11: "FREEZE_AT_TIME", 12: "FREEZE_AT_TIME_NR", 13: "COLD_RESTART",
    14: "WARM_RESTART", 15: "INITIALIZE_DATA", 16: "INITIALIZE_APPL", 17: "START_APPL",
    18: "STOP_APPL", 19: "SAVE_CONFIG", 20: "ENABLE_UNSOLICITED", 21: "DISABLE_UNSOLICITED",
    22: "ASSIGN_CLASS", 23: "DELAY_MEASURE", 24: "RECORD_CURRENT_TIME", 25: "OPEN_FILE",
    26: "CLOSE_FILE", 27: "DELETE_FILE", 28: "GET_FILE_INFO", 29: "AUTHENTICATE_FILE",
    30: "ABORT_FILE", 31: "ACTIVATE_CONFIG", 32: "AUTHENTICATE_REQ", 33: "AUTH_REQ_NO_ACK",
    129: "RESPONSE", 130: "UNSOLICITED_RESPONSE", 131: "AUTHENTICATE_RESP",
}
RESPONSE_FUNCTIONS = frozenset((129, 130, 131))
# Functions whose object headers carry no object data, only headers (and, for indexed
# qualifiers, the indices): READ, the immediate freezes, (dis)enable unsolicited, assign class
# (IEEE 1815-2012 clauses 4.4.1, 4.4.7-4.4.8, 4.4.11-4.4.13).
HEADER_ONLY_FUNCTIONS = frozenset((1, 7, 8, 9, 10, 20, 21, 22))
#: PDUs that change stored state in the outstation: WRITE, the control functions carrying CROB or
#: analog output blocks, freeze-and-clear (counters reset), SAVE_CONFIG, ASSIGN_CLASS,
#: DELETE_FILE, ACTIVATE_CONFIG.
WRITE_FUNCTIONS = frozenset((2, 3, 4, 5, 6, 9, 10, 19, 22, 27, 31))
#: PDUs that operate the process or the device: controls, restarts, initialise, start/stop
#: application, disabling unsolicited reporting, activating a configuration.
CONTROL_FUNCTIONS = frozenset((3, 4, 5, 6, 13, 14, 15, 16, 17, 18, 21, 31))

# --- Data-link function codes (IEEE 1815-2012 clause 9.2.4.1.3, tables 9-1 and 9-2) -----------
LINK_PRIMARY_NAMES = {
    0: "RESET_LINK_STATES", 2: "TEST_LINK_STATES", 3: "CONFIRMED_USER_DATA",
    4: "UNCONFIRMED_USER_DATA", 9: "REQUEST_LINK_STATUS",
}
LINK_SECONDARY_NAMES = {0: "ACK", 1: "NACK", 11: "LINK_STATUS", 15: "NOT_SUPPORTED"}
#: ``function`` column of link-layer-only rows: LINK_PRIMARY_BASE + code (PRM=1) or
#: LINK_SECONDARY_BASE + code (PRM=0), so they never collide with application codes (0..255).
LINK_PRIMARY_BASE, LINK_SECONDARY_BASE = 1000, 1100


def function_name(code: int) -> str:
    """Name of an application function code, or of a link-only code (1000+/1100+).

    >>> function_name(129), function_name(1009), function_name(1111)
    ('RESPONSE', 'LINK_REQUEST_LINK_STATUS', 'LINK_LINK_STATUS')
    """
    if code >= LINK_SECONDARY_BASE:
        return "LINK_" + LINK_SECONDARY_NAMES.get(code - LINK_SECONDARY_BASE, f"unknown-{code - LINK_SECONDARY_BASE}")
    if code >= LINK_PRIMARY_BASE:
        return "LINK_" + LINK_PRIMARY_NAMES.get(code - LINK_PRIMARY_BASE, f"unknown-{code - LINK_PRIMARY_BASE}")
    return FUNCTION_NAMES.get(code, f"unknown-{code}")


# --- Internal indications (IEEE 1815-2012 clause 4.2.2.6), as tshark shows them: IIN1 << 8 | IIN2
IIN_NAMES = {
    0x0100: "BROADCAST", 0x0200: "CLASS_1_EVENTS", 0x0400: "CLASS_2_EVENTS", 0x0800: "CLASS_3_EVENTS",
    0x1000: "NEED_TIME", 0x2000: "LOCAL_CONTROL", 0x4000: "DEVICE_TROUBLE", 0x8000: "DEVICE_RESTART",
    0x0001: "NO_FUNC_CODE_SUPPORT", 0x0002: "OBJECT_UNKNOWN", 0x0004: "PARAMETER_ERROR",
    0x0008: "EVENT_BUFFER_OVERFLOW", 0x0010: "ALREADY_EXECUTING", 0x0020: "CONFIG_CORRUPT",
    0x0040: "RESERVED_2", 0x0080: "RESERVED_1",
}


def iin_names(iin: int) -> list[str]:
    """>>> iin_names(0x9002)
    ['DEVICE_RESTART', 'NEED_TIME', 'OBJECT_UNKNOWN']
    """
    return [IIN_NAMES[b] for b in (0x8000, 0x4000, 0x2000, 0x1000, 0x0800, 0x0400, 0x0200, 0x0100,
                                   0x0080, 0x0040, 0x0020, 0x0010, 0x0008, 0x0004, 0x0002, 0x0001) if iin & b]


# --- Object header qualifier (IEEE 1815-2012 clause 4.2.2.7.3, tables 4-5 and 4-6) ------------
#: range specifier code -> (struct of the range field, kind): "startstop", "count", "none"
RANGE_FIELDS = {
    0x0: (struct.Struct("<BB"), "startstop"),
    0x1: (struct.Struct("<HH"), "startstop"),
    0x2: (struct.Struct("<II"), "startstop"),
    0x3: (struct.Struct("<BB"), "startstop"),  # virtual addresses (obsolete, same layout)
    0x4: (struct.Struct("<HH"), "startstop"),
    0x5: (struct.Struct("<II"), "startstop"),
    0x6: (None, "none"),
    0x7: (struct.Struct("<B"), "count"),
    0x8: (struct.Struct("<H"), "count"),
    0x9: (struct.Struct("<I"), "count"),
    0xB: (struct.Struct("<B"), "count"),  # variable-format qualifier: count, objects carry a size prefix
}
#: object prefix code -> (octets, meaning): "index" or "size" (table 4-5)
PREFIXES = {0: (0, None), 1: (1, "index"), 2: (2, "index"), 3: (4, "index"), 4: (1, "size"),
            5: (2, "size"), 6: (4, "size")}

# --- Object library (IEEE 1815-2012 Annex A) ---------------------------------------------------
# How to turn one fixed-size object into a point row.
V_RAW, V_BIT7, V_DBIT, V_TIME48 = 0, 1, 2, 3


class ObjectLayout(NamedTuple):
    size: int            # octets per object
    struct: struct.Struct
    value_at: int        # index of the value in the unpacked tuple (-1: none)
    flags_at: int        # index of flags / status in the unpacked tuple (-1: none)
    convert: int = V_RAW  # V_BIT7: value is flags bit 7; V_DBIT: flags bits 7-6; V_TIME48: lo | hi << 32


def _lay(fmt: str, value_at: int, flags_at: int, convert: int = V_RAW) -> ObjectLayout:
    s = struct.Struct("<" + fmt)
    return ObjectLayout(s.size, s, value_at, flags_at, convert)


FLAG = _lay("B", 0, 0, V_BIT7)             # binary with flags: state in bit 7 (A.2, A.3, A.8...)
DFLAG = _lay("B", 0, 0, V_DBIT)            # double-bit with flags: state in bits 7-6 (A.4, A.5)
FLAG_T48 = _lay("BIH", 0, 0, V_BIT7)       # flags + 48-bit absolute time
DFLAG_T48 = _lay("BIH", 0, 0, V_DBIT)
FLAG_T16 = _lay("BH", 0, 0, V_BIT7)        # flags + 16-bit relative time
DFLAG_T16 = _lay("BH", 0, 0, V_DBIT)
CTR32F, CTR16F, CTR32, CTR16 = _lay("BI", 1, 0), _lay("BH", 1, 0), _lay("I", 0, -1), _lay("H", 0, -1)
CTR32FT, CTR16FT = _lay("BIIH", 1, 0), _lay("BHIH", 1, 0)
AI32F, AI16F, AI32, AI16 = _lay("Bi", 1, 0), _lay("Bh", 1, 0), _lay("i", 0, -1), _lay("h", 0, -1)
AIFLTF, AIDBLF = _lay("Bf", 1, 0), _lay("Bd", 1, 0)
AI32FT, AI16FT, AIFLTFT, AIDBLFT = _lay("BiIH", 1, 0), _lay("BhIH", 1, 0), _lay("BfIH", 1, 0), _lay("BdIH", 1, 0)
AIFLT, AIDBL = _lay("f", 0, -1), _lay("d", 0, -1)

OBJECTS: dict[tuple[int, int], ObjectLayout] = {
    # A.2-A.5 binary and double-bit inputs (with flags) and their events
    (1, 2): FLAG, (2, 1): FLAG, (2, 2): FLAG_T48, (2, 3): FLAG_T16,
    (3, 2): DFLAG, (4, 1): DFLAG, (4, 2): DFLAG_T48, (4, 3): DFLAG_T16,
    # A.6-A.9 binary output status, events, command events
    (10, 2): FLAG, (11, 1): FLAG, (11, 2): FLAG_T48, (13, 1): FLAG, (13, 2): FLAG_T48,
    # A.10-A.11 CROB and pattern control block: control code, count, on, off, status
    (12, 1): _lay("BBIIB", 0, 4), (12, 2): _lay("BBIIB", 0, 4),
    # A.12-A.15 counters, frozen counters, counter events, frozen counter events
    (20, 1): CTR32F, (20, 2): CTR16F, (20, 3): CTR32F, (20, 4): CTR16F,
    (20, 5): CTR32, (20, 6): CTR16, (20, 7): CTR32, (20, 8): CTR16,
    (21, 1): CTR32F, (21, 2): CTR16F, (21, 3): CTR32F, (21, 4): CTR16F, (21, 5): CTR32FT,
    (21, 6): CTR16FT, (21, 7): CTR32FT, (21, 8): CTR16FT, (21, 9): CTR32, (21, 10): CTR16,
    (21, 11): CTR32, (21, 12): CTR16,
    (22, 1): CTR32F, (22, 2): CTR16F, (22, 3): CTR32F, (22, 4): CTR16F, (22, 5): CTR32FT,
    (22, 6): CTR16FT, (22, 7): CTR32FT, (22, 8): CTR16FT,
    (23, 1): CTR32F, (23, 2): CTR16F, (23, 3): CTR32F, (23, 4): CTR16F, (23, 5): CTR32FT,
    (23, 6): CTR16FT, (23, 7): CTR32FT, (23, 8): CTR16FT,
    # A.16-A.20 analog inputs, frozen analog inputs, events, frozen events, deadbands
    (30, 1): AI32F, (30, 2): AI16F, (30, 3): AI32, (30, 4): AI16, (30, 5): AIFLTF, (30, 6): AIDBLF,
    (31, 1): AI32F, (31, 2): AI16F, (31, 3): AI32FT, (31, 4): AI16FT, (31, 5): AI32, (31, 6): AI16,
    (31, 7): AIFLTF, (31, 8): AIDBLF,
    (32, 1): AI32F, (32, 2): AI16F, (32, 3): AI32FT, (32, 4): AI16FT, (32, 5): AIFLTF, (32, 6): AIDBLF,
    (32, 7): AIFLTFT, (32, 8): AIDBLFT,
    (33, 1): AI32F, (33, 2): AI16F, (33, 3): AI32FT, (33, 4): AI16FT, (33, 5): AIFLTF, (33, 6): AIDBLF,
    (33, 7): AIFLTFT, (33, 8): AIDBLFT,
    (34, 1): _lay("H", 0, -1), (34, 2): _lay("I", 0, -1), (34, 3): AIFLT,
    # A.21-A.24 analog output status, output block (value + control status), events, command events
    (40, 1): AI32F, (40, 2): AI16F, (40, 3): AIFLTF, (40, 4): AIDBLF,
    (41, 1): _lay("iB", 0, 1), (41, 2): _lay("hB", 0, 1), (41, 3): _lay("fB", 0, 1), (41, 4): _lay("dB", 0, 1),
    (42, 1): AI32F, (42, 2): AI16F, (42, 3): AI32FT, (42, 4): AI16FT, (42, 5): AIFLTF, (42, 6): AIDBLF,
    (42, 7): AIFLTFT, (42, 8): AIDBLFT,
    (43, 1): AI32F, (43, 2): AI16F, (43, 3): AI32FT, (43, 4): AI16FT, (43, 5): AIFLTF, (43, 6): AIDBLF,
    (43, 7): AIFLTFT, (43, 8): AIDBLFT,
    # A.25-A.28 time and date (48-bit ms since 1970 UTC), CTO, time delay
    (50, 1): _lay("IH", 0, -1, V_TIME48), (50, 2): _lay("IHI", 0, -1, V_TIME48),
    (50, 3): _lay("IH", 0, -1, V_TIME48), (50, 4): _lay("IHIB", 0, -1, V_TIME48),
    (51, 1): _lay("IH", 0, -1, V_TIME48), (51, 2): _lay("IH", 0, -1, V_TIME48),
    (52, 1): _lay("H", 0, -1), (52, 2): _lay("H", 0, -1),
    # A.31 device storage, A.38-39 BCD, unsigned integer; A.44 security statistics
    (81, 1): _lay("BH", 1, 0), (101, 1): _lay("H", 0, -1), (101, 2): _lay("I", 0, -1),
    (101, 3): _lay("Q", 0, -1), (102, 1): _lay("B", 0, -1),
    (121, 1): _lay("BHI", 2, 0), (122, 1): _lay("BHI", 2, 0), (122, 2): _lay("BHIIH", 2, 0),
}

#: packed objects: (group, variation) -> bits per point (A.2 g1v1, A.4 g3v1, A.6 g10v1,
#: A.11 g12v3 pattern mask, A.30 g80v1 internal indications)
PACKED_BITS = {(1, 1): 1, (3, 1): 2, (10, 1): 1, (12, 3): 1, (80, 1): 1}

#: groups whose variation is the object's length in octets (A.34-A.37: octet strings, virtual
#: terminal); no point rows, skipped by that length.
LENGTH_IS_VARIATION = frozenset((110, 111, 112, 113))

#: groups that carry no object data in any function (A.29 class data; A.1 group 0 in requests
#: is handled by the caller).  Variation 0 of any group means "any variation" and is header-only.
NO_DATA_GROUPS = frozenset((60,))

#: groups turned into point rows (the process values feature extraction reads)
POINT_GROUPS = frozenset((1, 2, 3, 4, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33, 34,
                          40, 41, 42, 43, 50, 51, 52, 80, 101, 102, 121, 122))

# --- Group 0 device attributes (IEEE 1815-2012 clause A.1, data types table A-1...) ----------
ATTRIBUTE_TYPES = {1: "VSTR", 2: "UINT", 3: "INT", 4: "FLT", 5: "OSTR", 6: "BSTR", 254: "U8BS8LIST",
                   255: "U8BS8EXLIST"}
ATTRIBUTE_NAMES = {
    209: "secure_auth_version", 210: "num_security_stat_per_assoc", 211: "user_specific_attributes",
    212: "num_master_defined_data_set_protos", 213: "num_outstation_defined_data_set_protos",
    214: "num_master_defined_data_sets", 215: "num_outstation_defined_data_sets",
    216: "max_binary_outputs_per_request", 217: "local_timing_accuracy", 218: "duration_of_time_accuracy",
    219: "supports_analog_output_events", 220: "max_analog_output_index", 221: "num_analog_outputs",
    222: "supports_binary_output_events", 223: "max_binary_output_index", 224: "num_binary_outputs",
    225: "supports_frozen_counter_events", 226: "supports_frozen_counters", 227: "supports_counter_events",
    228: "max_counter_index", 229: "num_counters", 230: "supports_frozen_analog_inputs",
    231: "supports_analog_input_events", 232: "max_analog_input_index", 233: "num_analog_inputs",
    234: "supports_double_bit_input_events", 235: "max_double_bit_input_index",
    236: "num_double_bit_inputs", 237: "supports_binary_input_events", 238: "max_binary_input_index",
    239: "num_binary_inputs", 240: "max_tx_fragment_size", 241: "max_rx_fragment_size",
    242: "device_manufacturer_software_version", 243: "device_manufacturer_hardware_version",
    244: "user_assigned_owner_name", 245: "user_assigned_location", 246: "user_assigned_id_code",
    247: "user_assigned_device_name", 248: "device_serial_number", 249: "dnp3_subset_and_conformance",
    250: "device_manufacturer_product_name", 252: "device_manufacturer_name",
    254: "all_attributes_request", 255: "list_of_attribute_variations",
}


def attribute_name(variation: int) -> str:
    """>>> attribute_name(252), attribute_name(3)
    ('device_manufacturer_name', 'unknown-3')
    """
    return ATTRIBUTE_NAMES.get(variation, f"unknown-{variation}")


def attribute_value(type_code: int, raw: bytes):
    """Decode one device attribute value (A.1): strings as text, numbers as int/float.

    >>> attribute_value(1, b"ACME"), attribute_value(2, b"\\x00\\x08"), attribute_value(4, bytes(4))
    ('ACME', 2048, 0.0)
    """
    if type_code == 1:
        return raw.decode("latin-1")
    if type_code in (2, 3) and 1 <= len(raw) <= 8:
        return int.from_bytes(raw, "little", signed=type_code == 3)
    if type_code == 4 and len(raw) in (4, 8):
        return struct.unpack("<f" if len(raw) == 4 else "<d", raw)[0]
    return raw.hex()
