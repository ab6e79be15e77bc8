"""``otwatch assets CAPTURE... [--format table|json|csv|dot] [-o FILE] [--render PNG|SVG]``.

Reads the captures through one pipeline (as ``otwatch replay`` does) with an
:class:`~models.inventory.AssetInventory` attached, then prints the assets (who is on the network)
and the conversations (who talks to whom, with which function classes, how often).

- ``table`` (default): two aligned tables for people;
- ``json``: one object ``{"assets": [...], "conversations": [...], "counts": {...}}``;
- ``csv``: the assets table, an empty line, the conversations table (``--only`` picks one);
- ``dot``: the communication map as a Graphviz digraph (client -> server, one edge per
  conversation); ``--render map.png`` (or ``.svg``) also draws it when Graphviz's ``dot`` is
  installed.

When the bounds (``--max-assets``, ``--max-conversations``) refused anything, every format says so
(table footer, JSON ``counts.dropped``, a warning on stderr for CSV and DOT).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from models.inventory import AssetInventory, InventoryLimits
from parsers import dnp3_objects, iec104_types, modbus
from parsers.events import PROTOCOL_CODES, PROTO_DNP3, PROTO_IEC104, PROTO_MODBUS

from .errors import InputError
from .pipeline import Pipeline
from .progress import Progress
from .replay import check_files, replay_files

FUNCTION_NAMERS = {
    PROTO_MODBUS: modbus.function_name,
    PROTO_DNP3: dnp3_objects.function_name,
    PROTO_IEC104: iec104_types.function_name,
}
RENDER_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="CAPTURE", help="pcap or pcapng capture (optionally .gz)")
    p.add_argument("--format", choices=("table", "json", "csv", "dot"), default="table",
                   help="output format (default table)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--only", choices=("assets", "conversations"),
                   help="table/csv: print only the assets or only the conversations")
    p.add_argument("--render", metavar="PICTURE",
                   help="also draw the communication map to PICTURE (.png, .svg or .pdf; needs Graphviz)")
    p.add_argument("--max-assets", type=int, default=InventoryLimits.max_assets, metavar="N",
                   help=f"keep at most N assets (default {InventoryLimits.max_assets})")
    p.add_argument("--max-conversations", type=int, default=InventoryLimits.max_conversations, metavar="N",
                   help=f"keep at most N conversations (default {InventoryLimits.max_conversations})")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    from . import parallel

    parallel.add_arguments(p)


def build_inventory(paths, limits: InventoryLimits | None = None, progress=None) -> tuple[AssetInventory, Pipeline]:
    """Replay ``paths`` through a fresh pipeline with an inventory attached; return both."""
    pipeline = Pipeline()
    inventory = AssetInventory(limits).attach(pipeline)
    replay_files(paths, pipeline, progress, on_events=inventory.observe_events)
    inventory.refresh_identities()
    return inventory, pipeline


# -- text helpers ------------------------------------------------------------------------------------
def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _function_names(protocol: str, functions: dict) -> str:
    namer = FUNCTION_NAMERS.get(PROTOCOL_CODES.get(protocol))
    parts = []
    for f, k in functions.items():
        name = namer(int(f)) if namer else f
        parts.append(f"{f}:{name}={k}")
    return " ".join(parts)


def identity_summary(identity: dict) -> str:
    """One line from the identity tables: vendor, product, revision, server id, DNP3 attributes.

    >>> identity_summary({"modbus": {"1": {"vendor_name": "ACME", "product_code": "X1",
    ...                                    "major_minor_revision": "1.0"}}})
    'modbus unit 1: ACME X1 1.0'
    """
    parts = []
    for proto, units in identity.items():
        for unit, info in units.items():
            if proto == "modbus":
                words = [info[k] for k in ("vendor_name", "product_code", "major_minor_revision",
                                           "product_name", "model_name") if info.get(k)]
                if info.get("server_id") and not words:
                    words.append(f"server id {info['server_id']}")
            else:
                words = [f"{k}={v}" for k, v in info.items()]
            parts.append(f"{proto} unit {unit}: " + " ".join(str(w) for w in words))
    return "; ".join(parts)


def _roles(asset: dict) -> str:
    out = []
    for r in asset["roles"]:
        units = ",".join(str(u) for u in r["units"][:8]) + ("..." if len(r["units"]) > 8 else "")
        out.append(f"{r['protocol']} {r['role']}" + (f" [{units}]" if units else ""))
    return "; ".join(out) if out else "non-ICS"


def dropped_note(counts: dict) -> str | None:
    d = counts["dropped"]
    parts = []
    if d["assets"]:
        parts.append(f"{d['assets']:,} new assets refused ({d['asset_frames']:,} frames/PDUs not counted)")
    if d["conversations"]:
        parts.append(f"{d['conversations']:,} new conversations refused ({d['conversation_pdus']:,} PDUs "
                     "not counted)")
    if d["values"]:
        parts.append(f"{d['values']:,} per-record values (MACs, units, function codes...) not kept")
    if d["request_keys"]:
        parts.append(f"{d['request_keys']:,} request signatures not timed")
    return ("inventory bounds reached: " + "; ".join(parts)) if parts else None


# -- formats -----------------------------------------------------------------------------------------
ASSET_COLUMNS = ["address", "ics", "roles", "macs", "vlans", "services", "first_seen", "last_seen",
                 "frames_in", "frames_out", "bytes_in", "bytes_out", "functions_sent", "functions_received",
                 "identity"]
CONVERSATION_COLUMNS = ["client", "server", "protocol", "transport", "port", "client_role", "server_role",
                        "classes", "functions", "units", "requests", "responses", "bytes", "exceptions",
                        "malformed", "first_seen", "last_seen", "polling_period_s", "cyclic"]


def _flat(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "" if value is None else str(value)


def format_csv(assets, conversations, only=None) -> str:
    buf = io.StringIO()
    blocks = []
    if only in (None, "assets"):
        blocks.append((ASSET_COLUMNS, [dict(a, roles=_roles(a)) for a in assets]))
    if only in (None, "conversations"):
        blocks.append((CONVERSATION_COLUMNS, conversations))
    for i, (cols, rows) in enumerate(blocks):
        if i:
            buf.write("\r\n")
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _flat(r.get(c)) for c in cols})
    return buf.getvalue()


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_table(assets, conversations, counts, only=None) -> str:
    lines = []
    if only in (None, "assets"):
        lines.append(f"Assets ({len(assets)})")
        rows = []
        for a in assets:
            rows.append([a["address"], _roles(a), " ".join(a["macs"][:2]) + (" ..." if len(a["macs"]) > 2 else ""),
                         ",".join(map(str, a["vlans"])), f"{a['frames_out']:,}/{a['frames_in']:,}",
                         f"{a['bytes_out']:,}/{a['bytes_in']:,}", _time(a["first_seen"]), _time(a["last_seen"]),
                         identity_summary(a["identity"]) or " ".join(a["services"])])
        lines += _table(["address", "roles [units]", "mac", "vlan", "frames out/in", "bytes out/in",
                         "first seen", "last seen", "identity / services"], rows)
        lines.append("")
    if only in (None, "conversations"):
        lines.append(f"Conversations ({len(conversations)})")
        rows = []
        for c in conversations:
            period = f"{c['polling_period_s']:g} s" if c["cyclic"] else "-"
            rows.append([c["client"], c["server"], f"{c['protocol']} {c['transport']}/{c['port']}",
                         " ".join(f"{k}={v:,}" for k, v in c["classes"].items()),
                         f"{c['requests']:,}/{c['responses']:,}", ",".join(map(str, c["units"][:8])),
                         period, _time(c["first_seen"]), _time(c["last_seen"]),
                         _function_names(c["protocol"], c["functions"])])
        lines += _table(["client", "server", "protocol", "function classes", "req/resp", "units", "polling",
                         "first seen", "last seen", "functions"], rows)
        lines.append("")
    by = counts["assets"]
    summary = ", ".join(f"{p} {r} {n}" for p, roles in by.items() for r, n in roles.items() if n)
    lines.append(f"{counts['assets_total']} assets ({summary or 'none'}), "
                 f"{counts['conversations_total']} conversations")
    note = dropped_note(counts)
    if note:
        lines.append(note)
    return "\n".join(lines)


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_dot(assets, conversations) -> str:
    """The communication map: one node per asset taking part in an ICS conversation, one edge per
    conversation (client -> server) labelled protocol/port, function classes and polling period."""
    in_map = {c["client"] for c in conversations} | {c["server"] for c in conversations}
    lines = ["digraph otwatch_assets {", "  rankdir=LR;", '  node [shape=box, style="rounded", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for a in assets:
        if a["address"] not in in_map:
            continue
        label = [a["address"]] + [f"{r['protocol']} {r['role']}" + (f" {','.join(map(str, r['units'][:4]))}"
                                                                     if r["units"] else "")
                                   for r in a["roles"]]
        ident = identity_summary(a["identity"])
        if ident:
            label.append(ident[:60])
        lines.append(f"  {_dot_id(a['address'])} [label={_dot_id(chr(10).join(label))}];")
    for c in conversations:
        label = [f"{c['protocol']} {c['transport']}/{c['port']}", " ".join(c["classes"])]
        if c["cyclic"]:
            label.append(f"every {c['polling_period_s']:g} s")
        style = ', color="red"' if ("write" in c["classes"] or "control" in c["classes"]) else ""
        lines.append(f"  {_dot_id(c['client'])} -> {_dot_id(c['server'])} "
                     f"[label={_dot_id(chr(10).join(label))}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, picture: str) -> None:
    """Draw DOT text to ``picture`` with Graphviz's ``dot`` (format from the file suffix)."""
    fmt = RENDER_FORMATS.get(Path(picture).suffix.lower())
    if fmt is None:
        raise InputError(f"{picture}: --render wants a .png, .svg or .pdf file name")
    exe = shutil.which("dot")
    if exe is None:
        raise InputError("--render needs Graphviz's `dot` program (e.g. apt-get install graphviz)")
    proc = subprocess.run([exe, f"-T{fmt}", "-o", picture], input=dot_text, text=True, capture_output=True)
    if proc.returncode != 0:
        raise InputError(f"{picture}: dot failed: {proc.stderr.strip()[:200]}")


