"""Check a parser's batch path (``feed_batch``) against its chunk-by-chunk path (``feed``).

Both paths must write exactly the same rows (every column, in the same order) and count exactly
the same errors, however the chunks are grouped into batches.
"""

from __future__ import annotations

import numpy as np

from parsers.events import COLUMNS, EventBuilder


def same_rows(a, b, where: str = "") -> None:
    assert len(a) == len(b), f"{where}: {len(a)} rows one by one, {len(b)} in batches"
    assert a.errors == b.errors, f"{where}: errors {a.errors} one by one, {b.errors} in batches"
    for name in COLUMNS:
        x, y = a[name], b[name]
        equal = (x == y) | (np.isnan(x) & np.isnan(y)) if x.dtype.kind == "f" else x == y
        if not equal.all():
            i = int(np.flatnonzero(~equal)[0])
            raise AssertionError(f"{where}: column {name} differs first at row {i}: {x[i]!r} one by one, "
                                 f"{y[i]!r} in batches")


def run_both(make_parser, batches, closes_after=None):
    """Feed ``batches`` (lists of chunks) both ways; ``closes_after[i]`` lists the flows closed after
    batch ``i``.  Returns (rows one by one, rows in batches), one EventBatch per batch each."""
    results = []
    for batched in (False, True):
        parser, out, built = make_parser(), EventBuilder(), []
        for i, chunks in enumerate(batches):
            if batched:
                parser.feed_batch(chunks, out)
            else:
                for chunk in chunks:
                    parser.feed(chunk, out)
            for flow in (closes_after or {}).get(i, ()):
                parser.close(flow, out)
            built.append(out.build())
        results.append(built)
    return results


def check_same(make_parser, batches, closes_after=None, where: str = "") -> int:
    """Assert both paths agree batch by batch; return the number of rows compared."""
    one, many = run_both(make_parser, batches, closes_after)
    for i, (a, b) in enumerate(zip(one, many)):
        same_rows(a, b, f"{where} batch {i}")
    return sum(len(a) for a in one)


def regroup(chunks: list, rng: np.random.Generator, largest: int = 40) -> list[list]:
    """``chunks`` cut into consecutive batches of random sizes (1..largest)."""
    out, i = [], 0
    while i < len(chunks):
        n = int(rng.integers(1, largest + 1))
        out.append(chunks[i: i + n])
        i += n
    return out
