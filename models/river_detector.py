"""River online anomaly model on per-channel window aggregates.

River's HalfSpaceTrees (Tan et al., IJCAI 2011) behind a MinMaxScaler.  It sees one vector per active
channel per second (:class:`models.features.WindowFeatures`), not one per packet; it keeps learning in
monitoring from windows that do not alert (River's ``protect_anomaly_detector`` idea), and its memory
is fixed by the tree size.

**Learning** goes through River's own API, one row at a time (``model.learn_one(x)``): River builds
the trees, updates the scaler's running min/max and each node's mass, and swaps the reference and
latest masses every ``window_size`` rows.  When channels are many (an aggregation point watching
dozens of substations) it learns from a uniform random sample of the windows, at most
``learn_per_s`` of them per second of capture time; a plant of a few devices gives fewer than that,
so every window is learned.

**Scoring** reads River's model and scores a whole batch with NumPy.  The plain form is

    scores = [model.score_one(dict(zip(names, row))) for row in X]

and :meth:`RiverDetector.score_one_by_one` keeps it (the tests check both give identical numbers).
River's ``score_one`` scales ``x`` with the scaler's current min/max, then walks each tree from the
root, adding ``r_mass * 2**depth`` at every node and stopping below a node whose reference mass is
under ``0.1 * window_size``; the score is ``1 - total / max_score``.  :class:`_HSTArrays` holds the
tree *structure* (split feature and threshold per node, heap order), which River never changes after
building it, and re-reads the masses only when River has swapped windows (every ``window_size``
learned rows), so a batch costs one descent per tree level over all rows and trees at once.  The sums
are of integers times powers of two, so they are exact and equal to River's.

>>> import numpy as np
>>> d = RiverDetector(seed=1); rng = np.random.default_rng(0)
>>> d.learn(rng.normal(0, 1, (300, 3)))
>>> s = d.score(np.array([[0.0, 0.0, 0.0], [40.0, 40.0, 40.0]]))
>>> bool(s[1] > s[0]), bool(np.array_equal(s, d.score_one_by_one(np.array([[0.0, 0.0, 0.0], [40.0, 40.0, 40.0]]))))
(True, True)
"""

from __future__ import annotations

import numpy as np


class RiverDetector:
    name = "river"

    def __init__(self, n_trees: int = 15, height: int = 8, window_size: int = 250, seed: int = 42,
                 learn_per_s: float = 8.0):
        from river import anomaly, preprocessing

        self.params = {"n_trees": n_trees, "height": height, "window_size": window_size, "seed": seed}
        self.scaler = preprocessing.MinMaxScaler()
        self.hst = anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed)
        self.model = self.scaler | self.hst
        self.learn_per_s = float(learn_per_s)
        self.rng = np.random.default_rng(seed)
        self.learned = 0
        self.offered = 0
        self._arrays: _HSTArrays | None = None
        self._names: list[str] = []

    def _rows(self, X: np.ndarray):
        if len(self._names) != X.shape[1]:
            self._names = [f"f{j}" for j in range(X.shape[1])]
        names = self._names
        return [dict(zip(names, row)) for row in X.tolist()]

    def learn(self, X: np.ndarray) -> None:
        """Every row, in order, through River's ``learn_one``."""
        learn_one = self.model.learn_one
        for x in self._rows(X):
            learn_one(x)
        self.learned += X.shape[0]
        self.offered += X.shape[0]

    def learn_sample(self, X: np.ndarray, seconds: float) -> None:
        """Learn from the windows of ``seconds`` of capture time, at most ``learn_per_s`` per second on
        average (a uniform random sample, in order); all of them when they are fewer."""
        n = X.shape[0]
        if n == 0:
            return
        cap = self.learn_per_s * max(seconds, 1.0)
        if n > cap:
            keep = self.rng.random(n) < cap / n
            self.offered += n - int(np.count_nonzero(keep))
            X = X[keep]
        self.learn(X)

    def score(self, X: np.ndarray) -> np.ndarray:
        """River's ``score_one`` of every row, computed on the whole batch at once (module docstring)."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        if n == 0 or self.hst._first_window or not self.hst.trees:
            return np.zeros(n)
        if self._arrays is None:
            self._arrays = _HSTArrays(self.hst, X.shape[1])
        scaled = self._scale(X)
        return self._arrays.score(scaled, self.learned // self.hst.window_size)

    def _scale(self, X: np.ndarray) -> np.ndarray:
        """MinMaxScaler.transform_one on every row: ``(x - min) / (max - min)``, 0 where max == min."""
        d = X.shape[1]
        lo = np.array([self.scaler.min[f"f{j}"].get() for j in range(d)], dtype=np.float64)
        hi = np.array([self.scaler.max[f"f{j}"].get() for j in range(d)], dtype=np.float64)
        span = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (X - lo) / np.where(span != 0, span, 1.0)
        return np.where(span != 0, out, 0.0)

    def score_one_by_one(self, X: np.ndarray) -> np.ndarray:
        """The reference: River's own ``score_one`` per row (slow; used by the tests)."""
        return np.array([self.model.score_one(x) for x in self._rows(np.asarray(X, dtype=np.float64))],
                        dtype=np.float64)


class _HSTArrays:
    """A River HalfSpaceTrees as arrays: the fixed structure once, the reference masses per window swap.

    Nodes of each tree are numbered in heap order (root 0, children of ``i`` at ``2i+1`` left and
    ``2i+2`` right), as River's padded trees are complete binary trees of ``height`` levels.
    """

    def __init__(self, hst, n_features: int):
        self.hst = hst
        self.height = int(hst.height)
        size = 2 ** (self.height + 1) - 1
        T = len(hst.trees)
        self.feature = np.zeros((T, size), dtype=np.int64)
        self.threshold = np.full((T, size), np.inf)
        self.nodes: list[list] = []
        for t, root in enumerate(hst.trees):
            nodes = [None] * size
            stack = [(root, 0)]
            while stack:  # once per model: River keeps its tree structure fixed
                node, i = stack.pop()
                nodes[i] = node
                if hasattr(node, "feature"):
                    self.feature[t, i] = int(str(node.feature)[1:])  # River feature "f<j>" -> column j
                    self.threshold[t, i] = float(node.threshold)
                    stack.append((node.children[0], 2 * i + 1))
                    stack.append((node.children[1], 2 * i + 2))
            self.nodes.append(nodes)
        self.tree_index = np.arange(T)[:, None]
        self.pivots = -1
        self.r_mass = np.zeros((T, size))

    def score(self, X: np.ndarray, pivots: int) -> np.ndarray:
        if pivots != self.pivots:  # River swapped its mass windows since we last read them
            self.r_mass = np.array([[node.r_mass for node in nodes] for nodes in self.nodes], dtype=np.float64)
            self.pivots = pivots
        hst = self.hst
        size_limit = 0.1 * hst.window_size
        n = X.shape[0]
        T = self.feature.shape[0]
        tix = self.tree_index
        rows = np.arange(n)[None, :]
        node = np.zeros((T, n), dtype=np.int64)
        alive = np.ones((T, n), dtype=bool)
        total = np.zeros((T, n))
        for depth in range(self.height):
            r = self.r_mass[tix, node]
            total += np.where(alive, r * float(2 ** depth), 0.0)
            alive &= r >= size_limit
            go_right = ~(X[rows, self.feature[tix, node]] < self.threshold[tix, node])
            node = 2 * node + 1 + go_right
        total += np.where(alive, self.r_mass[tix, node] * float(2 ** self.height), 0.0)
        return 1.0 - total.sum(axis=0) / hst._max_score
