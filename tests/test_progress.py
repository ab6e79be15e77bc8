"""Progress on a terminal (frames, rate, ETA; moving every few thousand frames, not once per read block),
nothing when not on one; ``simulate -o x.pcapng`` writes pcapng with the same frames as the pcap."""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys

import pytest

from agent.sources import CaptureReader
from tests.conftest import PROJECT_PCAPS, ROOT

BAR = re.compile(r"\[[#.]{30}\]\s+(\d+\.\d)%\s+([\d,]+) frames\s+[\d,]+ frames/s\s+ETA \d+:\d\d")


def run_on_terminal(*args) -> tuple[int, str]:
    """The command with its standard error on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OTWATCH_PROGRESS_DELAY="0")  # every piece redraws
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("command", [
    ("replay", PROJECT_PCAPS / "modbus.pcap"),
    ("eval", PROJECT_PCAPS / "modbus.pcap", "--labels", PROJECT_PCAPS / "modbus.labels.csv",
     "--detectors", "allowlist"),
])
def test_progress_moves_by_frames_on_a_terminal(command):
    rc, err = run_on_terminal(*command)
    assert rc == 0, err
    bars = [(float(p), int(f.replace(",", ""))) for p, f in BAR.findall(err)]
    # the 1.7 MB capture is one read block: a bar moved by read blocks would show once, at the end
    assert len({f for _, f in bars}) >= 4, err[-500:]
    assert [f for _, f in bars] == sorted(f for _, f in bars) and all(0 < p <= 100 for p, _ in bars)
    assert all(f % 4096 == 0 for _, f in bars[:-1])


def test_no_progress_when_not_a_terminal():
    done = subprocess.run([sys.executable, "-m", "agent.cli", "replay", PROJECT_PCAPS / "modbus.pcap"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "ETA" not in done.stderr and "\r" not in done.stderr


def test_simulate_writes_pcapng_when_asked(tmp_path):
    outs = {}
    for suffix in ("pcap", "pcapng"):
        out = tmp_path / f"sim.{suffix}"
        done = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", "-o", out, "--protocols", "iec104",
                               "--duration", "15m", "--seed", "3"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        reader = CaptureReader(out)
        batches = list(reader)
        assert reader.format == suffix
        outs[suffix] = [(int(t), b.frame(i)) for b in batches for i, t in enumerate(b.ts)]
    assert outs["pcap"] == outs["pcapng"] and len(outs["pcap"]) > 1000
    if shutil.which("capinfos"):
        info = subprocess.run(["capinfos", "-t", "-c", str(tmp_path / "sim.pcapng")], capture_output=True, text=True)
        assert "pcapng" in info.stdout and f"{len(outs['pcap'])}" in info.stdout.replace(",", "")
