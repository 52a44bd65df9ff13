"""The scoring core, free of HTTP: route the user to an arm, score with that arm's live bundle,
rank, and hand the shown items to the arm's impression logger.

The response and the logged impressions are built from the same numbers in the same place, so the
log holds exactly what was served (prediction, model version, arm, features, ids, time).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson
from reloop.engine.events.schema import Impression
from reloop.engine.features.check import FeatureLimits, SpecChecker
from reloop.engine.features.counters import CounterError
from reloop.engine.metrics.stats import STATS
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.config import RequestLimits
from reloop.engine.serve.impression_log import ImpressionLogger
from reloop.engine.serve.producer_log import ProducerLogger
from reloop.engine.serve.schema import RankedItem, ScoredItem, ScoreRequest, ScoreResponse

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """No snapshot is loaded yet for the arm a request was routed to."""


class BadRequest(ValueError):
    """A request the service refuses to score (422): ``errors`` in FastAPI's shape (loc, msg, type)."""

    def __init__(self, errors: list[dict]) -> None:
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


@dataclass(slots=True)
class ArmRuntime:
    name: str
    holder: ModelHolder
    logger: ImpressionLogger | ProducerLogger | None = None
    memory: Any = None  # reloop.engine.memory.served.ServedMemory: ReLoop2's error memory (arms[].memory)
    counters: Any = None  # reloop.engine.memory.served_counters.ServedCounters (arms[].counters)


def _feature_path(field: str | None) -> list[str]:
    """``["features", name]`` from a spec check's ``features.<name>``: cut at the first dot only, since a
    field name may hold dots ("geo.country")."""
    return (field or "features").split(".", 1)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _new_impression_id() -> str:
    return uuid.uuid4().hex


