"""``otwatch config check|show [--config FILE] [--json]``: validate or print the effective configuration.

``check`` reads the file exactly as ``otwatch run`` does and prints one line: ``FILE: ok`` (exit 0),
or the first problem, naming the key and what was expected (exit 2).  ``show`` prints the effective
configuration (the file's values over the defaults) as TOML, or JSON with ``--json``; with
``--comments`` each key carries its one-line help (what ``deploy/otwatch.toml`` is made from).
"""

from __future__ import annotations

import json

from . import config as config_mod


def add_arguments(p) -> None:
    p.add_argument("action", choices=("check", "show"), help="check: validate; show: print the effective config")
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML file (default: $OTWATCH_CONFIG, else {config_mod.DEFAULT_PATH} if present, "
                        "else the built-in defaults)")
    p.add_argument("--json", action="store_true", help="show: print JSON instead of TOML")
    p.add_argument("--comments", action="store_true", help="show: a comment line with each key's help")


def run(args) -> int:
    path = args.config or config_mod.default_config_path()
    cfg = config_mod.load(path)  # InputError -> one line on stderr, exit 2
    if args.action == "check":
        print(f"{path or 'built-in defaults'}: ok")
        return 0
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(config_mod.to_toml(cfg, comments=args.comments), end="")
    return 0
