"""What the simulator knows and a real site never does: the true click probability of every shown item.

Per arm it keeps the expected CTR (mean true probability of the shown items: low-variance), the
realized CTR (the clicks it drew), a rolling exact AUC of the served predictions against the drawn
clicks, and the same per model version, so a report can show quality rising as versions advance.

Memory stays bounded however long the world runs (``reloop demo`` until Ctrl-C): the whole-run AUCs are
counted in fine logit bins (``BinnedAUC``), and a version's exact AUC is kept while it is one of the
arm's newest ``EXACT_VERSIONS``, then only its value (the exact sorted scores grew ~130 MB an hour).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from reloop.engine.metrics.online import ExactAUC, RollingBinaryMetrics


class BinnedAUC:
    """ROC AUC over scores counted in ``bins`` equal bins of logit(p) (p clipped to [1e-7, 1 - 1e-7]):
    fixed memory, and within ``tie_bound()`` of the exact AUC (pairs sharing a bin count as ties).
    ``get()`` is NaN until both classes are present."""

    LOGIT_MAX = 16.2  # logit(1 - 1e-7) = 16.118

    def __init__(self, bins: int = 1 << 15) -> None:
        self.bins = bins
        self._pos = np.zeros(bins, dtype=np.int64)
        self._neg = np.zeros(bins, dtype=np.int64)

    def update_many(self, y: np.ndarray, p: np.ndarray) -> None:
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
        logit = np.log(p) - np.log1p(-p)
        scaled = (logit + self.LOGIT_MAX) * (self.bins / (2 * self.LOGIT_MAX))
        index = np.clip(scaled.astype(np.int64), 0, self.bins - 1)
        clicked = np.asarray(y).astype(bool)
        np.add.at(self._pos, index[clicked], 1)
        np.add.at(self._neg, index[~clicked], 1)

    @property
    def n_pos(self) -> int:
        return int(self._pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self._neg.sum())

    def get(self) -> float:
        n_pos, n_neg = self.n_pos, self.n_neg
        if n_pos == 0 or n_neg == 0:
            return math.nan
        below = np.cumsum(self._neg) - self._neg  # negatives in lower bins
        u = float(np.dot(self._pos, below)) + 0.5 * float(np.dot(self._pos, self._neg))
        return u / (n_pos * n_neg)

    def tie_bound(self) -> float:
        """The most the binning can move the AUC: half the share of (click, no click) pairs in one bin."""
        n = self.n_pos * self.n_neg
        return 0.5 * float(np.dot(self._pos, self._neg)) / n if n else math.nan


#: Versions of an arm whose exact AUC is kept (the newest); older ones keep only its value.
EXACT_VERSIONS = 3


@dataclass
class VersionStats:
    impressions: int = 0
    clicks: int = 0
    true_p_sum: float = 0.0
    auc: ExactAUC | None = field(default_factory=ExactAUC)
    final_auc: float = math.nan  # once ``auc`` is dropped: its value then

    def auc_value(self) -> float:
        return _safe_auc(self.auc) if self.auc is not None else self.final_auc

    def freeze(self) -> None:
        if self.auc is not None:
            self.final_auc, self.auc = _safe_auc(self.auc), None


class ArmStats:
    def __init__(self, name: str, *, window: int = 5000) -> None:
        self.name = name
        self.requests = 0
        self.impressions = 0
        self.clicks = 0
        self.true_p_sum = 0.0
        self.oracle_auc = BinnedAUC()  # the true probability as a ranker: the ceiling for any model
        self.served_auc = BinnedAUC()
        self.rolling = RollingBinaryMetrics(window)
        self._rolling_true: deque[float] = deque(maxlen=window)
        self._rolling_true_sum = 0.0
        self.by_version: dict[int, VersionStats] = {}
        self.first_version: int | None = None
        self.last_version: int | None = None
        self.first_at = self.last_at = math.nan  # time.monotonic() of the first and the latest request
        # user -> [impressions, clicks]: users, not impressions, are what the arms are randomised by.
        self.by_user: dict[str, list[int]] = {}

    def record(
        self,
        version: int,
        served: np.ndarray,
        true_p: np.ndarray,
        clicked: np.ndarray,
        user: str | None = None,
    ) -> None:
        self.requests += 1
        clicks = int(clicked.sum())
        if user is not None:
            counts = self.by_user.setdefault(user, [0, 0])
            counts[0] += len(served)
            counts[1] += clicks
        self.impressions += len(served)
        self.clicks += clicks
        self.true_p_sum += float(true_p.sum())
        vs = self.by_version.get(version)
        if vs is None:
            vs = self.by_version[version] = VersionStats()
            for old in sorted(self.by_version)[:-EXACT_VERSIONS]:
                self.by_version[old].freeze()
        vs.impressions += len(served)
        vs.clicks += clicks
        vs.true_p_sum += float(true_p.sum())
        self.served_auc.update_many(clicked, served)
        self.oracle_auc.update_many(clicked, true_p)
        for y, p, t in zip(clicked.tolist(), served.tolist(), true_p.tolist(), strict=True):
            y = int(y)
            p = min(max(float(p), 1e-7), 1 - 1e-7)
            self.rolling.update(y, p)
            if vs.auc is not None:  # a late request of a version no longer among the newest: counted only
                vs.auc.update(y, p)
            if len(self._rolling_true) == self._rolling_true.maxlen:
                self._rolling_true_sum -= self._rolling_true[0]
            self._rolling_true.append(float(t))
            self._rolling_true_sum += float(t)
        self.last_at = time.monotonic()
        if self.first_version is None:
            self.first_version = version
            self.first_at = self.last_at
        self.last_version = version if self.last_version is None else max(self.last_version, version)

    @property
    def true_ctr(self) -> float:
        return self.true_p_sum / self.impressions if self.impressions else math.nan

    @property
    def realized_ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else math.nan

    def rolling_auc(self) -> float:
        return _safe_auc(self.rolling.auc)

    def rolling_true_ctr(self) -> float:
        """Mean true click probability of the last ``window`` shown items."""
        return self._rolling_true_sum / len(self._rolling_true) if self._rolling_true else math.nan

    def summary(self) -> dict[str, object]:
        return {
            "arm": self.name,
            "requests": self.requests,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "true_ctr": self.true_ctr,
            "realized_ctr": self.realized_ctr,
            "served_auc": _safe_auc(self.served_auc),
            "rolling_auc": self.rolling_auc(),
            "rolling_true_ctr": self.rolling_true_ctr(),
            "oracle_auc": _safe_auc(self.oracle_auc),
            "served_auc_binning": self.served_auc.tie_bound(),  # at most this far from the exact AUC
            "first_version": self.first_version,
            "last_version": self.last_version,
            "versions": {
                v: {
                    "impressions": s.impressions,
                    "true_ctr": s.true_p_sum / s.impressions if s.impressions else math.nan,
                    "auc": s.auc_value(),
                }
                for v, s in sorted(self.by_version.items())
            },
        }


def _safe_auc(auc: ExactAUC | BinnedAUC) -> float:
    return auc.get() if auc.n_pos and auc.n_neg else math.nan


class SimStats:
    """All arms' stats behind one lock (the request thread writes, the display thread reads)."""

    def __init__(self, *, window: int = 5000) -> None:
        self.window = window
        self.arms: dict[str, ArmStats] = {}
        self.lock = threading.Lock()
        self.not_ready = 0
        self.errors = 0
        self.clicks_sent = 0
        self.clicks_resent = 0  # given up on by a producer (a long broker outage), sent again
        self.clicks_late = 0  # drawn beyond the attribution window
        self.clicks_pending_at_end = 0

    def arm(self, name: str) -> ArmStats:
        stats = self.arms.get(name)
        if stats is None:
            stats = self.arms[name] = ArmStats(name, window=self.window)
        return stats


