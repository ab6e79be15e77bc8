"""PyOD model fitted on the learning window's per-channel window aggregates, scoring whole batches.

The engine uses IForest (Liu et al., 2008; ``method="iforest"``): on the held-out generated captures
(docs/detection.md) HBOS (Goldstein & Dengel, 2012), which scores each feature's histogram on its
own, raised 2 false alerts on an engineering workstation's rare sessions where IForest raised none,
and both caught the same attacks.  HBOS (~600k rows/s) and ECOD stay available through ``method``;
ECOD recomputes its empirical CDFs against the training set on every call, which is slow for the
small batches a stream gives.  The model is refitted from a bounded reservoir of windows that did
not alert, once ``refit_every`` windows have been added and at least ``refit_s`` seconds of capture
time have passed since the last fit, so a slow drift of the plant follows into the baseline but an
attack does not.  IForest draws 256 rows per tree whatever it is given, so it is fitted on a random
``fit_rows`` of the reservoir: the same trees in distribution, at a fraction of the cost of PyOD's
scoring of its whole training set on every fit.  Scoring descends the fitted trees in compiled code
(:class:`_Forest`), with the NumPy form kept as the reference.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> d = PyODDetector(); d.fit(rng.normal(0, 1, (500, 3)))
>>> s = d.score(np.array([[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]))
>>> bool(s[1] > s[0])
True
"""

from __future__ import annotations

import numpy as np


