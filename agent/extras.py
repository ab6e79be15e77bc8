"""Which optional parts are installed.  The edge install is numpy and prometheus-client only; the
score-based detectors need the ``ml`` extra (River, PyOD), ``export --stix`` the ``stix`` extra.

>>> missing_detectors(["allowlist", "cycle"])
{}
"""

from __future__ import annotations

import importlib.util

# detector -> (module it imports, extra that installs it)
DETECTOR_NEEDS = {"river": ("river", "ml"), "pyod": ("pyod", "ml")}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_detectors(detectors) -> dict[str, str]:
    """Detector -> one-line reason, for each configured detector whose library is not installed."""
    out = {}
    for d in detectors:
        module, extra = DETECTOR_NEEDS.get(d, (None, None))
        if module and not installed(module):
            out[d] = f"detector {d!r} needs the {module} library: pip install 'otwatch[{extra}]'"
    return out
