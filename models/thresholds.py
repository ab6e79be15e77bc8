"""Scores become alerts through thresholds calibrated on the learning window, never hand-picked.

:func:`calibrate` picks the score a fraction ``budget`` of normal windows would exceed.  When the
learning window holds enough scores the empirical quantile is used; beyond what it can resolve
(``budget < 10 / n``) the tail above the 90th percentile is fitted with an exponential (the
peaks-over-threshold method with shape 0, as in SPOT, Siffer et al., KDD 2017) and extrapolated:
``t = u + mean_excess * ln(tail_fraction / budget)``.  With ``floor`` > 0 the threshold never
falls below the largest learning score times ``floor`` (``floor=1``: nothing seen while learning
alerts).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> s = rng.exponential(1.0, 100_000)
>>> round(calibrate(s, 1e-2), 1)  # quantile: ln(100) = 4.6
4.6
>>> 9.0 < calibrate(s[:2000], 1e-4) < 11.0  # extrapolated: ln(10_000) = 9.2
True
"""

from __future__ import annotations

import numpy as np


def calibrate(scores, budget: float, floor: float = 0.0) -> float:
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.shape[0] == 0:
        return float("inf")
    n = s.shape[0]
    if budget * n >= 10:
        t = float(np.quantile(s, 1.0 - budget))
    else:
        u = float(np.quantile(s, 0.9))
        excess = s[s > u] - u
        scale = float(excess.mean()) if excess.shape[0] else 0.0
        if scale <= 0:  # flat tail: spread from the interquartile range instead
            q1, q3 = np.quantile(s, [0.25, 0.75])
            scale = max(float(q3 - q1), 1e-9 * max(abs(u), 1.0))
        tail_fraction = max(excess.shape[0], 1) / n
        t = u + scale * np.log(tail_fraction / budget)
    smax = float(s.max())
    return float(max(t, smax * floor if smax > 0 else smax))


class ScoreMonitor:
    """Model health for one score stream: drift of the median against learning, fraction above
    threshold.  Plain numbers for the metrics exporter.

    >>> m = ScoreMonitor(); m.set_reference(np.arange(100.0), threshold=95.0)
    >>> m.observe(np.array([50.0, 99.0])); m.as_dict()["fraction_above"]
    0.5
    """

    def __init__(self, decay: float = 0.01):
        self.decay = decay
        self.ref_median = 0.0
        self.ref_iqr = 1.0
        self.threshold = float("inf")
        self.median = 0.0
        self.above = 0
        self.seen = 0

    def set_reference(self, scores, threshold: float) -> None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape[0]:
            q1, q2, q3 = np.quantile(s, [0.25, 0.5, 0.75])
            self.ref_median, self.ref_iqr = float(q2), float(max(q3 - q1, 1e-9))
            self.median = float(q2)
        self.threshold = float(threshold)

    def observe(self, scores) -> None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape[0] == 0:
            return
        self.seen += int(s.shape[0])
        self.above += int(np.count_nonzero(s > self.threshold))
        self.median += min(1.0, self.decay * s.shape[0]) * (float(np.median(s)) - self.median)

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "score_drift": (self.median - self.ref_median) / self.ref_iqr,
                "fraction_above": self.above / self.seen if self.seen else 0.0, "scored": self.seen}
