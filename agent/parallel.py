"""Many captures at once: which ones continue each other, and running the rest side by side.

An archive holds captures from many sites and many days.  Captures that *continue each other* -- a
rotated ``tcpdump -C``/``-G`` series, or files whose timestamps run on with the same hosts -- form a
**chain** that goes through one pipeline in order, so flows, learned ports and the baseline carry
over from file to file.  Independent chains run in parallel, on this machine's cores
(:class:`concurrent.futures.ProcessPoolExecutor`, ``--jobs N``) or on a Dask distributed cluster
(``--scheduler tcp://HOST:PORT``; ``pip install otwatch[fleet]``; every worker must read the
captures at the same paths).  Results come back in the order of the command line, and a chain gives
the same result whichever way it ran: ``--jobs 1`` runs the very same tasks one after another.

>>> rotated_series(Path("site-a.pcap3")), rotated_series(Path("north_00012_20260105120000.pcap"))
(('site-a.pcap', 3), ('north_#_20260105120000.pcap', 12))
>>> rotated_series(Path("dnp3.pcap")) is None
True
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

#: Longest silence between the end of one capture and the start of the next for the second to count
#: as its continuation: a rotated capture starts with the next frame, so seconds, not minutes.
MAX_GAP_S = 60.0
_SERIES = re.compile(r"^(?P<head>.*?)(?P<num>\d+)$")  # tcpdump -C/-W: the number ends the name
_EDITCAP = re.compile(r"^(?P<head>.*_)(?P<num>\d{5})(?P<tail>_\d{14}\.[A-Za-z.]+)$")  # editcap -c / -i


def rotated_series(path: Path) -> tuple[str, int] | None:
    """``(series name, number)`` when the file name looks like one file of a rotated capture: tcpdump
    appends the file number (``dump.pcap``, ``dump.pcap1``, ``dump.pcap2``...), editcap inserts a
    5-digit one before the timestamp (``out_00001_20260105120000.pcap``)."""
    m = _EDITCAP.match(path.name)
    if m:
        return f"{m['head']}#{m['tail']}", int(m["num"])
    m = _SERIES.match(path.name)
    if m and re.search(r"\.(pcap|pcapng|cap|dmp)(\.gz)?$", m["head"], re.I):
        return m["head"], int(m["num"])
    return None


@dataclass
class Fingerprint:
    """What decides whether one capture continues another: its time span and the hosts at its ends."""
    path: str
    first_ts: int | None = None  # ns
    last_ts: int | None = None
    head_hosts: set = field(default_factory=set)  # addresses in the first block read
    tail_hosts: set = field(default_factory=set)  # addresses in the last block read


def fingerprint(path) -> Fingerprint:
    """One read through the capture; only its first and last blocks are decoded."""
    from parsers.decode import AddressBook, decode

    from .sources import CaptureReader

    fp = Fingerprint(str(path))
    book = AddressBook()
    last = None
    for batch in CaptureReader(path):
        if not len(batch):
            continue
        if fp.first_ts is None:
            fp.first_ts = int(batch.ts.min())
            fp.head_hosts = _hosts(decode(batch, book), book)
        fp.last_ts = max(fp.last_ts or 0, int(batch.ts.max()))
        last = batch
    if last is not None:
        fp.tail_hosts = _hosts(decode(last, book), book)
    return fp


def _hosts(dec, book) -> set:
    import numpy as np

    values = np.unique(np.concatenate([dec.src, dec.dst]))
    return {book.format(int(v)) for v in values.tolist() if v}


def continues(prev: Fingerprint, nxt: Fingerprint, same_series: bool) -> bool:
    """``nxt`` starts when ``prev`` ended (within :data:`MAX_GAP_S`, never before it) and is either
    the next file of the same rotated series or shares hosts with ``prev``'s last block."""
    if prev.last_ts is None or nxt.first_ts is None:
        return False
    gap = (nxt.first_ts - prev.last_ts) / 1e9
    if not 0 <= gap <= MAX_GAP_S:
        return False
    return same_series or bool(prev.tail_hosts & nxt.head_hosts)


