"""River online anomaly model on per-channel window aggregates.

River's HalfSpaceTrees (Tan et al., IJCAI 2011) behind a MinMaxScaler, through River's own per-row
API (``learn_one`` / ``score_one``).  It sees one vector per active channel per second
(:class:`models.features.WindowFeatures`), not one per packet: about 16k rows/s is the speed of that
API, cyclic ICS traffic gives a few rows per channel per second, so this costs little and loses
nothing a per-packet score would catch.  It keeps learning in monitoring from windows that do not
alert (River's ``protect_anomaly_detector`` idea), and its memory is fixed by the tree size.

>>> import numpy as np
>>> d = RiverDetector(seed=1); rng = np.random.default_rng(0)
>>> d.learn(rng.normal(0, 1, (300, 3)))
>>> s = d.score(np.array([[0.0, 0.0, 0.0], [40.0, 40.0, 40.0]]))
>>> bool(s[1] > s[0])
True
"""

from __future__ import annotations

import numpy as np


class RiverDetector:
    name = "river"

    def __init__(self, n_trees: int = 15, height: int = 8, window_size: int = 250, seed: int = 42):
        from river import anomaly, preprocessing

        self.params = {"n_trees": n_trees, "height": height, "window_size": window_size, "seed": seed}
        self.model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(
            n_trees=n_trees, height=height, window_size=window_size, seed=seed)
        self.learned = 0

    @staticmethod
    def _rows(X: np.ndarray):
        names = [f"f{j}" for j in range(X.shape[1])]
        return [dict(zip(names, row)) for row in X.tolist()]

    def learn(self, X: np.ndarray) -> None:
        for x in self._rows(X):
            self.model.learn_one(x)
        self.learned += X.shape[0]

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.array([self.model.score_one(x) for x in self._rows(X)], dtype=np.float64)
