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


# --- every ECS alert record the tests make is checked against docs/alert.schema.json ---------------
_ALERT_VALIDATOR = None


def alert_schema_errors(rec: dict) -> list[str]:
    """Why ``rec`` (an ECS alert record, as written: through JSON) breaks docs/alert.schema.json."""
    global _ALERT_VALIDATOR
    import json

    import jsonschema

    if _ALERT_VALIDATOR is None:
        schema = json.loads((ROOT / "docs" / "alert.schema.json").read_text())
        _ALERT_VALIDATOR = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    from agent.sinks import _jsonable

    try:
        doc = json.loads(json.dumps(rec, default=_jsonable, allow_nan=False))
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '(record)'}: {e.message}"
            for e in _ALERT_VALIDATOR.iter_errors(doc)]


@pytest.fixture(autouse=True)
def _alert_records_match_schema(request, monkeypatch):
    if request.node.get_closest_marker("alert_schema_exempt"):
        return
    from models.alerts import Alert

    to_ecs = Alert.to_ecs

    def checked(self, *args, **kwargs):
        rec = to_ecs(self, *args, **kwargs)
        errors = alert_schema_errors(rec)
        assert not errors, f"alert {self.rule} breaks docs/alert.schema.json: {errors}"
        return rec

    monkeypatch.setattr(Alert, "to_ecs", checked)


def stix_validation_errors(bundle: dict) -> list[str]:
    """What the OASIS ``stix2-validator`` (errors, not warnings) finds wrong with a STIX 2.1 bundle."""
    import json

    from stix2validator import ValidationOptions, validate_string

    results = validate_string(json.dumps(bundle), ValidationOptions(version="2.1"))
    results = results if isinstance(results, list) else [results]
    return [f"{r.object_id}: {e}" for r in results for e in r.errors] + \
        [f"{r.object_id}: not valid" for r in results if not r.is_valid and not r.errors]


@pytest.fixture(autouse=True)
def _stix_bundles_validate(monkeypatch):
    """Every bundle the tests make in-process goes through stix2-validator."""
    try:
        import agent.export_cmd as export_cmd
    except ImportError:
        return
    make = export_cmd.bundle

    def checked(records):
        b = make(records)
        errors = stix_validation_errors(b)
        assert not errors, errors
        return b

    monkeypatch.setattr(export_cmd, "bundle", checked)