class PyODDetector:
    name = "pyod"

    def __init__(self, method: str = "iforest", refit_every: int = 20000, reservoir: int = 20000, seed: int = 7,
                 refit_s: float = 1800.0, fit_rows: int = 4096):
        self.method = method
        self.refit_every = refit_every
        self.refit_s = float(refit_s)
        self.fit_rows = int(fit_rows)
        self.last_fit_s: float | None = None
        self.reservoir_size = reservoir
        self.rng = np.random.default_rng(seed)
        self.model = None
        self.reservoir = np.empty((0, 0))
        self.seen = 0
        self.since_fit = 0
        self.fits = 0

    def _new(self):
        if self.method == "iforest":
            from pyod.models.iforest import IForest
            return IForest(n_estimators=100, random_state=0)
        if self.method == "ecod":
            from pyod.models.ecod import ECOD
            return ECOD()
        from pyod.models.hbos import HBOS
        return HBOS(n_bins=20)

    def fit(self, X: np.ndarray) -> None:
        self.reservoir = np.asarray(X, dtype=np.float64)[-self.reservoir_size:]
        self.seen = self.reservoir.shape[0]
        self._refit()

    def _refit(self) -> None:
        if self.reservoir.shape[0] < 10:
            self.model = None
            self.forest = None
            return
        self.model = self._new()
        R = self.reservoir
        if self.method == "iforest" and R.shape[0] > self.fit_rows:
            R = R[np.sort(self.rng.choice(R.shape[0], self.fit_rows, replace=False))]
        self.model.fit(R)
        self.forest = _Forest(self.model) if self.method == "iforest" else None
        self.since_fit = 0
        self.fits += 1

    def score(self, X: np.ndarray) -> np.ndarray:
        if self.model is None or X.shape[0] == 0:
            return np.zeros(X.shape[0])
        X = np.asarray(X, dtype=np.float64)
        if self.forest is not None:
            return self.forest.decision_function(X)
        return np.asarray(self.model.decision_function(X), dtype=np.float64)

    def learn(self, X: np.ndarray, now_s: float | None = None) -> None:
        """Add normal windows to the reservoir (reservoir sampling, Vitter's algorithm R); refit on schedule
        (``now_s``: capture time of the rows, seconds)."""
        X = np.asarray(X, dtype=np.float64)
        n_in = X.shape[0]
        if n_in == 0:
            return
        if self.reservoir.shape[0] == 0:
            self.reservoir = np.empty((0, X.shape[1]))
        room = self.reservoir_size - self.reservoir.shape[0]
        if room > 0:  # still filling: append the first rows in one step
            self.reservoir = np.vstack([self.reservoir, X[:room]])
            self.seen += min(room, X.shape[0])
            X = X[room:]
        if X.shape[0]:
            seen = self.seen + 1 + np.arange(X.shape[0])
            j = (self.rng.random(X.shape[0]) * seen).astype(np.int64)  # uniform in [0, seen)
            keep = j < self.reservoir_size
            self.reservoir[j[keep]] = X[keep]  # later rows win a slot they share, as in the loop form
            self.seen += X.shape[0]
        self.since_fit += n_in
        if now_s is not None and self.last_fit_s is None:
            self.last_fit_s = now_s  # the schedule starts with the first rows learned after the fit
        due = now_s is None or self.last_fit_s is None or now_s - self.last_fit_s >= self.refit_s
        if self.since_fit >= self.refit_every and due:
            self._refit()
            self.last_fit_s = now_s


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n), the mean path length of an unsuccessful search in a binary search tree of n points
    (Liu et al., 2008, eq. 1), as scikit-learn computes it."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _Forest:
    """A fitted PyOD/scikit-learn IForest as flat arrays, scored with one vectorised descent per tree.

    scikit-learn scores through joblib, with a fixed cost of tens of milliseconds per call whatever
    the batch size; a stream scores small batches many times.  Same numbers as PyOD's
    ``decision_function`` (``2 ** (-E[h(x)] / c(max_samples)) + offset``), checked in
    tests/test_detectors.py.
    """

    def __init__(self, pyod_model):
        sk = pyod_model.detector_
        lefts, rights, feats_all, thrs, values, roots = [], [], [], [], [], []
        base = 0
        for est, feats in zip(sk.estimators_, sk.estimators_features_):
            t = est.tree_
            leaf_depth = np.zeros(t.node_count)
            stack = [(0, 0)]
            while stack:  # node depths, once per fit
                node, d = stack.pop()
                leaf_depth[node] = d
                if t.children_left[node] >= 0:
                    stack.append((t.children_left[node], d + 1))
                    stack.append((t.children_right[node], d + 1))
            leaf = t.children_left < 0
            # all trees in one node array; a leaf points to itself so extra descent steps stay put
            idx = np.arange(t.node_count)
            lefts.append(np.where(leaf, idx, t.children_left) + base)
            rights.append(np.where(leaf, idx, t.children_right) + base)
            feats_all.append(np.asarray(feats)[np.maximum(t.feature, 0)])
            thrs.append(np.where(leaf, np.inf, t.threshold))
            values.append(leaf_depth + _average_path_length(t.n_node_samples))  # sklearn: path nodes - 1 + c(n)
            roots.append(base)
            base += t.node_count
        self.left, self.right = np.concatenate(lefts), np.concatenate(rights)
        self.feature, self.threshold = np.concatenate(feats_all), np.concatenate(thrs)
        self.value, self.roots = np.concatenate(values), np.asarray(roots, np.int64)
        self.max_depth = max(int(est.tree_.max_depth) for est in sk.estimators_)
        self.child = np.empty(2 * self.left.shape[0], np.int64)  # child[2 * node + go_right]
        self.child[0::2], self.child[1::2] = self.left, self.right
        self.norm = len(roots) * float(_average_path_length(np.array([sk._max_samples]))[0])
        self.offset = float(sk.offset_)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """PyOD's ``decision_function``: compiled descent (:func:`_path_sums`) when Numba is there."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        if _path_sums_fast is None or X.shape[0] == 0:
            return self.decision_function_numpy(X)
        depth = _path_sums_fast(X, self.roots, self.child, self.feature, self.threshold, self.value, self.max_depth)
        return 2.0 ** (-depth / self.norm) + self.offset

    def decision_function_numpy(self, X: np.ndarray) -> np.ndarray:
        """The same with NumPy: every tree descends over all rows at once, one level per step."""
        n = X.shape[0]
        node = np.repeat(self.roots[:, None], n, axis=1)  # (trees, rows): every tree descends at once
        rows = np.broadcast_to(np.arange(n), node.shape)
        for _ in range(self.max_depth):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(go_left, self.left[node], self.right[node])
        depth = self.value[node].sum(axis=0)
        return 2.0 ** (-depth / self.norm) + self.offset


def _path_sums(X, roots, child, feature, threshold, value, max_depth):
    """Per row, the sum over trees of the leaf's ``value`` (its depth + c(n)): the plain loop that
    :meth:`_Forest.decision_function_numpy` runs as arrays.  ``child[2 * node + go_right]``; a leaf is
    its own child, so ``max_depth`` steps always end on the leaf (no data-dependent branch);
    ``x <= threshold`` goes left (scikit-learn's rule; NaN goes right).  Tree by tree, so one tree's
    nodes stay in cache while every row descends it."""
    n = X.shape[0]
    out = np.zeros(n)
    for r in roots:
        for i in range(n):
            node = r
            for _ in range(max_depth):
                node = child[2 * node + (not (X[i, feature[node]] <= threshold[node]))]
            out[i] += value[node]
    return out


try:  # Numba is installed with PyOD; the NumPy descent is the fallback and the reference.
    import numba

    _path_sums_fast = numba.njit(cache=True, nogil=True)(_path_sums)
except Exception:  # pragma: no cover - exercised only where numba is missing
    _path_sums_fast = None
