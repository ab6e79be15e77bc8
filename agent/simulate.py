"""``otwatch simulate``: write a simulated substation capture and the labels of the attacks in it.

    otwatch simulate -o OUT.pcap [--protocols modbus,dnp3,iec104] [--duration 30m] [--seed N]
                     [--attacks all|none|recon,flood,...] [--start 2026-01-05T08:00:00Z]
                     [--labels OUT.csv] [--json]

The same arguments always give byte-identical files.  See docs/simulator.md.

>>> parse_duration("90s"), parse_duration("30m"), parse_duration("2h"), parse_duration("45")
(90.0, 1800.0, 7200.0, 45.0)
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from .cli import InputError

DEFAULT_START = "2026-01-05T08:00:00Z"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise InputError(f"bad duration {text!r} (use e.g. 90s, 30m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_start(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"bad --start {text!r} (use ISO 8601, e.g. {DEFAULT_START})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise InputError(f"unknown {what} {','.join(bad) or repr(text)} (choose from {','.join(allowed)})")
    return items


def default_labels_path(pcap: Path) -> Path:
    """``OUT.pcap`` -> ``OUT.labels.csv``

    >>> str(default_labels_path(Path("pcaps/modbus.pcap")))
    'pcaps/modbus.labels.csv'
    """
    return pcap.with_name(pcap.stem + ".labels.csv") if pcap.suffix else pcap.with_name(pcap.name + ".labels.csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .simulator.common import PROTOCOLS, RULE_BLIND, SCENARIOS

    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.pcap", help="capture to write: pcapng when the name ends in .pcapng, else classic pcap")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default: all, mixed in one capture)")
    parser.add_argument("--duration", default="30m", help="simulated plant time: 90s, 30m, 2h (default 30m)")
    parser.add_argument("--seed", type=int, default=1, help="random seed; same seed, same bytes (default 1)")
    parser.add_argument("--attacks", default="all",
                        help=f"all, none, rule-blind ({','.join(RULE_BLIND)}: not in all), or a comma-separated "
                             f"subset of {','.join(SCENARIOS + RULE_BLIND)}")
    parser.add_argument("--start", default=DEFAULT_START, help=f"capture start, ISO 8601 (default {DEFAULT_START})")
    parser.add_argument("--labels", type=Path, metavar="OUT.csv", help="labels CSV (default: OUT.labels.csv)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from .simulator.common import ALL_SCENARIOS, PROTOCOLS, RULE_BLIND, SCENARIOS
    from .simulator.substation import min_duration, simulate

    protocols = parse_list(args.protocols, PROTOCOLS, "protocol")
    if args.attacks == "all":
        scenarios = SCENARIOS
    elif args.attacks == "none":
        scenarios = ()
    elif args.attacks == "rule-blind":
        scenarios = RULE_BLIND
    else:
        scenarios = parse_list(args.attacks, ALL_SCENARIOS, "attack scenario")
    duration = parse_duration(args.duration)
    if duration < 10:
        raise InputError(f"--duration {args.duration} is too short (at least 10s)")
    if duration > 7 * 86400:
        raise InputError(f"--duration {args.duration} is too long (at most 7 days)")
    needed = min_duration(len(set(scenarios)))
    if duration < needed:
        raise InputError(f"--duration {args.duration} is too short for {len(set(scenarios))} attacks "
                         f"(need at least {needed / 60:.0f}m, or fewer --attacks)")
    if args.seed < 0:
        raise InputError("--seed must be >= 0")
    start = parse_start(args.start)
    labels = args.labels or default_labels_path(args.output)
    for path in (args.output, labels):
        if not path.parent.is_dir():
            raise InputError(f"directory {str(path.parent)!r} does not exist")
    import sys

    from .progress import Progress

    progress = Progress(len(protocols) + 1, stream=sys.stderr)
    try:
        result = simulate(args.output, labels, protocols, duration, args.seed, scenarios, start, progress)
    finally:
        progress.close()
    summary = {"pcap": str(args.output), "labels": str(labels), "frames": result.frames, "bytes": result.pcap_bytes,
               "duration_s": duration, "seed": args.seed, "protocols": list(protocols),
               "attacks": [{"scenario": r["scenario"], "protocol": r["protocol"], "start_ts": r["start_ts"],
                            "end_ts": r["end_ts"], "src": r["src"], "dst": r["dst"]} for r in result.labels],
               "elapsed_s": round(result.seconds, 3)}
    if args.json:
        print(json.dumps(summary, indent=None))
    else:
        print(f"wrote {result.frames} frames ({result.pcap_bytes / 1e6:.2f} MB, {duration / 60:g} min of "
              f"{'+'.join(protocols)}) with {len(result.labels)} attacks to {args.output}; labels {labels} "
              f"[{result.seconds:.1f} s]")
    return 0