def plan_chains(paths, fingerprints: list[Fingerprint]) -> list[list[Path]]:
    """Group ``paths`` into chains of captures that continue each other, each in capture order;
    chains are ordered by where their first file stands on the command line.

    Captures are taken in time order; each joins the chain whose last capture it continues (the one
    with the shortest gap), else starts a chain.
    """
    paths = [Path(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: (fingerprints[i].first_ts is None,
                                                     fingerprints[i].first_ts or 0, i))
    chains: list[list[int]] = []
    for i in order:
        series = rotated_series(paths[i])
        best, best_gap = None, None
        for chain in chains:
            j = chain[-1]
            prev_series = rotated_series(paths[j])
            same = (series is not None and prev_series is not None and series[0] == prev_series[0]
                    and paths[i].parent == paths[j].parent and series[1] > prev_series[1]) or (
                series is not None and series[1] in (0, 1) and prev_series is None and paths[j].name == series[0]
                and paths[i].parent == paths[j].parent)
            if continues(fingerprints[j], fingerprints[i], same):
                gap = fingerprints[i].first_ts - fingerprints[j].last_ts
                if best_gap is None or gap < best_gap:
                    best, best_gap = chain, gap
        if best is None:
            chains.append([i])
        else:
            best.append(i)
    chains.sort(key=min)
    return [[paths[i] for i in chain] for chain in chains]


# --- running tasks ------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("parallel work on many captures")
    g.add_argument("--jobs", "-j", metavar="N", type=int, default=None,
                   help="process up to N independent captures at once (default: the number of cores); "
                        "captures that continue each other (a rotated series) always run in order in one job")
    g.add_argument("--scheduler", metavar="tcp://HOST:PORT", default=None,
                   help="run the captures on this Dask distributed scheduler instead of local processes "
                        "(pip install 'otwatch[fleet]'; workers must see the captures at the same paths)")


def jobs_of(args) -> int:
    jobs = getattr(args, "jobs", None)
    if jobs is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: expected a number of processes >= 1")
    return jobs


#: What the ML detectors import on first use (~2.3 s of CPU): imported once before forking, not once per worker.
ML_MODULES = ("river.anomaly", "river.preprocessing", "pyod.models.iforest")


def run_tasks(func, tasks: list, jobs: int = 1, scheduler: str | None = None, preload=()) -> list:
    """``[func(t) for t in tasks]``, computed in parallel, returned in the order of ``tasks``.

    ``func`` must be a module-level function (it is pickled by name) and each task picklable.  An
    :class:`InputError` raised in a worker is raised here, for the CLI to print as usual.
    ``preload``: modules the tasks will import, imported here first so forked workers share them.
    """
    tasks = list(tasks)
    if scheduler:
        return _run_dask(func, tasks, scheduler)
    if jobs <= 1 or len(tasks) <= 1:
        return [func(t) for t in tasks]
    import importlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # the worker will say what is missing, if it needs it
            pass

    # fork: workers start with the parent's imports (NumPy, Numba's compiled walks) instead of
    # importing them again; nothing here runs threads before the pool starts.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(func, tasks))


def _run_dask(func, tasks: list, scheduler: str) -> list:
    try:
        from distributed import Client
    except ImportError:
        raise InputError("--scheduler needs Dask distributed: pip install 'otwatch[fleet]'") from None
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"--scheduler {scheduler}: cannot connect: {exc}") from None
    try:
        # pure=False: the same capture given twice is two tasks, as with local processes.
        futures = client.map(func, tasks, pure=False)
        return client.gather(futures)
    finally:
        client.close()


def chains_of(paths, jobs: int = 1, scheduler: str | None = None) -> list[list[Path]]:
    """The chains of ``paths`` (one read of every capture, itself run in parallel)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return [paths]
    fps = run_tasks(fingerprint, [str(p) for p in paths], jobs, scheduler)
    return plan_chains(paths, fps)
