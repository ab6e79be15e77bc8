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
interfaces.  Walked block by block in Python (pcapng files in the field are small) with the
per-interface timestamp scaling done on whole arrays.

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
        data = head + self._read_all(stream)
        buf = np.frombuffer(data, dtype=np.uint8)
        n = len(data)
        pos = 0
        bo = "<"
        ifaces: list[tuple[int, int, int, int]] = []  # (linktype, snaplen, tsresol code, tsoffset s)
        offs, caps, wires, ticks, ifids = [], [], [], [], []
        all_ifaces: list[tuple[int, int, int, int]] = []  # interfaces of every section, numbered globally
        base = 0  # index in all_ifaces of this section's interface 0
        while pos + 12 <= n:
            btype = struct.unpack_from(bo + "I", data, pos)[0]
            if btype == PCAPNG_SHB:
                bom = struct.unpack_from("<I", data, pos + 8)[0]
                if bom == PCAPNG_BYTE_ORDER:
                    bo = "<"
                elif struct.unpack_from(">I", data, pos + 8)[0] == PCAPNG_BYTE_ORDER:
                    bo = ">"
                else:
                    self.corrupt = f"bad section header byte-order magic at offset {pos}"
                    break
                base = len(all_ifaces)
                ifaces = []
            blen = struct.unpack_from(bo + "I", data, pos + 4)[0]
            if blen < 12 or blen % 4 or blen > MAX_RECORD + 64 and btype not in (PCAPNG_SHB,):
                self.corrupt = f"bad block length {blen} at offset {pos}"
                break
            if pos + blen > n:
                self.truncated = n - pos
                break
            body = pos + 8
            if btype == 1 and blen >= 20:  # Interface Description Block
                linktype, _res, snaplen = struct.unpack_from(bo + "HHI", data, body)
                tsresol, tsoffset = 6, 0
                for code, val in _pcapng_options(data, body + 8, pos + blen - 4, bo):
                    if code == 9 and len(val) >= 1:
                        tsresol = val[0]
                    elif code == 14 and len(val) >= 8:
                        tsoffset = struct.unpack(bo + "q", val[:8])[0]
                ifaces.append((linktype, snaplen, tsresol, tsoffset))
                all_ifaces.append(ifaces[-1])
                self.linktypes.add(linktype)
            elif btype == 6 and blen >= 32:  # Enhanced Packet Block
                ifid, hi, lo, cap, orig = struct.unpack_from(bo + "IIIII", data, body)
                if ifid >= len(ifaces) or cap > blen - 32:
                    self.corrupt = f"enhanced packet block with bad interface or length at offset {pos}"
                    break
                offs.append(body + 20); caps.append(cap); wires.append(orig)
                ticks.append((hi << 32) | lo); ifids.append(base + ifid)
            elif btype == 3 and blen >= 16:  # Simple Packet Block: interface 0, no timestamp
                if not ifaces:
                    self.corrupt = f"simple packet block before any interface at offset {pos}"
                    break
                orig = struct.unpack_from(bo + "I", data, body)[0]
                snap = ifaces[0][1] or orig
                cap = min(orig, snap, blen - 16)
                offs.append(body + 4); caps.append(cap); wires.append(orig); ticks.append(0); ifids.append(base)
            elif btype == 2 and blen >= 32:  # obsolete Packet Block
                ifid, _drops, hi, lo, cap, orig = struct.unpack_from(bo + "HHIIII", data, body)
                if ifid >= len(ifaces) or cap > blen - 32:
                    self.corrupt = f"packet block with bad interface or length at offset {pos}"
                    break
                offs.append(body + 20); caps.append(cap); wires.append(orig)
                ticks.append((hi << 32) | lo); ifids.append(base + ifid)
            pos += blen
        else:
            if pos < n:
                self.truncated = n - pos
        if not offs:
            return
        ifid_arr = np.asarray(ifids, dtype=np.int64)
        tick_arr = np.asarray(ticks, dtype=np.uint64)
        ts = np.zeros(len(offs), dtype=np.int64)
        lts = np.zeros(len(offs), dtype=np.uint16)
        for i, (linktype, _snap, tsresol, tsoffset) in enumerate(all_ifaces):
            m = ifid_arr == i
            if not m.any():
                continue
            ts[m] = _ticks_to_ns(tick_arr[m], tsresol) + tsoffset * 1_000_000_000
            lts[m] = linktype
            self._note_linktype(linktype, int(m.sum()))
        self.frames += len(offs)
        yield FrameBatch(buf=buf, ts=ts, offset=np.asarray(offs, dtype=np.int64),
                         caplen=np.asarray(caps, dtype=np.uint32), wirelen=np.asarray(wires, dtype=np.uint32),
                         linktype=lts, iface=ifid_arr.astype(np.uint16), first_frame=1)

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

    def _read_all(self, stream) -> bytes:
        parts = []
        while True:
            chunk = self._read(stream, self.block_size)
            if not chunk:
                break
            parts.append(chunk)
            if len(chunk) < self.block_size and not self.compressed:
                break
        return b"".join(parts)


def _pcapng_options(data: bytes, start: int, end: int, bo: str):
    pos = start
    while pos + 4 <= end:
        code, length = struct.unpack_from(bo + "HH", data, pos)
        if code == 0:
            return
        val = data[pos + 4 : pos + 4 + length]
        yield code, val
        pos += 4 + ((length + 3) & ~3)


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