def inventory_chain(task: dict) -> dict:
    """The inventory of one chain of captures (run in a worker), as records."""
    limits = InventoryLimits(max_assets=task["max_assets"], max_conversations=task["max_conversations"])
    inventory, pipeline = build_inventory([Path(f) for f in task["files"]], limits)
    return {"files": task["files"], "frames": pipeline.stats.frames, "assets": inventory.assets(),
            "conversations": inventory.conversations(), "counts": inventory.counts()}


def run_chains(args, chains, jobs: int) -> int:
    """Independent captures (other sites reuse the same addresses): one inventory each, printed in
    command-line order -- JSON one object per line with its ``files``, CSV and table one block each
    headed by the files, DOT one graph each; ``--render`` draws chain i to NAME-i.EXT (i >= 2)."""
    from . import parallel

    tasks = [{"files": [str(p) for p in c], "max_assets": args.max_assets,
              "max_conversations": args.max_conversations} for c in chains]
    parts = parallel.run_tasks(inventory_chain, tasks, jobs, args.scheduler)
    if not any(r["frames"] for r in parts):
        raise InputError("no frames could be read from the captures")
    texts = []
    for r in parts:
        head = "captures: " + ", ".join(r["files"])
        if args.format == "json":
            texts.append(json.dumps({"files": r["files"], "assets": r["assets"], "conversations": r["conversations"],
                                     "counts": r["counts"]}) + "\n")
        elif args.format == "csv":
            texts.append(f"# {head}\r\n" + format_csv(r["assets"], r["conversations"], args.only) + "\r\n")
        elif args.format == "dot":
            texts.append(f"// {head}\n" + format_dot(r["assets"], r["conversations"]))
        else:
            texts.append(f"== {head}\n" + format_table(r["assets"], r["conversations"], r["counts"], args.only) + "\n\n")
        note = dropped_note(r["counts"])
        if note and args.format in ("csv", "dot"):
            print(f"otwatch assets: warning: {', '.join(r['files'])}: {note}", file=sys.stderr)
    text = "".join(texts)
    if args.output:
        try:
            Path(args.output).write_text(text, newline="" if args.format == "csv" else None)
        except OSError as exc:
            raise InputError(f"{args.output}: cannot write: {exc.strerror}") from None
    else:
        sys.stdout.write(text)
    if args.render:
        pic = Path(args.render)
        for i, r in enumerate(parts, 1):
            target = pic if i == 1 else pic.with_name(f"{pic.stem}-{i}{pic.suffix}")
            render(format_dot(r["assets"], r["conversations"]), str(target))
    return 0


