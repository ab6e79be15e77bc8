"""PyOD model fitted on the learning window's per-channel window aggregates, scoring whole batches.

The engine uses IForest (Liu et al., 2008; ``method="iforest"``): on the held-out generated captures
(docs/detection.md) HBOS (Goldstein & Dengel, 2012), which scores each feature's histogram on its
own, raised 2 false alerts on an engineering workstation's rare sessions where IForest raised none,
and both caught the same attacks.  HBOS (~600k rows/s) and ECOD stay available through ``method``;
ECOD recomputes its empirical CDFs against the training set on every call, which is slow for the
small batches a stream gives.  The model is refitted every ``refit_every`` scored rows from a bounded
reservoir of windows that did not alert, so a slow drift of the plant follows into the baseline but
an attack does not.

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

    def __init__(self, method: str = "iforest", refit_every: int = 20000, reservoir: int = 20000, seed: int = 7):
        self.method = method
        self.refit_every = refit_every
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
            return
        self.model = self._new()
        self.model.fit(self.reservoir)
        self.since_fit = 0
        self.fits += 1

    def score(self, X: np.ndarray) -> np.ndarray:
        if self.model is None or X.shape[0] == 0:
            return np.zeros(X.shape[0])
        return np.asarray(self.model.decision_function(np.asarray(X, dtype=np.float64)), dtype=np.float64)

    def learn(self, X: np.ndarray) -> None:
        """Add normal windows to the reservoir (reservoir sampling, Vitter's algorithm R); refit on schedule."""
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
        if self.since_fit >= self.refit_every:
            self._refit()
