"""The frame batch: the one type every capture source produces and the decoder consumes.

A batch is one contiguous ``uint8`` buffer plus equal-length NumPy columns that say where each
captured frame starts in it, how long it is, when it was seen and on which link.  Sources never
hand individual packets downstream; the decoder works on whole columns.

>>> import numpy as np
>>> b = FrameBatch.from_frames([b"\\x01\\x02", b"\\x03"], ts=[10, 20], linktype=LINKTYPE_ETHERNET)
>>> len(b), b.offset.tolist(), b.caplen.tolist()
(2, [0, 2], [2, 1])
>>> b.frame(1)
b'\\x03'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Link-layer header types (tcpdump.org/linktypes.html).  pcap uses the LINKTYPE_ values.
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in the *writer's* byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IP, version taken from the first nibble
LINKTYPE_LOOP = 108  # OpenBSD loopback: 4-byte address family, network byte order
LINKTYPE_LINUX_SLL = 113  # Linux cooked capture v1 (16-byte header)
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276  # Linux cooked capture v2 (20-byte header)

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "null",
    LINKTYPE_ETHERNET: "ethernet",
    LINKTYPE_RAW: "raw",
    LINKTYPE_LOOP: "loop",
    LINKTYPE_LINUX_SLL: "linux_sll",
    LINKTYPE_IPV4: "ipv4",
    LINKTYPE_IPV6: "ipv6",
    LINKTYPE_LINUX_SLL2: "linux_sll2",
}
SUPPORTED_LINKTYPES = frozenset(LINKTYPE_NAMES)


@dataclass
class FrameBatch:
    """Frames in one buffer.

    ``buf`` is a ``uint8`` array; frame *i* is ``buf[offset[i] : offset[i] + caplen[i]]``.
    ``ts`` is nanoseconds since the Unix epoch.  ``offset`` is int64 so index arithmetic in the
    decoder never wraps; the length columns are uint32 as in the capture formats.
    ``first_frame`` is the 1-based number of the batch's first frame in its source (Wireshark's
    ``frame.number``), so events can point back at the frame that carried them.
    """

    buf: np.ndarray
    ts: np.ndarray
    offset: np.ndarray
    caplen: np.ndarray
    wirelen: np.ndarray
    linktype: np.ndarray
    iface: np.ndarray
    first_frame: int = 1
    # Frames the source saw but could not put in the batch (e.g. a record cut by end of file).
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def frame_number(self) -> np.ndarray:
        return np.arange(self.first_frame, self.first_frame + len(self), dtype=np.int64)

    @property
    def nbytes_captured(self) -> int:
        return int(self.caplen.sum(dtype=np.int64))

    def frame(self, i: int) -> bytes:
        o = int(self.offset[i])
        return self.buf[o : o + int(self.caplen[i])].tobytes()

    def select(self, idx) -> "FrameBatch":
        """The frames at ``idx`` (indices or a boolean mask), sharing this batch's buffer.

        ``first_frame`` is kept, so frame numbers of a selection are not contiguous: use the
        source's numbering (``frame_number``) before selecting when it matters.
        """
        return FrameBatch(buf=self.buf, ts=self.ts[idx], offset=self.offset[idx], caplen=self.caplen[idx],
                          wirelen=self.wirelen[idx], linktype=self.linktype[idx], iface=self.iface[idx],
                          first_frame=self.first_frame, notes=dict(self.notes))

    @classmethod
    def empty(cls) -> "FrameBatch":
        return cls.from_frames([], ts=[], linktype=LINKTYPE_ETHERNET)

    @classmethod
    def from_frames(cls, frames, ts, linktype=LINKTYPE_ETHERNET, wirelen=None, iface=0, first_frame=1):
        """Build a batch from a list of ``bytes`` (tests, live capture, the scapy fallback)."""
        n = len(frames)
        lens = np.fromiter((len(f) for f in frames), dtype=np.uint32, count=n)
        offset = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(lens[:-1], out=offset[1:])
        buf = np.frombuffer(b"".join(frames), dtype=np.uint8) if n else np.zeros(0, np.uint8)
        return cls(
            buf=buf,
            ts=np.asarray(ts, dtype=np.int64).reshape(n),
            offset=offset,
            caplen=lens,
            wirelen=lens.copy() if wirelen is None else np.asarray(wirelen, dtype=np.uint32),
            linktype=np.broadcast_to(np.asarray(linktype, dtype=np.uint16), (n,)).copy(),
            iface=np.broadcast_to(np.asarray(iface, dtype=np.uint16), (n,)).copy(),
            first_frame=first_frame,
        )
