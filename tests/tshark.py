"""Run tshark over a capture and read fields back: the reference our parsers are compared with.

We call ``tshark -T fields`` directly rather than pyshark: pyshark starts one tshark per capture as
well but then builds a Python object per packet and per layer, which is 20-50x slower for the
thousands of frames these comparisons read, and gives nothing extra for flat field lists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def tshark_fields(pcap: Path | str, fields: list[str], display_filter: str = "",
                  extra: list[str] | None = None, occurrence: str = "a", aggregator: str = ",") -> list[dict]:
    """One dict per displayed frame: ``{"frame.number": "1", field: "v1,v2", ...}``.

    Multi-valued fields (several PDUs or objects in one frame) come joined by ``aggregator``.
    """
    cmd = ["tshark", "-n", "-r", str(pcap), "-T", "fields", "-E", f"occurrence={occurrence}",
           "-E", f"aggregator={aggregator}", "-E", "separator=\t", "-e", "frame.number"]
    for f in fields:
        cmd += ["-e", f]
    if display_filter:
        cmd += ["-Y", display_filter]
    cmd += list(extra or [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    names = ["frame.number", *fields]
    for line in out.splitlines():
        parts = line.split("\t")
        parts += [""] * (len(names) - len(parts))
        rows.append(dict(zip(names, parts)))
    return rows


def split_multi(value: str, aggregator: str = ",") -> list[str]:
    return [v for v in value.split(aggregator)] if value else []
