"""The ``otwatch`` command line.

Each subcommand lives in its own module with two functions, ``add_arguments(parser)`` and
``run(args) -> int``; this module lists them explicitly and imports a subcommand's module only when
it runs, so ``otwatch --help`` stays fast.

Exit status: 0 success, 1 internal error, 2 bad input (missing or unreadable file, bad config,
bad arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# name -> (module, one-line help)
SUBCOMMANDS = {
    "replay": ("agent.replay", "read captures through the pipeline and print a summary"),
    "simulate": ("agent.simulate", "write a simulated substation capture with labelled attacks"),
    "parse": ("agent.parse_cmd", "write the parsed protocol events of a capture as JSON lines or CSV"),
    "eval": ("agent.eval", "score detection on a labelled capture: per-scenario detection, precision, recall"),
    "baseline": ("agent.baseline_cmd", "show, approve or revoke what the agent learned"),
    "export": ("agent.export_cmd", "export alerts (STIX 2.1 bundle)"),
    "run": ("agent.daemon", "run the monitoring agent on a network interface (SPAN port)"),
    "config": ("agent.config_cmd", "check or show the effective configuration"),
    "assets": ("agent.assets_cmd", "list assets and conversations seen in captures"),
    "alerts": ("agent.alerts_cmd", "show an alert log as a table, filtered by severity, rule, host, time"),
    "rules": ("agent.rules_cmd", "list the alert rules: severity, ATT&CK technique and tactic, tuning"),
    "report": ("agent.report", "write a self-contained HTML report of captures: plots, attacks, alerts"),
}


from .errors import InputError  # noqa: E402,F401 - re-exported: subcommands raise agent.cli.InputError


def _build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otwatch",
        description="Network anomaly monitoring for OT/ICS networks (Modbus/TCP, DNP3, IEC 60870-5-104).",
    )
    parser.add_argument("--version", action="version", version=f"otwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Find the subcommand first so only its module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in SUBCOMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # words after options: a subcommand may take them as more of its positional list
        dest = getattr(importlib.import_module(SUBCOMMANDS[args.command][0]), "INTERMIXED", None) \
            if args.command else None
        if dest is None or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, dest).extend(extra)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="otwatch: %(levelname)s: %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except InputError as exc:
        print(f"otwatch {args.command}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"otwatch {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if os.environ.get("OTWATCH_DEBUG"):
            raise
        print(f"otwatch {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set OTWATCH_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
