"""A synthetic world of users and items whose preferences drift, with a known click probability.

Pure numpy and seeded: the same seed gives the same users, items, requests, clicks and delays (a
request's clicks and delays come from a generator of its own, ``outcome_rng(n)``, so several client
threads that finish their requests in any order still draw the same outcomes).
Time ``t_s`` is seconds since the world started (the caller maps it to wall-clock event times).

Why this shape: a CTR model sees ids and coarse attributes, so the truth is built from the same pieces.
A user's taste is its segment's taste plus a personal part; an item's profile is its category's
profile plus a personal part. Segment x category affinity is learnable from a few thousand samples
(so a demo shows AUC rising within minutes); the personal parts reward id embeddings later on.
Tastes rotate between two random directions over ``drift_period_s``, so a model trained on old
feedback goes stale: the reason to train continually.

>>> world = World(WorldConfig(seed=1))
>>> req = world.sample_request(t_s=0.0)
>>> len(req.candidates) == world.config.n_candidates
True
>>> p = world.click_probability(req, t_s=0.0)
>>> bool(((p > 0) & (p < 1)).all())
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

DEVICES = ("mobile", "desktop", "tablet")


@dataclass(frozen=True, slots=True)
class WorldConfig:
    seed: int = 0
    n_users: int = 2000
    n_items: int = 500
    n_segments: int = 8
    n_categories: int = 16
    dim: int = 8
    n_candidates: int = 50
    # Logit = base + affinity_scale * <user, item> + device effect + item popularity.
    base_logit: float = -3.0
    affinity_scale: float = 2.5
    personal_scale: float = 0.6
    device_scale: float = 0.4
    popularity_scale: float = 0.4
    # Every taste turns in the plane of its two directions a, b: from a through b to -a (half a period,
    # the opposite taste) and back to a (a full period; simulated seconds).
    drift_period_s: float = 600.0
    # Click delay after the impression: lognormal(median, sigma); some land beyond the attribution window.
    delay_median_s: float = 2.0
    delay_sigma: float = 1.0
    attribution_window_s: float = 20.0

    def __post_init__(self) -> None:
        for f in fields(self):  # a config file's "2.5" or "abc" failed deep inside numpy, NaN silently
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int | np.integer)):
                raise ValueError(f"world.{f.name} must be an integer, got {value!r}")
            if f.type == "float" and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise ValueError(f"world.{f.name} must be a finite number, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"world.seed must be >= 0, got {self.seed}")
        if self.attribution_window_s <= 0:
            raise ValueError(f"world.attribution_window_s must be > 0, got {self.attribution_window_s}")
        for name in ("n_users", "n_items", "n_segments", "n_categories", "dim", "n_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"world.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_candidates > self.n_items:
            raise ValueError(
                f"world.n_candidates ({self.n_candidates}) exceeds world.n_items ({self.n_items})"
            )
        if self.drift_period_s <= 0:
            raise ValueError(f"world.drift_period_s must be > 0, got {self.drift_period_s}")
        if self.delay_median_s <= 0 or self.delay_sigma < 0:
            raise ValueError("world.delay_median_s must be > 0 and world.delay_sigma >= 0")


@dataclass(frozen=True, slots=True)
class Request:
    """One page view: a user in a context, and the candidate items the ranker must order."""

    user: int
    device: int
    hour: int
    candidates: np.ndarray  # item indices, shape (n_candidates,)


class World:
    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        c = config
        rng = np.random.default_rng(c.seed)
        self._rng = np.random.default_rng(rng.integers(2**63))

        def unit(shape: tuple[int, ...]) -> np.ndarray:
            x = rng.standard_normal(shape)
            return x / np.linalg.norm(x, axis=-1, keepdims=True)

        self.user_segment = rng.integers(c.n_segments, size=c.n_users)
        self.item_category = rng.integers(c.n_categories, size=c.n_items)
        # Two taste directions per segment (and per user): the taste at time t turns from the first
        # through the second to the first's opposite and back (WorldConfig.drift_period_s).
        seg_a, seg_b = unit((c.n_segments, c.dim)), unit((c.n_segments, c.dim))
        own_a, own_b = unit((c.n_users, c.dim)), unit((c.n_users, c.dim))
        self._user_a = seg_a[self.user_segment] + c.personal_scale * own_a
        self._user_b = seg_b[self.user_segment] + c.personal_scale * own_b
        cat = unit((c.n_categories, c.dim))
        self._item = (cat[self.item_category] + c.personal_scale * unit((c.n_items, c.dim))) / math.sqrt(
            1 + c.personal_scale**2
        )
        self._item_pop = c.popularity_scale * rng.standard_normal(c.n_items)
        self._device_cat = c.device_scale * rng.standard_normal((len(DEVICES), c.n_categories))
        # A few users visit much more often than others (Zipf-like), as on real sites.
        weights = 1.0 / np.arange(1, c.n_users + 1) ** 0.6
        self._user_p = rng.permutation(weights / weights.sum())

    def user_taste(self, users: np.ndarray, t_s: float) -> np.ndarray:
        theta = 0.5 * math.pi * (1 - math.cos(2 * math.pi * t_s / self.config.drift_period_s))
        taste = math.cos(theta) * self._user_a[users] + math.sin(theta) * self._user_b[users]
        return taste / math.sqrt(1 + self.config.personal_scale**2)

    def sample_request(self, t_s: float) -> Request:
        c = self.config
        user = int(self._rng.choice(c.n_users, p=self._user_p))
        candidates = self._rng.choice(c.n_items, size=c.n_candidates, replace=False)
        # A simulated day passes in 24 minutes. Clicks do not depend on it: a feature the model can only
        # memorise, whose new value each minute a version published just after sees in clicks alone
        # (docs/observability.md, "Reading a young version's window").
        hour = int((t_s // 60) % 24)
        return Request(
            user=user, device=int(self._rng.integers(len(DEVICES))), hour=hour, candidates=candidates
        )

    def click_probability(self, request: Request, t_s: float, items: np.ndarray | None = None) -> np.ndarray:
        """The true click probability of each item (default: every candidate) for this request at t_s."""
        c = self.config
        items = request.candidates if items is None else np.asarray(items)
        taste = self.user_taste(np.array([request.user]), t_s)[0]
        logit = (
            c.base_logit
            + c.affinity_scale * self._item[items] @ taste * 2.0
            + self._device_cat[request.device, self.item_category[items]]
            + self._item_pop[items]
        )
        return 1.0 / (1.0 + np.exp(-logit))

    def outcome_rng(self, request_number: int) -> np.random.Generator:
        """The generator of one request's clicks and delays: the same for the same seed and request
        number, whatever order the requests are answered in."""
        return np.random.default_rng([self.config.seed, 1, request_number])

    def draw_clicks(self, probabilities: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return (rng or self._rng).random(len(probabilities)) < probabilities

    def draw_delays_s(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        c = self.config
        return c.delay_median_s * np.exp(c.delay_sigma * (rng or self._rng).standard_normal(n))

    def fraction_beyond_window(self) -> float:
        """P(delay > attribution window) under the lognormal: the share of clicks that arrive too late."""
        c = self.config
        if c.delay_sigma == 0:
            return float(c.delay_median_s > c.attribution_window_s)
        z = math.log(c.attribution_window_s / c.delay_median_s) / c.delay_sigma
        return 0.5 * math.erfc(z / math.sqrt(2))

    def context_features(self, request: Request) -> dict[str, str]:
        return {
            "user_id": f"u{request.user}",
            "user_segment": f"s{self.user_segment[request.user]}",
            "device": DEVICES[request.device],
            "hour": str(request.hour),
        }

    def item_features(self, item: int) -> dict[str, str]:
        return {"item_id": self.item_id(item), "item_category": f"c{self.item_category[item]}"}

    @staticmethod
    def item_id(item: int) -> str:
        return f"i{item}"

    @staticmethod
    def parse_item_id(item_id: str) -> int:
        return int(item_id[1:])
