"""The simulated substation's process: values that evolve like a plant and are pure functions of time.

Every signal answers ``value(t)`` for any ``t`` (seconds since the capture start) without hidden
state, so the master, the HMI and an attacker polling the same device in any order see one
consistent process.  Noise is a first-order autoregressive series drawn once per signal from
NumPy's PCG64 (platform-independent) on a 1 s grid and interpolated.

>>> plant = Plant(seed=1, start_epoch=1767600000.0, duration=600)
>>> feeder = plant.feeder("F1")
>>> 10.5 < feeder.voltage_kv.value(0) < 11.5
True
>>> feeder.energy_kwh.value(300) >= feeder.energy_kwh.value(299)
True
"""

from __future__ import annotations

import bisect
import math
import zlib

import numpy as np

DAY = 86400.0


class Analog:
    """nominal x (1 + daily drift) + AR(1) noise, clipped to the instrument range; spoofable."""

    def __init__(self, rng: np.random.Generator, start_epoch: float, duration: float, nominal: float,
                 daily: float, noise: float, lo: float, hi: float, peak_hour: float = 18.0):
        self.start_epoch, self.nominal, self.daily, self.lo, self.hi = start_epoch, nominal, daily, lo, hi
        self.peak_hour = peak_hour
        n = int(duration) + 4
        shocks = rng.normal(0.0, noise, n)
        series = np.empty(n)
        level = 0.0
        for i in range(n):  # AR(1), coefficient 0.95: slow wander plus sensor noise
            level = 0.95 * level + shocks[i]
            series[i] = level
        self.noise = series + rng.normal(0.0, noise * 0.3, n)
        self.overrides: list[tuple[float, float, str, float]] = []  # (t0, t1, "freeze"|"step", amount)

    def true_value(self, t: float) -> float:
        tod = (self.start_epoch + t) % DAY
        drift = self.daily * math.cos(2 * math.pi * (tod - self.peak_hour * 3600.0) / DAY)
        i = min(max(int(t), 0), len(self.noise) - 2)
        frac = min(max(t - i, 0.0), 1.0)
        noise = self.noise[i] * (1 - frac) + self.noise[i + 1] * frac
        return min(max(self.nominal * (1 + drift) + float(noise) * self.nominal, self.lo), self.hi)

    def value(self, t: float) -> float:
        for t0, t1, mode, amount in self.overrides:
            if t0 <= t <= t1:
                return self.true_value(t0) if mode == "freeze" else self.true_value(t) + amount
        return self.true_value(t)


class Counter:
    """An energy counter that only rises: integral of a load around ``rate_per_s``."""

    def __init__(self, rng: np.random.Generator, start_value: int, rate_per_s: float):
        self.start_value, self.rate = start_value, rate_per_s
        self.wobble = float(rng.uniform(0.05, 0.15))

    def value(self, t: float) -> int:
        # derivative = rate * (1 + wobble * cos(...) ) stays positive, so the count never falls.
        return self.start_value + int(self.rate * (t + self.wobble * 600 / (2 * math.pi) * math.sin(2 * math.pi * t / 600)))


class Breaker:
    """A breaker position (True = closed) that changes only at given times (commands, rare trips)."""

    def __init__(self, closed: bool = True):
        self.initial = closed
        self.changes: list[float] = []

    def toggle_at(self, t: float) -> None:
        bisect.insort(self.changes, t)

    def value(self, t: float) -> bool:
        return self.initial ^ (bisect.bisect_right(self.changes, t) % 2 == 1)


class Feeder:
    """One bay of the substation as its outstation/PLC sees it."""

    def __init__(self, plant: "Plant", name: str):
        rng = plant.rng(name)
        s, d = plant.start_epoch, plant.duration
        self.name = name
        self.voltage_kv = Analog(rng, s, d, 11.0 * float(rng.uniform(0.99, 1.01)), 0.015, 0.0006, 9.0, 13.0)
        self.current_a = Analog(rng, s, d, float(rng.uniform(150, 320)), 0.25, 0.002, 0.0, 1200.0)
        self.frequency_hz = Analog(rng, s, d, 50.0, 0.0, 0.00003, 49.5, 50.5)
        self.temperature_c = Analog(rng, s, d, float(rng.uniform(35, 45)), 0.08, 0.0005, -20, 120)
        self.breakers = [Breaker(True), Breaker(True), Breaker(bool(rng.integers(0, 2)))]
        self.energy_kwh = Counter(rng, int(rng.integers(1_000_000, 9_000_000)), float(rng.uniform(0.6, 1.4)))
        self.setpoints: list[tuple[float, int, int]] = []  # (t, register/point, value) writes that took effect
        # A replay attack (t0, t1, lag): the device reports, for each of its reads, the measurements it read
        # ``lag`` s earlier (the recording's read nearest that time, per kind of read: value for value)
        self.replay: tuple[float, float, float] | None = None
        self.read_log: dict[str, list[float]] = {}

    def at(self, t: float, kind: str = "") -> float:
        """The time whose measurements the device reports when read at ``t`` (a read of ``kind``): ``t``
        itself, or during a replay the time of the recorded read of that kind nearest ``t - lag``."""
        if self.replay is None:
            return t
        t0, t1, lag = self.replay
        log = self.read_log.setdefault(kind, [])
        if t0 <= t <= t1 and log:
            i = bisect.bisect_left(log, t - lag)
            return min(log[max(i - 1, 0):i + 1], key=lambda x: abs(x - (t - lag)))
        bisect.insort(log, t)
        return t

    def seamless_lag(self, t0: float, t1: float, step: float, lo: float, hi: float) -> float:
        """The lag (a multiple of ``step`` in [lo, hi]) whose recording best matches the live values at both
        ends of [t0, t1]: what an attacker picks so that neither splice shows as a jump."""
        signals = (self.voltage_kv, self.current_a, self.frequency_hz, self.temperature_c)
        scale = [max(float(np.std(np.diff(s.noise))) * s.nominal, 1e-9) for s in signals]
        best, best_d = lo, math.inf
        lag = lo
        while lag <= min(hi, t0):
            d = sum(abs(s.value(t) - s.value(t - lag)) / k for s, k in zip(signals, scale) for t in (t0, t1))
            if d < best_d:
                best, best_d = lag, d
            lag += step
        return best

    def power_kw(self, t: float) -> float:
        # The true voltage: a spoofed voltage register does not change what the meter integrates.
        return math.sqrt(3) * self.voltage_kv.true_value(t) * self.current_a.value(t) * 0.95

    def write(self, t: float, point: int, value: int) -> None:
        bisect.insort(self.setpoints, (t, point, value))

    def setpoint(self, t: float, point: int, default: int) -> int:
        value = default
        for when, p, v in self.setpoints:
            if when > t:
                break
            if p == point:
                value = v
        return value


class Plant:
    def __init__(self, seed: int, start_epoch: float, duration: float):
        self.seed, self.start_epoch, self.duration = seed, start_epoch, duration
        self.feeders: dict[str, Feeder] = {}

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def feeder(self, name: str) -> Feeder:
        if name not in self.feeders:
            self.feeders[name] = Feeder(self, name)
        return self.feeders[name]
