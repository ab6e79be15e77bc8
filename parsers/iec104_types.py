"""IEC 60870-5-101/104 name tables and the layout of every standard information element.

Type identifications are those of IEC 60870-5-101 §7.2.1.1 (table 8 and the -101 Amd.2 process
types), the additions of IEC 60870-5-104 §8 (types 58-64 and 107 with CP56Time2a time tags, 127
query log), and the secure-authentication types 81-95 of IEC 60870-5-7 / IEC 62351-5.  Causes of
transmission are IEC 60870-5-101 §7.2.3 (table 14).

``ELEMENTS[type_id]`` says how one information element (the part of an information object after
its 3-octet address) is laid out: a little-endian :mod:`struct` format (time tags are pad bytes,
``3x`` for CP24Time2a and ``7x`` for CP56Time2a, §7.2.6.19 / §7.2.6.18) and the *kind* that tells the
parser how to turn the unpacked fields into a ``(value, quality)`` pair.

>>> type_name(13), type_name(200)
('M_ME_NC_1', 'unknown-200')
>>> cause_name(20), cause_name(63)
('inrogen', 'unknown-63')
>>> ELEMENTS[36].size, ELEMENTS[36].kind   # float + QDS + CP56Time2a
(12, 'flt_qds')
>>> u_function_name(517)
'TESTFR act'
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- Type identification: IEC 60870-5-101 §7.2.1.1, IEC 60870-5-104 §8, IEC 60870-5-7 -----------
TYPE_NAMES = {
    # Process information in monitor direction (-101 table 8)
    1: "M_SP_NA_1", 2: "M_SP_TA_1", 3: "M_DP_NA_1", 4: "M_DP_TA_1", 5: "M_ST_NA_1", 6: "M_ST_TA_1",
    7: "M_BO_NA_1", 8: "M_BO_TA_1", 9: "M_ME_NA_1", 10: "M_ME_TA_1", 11: "M_ME_NB_1", 12: "M_ME_TB_1",
    13: "M_ME_NC_1", 14: "M_ME_TC_1", 15: "M_IT_NA_1", 16: "M_IT_TA_1", 17: "M_EP_TA_1", 18: "M_EP_TB_1",
    19: "M_EP_TC_1", 20: "M_PS_NA_1", 21: "M_ME_ND_1",
    30: "M_SP_TB_1", 31: "M_DP_TB_1", 32: "M_ST_TB_1", 33: "M_BO_TB_1", 34: "M_ME_TD_1", 35: "M_ME_TE_1",
    36: "M_ME_TF_1", 37: "M_IT_TB_1", 38: "M_EP_TD_1", 39: "M_EP_TE_1", 40: "M_EP_TF_1",
    41: "S_IT_TC_1",
    # Process information in control direction
    45: "C_SC_NA_1", 46: "C_DC_NA_1", 47: "C_RC_NA_1", 48: "C_SE_NA_1", 49: "C_SE_NB_1", 50: "C_SE_NC_1",
    51: "C_BO_NA_1",
    # -104 §8: commands with CP56Time2a time tag
    58: "C_SC_TA_1", 59: "C_DC_TA_1", 60: "C_RC_TA_1", 61: "C_SE_TA_1", 62: "C_SE_TB_1", 63: "C_SE_TC_1",
    64: "C_BO_TA_1",
    # System information in monitor direction
    70: "M_EI_NA_1",
    # Secure authentication (IEC 60870-5-7, IEC 62351-5)
    81: "S_CH_NA_1", 82: "S_RP_NA_1", 83: "S_AR_NA_1", 84: "S_KR_NA_1", 85: "S_KS_NA_1", 86: "S_KC_NA_1",
    87: "S_ER_NA_1", 90: "S_US_NA_1", 91: "S_UQ_NA_1", 92: "S_UR_NA_1", 93: "S_UK_NA_1", 94: "S_UA_NA_1",
    95: "S_UC_NA_1",
    # System information in control direction
    100: "C_IC_NA_1", 101: "C_CI_NA_1", 102: "C_RD_NA_1", 103: "C_CS_NA_1", 104: "C_TS_NA_1",
    105: "C_RP_NA_1", 106: "C_CD_NA_1", 107: "C_TS_TA_1",
    # Parameters in control direction
    110: "P_ME_NA_1", 111: "P_ME_NB_1", 112: "P_ME_NC_1", 113: "P_AC_NA_1",
    # File transfer (-101 §7.3.6; 127 is the -104 §8 query log)
    120: "F_FR_NA_1", 121: "F_SR_NA_1", 122: "F_SC_NA_1", 123: "F_LS_NA_1", 124: "F_AF_NA_1",
    125: "F_SG_NA_1", 126: "F_DR_TA_1", 127: "F_SC_NB_1",
}

# --- Cause of transmission: IEC 60870-5-101 §7.2.3, table 14 (6 bits; T and P/N are separate) -----
COT_NAMES = {
    1: "percyc", 2: "back", 3: "spont", 4: "init", 5: "req", 6: "act", 7: "actcon", 8: "deact",
    9: "deactcon", 10: "actterm", 11: "retrem", 12: "retloc", 13: "file",
    14: "auth", 15: "seskey", 16: "usrkey",  # IEC 60870-5-7
    20: "inrogen", **{20 + g: f"inro{g}" for g in range(1, 17)},
    37: "reqcogen", 38: "reqco1", 39: "reqco2", 40: "reqco3", 41: "reqco4",
    44: "unknown_type", 45: "unknown_cause", 46: "unknown_common_address", 47: "unknown_ioa",
}

# --- APCI functions as event ``function`` codes (type ids stay 0-255; these are outside) ------------
# IEC 60870-5-104 §5.2 (S format), §5.3 (U format: one of six function bits set in octet 1).
FUNC_S = 512
U_FUNCTIONS = {  # U-format function bits (control octet 1 >> 2) -> event function code
    0x01: 513,  # STARTDT act
    0x02: 514,  # STARTDT con
    0x04: 515,  # STOPDT act
    0x08: 516,  # STOPDT con
    0x10: 517,  # TESTFR act
    0x20: 518,  # TESTFR con
}
FUNC_U_INVALID = 519  # a U frame with no or several function bits set
APCI_FUNCTION_NAMES = {
    FUNC_S: "S", 513: "STARTDT act", 514: "STARTDT con", 515: "STOPDT act", 516: "STOPDT con",
    517: "TESTFR act", 518: "TESTFR con", FUNC_U_INVALID: "U invalid",
}


def type_name(type_id: int) -> str:
    return TYPE_NAMES.get(type_id, f"unknown-{type_id}")


def cause_name(cot: int) -> str:
    return COT_NAMES.get(cot, f"unknown-{cot}")


def u_function_name(function: int) -> str:
    return APCI_FUNCTION_NAMES.get(function, f"unknown-{function}")


def function_name(function: int) -> str:
    """Name of an event ``function`` code: a type id, or the S/U codes above."""
    return type_name(function) if 0 <= function < 256 else u_function_name(function)


# --- Which types operate or change the outstation ---------------------------------------------------
# Commands (-101 §7.3.2 and §7.3.4, -104 §8): process commands 45-51/58-64, system commands 100-107.
CONTROL_TYPES = frozenset(range(45, 52)) | frozenset(range(58, 65)) | frozenset(range(100, 108))
# Commands that write a value or a setting: set-points and bitstring commands (48-51, 61-64),
# clock synchronisation (103), parameter loading and activation (110-113, -101 §7.3.5).
WRITE_TYPES = frozenset({48, 49, 50, 51, 61, 62, 63, 64, 103, 110, 111, 112, 113})


class Element(NamedTuple):
    kind: str  # how to turn the unpacked fields into (value, quality); see parsers.iec104
    fmt: str  # struct format of one element (without the IOA), little-endian
    size: int
    struct: struct.Struct  # the element alone (SQ=1 runs)
    with_ioa: struct.Struct  # IOA (3 octets as H + B) followed by the element (SQ=0 objects)


def _element(kind: str, fmt: str) -> Element:
    alone = struct.Struct("<" + fmt)
    return Element(kind, fmt, alone.size, alone, struct.Struct("<HB" + fmt))


CP24, CP56 = "3x", "7x"  # CP24Time2a (-101 §7.2.6.19), CP56Time2a (§7.2.6.18): not exported

# Information element layouts, -101 §7.3 (one clause per type) and -104 §8.
ELEMENTS = {
    1: _element("siq", "B"),                 # §7.3.1.1  SIQ
    2: _element("siq", "B" + CP24),          # §7.3.1.2  SIQ + CP24Time2a
    3: _element("diq", "B"),                 # §7.3.1.3  DIQ
    4: _element("diq", "B" + CP24),          # §7.3.1.4
    5: _element("vti_qds", "BB"),            # §7.3.1.5  VTI + QDS
    6: _element("vti_qds", "BB" + CP24),     # §7.3.1.6
    7: _element("bsi_qds", "IB"),            # §7.3.1.7  BSI + QDS
    8: _element("bsi_qds", "IB" + CP24),     # §7.3.1.8
    9: _element("nva_qds", "hB"),            # §7.3.1.9  NVA + QDS
    10: _element("nva_qds", "hB" + CP24),    # §7.3.1.10
    11: _element("sva_qds", "hB"),           # §7.3.1.11 SVA + QDS
    12: _element("sva_qds", "hB" + CP24),    # §7.3.1.12
    13: _element("flt_qds", "fB"),           # §7.3.1.13 IEEE STD 754 + QDS
    14: _element("flt_qds", "fB" + CP24),    # §7.3.1.14
    15: _element("bcr", "iB"),               # §7.3.1.15 BCR
    16: _element("bcr", "iB" + CP24),        # §7.3.1.16
    17: _element("sep", "BH" + CP24),        # §7.3.1.17 SEP + CP16Time2a + CP24Time2a
    18: _element("spe_qdp", "BBH" + CP24),   # §7.3.1.18 SPE + QDP + CP16Time2a + CP24Time2a
    19: _element("spe_qdp", "BBH" + CP24),   # §7.3.1.19 OCI + QDP + CP16Time2a + CP24Time2a
    20: _element("bsi_qds", "IB"),           # §7.3.1.20 SCD + QDS
    21: _element("nva", "h"),                # §7.3.1.21 NVA without quality
    30: _element("siq", "B" + CP56),         # §7.3.1.22
    31: _element("diq", "B" + CP56),         # §7.3.1.23
    32: _element("vti_qds", "BB" + CP56),    # §7.3.1.24
    33: _element("bsi_qds", "IB" + CP56),    # §7.3.1.25
    34: _element("nva_qds", "hB" + CP56),    # §7.3.1.26
    35: _element("sva_qds", "hB" + CP56),    # §7.3.1.27
    36: _element("flt_qds", "fB" + CP56),    # §7.3.1.28
    37: _element("bcr", "iB" + CP56),        # §7.3.1.29
    38: _element("sep", "BH" + CP56),        # §7.3.1.30
    39: _element("spe_qdp", "BBH" + CP56),   # §7.3.1.31
    40: _element("spe_qdp", "BBH" + CP56),   # §7.3.1.32
    41: _element("aid_bcr", "HiB" + CP56),   # IEC 60870-5-7: AID + BCR + CP56Time2a
    45: _element("sco", "B"),                # §7.3.2.1  SCO
    46: _element("dco", "B"),                # §7.3.2.2  DCO
    47: _element("dco", "B"),                # §7.3.2.3  RCO (same bit layout as DCO)
    48: _element("nva_qds", "hB"),           # §7.3.2.4  NVA + QOS
    49: _element("sva_qds", "hB"),           # §7.3.2.5  SVA + QOS
    50: _element("flt_qds", "fB"),           # §7.3.2.6  IEEE STD 754 + QOS
    51: _element("bsi", "I"),                # §7.3.2.7  BSI
    58: _element("sco", "B" + CP56),         # -104 §8.1
    59: _element("dco", "B" + CP56),         # -104 §8.2
    60: _element("dco", "B" + CP56),         # -104 §8.3
    61: _element("nva_qds", "hB" + CP56),    # -104 §8.4
    62: _element("sva_qds", "hB" + CP56),    # -104 §8.5
    63: _element("flt_qds", "fB" + CP56),    # -104 §8.6
    64: _element("bsi", "I" + CP56),         # -104 §8.7
    70: _element("octet", "B"),              # §7.3.3    COI
    100: _element("octet", "B"),             # §7.3.4.1  QOI
    101: _element("octet", "B"),             # §7.3.4.2  QCC
    102: _element("none", ""),               # §7.3.4.3  read: the IOA alone
    103: _element("cp56", "HBBBBB"),         # §7.3.4.4  CP56Time2a
    104: _element("word", "H"),              # §7.3.4.5  FBP (fixed test pattern 0x55AA)
    105: _element("octet", "B"),             # §7.3.4.6  QRP
    106: _element("word", "H"),              # §7.3.4.7  CP16Time2a delay
    107: _element("word", "H" + CP56),       # -104 §8.8 TSC + CP56Time2a
    110: _element("nva_qds", "hB"),          # §7.3.5.1  NVA + QPM
    111: _element("sva_qds", "hB"),          # §7.3.5.2  SVA + QPM
    112: _element("flt_qds", "fB"),          # §7.3.5.3  IEEE STD 754 + QPM
    113: _element("octet", "B"),             # §7.3.5.4  QPA
    120: _element("word", "H4x"),            # §7.3.6.1  NOF LOF FRQ (value: name of file)
    121: _element("word", "H5x"),            # §7.3.6.2  NOF NOS LOF SRQ
    122: _element("word", "H2x"),            # §7.3.6.3  NOF NOS SCQ
    123: _element("word", "H3x"),            # §7.3.6.4  NOF NOS LSQ CHS
    124: _element("word", "H2x"),            # §7.3.6.5  NOF NOS AFQ
    126: _element("word", "H11x"),           # §7.3.6.7  NOF LOF SOF CP56Time2a
    127: _element("word", "H" + CP56 + CP56),  # -104 §8.9 NOF + range start/stop CP56Time2a
}
# Named types whose element length varies (segment, secure authentication): header only.
VARIABLE_TYPES = frozenset({125}) | frozenset(t for t in TYPE_NAMES if 81 <= t <= 95)