class ScoringService:
    def __init__(
        self,
        *,
        router: ArmRouter,
        arms: Mapping[str, ArmRuntime],
        top_k: int = 10,
        clock_ms: Callable[[], int] = _now_ms,
        new_impression_id: Callable[[], str] = _new_impression_id,
        limits: RequestLimits | None = None,
    ) -> None:
        missing = set(router.names) - set(arms)
        if missing:
            raise ValueError(f"router names arms without a runtime: {sorted(missing)}")
        self.router = router
        self.arms = dict(arms)
        self.top_k = top_k
        self.clock_ms = clock_ms
        self.new_impression_id = new_impression_id
        self.limits = limits or RequestLimits()
        self._feature_limits = FeatureLimits(
            max_chars=self.limits.max_feature_chars, max_list=self.limits.max_feature_list
        )
        # Per arm: the bundle a checker was built for (rebuilt after a hot reload; cheap).
        self._checkers: dict[str, tuple[ModelBundle, SpecChecker | None, frozenset[str], dict[str, str]]] = {}
        self._unread = {name: STATS.serve_unread_requests.child(name) for name in self.arms}
        self._unread_warning = {
            name: ThrottledWarning(
                log,
                "a request whose features the model reads none of: scored with every input missing "
                "(check the feature names against the model's spec)",
            )
            for name in self.arms
        }
        self._misnamed_warning = {
            name: ThrottledWarning(
                log,
                "a request feature named like one the model reads but not the same (scored as missing)",
            )
            for name in self.arms
        }
        # Metrics children are single-writer; request threads share them, so updates take this lock.
        self._metrics_lock = threading.Lock()
        self._requests = {name: STATS.serve_requests.child(name) for name in self.arms}
        self._latency = {name: STATS.serve_latency_s.child(name) for name in self.arms}
        for name, arm in self.arms.items():
            STATS.serve_model_version.set_function(
                lambda h=arm.holder: float(h.version) if h.version is not None else -1.0, name
            )
            if arm.logger is not None:  # read at scrape time: /stats said it, /metrics did not
                # (never raising: a scrape-time error answers every later /metrics with a 500)
                STATS.impressions_pending.set_function(
                    lambda lg=arm.logger: float(getattr(lg, "pending", 0) or 0), name
                )
        # Answers other than 200 by status (413, 422, 500, 503), as reloop_serve_failed_requests_total
        # counts them: GET /stats reports these.
        self.failed: dict[int, int] = {}

    def ready(self) -> bool:
        return not self.not_ready()

    def not_ready(self) -> dict[str, str]:
        """Why each arm that cannot score a request does not (``/readyz``): no model loaded yet, or one
        without the counter inputs its arm's counters fill (arms[].counters), which would refuse every
        request (503) until a version with them loads."""
        reasons = {}
        for name, arm in self.arms.items():
            bundle = arm.holder.current
            if bundle is None:
                refused = arm.holder.last_refusal
                reasons[name] = "no model loaded yet" + (f" (refused {refused})" if refused else "")
            elif arm.counters is not None:
                refusal = arm.counters.refusal(bundle.featurizer.spec)
                if refusal is not None:
                    reasons[name] = f"version {bundle.version}: {refusal}"
        return reasons

    def versions(self) -> dict[str, int | None]:
        return {name: arm.holder.version for name, arm in self.arms.items()}

    def _check(
        self,
        arm: str,
        bundle: ModelBundle,
        request: Any,
        context: Mapping[str, Any],
        features: list[Mapping[str, Any]],
    ) -> None:
        """Refuse what the model's feature spec cannot read and event times far from the clock: a 422
        here instead of a 500 (or seconds of hashing) later. The context is checked once and each
        candidate's own features once: together that is every value of every merged row."""
        lim = self.limits
        most = lim.max_features
        if len(context) > most or max(map(len, features), default=0) > most:  # (the hot path: one C pass)
            crowded = [(["body", "context"], len(context))] if len(context) > most else []
            crowded += [
                (["body", "candidates", i, "features"], len(f))
                for i, f in enumerate(features)
                if len(f) > most
            ]
            raise BadRequest(
                [
                    {"loc": loc, "msg": f"{n} feature keys; at most {most}", "type": "too_many"}
                    for loc, n in crowded[:20]
                ]
            )
        t = request.event_time_ms
        if t is not None:
            now = self.clock_ms()
            if (lim.max_future_ms is not None and t > now + lim.max_future_ms) or (
                lim.max_past_ms is not None and t < now - lim.max_past_ms
            ):
                raise BadRequest(
                    [
                        {
                            "loc": ["body", "event_time_ms"],
                            "msg": f"event_time_ms {t} is {t - now:+d} ms from the service clock; allowed: "
                            f"-{lim.max_past_ms} .. +{lim.max_future_ms} ms",
                            "type": "value_error",
                        }
                    ]
                )
        cached = self._checkers.get(arm)
        if cached is None or cached[0] is not bundle:
            spec = getattr(bundle.featurizer, "spec", None)
            checker = SpecChecker(spec, self._feature_limits) if spec is not None else None
            # The fields a request may carry (counter inputs, "user_id#ctr", are the arm's to fill).
            names = [] if spec is None else [f.name for f in spec.fields]
            reads = frozenset(name for name in names if "#" not in name)
            cached = (bundle, checker, reads, {_loose(name): name for name in reads})
            self._checkers[arm] = cached
        checker, reads, loose = cached[1], cached[2], cached[3]
        if reads and reads.isdisjoint(context) and all(reads.isdisjoint(f) for f in features[:3]):
            # Names the spec does not read (`c1` for `C1`): every candidate scored alike, and trained on.
            with self._metrics_lock:
                self._unread[arm].add()
            self._unread_warning[arm](
                arm=arm, reads=sorted(reads)[:8], got=sorted({*context, *features[0]})[:8] if features else []
            )
        elif reads:
            self._warn_misnamed(arm, reads, loose, context, features[0] if features else {})
        if checker is None:
            return
        errors = []
        ctx = context
        while ctx:
            bad_ctx = checker.check_rows([ctx])  # (at most one error per row)
            if not bad_ctx:
                break
            err = bad_ctx[0][1]
            name = _feature_path(err.field)[-1]
            # A context value every candidate overrides is never scored: only refuse a used one; the
            # context without it is checked again, or a bad value after it was scored (a 500).
            if name not in ctx or not all(name in f for f in features):
                errors.append({"loc": ["body", "context", name], "msg": err.detail, "type": err.reason})
                break
            ctx = {k: v for k, v in ctx.items() if k != name}
        bad = checker.check_rows(features)
        errors += [
            {
                "loc": ["body", "candidates", i, *_feature_path(err.field)],
                "msg": err.detail,
                "type": err.reason,
            }
            for i, err in bad[:20]
        ]
        if errors:
            raise BadRequest(errors)

    def _check_logged(self, context: Mapping[str, Any], k: int) -> None:
        """Refuse a request whose logged impressions would carry more than ``max_logged_bytes`` of context
        (each carries it whole): within the body limit, a large context times a large top_k wrote a
        gigabyte to the log and held the event loop for seconds."""
        most = self.limits.max_logged_bytes
        size = context_bytes(context)
        if k * size > most:
            raise BadRequest(
                [
                    {
                        "loc": ["body", "top_k"],
                        "msg": f"{k} logged impressions, each with the context's ~{size} bytes: ~{k * size} "
                        f"bytes to the impression log; at most {most} (a smaller top_k or context)",
                        "type": "too_large",
                    }
                ]
            )

    def _warn_misnamed(
        self,
        arm: str,
        reads: frozenset[str],
        loose: dict[str, str],
        context: Mapping[str, Any],
        candidate: Mapping[str, Any],
    ) -> None:
        """Warn (once in 10 s) of a context or first-candidate key that the spec reads under another
        spelling (``userId`` for ``user_id``): that field is scored as missing. Other unread keys are
        the caller's business (a context logged for other uses)."""
        given = context.keys() | candidate.keys()
        misnamed = {
            key: loose[folded]
            for key in given - reads
            if (folded := _loose(key)) in loose and loose[folded] not in given
        }
        if misnamed:
            self._misnamed_warning[arm](arm=arm, misnamed=dict(sorted(misnamed.items())[:8]))

    def _score(self, request: Any) -> _Scored:
        """Route, check, score and rank one request (a ScoreRequest or a WireRequest), log its top k."""
        start = time.perf_counter()
        arm = self.arms[self.router.route(request.user_id)]
        bundle = arm.holder.current  # read once: this request uses this version throughout
        if bundle is None:
            raise NotReady(f"arm {arm.name!r} has no model loaded yet")
        context = request.context
        candidates = request.candidates
        features = [c.features for c in candidates]
        self._check(arm.name, bundle, request, context, features)
        n = len(candidates)
        k = min(request.top_k or self.top_k, n)
        if context:  # (also where nothing is logged: one request is valid or not wherever it is sent)
            self._check_logged(context, k)
        memory, counters = arm.memory, arm.counters
        counted: np.ndarray | None = None
        if memory is None and counters is None:
            scores = bundle.score_request(context, features)
        else:
            batch = bundle.request_batch(context, features)
            if counters is not None:
                now = self.clock_ms()  # counters age by the service's clock (memory/served_counters.py)
                try:
                    counted = counters.fill(bundle.featurizer.spec, batch, now)
                except CounterError as exc:  # a model trained without the arm's counters: never scored
                    raise NotReady(f"arm {arm.name!r}: {exc}") from None
            scores = bundle.score_batch(batch) if memory is None else memory.score(bundle, batch)
        unscored = np.flatnonzero(np.isnan(scores))
        if len(unscored):
            # Values the spec reads but the model cannot take (a numeric of 1e39 under the identity
            # transform): a 422 naming them, rather than a ranking with null scores (and a NaN
            # served_prediction in the impression log, which the joiner would refuse).
            raise BadRequest(
                [
                    {
                        "loc": ["body", "candidates", int(i), "features"],
                        "msg": "the model cannot score these features (a numeric value too large for it?)",
                        "type": "unscorable",
                    }
                    for i in unscored[:20]
                ]
            )
        # Stable sort: equal scores keep request order, so the ranking is deterministic.
        order = np.argsort(-scores, kind="stable")[:k].tolist()
        values = scores.tolist()
        ids = self.new_impression_ids(k)
        served: dict[int, dict[str, float]] = {}
        if counted is not None:
            if counters.counts_requests:  # else the feed counts them from the impression log
                counters.count_shown(bundle.featurizer.spec, batch.take(np.asarray(order)), now)
            # the values as served go with each impression: the trainer learns exactly what was scored
            names = counters.names
            served = {i: dict(zip(names, counted[i].tolist(), strict=True)) for i in order}
        logger = arm.logger
        if logger is not None:
            event_time = request.event_time_ms if request.event_time_ms is not None else self.clock_ms()
            logger.log(
                [
                    Impression(
                        impression_id=impression_id,
                        request_id=request.request_id,
                        user_id=request.user_id,
                        item_id=candidates[i].item_id,
                        features={**context, **features[i], **served.get(i, {})},
                        event_time_ms=event_time,
                        served_prediction=values[i],
                        model_version=bundle.version,
                        arm=arm.name,
                    )
                    for i, impression_id in zip(order, ids, strict=True)
                ]
            )
        elapsed = time.perf_counter() - start
        with self._metrics_lock:
            self._requests[arm.name].add()
            self._latency[arm.name].observe(elapsed)
        return _Scored(arm.name, bundle.version, candidates, values, order, ids)

    def new_impression_ids(self, k: int) -> list[str]:
        if self.new_impression_id is not _new_impression_id:
            return [self.new_impression_id() for _ in range(k)]
        # One read of the OS's random source per request, not one per impression (uuid4 each).
        raw = os.urandom(16 * k).hex()
        return [raw[32 * j : 32 * j + 32] for j in range(k)]

    def score(self, request: ScoreRequest | Any) -> ScoreResponse:
        """Score a request; the response as pydantic objects (the in-process API)."""
        r = self._score(request)
        return ScoreResponse.model_construct(
            request_id=request.request_id,
            arm=r.arm,
            model_version=r.version,
            scores=[
                ScoredItem.model_construct(item_id=c.item_id, score=s)
                for c, s in zip(r.candidates, r.scores, strict=True)
            ],
            # model_construct: the values are ours and typed; validating them again costs ~1 us each.
            ranking=[
                RankedItem.model_construct(
                    item_id=r.candidates[i].item_id, score=r.scores[i], position=p, impression_id=imp
                )
                for p, (i, imp) in enumerate(zip(r.order, r.impression_ids, strict=True))
            ],
        )

    def score_json(self, request: Any) -> bytes:
        """Score a request; the response as the JSON bytes of ``ScoreResponse`` (the HTTP path)."""
        r = self._score(request)
        cands, scores = r.candidates, r.scores
        return orjson.dumps(
            {
                "request_id": request.request_id,
                "arm": r.arm,
                "model_version": r.version,
                "scores": [{"item_id": c.item_id, "score": s} for c, s in zip(cands, scores, strict=True)],
                "ranking": [
                    {"item_id": cands[i].item_id, "score": scores[i], "position": p, "impression_id": imp}
                    for p, (i, imp) in enumerate(zip(r.order, r.impression_ids, strict=True))
                ],
            }
        )


class _Scored(NamedTuple):
    arm: str
    version: int
    candidates: Sequence[Any]
    scores: list[float]
    order: list[int]
    impression_ids: list[str]


def context_bytes(context: Mapping[str, Any]) -> int:
    """About the bytes ``context`` takes in an encoded impression: its keys and string values by their
    UTF-8 length (a character counted as one byte let an emoji context log 4x the limit), 8 for any
    other value, lists item by item (a lower bound of JSON's size)."""
    size = 0
    for key, value in context.items():
        size += _utf8_len(key) + _value_bytes(value)
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return _utf8_len(value)
    if isinstance(value, list | tuple):
        return sum(_utf8_len(v) if isinstance(v, str) else 8 for v in value)
    return 8


def _loose(name: str) -> str:
    """A feature name as a near-miss matches it: case, ``_``, ``-``, ``.`` and spaces ignored."""
    return name.lower().translate(_LOOSE_DROP)


_LOOSE_DROP = str.maketrans("", "", "_-. ")
