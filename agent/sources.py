"""Capture file sources: pcap and pcapng (optionally gzip-compressed) read into frame batches.

The format is chosen by magic number, never by file name (public captures named ``.pcap`` are
sometimes pcapng).  Files are read in large blocks; each block becomes one
:class:`~parsers.frames.FrameBatch` whose buffer *is* the block, so frame bytes are never copied.

pcap (tcpdump.org "PCAP Capture File Format"): 24-byte global header, then records of a 16-byte
header (ts_sec, ts_frac, incl_len, orig_len) and ``incl_len`` bytes.  Both byte orders, micro- and
nanosecond magic.  Finding where each record starts is a sequential walk (each header says where
the next one is) and is the one loop here that cannot be vectorised; it is compiled with Numba.
Everything else (timestamps, lengths) is gathered with array indexing.

pcapng (IETF draft-ietf-opsawg-pcapng): section header, interface description (link type,
``if_tsresol``, ``if_tsoffset``), enhanced, simple and obsolete packet blocks, several sections and
interfaces.  Streamed like pcap, one block of the file at a time (memory does not grow with the
file or its gzip ratio): a compiled walk finds the packet blocks, the rare section headers and
interface descriptions are read in Python, and the per-interface timestamp scaling is done on
whole arrays.  Timestamps are checked: an ``if_tsresol``/``if_tsoffset`` the arithmetic cannot
hold, or a time outside 1970..2106, skips the frame and counts it (``bad_timestamps``).

A record cut short by the end of the file (a capture copied while it was being written) keeps
every complete frame before it; ``reader.truncated`` says how many bytes were left over.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from parsers.frames import SUPPORTED_LINKTYPES, FrameBatch

from .errors import InputError

BLOCK_SIZE = 8 << 20
# Wireshark's limit for any pcapng block (MAX_BLOCK_SIZE): a longer section header is corrupt, and
# no block is ever buffered whole beyond it.
MAX_BLOCK = 16 << 20
# Capture times are accepted from 1970 up to 2^32 s (2106, the end of pcap's 32-bit seconds); a
# pcapng timestamp outside is counted (``bad_timestamps``) and its frame skipped.
MAX_TS_S = 1 << 32
# Wireshark's limit for one frame (WTAP_MAX_PACKET_SIZE_STANDARD); a larger record length means
# the file is corrupt, not that a frame is big.
MAX_RECORD = 262144

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER = 0x1A2B3C4D


class CaptureError(InputError):
    """The file is not a capture we can read (or is corrupt beyond the point already read)."""


def _scan_pcap_records(buf, start, swapped, max_record):
    """Offsets of the complete pcap records in ``buf[start:]``.

    Returns ``(offsets, end, status)``: offsets of the 16-byte record headers, the position just
    after the last complete record, and 0 (ran out of bytes) or 1 (a corrupt length field).
    The plain Python form of the loop, compiled by Numba when available::

        pos = start
        while pos + 16 <= len(buf):
            incl = u32(buf, pos + 8)
            if incl > max_record: corrupt
            if pos + 16 + incl > len(buf): break
            offsets.append(pos); pos += 16 + incl
    """
    n = buf.shape[0]
    out = np.empty(max(16, (n - start) // 16 + 1), dtype=np.int64)
    count = 0
    pos = start
    status = 0
    while pos + 16 <= n:
        p = pos + 8
        if swapped:
            incl = (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16) | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
        else:
            incl = np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 3]) << 24)
        if incl > max_record:
            status = 1
            break
        if pos + 16 + incl > n:
            break
        out[count] = pos
        count += 1
        pos += 16 + incl
    return out[:count], pos, status


try:  # Numba is installed with PyOD; the pure-Python loop above is the fallback and the reference.
    import numba

    _scan_pcap_records_fast = numba.njit(cache=True, nogil=True)(_scan_pcap_records)
except Exception:  # pragma: no cover - exercised only where numba is missing
    _scan_pcap_records_fast = _scan_pcap_records


def _scan_pcapng_blocks(buf, start, swapped, max_block):
    """The packet blocks (enhanced 6, simple 3, obsolete 2) in ``buf[start:]``, other blocks skipped.

    Returns ``(offsets, types, end, status)``; status 0: ran out of bytes, 1: a corrupt block length
    at ``end``, 2: a section header or interface description at ``end`` (read by the caller, which
    then walks on).  Blocks too short for their kind are skipped, as any unknown block."""
    n = buf.shape[0]
    cap = max(16, (n - start) // 16 + 1)
    out = np.empty(cap, dtype=np.int64)
    typ = np.empty(cap, dtype=np.int64)
    count = 0
    pos = start
    status = 0
    while pos + 12 <= n:
        if swapped:
            btype = (np.int64(buf[pos]) << 24) | (np.int64(buf[pos + 1]) << 16) | (np.int64(buf[pos + 2]) << 8) | np.int64(buf[pos + 3])
            blen = (np.int64(buf[pos + 4]) << 24) | (np.int64(buf[pos + 5]) << 16) | (np.int64(buf[pos + 6]) << 8) | np.int64(buf[pos + 7])
        else:
            btype = np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8) | (np.int64(buf[pos + 2]) << 16) | (np.int64(buf[pos + 3]) << 24)
            blen = np.int64(buf[pos + 4]) | (np.int64(buf[pos + 5]) << 8) | (np.int64(buf[pos + 6]) << 16) | (np.int64(buf[pos + 7]) << 24)
        if btype == 0x0A0D0D0A or btype == 1:
            status = 2
            break
        if blen < 12 or blen % 4 != 0 or blen > max_block:
            status = 1
            break
        if pos + blen > n:
            break
        if (btype == 6 and blen >= 32) or (btype == 2 and blen >= 32) or (btype == 3 and blen >= 16):
            out[count] = pos
            typ[count] = btype
            count += 1
        pos += blen
    return out[:count], typ[:count], pos, status


try:
    _scan_pcapng_blocks_fast = numba.njit(cache=True, nogil=True)(_scan_pcapng_blocks)
except Exception:  # pragma: no cover - exercised only where numba is missing
    _scan_pcapng_blocks_fast = _scan_pcapng_blocks


class _Section:
    """What a pcapng reader knows at a point of the file: the section's byte order and the
    interfaces of every section so far, numbered globally."""

    def __init__(self):
        self.bo = "<"
        self.swapped = False
        self.ifaces: list = []  # this section's: (linktype, snaplen, tsresol, tsoffset, timestamps valid)
        self.all_ifaces: list = []
        self.base = 0  # index in all_ifaces of this section's interface 0

    def new_section(self, bo: str) -> None:
        self.bo, self.swapped = bo, bo == ">"
        self.base = len(self.all_ifaces)
        self.ifaces = []

    def add_interface(self, iface: tuple) -> None:
        self.ifaces.append(iface)
        self.all_ifaces.append(iface)


def _open_stream(path: Path):
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CaptureError(f"{path}: is a directory, not a capture file") from None
    except OSError as exc:
        raise CaptureError(f"{path}: cannot open: {exc.strerror}") from None
    head = fh.peek(4)[:4] if hasattr(fh, "peek") else b""
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh, mode="rb"), True
    return fh, False


class CaptureReader:
    """Iterate over a capture file as frame batches.

    >>> import tempfile, os
    >>> from scapy.all import Ether, IP, TCP, wrpcap
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "x.pcap")
    >>> e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    >>> wrpcap(p, [e/IP()/TCP(), e/IP()/TCP()])
    >>> r = CaptureReader(p)
    >>> sum(len(b) for b in r), r.format, r.frames
    (2, 'pcap', 2)
    """

    def __init__(self, path: str | os.PathLike, block_size: int = BLOCK_SIZE):
        self.path = Path(path)
        self.block_size = int(block_size)
        self.format = None  # "pcap" or "pcapng"
        self.compressed = False
        self.linktypes: set[int] = set()
        self.frames = 0
        self.bytes_read = 0
        #: bytes at the end of the file that did not make a complete record (0 if none)
        self.truncated = 0
        #: a reason if reading stopped early on corrupt data (frames before it were delivered)
        self.corrupt: str | None = None
        #: pcapng frames skipped for a timestamp out of range or an invalid if_tsresol/if_tsoffset
        self.bad_timestamps = 0
        #: pcapng interface descriptions with an if_tsresol or if_tsoffset we cannot use
        self.bad_interfaces = 0
        #: frames whose link type we do not decode: {linktype: count}
        self.unsupported_linktypes: dict[int, int] = {}
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise CaptureError(f"{self.path}: empty file, not a capture")

    # -- public -------------------------------------------------------------------------------
    def __iter__(self):
        stream, self.compressed = _open_stream(self.path)
        with stream:
            try:
                head = stream.read(4)
            except (OSError, EOFError) as exc:
                raise CaptureError(f"{self.path}: unreadable: {exc}") from None
            if len(head) < 4:
                raise CaptureError(f"{self.path}: too short to be a capture ({len(head)} bytes)")
            magic_le = struct.unpack("<I", head)[0]
            if magic_le == PCAPNG_SHB:
                self.format = "pcapng"
                yield from self._read_pcapng(stream, head)
            elif magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or struct.unpack(">I", head)[0] in (
                PCAP_MAGIC_US, PCAP_MAGIC_NS):
                self.format = "pcap"
                yield from self._read_pcap(stream, head)
            else:
                raise CaptureError(f"{self.path}: not a pcap or pcapng file (magic {head.hex()})")

    # -- pcap ---------------------------------------------------------------------------------
    def _read_pcap(self, stream, head: bytes):
        rest = self._read(stream, 20)
        if len(rest) < 20:
            raise CaptureError(f"{self.path}: truncated pcap header")
        swapped = struct.unpack(">I", head)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS)
        bo = ">" if swapped else "<"
        magic = struct.unpack(bo + "I", head)[0]
        ns = magic == PCAP_MAGIC_NS
        _vmaj, _vmin, _zone, _sigfigs, _snaplen, network = struct.unpack(bo + "HHiIII", rest)
        linktype = network & 0xFFFF  # upper bits: FCS length flags (pcap spec §4)
        self.linktypes.add(linktype)
        hdr_dtype = np.dtype(bo + "u4")
        carry = b""
        frame_no = 1
        consumed = 24  # file offset of the block's first byte
        eof = False
        while not eof:
            # Read straight into a fresh buffer behind the carried-over partial record (each batch
            # keeps its own buffer, so one is never reused).
            block = bytearray(len(carry) + self.block_size)
            block[:len(carry)] = carry
            got = self._read_into(stream, memoryview(block)[len(carry):])
            eof = got < self.block_size
            if got < self.block_size:
                del block[len(carry) + got:]
            if not block:
                break
            buf = np.frombuffer(block, dtype=np.uint8)
            offs, end, status = _scan_pcap_records_fast(buf, 0, swapped, MAX_RECORD)
            if offs.shape[0] == 0 and not eof and status == 0:
                # one record larger than a block: read more before scanning again
                carry = block
                continue
            if offs.shape[0]:
                batch = self._pcap_batch(buf, offs, hdr_dtype, ns, linktype, frame_no)
                frame_no += len(batch)
                yield batch
            if status == 1:
                self.corrupt = f"corrupt record header at file offset {consumed + end}"
                return
            consumed += end
            carry = block[end:]
        if carry:
            self.truncated = len(carry)

    def _pcap_batch(self, buf, offs, hdr_dtype, ns, linktype, frame_no) -> FrameBatch:
        idx = offs[:, None] + np.arange(16, dtype=np.int64)
        hdr = buf[idx].view(hdr_dtype).reshape(-1, 4)
        sec = hdr[:, 0].astype(np.int64)
        frac = hdr[:, 1].astype(np.int64)
        ts = sec * 1_000_000_000 + (frac if ns else frac * 1000)
        n = offs.shape[0]
        self.frames += n
        lt = np.full(n, linktype, dtype=np.uint16)
        self._note_linktype(linktype, n)
        return FrameBatch(buf=buf, ts=ts, offset=offs + 16, caplen=hdr[:, 2].astype(np.uint32),
                          wirelen=hdr[:, 3].astype(np.uint32), linktype=lt,
                          iface=np.zeros(n, dtype=np.uint16), first_frame=frame_no)

    # -- pcapng -------------------------------------------------------------------------------
    def _read_pcapng(self, stream, head: bytes):
        """Block by block, one buffer of ``block_size`` at a time, like pcap: memory stays bounded
        whatever the file's size or compression ratio (a block longer than :data:`MAX_BLOCK` is
        corrupt).  Packet blocks are found by the compiled walk; section headers and interface
        descriptions, rare, are read here between walks."""
        sec = _Section()
        carry = head
        consumed = 0  # file offset of the buffer's first byte
        frame_no = 1
        eof = False
        while not eof:
            block = bytearray(len(carry) + self.block_size)
            block[:len(carry)] = carry
            got = self._read_into(stream, memoryview(block)[len(carry):])
            eof = got < self.block_size
            if eof:
                del block[len(carry) + got:]
            buf = np.frombuffer(block, dtype=np.uint8)
            n = buf.shape[0]
            parts = []
            pos = 0
            stop = False
            while True:
                offs, types, end, status = _scan_pcapng_blocks_fast(buf, pos, sec.swapped, MAX_RECORD + 64)
                if offs.shape[0]:
                    part, bad = self._pcapng_records(buf, offs, types, sec, consumed)
                    if part is not None:
                        parts.append(part)
                    if bad:
                        stop = True
                        break
                pos = end
                if status == 1:
                    self.corrupt = f"bad block length at offset {consumed + pos}"
                    stop = True
                    break
                if status == 0:
                    break
                # status 2: a section header or an interface description at ``pos``
                need = self._pcapng_control(buf, pos, sec, consumed)
                if need is None:
                    stop = True
                    break
                if need == 0:  # the whole block is not in the buffer yet: read more
                    break
                pos += need
            if parts:
                batch = self._pcapng_batch(buf, parts, sec, frame_no)
                frame_no += len(batch)
                yield batch
            if stop:
                return
            consumed += pos
            carry = block[pos:]
        if carry:
            self.truncated = len(carry)

    def _pcapng_control(self, buf, pos: int, sec: "_Section", consumed: int) -> int | None:
        """Read the SHB or IDB at ``pos``: its length, 0 when it is not all in ``buf``, None when corrupt."""
        n = buf.shape[0]
        data = buf.data
        btype_le = struct.unpack_from("<I", data, pos)[0]
        if btype_le == PCAPNG_SHB:
            if pos + 12 > n:
                return 0
            if struct.unpack_from("<I", data, pos + 8)[0] == PCAPNG_BYTE_ORDER:
                bo = "<"
            elif struct.unpack_from(">I", data, pos + 8)[0] == PCAPNG_BYTE_ORDER:
                bo = ">"
            else:
                self.corrupt = f"bad section header byte-order magic at offset {consumed + pos}"
                return None
            blen = struct.unpack_from(bo + "I", data, pos + 4)[0]
            if blen < 28 or blen % 4 or blen > MAX_BLOCK:
                self.corrupt = f"bad block length {blen} at offset {consumed + pos}"
                return None
            if pos + blen > n:
                return 0
            sec.new_section(bo)
            return blen
        bo = sec.bo
        blen = struct.unpack_from(bo + "I", data, pos + 4)[0]
        if blen < 12 or blen % 4 or blen > MAX_RECORD + 64:
            self.corrupt = f"bad block length {blen} at offset {consumed + pos}"
            return None
        if pos + blen > n:
            return 0
        if blen < 20:  # an interface description too short to hold one: skipped, as before
            return blen
        linktype, _res, snaplen = struct.unpack_from(bo + "HHI", data, pos + 8)
        tsresol, tsoffset = 6, 0
        raw = bytes(data[pos + 16: pos + blen - 4])
        for code, val in _pcapng_options(raw, 0, len(raw), bo):
            if code == 9 and len(val) >= 1:
                tsresol = val[0]
            elif code == 14 and len(val) >= 8:
                tsoffset = struct.unpack(bo + "q", val[:8])[0]
        ok = _valid_tsresol(tsresol) and abs(tsoffset) <= MAX_TS_S
        if not ok:
            self.bad_interfaces += 1
        sec.add_interface((linktype, snaplen, tsresol, tsoffset, ok))
        self.linktypes.add(linktype)
        return blen

    def _pcapng_records(self, buf, offs, types, sec: "_Section", consumed: int):
        """The packet blocks found by one walk, as arrays; and whether a corrupt one ended it."""
        dt4 = np.dtype(sec.bo + "u4")
        dt2 = np.dtype(sec.bo + "u2")

        last = buf.shape[0] - 4

        def u32(at):  # fields past a short simple packet block read clamped garbage, never used
            return buf[np.minimum(at, last)[:, None] + np.arange(4)].view(dt4).reshape(-1).astype(np.int64)

        blen = u32(offs + 4)
        spb = types == 3
        epb = types == 6
        w1, w2, w3, w4 = u32(offs + 12), u32(offs + 16), u32(offs + 20), u32(offs + 24)
        ifid = np.where(epb, u32(offs + 8), buf[(offs + 8)[:, None] + np.arange(2)].view(dt2).reshape(-1))
        ifid = np.where(spb, 0, ifid).astype(np.int64)
        orig_spb = u32(offs + 8)
        nif = len(sec.ifaces)
        if nif:
            snap0 = sec.ifaces[0][1]
            cap_spb = np.minimum(np.minimum(orig_spb, snap0 if snap0 else orig_spb), blen - 16)
        else:
            cap_spb = orig_spb
        cap = np.where(spb, cap_spb, w3)
        bad = np.where(spb, nif == 0, (ifid >= nif) | (w3 > blen - 32))
        n_ok = int(np.argmax(bad)) if bad.any() else len(offs)
        if n_ok < len(offs):
            kind = {3: "simple packet block before any interface", 2: "packet block with bad interface or length",
                    6: "enhanced packet block with bad interface or length"}[int(types[n_ok])]
            self.corrupt = f"{kind} at offset {consumed + int(offs[n_ok])}"
        if n_ok == 0:
            return None, n_ok < len(offs)
        k = slice(0, n_ok)
        ticks = np.where(spb, 0, (w1.astype(np.uint64) << np.uint64(32)) | w2.astype(np.uint64))[k]
        part = {"offset": (offs + np.where(spb, 12, 28))[k], "caplen": cap[k], "wirelen": np.where(spb, orig_spb, w4)[k],
                "ticks": ticks.astype(np.uint64), "iface": ifid[k] + sec.base}
        return part, n_ok < len(offs)

    def _pcapng_batch(self, buf, parts, sec: "_Section", frame_no: int) -> FrameBatch:
        offs = np.concatenate([p["offset"] for p in parts])
        caps = np.concatenate([p["caplen"] for p in parts])
        wires = np.concatenate([p["wirelen"] for p in parts])
        ticks = np.concatenate([p["ticks"] for p in parts])
        ifid = np.concatenate([p["iface"] for p in parts])
        ts = np.zeros(len(offs), dtype=np.int64)
        lts = np.zeros(len(offs), dtype=np.uint16)
        good = np.ones(len(offs), dtype=bool)
        for i in np.unique(ifid).tolist():
            linktype, _snap, tsresol, tsoffset, ok = sec.all_ifaces[i]
            m = ifid == i
            lts[m] = linktype
            if ok:
                ns, valid = _ticks_to_ns_checked(ticks[m], tsresol, tsoffset)
                ts[m] = ns
                good[m] = valid
            else:
                good[m] = False
        if not good.all():
            self.bad_timestamps += int((~good).sum())
            offs, caps, wires, ts, lts, ifid = (a[good] for a in (offs, caps, wires, ts, lts, ifid))
        for lt in np.unique(lts).tolist():
            self._note_linktype(lt, int((lts == lt).sum()))
        self.frames += len(offs)
        return FrameBatch(buf=buf, ts=ts, offset=offs.astype(np.int64), caplen=caps.astype(np.uint32),
                          wirelen=wires.astype(np.uint32), linktype=lts, iface=ifid.astype(np.uint16),
                          first_frame=frame_no)

    # -- helpers ------------------------------------------------------------------------------
    def _note_linktype(self, linktype: int, n: int) -> None:
        if linktype not in SUPPORTED_LINKTYPES:
            self.unsupported_linktypes[linktype] = self.unsupported_linktypes.get(linktype, 0) + n

    def _read(self, stream, n: int) -> bytes:
        try:
            data = stream.read(n)
        except EOFError:  # gzip stream cut short: keep what decompressed
            data = b""
            self.corrupt = "compressed stream ends early"
        except (OSError, gzip.BadGzipFile) as exc:
            data = b""
            self.corrupt = f"read error: {exc}"
        self.bytes_read += len(data)
        return data

    def _read_into(self, stream, view: memoryview) -> int:
        """Fill ``view`` from the stream (several reads for gzip); the number of bytes read."""
        total = 0
        while total < len(view):
            try:
                n = stream.readinto(view[total:])
            except EOFError:  # gzip stream cut short: keep what decompressed
                self.corrupt = "compressed stream ends early"
                break
            except (OSError, gzip.BadGzipFile) as exc:
                self.corrupt = f"read error: {exc}"
                break
            if not n:
                break
            total += n
        self.bytes_read += total
        return total


def _pcapng_options(data: bytes, start: int, end: int, bo: str):
    pos = start
    while pos + 4 <= end:
        code, length = struct.unpack_from(bo + "HH", data, pos)
        if code == 0:
            return
        val = data[pos + 4 : pos + 4 + length]
        yield code, val
        pos += 4 + ((length + 3) & ~3)


def _valid_tsresol(tsresol: int) -> bool:
    """An ``if_tsresol`` whose unit the 64-bit arithmetic can hold: 10^-v s with v <= 28, 2^-v s
    with v <= 63 (127 in either base is nonsense, and the spec's arithmetic would overflow).

    >>> _valid_tsresol(6), _valid_tsresol(0x80 | 30), _valid_tsresol(127), _valid_tsresol(0x80 | 64)
    (True, True, False, False)
    """
    v = tsresol & 0x7F
    return v <= 63 if tsresol & 0x80 else v <= 28


def _ticks_to_ns_checked(ticks: np.ndarray, tsresol: int, tsoffset: int) -> tuple[np.ndarray, np.ndarray]:
    """Capture time in ns of each tick count, and which of them lie in ``[0, MAX_TS_S)`` s (1970 to
    2106, what pcap can say); out-of-range ones are 0 and must be skipped, not trusted.

    >>> ns, ok = _ticks_to_ns_checked(np.array([5, 2**64 - 1], dtype=np.uint64), 6, 0); ns.tolist(), ok.tolist()
    ([5000, 0], [True, False])
    >>> _ticks_to_ns_checked(np.array([1], dtype=np.uint64), 6, -10)[1].tolist()
    [False]
    """
    v = tsresol & 0x7F
    unit = 2.0 ** -v if tsresol & 0x80 else 10.0 ** -v
    approx = ticks.astype(np.float64) * unit + float(tsoffset)  # only to keep the exact sums in int64
    near = (approx > -2.0) & (approx < MAX_TS_S + 2.0)
    ns = np.zeros(ticks.shape[0], dtype=np.int64)
    if near.any():
        ns[near] = _ticks_to_ns(ticks[near], tsresol) + tsoffset * 1_000_000_000
    ok = near & (ns >= 0) & (ns < MAX_TS_S * 1_000_000_000)
    ns[~ok] = 0
    return ns, ok


def _ticks_to_ns(ticks: np.ndarray, tsresol: int) -> np.ndarray:
    """Convert pcapng timestamp units to ns (if_tsresol: bit 7 clear = 10^-v s, set = 2^-v s)."""
    v = tsresol & 0x7F
    if tsresol & 0x80:
        whole = (ticks >> np.uint64(v)).astype(np.int64) * 1_000_000_000
        frac = (ticks & np.uint64((1 << v) - 1)).astype(np.float64) * 1e9 / float(1 << v)
        return whole + np.round(frac).astype(np.int64)
    if v <= 9:
        return ticks.astype(np.int64) * (10 ** (9 - v))
    return (ticks // np.uint64(10 ** (v - 9))).astype(np.int64)


def read_capture(path, **kw) -> FrameBatch:
    """Read a whole capture into one batch (tests and small files)."""
    reader = CaptureReader(path, **kw)
    batches = list(reader)
    if not batches:
        return FrameBatch.empty()
    if len(batches) == 1:
        return batches[0]
    return concat_batches(batches)


def concat_batches(batches: list[FrameBatch]) -> FrameBatch:
    bufs, offs, shift = [], [], 0
    for b in batches:
        bufs.append(b.buf)
        offs.append(b.offset + shift)
        shift += b.buf.shape[0]
    return FrameBatch(
        buf=np.concatenate(bufs), ts=np.concatenate([b.ts for b in batches]), offset=np.concatenate(offs),
        caplen=np.concatenate([b.caplen for b in batches]), wirelen=np.concatenate([b.wirelen for b in batches]),
        linktype=np.concatenate([b.linktype for b in batches]), iface=np.concatenate([b.iface for b in batches]),
        first_frame=batches[0].first_frame,
    )


def sniff_format(path) -> str | None:
    """'pcap', 'pcapng' or None, from the magic number (gzip looked through)."""
    try:
        stream, _ = _open_stream(Path(path))
    except CaptureError:
        return None
    with stream:
        try:
            head = stream.read(4)
        except (OSError, EOFError):
            return None
    if len(head) < 4:
        return None
    le, be = struct.unpack("<I", head)[0], struct.unpack(">I", head)[0]
    if le == PCAPNG_SHB:
        return "pcapng"
    if PCAP_MAGIC_US in (le, be) or PCAP_MAGIC_NS in (le, be):
        return "pcap"
    return None


__all__ = ["CaptureReader", "CaptureError", "read_capture", "concat_batches", "sniff_format"]