def lift(treatment: float, control: float) -> float:
    """Relative lift of treatment over control: CTR_t / CTR_c - 1."""
    if not control or math.isnan(control) or math.isnan(treatment):
        return math.nan
    return treatment / control - 1.0


def ab_minus_aa(
    ctr: dict[str, float], *, treatment: str, control: str, aa: tuple[str, str] | None = None
) -> dict[str, float]:
    """``ab_lift``, and with an A/A pair ``aa_lift`` and ``ab_minus_aa``, from per-arm CTRs."""
    if treatment not in ctr or control not in ctr:
        return {}
    out = {"ab_lift": lift(ctr[treatment], ctr[control])}
    if aa is not None and aa[0] in ctr and aa[1] in ctr:
        out["aa_lift"] = lift(ctr[aa[0]], ctr[aa[1]])
        out["ab_minus_aa"] = out["ab_lift"] - out["aa_lift"]
    return out


def ab_report(
    stats: SimStats, *, treatment: str, control: str, aa: tuple[str, str] | None = None
) -> dict[str, float]:
    """The paper's online readout: the A/B lift minus the A/A lift (the noise between two identical
    arms), computed from the true CTR and from the drawn clicks."""
    out: dict[str, float] = {}
    for kind, attr in (("true", "true_ctr"), ("clicks", "realized_ctr")):
        ctr = {name: getattr(arm, attr) for name, arm in stats.arms.items()}
        for key, value in ab_minus_aa(ctr, treatment=treatment, control=control, aa=aa).items():
            out[f"{key}_{kind}"] = value
    return out


