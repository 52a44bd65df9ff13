"""Click-delay models for datasets that record a click but not when it happened.

A positive row yields an Impression at t and a Click at t + delay. Delays are drawn from a hash of
(seed, impression id), not from a shared random stream, so a row's delay does not depend on which
other rows were read before it (a slice of a dataset gets the same delays as the whole file).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass
from typing import Literal, Protocol

DelayKind = Literal["immediate", "fixed", "exponential", "lognormal"]


class ClickDelay(Protocol):
    def delay_ms(self, impression_id: str) -> int: ...


def _uniform(seed: int, key: str) -> float:
    """A uniform draw in (0, 1) that is stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


@dataclass(frozen=True, slots=True)
class ImmediateDelay:
    def delay_ms(self, impression_id: str) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class FixedDelay:
    ms: int

    def __post_init__(self) -> None:
        if self.ms < 0:
            raise ValueError(f"delay ms must be >= 0, got {self.ms}")

    def delay_ms(self, impression_id: str) -> int:
        return self.ms


@dataclass(frozen=True, slots=True)
class ExponentialDelay:
    """Memoryless delays with the given mean (Chapelle 2014 models conversion delays this way)."""

    mean_ms: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mean_ms <= 0:
            raise ValueError(f"mean_ms must be > 0, got {self.mean_ms}")

    def delay_ms(self, impression_id: str) -> int:
        return int(-self.mean_ms * math.log(_uniform(self.seed, impression_id)))


@dataclass(frozen=True, slots=True)
class LogNormalDelay:
    """Heavy-tailed delays: most clicks come within seconds, a few much later."""

    median_ms: float
    sigma: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.median_ms <= 0 or self.sigma <= 0:
            raise ValueError(f"median_ms and sigma must be > 0, got {self.median_ms}, {self.sigma}")

    def delay_ms(self, impression_id: str) -> int:
        z = statistics.NormalDist().inv_cdf(_uniform(self.seed, impression_id))
        return int(self.median_ms * math.exp(self.sigma * z))


def make_delay(kind: DelayKind, ms: float = 0.0, sigma: float = 1.0, seed: int = 0) -> ClickDelay:
    """A delay model by name; ``ms`` is the fixed delay, the mean (exponential) or the median (lognormal)."""
    if kind == "immediate":
        return ImmediateDelay()
    if kind == "fixed":
        return FixedDelay(int(ms))
    if kind == "exponential":
        return ExponentialDelay(ms, seed)
    if kind == "lognormal":
        return LogNormalDelay(ms, sigma, seed)
    raise ValueError(f"unknown click delay kind {kind!r}: use immediate, fixed, exponential or lognormal")
