"""Shared test fixtures: where the public captures are, and skips that say why."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("OTWATCH_SHARED", ROOT.parent / "shared"))
SHARED_PCAPS = SHARED / "pcaps"
PROJECT_PCAPS = ROOT / "pcaps"


def shared_available() -> bool:
    return (SHARED_PCAPS / "MANIFEST.tsv").is_file()


def manifest_rows() -> list[dict]:
    """Rows of ../shared/pcaps/MANIFEST.tsv (empty when ../shared is absent)."""
    if not shared_available():
        return []
    import csv

    with open(SHARED_PCAPS / "MANIFEST.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def shared_pcaps(protocol: str | None = None) -> list[Path]:
    return [SHARED_PCAPS / r["file"] for r in manifest_rows() if protocol in (None, r["protocol"])]


needs_shared = pytest.mark.skipif(
    not shared_available(), reason="needs ../shared/pcaps (public captures; present in CI, not in a fresh clone)"
)
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (`make test` installs it)")


@pytest.fixture
def veth():
    """A veth pair: one end here, the other in a network namespace of its own (needs root and
    iproute2).  Yields (local end, namespace, far end); both are removed afterwards."""
    import subprocess
    import time

    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"otw{tag}", f"otw{tag}a", f"otw{tag}b"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{here}.disable_ipv6=1")
        sh("ip", "link", "set", here, "up")
        sh("ip", "-n", ns, "link", "set", there, "up")
        time.sleep(0.2)
        yield here, ns, there
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def shared_dir() -> Path:
    if not shared_available():
        pytest.skip("needs ../shared/pcaps (public captures; present in CI, not in a fresh clone)")
    return SHARED_PCAPS