def run(args) -> int:
    paths = check_files(args.files)
    if args.max_assets < 1 or args.max_conversations < 1:
        raise InputError("--max-assets and --max-conversations must be at least 1")
    if args.render and Path(args.render).suffix.lower() not in RENDER_FORMATS:
        raise InputError(f"{args.render}: --render wants a .png, .svg or .pdf file name")
    if args.render and shutil.which("dot") is None:
        raise InputError("--render needs Graphviz's `dot` program (e.g. apt-get install graphviz)")
    if len(paths) > 1:
        from . import parallel

        jobs = parallel.jobs_of(args)
        chains = parallel.chains_of(paths, jobs, args.scheduler)
        if len(chains) > 1:
            return run_chains(args, chains, jobs)
    limits = InventoryLimits(max_assets=args.max_assets, max_conversations=args.max_conversations)
    total = sum(p.stat().st_size for p in paths)
    show = not args.no_progress and args.output is None and sys.stderr.isatty()
    progress = Progress(total, stream=sys.stderr) if show else None
    inventory, pipeline = build_inventory(paths, limits, progress)
    if progress is not None:
        progress.close()
    if pipeline.stats.frames == 0:
        raise InputError("no frames could be read from the captures")
    assets, conversations, counts = inventory.assets(), inventory.conversations(), inventory.counts()
    if args.format == "json":
        text = json.dumps({"assets": assets, "conversations": conversations, "counts": counts}) + "\n"
    elif args.format == "csv":
        text = format_csv(assets, conversations, args.only)
    elif args.format == "dot":
        text = format_dot(assets, conversations)
    else:
        text = format_table(assets, conversations, counts, args.only) + "\n"
    note = dropped_note(counts)
    if note and args.format in ("csv", "dot"):
        print(f"otwatch assets: warning: {note}", file=sys.stderr)
    if args.output:
        try:
            Path(args.output).write_text(text, newline="" if args.format == "csv" else None)
        except OSError as exc:
            raise InputError(f"{args.output}: cannot write: {exc.strerror}") from None
    else:
        sys.stdout.write(text)
    if args.render:
        render(format_dot(assets, conversations), args.render)
    return 0
