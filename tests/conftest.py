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
def shared_dir() -> Path:
    if not shared_available():
        pytest.skip("needs ../shared/pcaps (public captures; present in CI, not in a fresh clone)")
    return SHARED_PCAPS
