"""``otwatch rules [--markdown | --json]``: every alert rule, its severity, ATT&CK for ICS technique and
tactic, what triggers it and how to tune it (``models/rules.py``; ``docs/rules.md`` is its Markdown)."""

from __future__ import annotations

import json

from models.rules import RULES_LIST, markdown, tactics_of


def add_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--markdown", action="store_true", help="the catalogue as docs/rules.md")
    g.add_argument("--json", action="store_true", help="the catalogue as one JSON array")


def run(args) -> int:
    if args.markdown:
        print(markdown(), end="")
    elif args.json:
        print(json.dumps([{"rule": r.name, "detector": r.detector, "severity": r.severity,
                           "techniques": list(r.techniques),
                           "tactics": sorted({t for tid in r.techniques for t, _ in tactics_of(tid)}),
                           "trigger": r.trigger, "tune": r.tune, "varies": r.escalation} for r in RULES_LIST],
                         indent=1))
    else:
        print(f"{'rule':<30}{'severity':<10}{'techniques':<38}trigger")
        for r in RULES_LIST:
            print(f"{r.name:<30}{r.severity:<10}{', '.join(r.techniques):<38}{r.trigger}")
    return 0