# The usual planning constants: a two-sided test at 5% with 80% power.
Z_PLAN = 1.959964 + 0.841621


def detectable_lift(a: ArmStats, b: ArmStats) -> float:
    """The smallest relative click-rate difference between two arms that their drawn clicks detect
    (two-sided 5%, power 80%) at their current size, by the delta method on log CTR."""
    if not (a.clicks and b.clicks):
        return math.nan
    return Z_PLAN * math.sqrt(log_ctr_variance(a) + log_ctr_variance(b))


def log_ctr_variance(arm: ArmStats) -> float:
    """var(log CTR) of an arm. Users are assigned to arms, and a user's impressions share that user's
    taste and visit rate, so with every impression's user known the variance is taken over users (the
    delta method for a ratio of per-user sums): var(CTR) = n/(n-1) * sum_u (clicks_u - CTR *
    impressions_u)^2 / impressions^2. With one impression per user that is the binomial's
    (1 - CTR) / clicks, which is used without users. Treating a visit-heavy user's impressions as
    independent understates the noise: in the demo's world several times over."""
    ctr = arm.realized_ctr
    if not _users_known(arm):
        return (1.0 - ctr) / arm.clicks
    counts = np.array(list(arm.by_user.values()), dtype=np.float64)
    residual = counts[:, 1] - ctr * counts[:, 0]
    n = len(counts)
    var_ctr = n / (n - 1) * float(residual @ residual) / float(arm.impressions) ** 2
    return var_ctr / ctr**2


def _users_known(arm: ArmStats) -> bool:
    """Whether every impression of ``arm`` was recorded with its user (and there are two users or more)."""
    users = arm.by_user
    return len(users) >= 2 and sum(n for n, _ in users.values()) == arm.impressions


def ab_plan(
    stats: SimStats, *, treatment: str, control: str, aa: tuple[str, str] | None = None
) -> dict[str, float]:
    """How long the A/B readout on drawn clicks must run to separate the arms.

    A/B minus A/A is close to the lift of the treatment over the A/A copy (``aa[0]``; the control's
    noise cancels), so its detectable size comes from those two arms; without an A/A pair, from the
    treatment and the control. ``needed_s``: the run length at which the lift this run observed would be
    detectable (the detectable size shrinks as 1 / sqrt(clicks), and clicks grow with time)."""
    other = aa[0] if aa else control
    arms = stats.arms
    if treatment not in arms or other not in arms or control not in arms:
        return {}
    t, o = arms[treatment], arms[other]
    detectable = detectable_lift(t, o)
    observed = ab_minus_aa(
        {n: a.realized_ctr for n, a in arms.items()}, treatment=treatment, control=control, aa=aa
    ).get("ab_minus_aa" if aa else "ab_lift", math.nan)
    elapsed = max(t.last_at, o.last_at) - min(t.first_at, o.first_at)
    needed = elapsed * (detectable / observed) ** 2 if observed else math.inf
    clustered = _users_known(t) and _users_known(o)
    return {
        "detectable": detectable,
        "observed": observed,
        "elapsed_s": elapsed,
        "needed_s": needed,
        "unit": "user" if clustered else "impression",
    }
