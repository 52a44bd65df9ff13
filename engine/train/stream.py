"""The streaming trainer: mini-batches of LabeledSamples, predict-then-learn, CE | KD | ReLoop.

Predict-then-learn (progressive validation): every sample is scored by the current model before the
model trains on it; those scores feed ``progressive`` (rolling AUC / LogLoss of the model in training).
Correction samples (a late click re-emitted as a positive) are trained on but left out of the
progressive metric: the negative they correct was already counted and its old score is not kept.

Where y_last comes from (``y_last``):

* ``logged`` (default): the prediction served and logged with the impression. When the impression was
  served by another version than the previous snapshot (``prev_version``), ``version_mismatch`` decides:
  ``use_logged`` keeps the logged value (what production actually showed), ``recompute`` scores the
  sample with the previous snapshot's model, ``skip_sc`` gives that sample no teacher (y_last = NaN:
  plain CE at full weight, see engine/loss). Before the first snapshot there is no previous version and
  the logged value is used.
* ``snapshot``: always the previous snapshot's model recomputed (no teacher before the first snapshot).

Learners with ``learn_scored`` (torch learners) score and learn in one call: the backbone scores the
batch as it was before the step, and a per-event wide part (engine/models/wide.py) scores each sample
after learning the earlier ones of the batch.

Replay (``replay_size > 0``, off by default): a bounded buffer of the latest samples learnt
(engine/train/replay_buffer.py) is replayed for ``replay_ratio`` extra samples per new one after each
batch; the buffer is part of ``state()``, so a restored trainer replays what an uninterrupted one does.

Divergence (engine/models/finite.py): a step whose gradients are not sound is skipped by the learner
(``skipped_steps``); ``max_consecutive_skipped`` steps in a row that learnt nothing (skipped, or every
row left out) raise ``TrainingDiverged``, and so does a batch that learnt nothing, or that the model
scored NaN, while the learner's state is not finite. ``state_dict()`` refuses a learner state that is not
finite (``TrainingDiverged`` naming the tensor): such a model is never published as the next version.
Data-parallel ranks (``steps_together``) decide together instead: a step only records what it found
(``learnt_nothing``, ``diverged``), and the rank stage, once every rank told the others, counts the
group's step (``count_learnt_nothing``) and stops every rank at the same step
(engine/runtime/train_ranks.py).

The trainer knows no Kafka and no files: the pipeline feeds it and snapshots ``state()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from reloop.engine.events.schema import LabeledSample
from reloop.engine.loss.losses import LossStats
from reloop.engine.metrics.rolling_batch import BatchRollingMetrics
from reloop.engine.models.finite import (
    DIVERGED_HINT,
    TrainingDiverged,
    first_not_finite,
    learner_not_finite,
)
from reloop.engine.train.replay_buffer import ReplayBuffer

YLastMode = Literal["logged", "snapshot"]
MismatchPolicy = Literal["use_logged", "recompute", "skip_sc"]


@dataclass(frozen=True, slots=True)
class StreamTrainerConfig:
    batch_size: int = 512  # train.batch_size's default
    y_last: YLastMode = "logged"
    version_mismatch: MismatchPolicy = "use_logged"
    progressive_window: int = 100_000
    replay_size: int = 0
    replay_ratio: float = 1.0
    replay_batch_size: int | None = None
    # Steps in a row that learnt nothing (skipped, or every row left out) before TrainingDiverged; 0: never.
    max_consecutive_skipped: int = 100

    def __post_init__(self) -> None:
        if self.max_consecutive_skipped < 0:
            raise ValueError("train.max_consecutive_skipped must be >= 0 (0: never stop)")
        if self.batch_size <= 0:
            raise ValueError("train.batch_size must be positive")
        if self.replay_size < 0 or self.replay_ratio < 0:
            raise ValueError("train.replay_size and train.replay_ratio must be >= 0")
        if self.replay_batch_size is not None and self.replay_batch_size <= 0:
            raise ValueError("train.replay_batch_size must be positive")
        if self.y_last not in ("logged", "snapshot"):
            raise ValueError("train.y_last must be 'logged' or 'snapshot'")
        if self.version_mismatch not in ("use_logged", "recompute", "skip_sc"):
            raise ValueError("train.version_mismatch must be use_logged, recompute or skip_sc")

    @property
    def needs_previous_model(self) -> bool:
        return self.y_last == "snapshot" or self.version_mismatch == "recompute"


@dataclass(slots=True)
class TrainCounters:
    steps: int = 0
    samples: int = 0
    positives: int = 0
    corrections: int = 0
    version_mismatches: int = 0
    y_last_recomputed: int = 0
    y_last_skipped: int = 0
    y_last_missing: int = 0
    replayed: int = 0
    skipped_steps: int = 0  # not applied: a gradient was not sound (TorchLearner._apply_gradients)
    skipped_samples: int = 0  # not learnt: in skipped steps, or rows left out of a step (models/finite.py)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class SampleColumns:
    """What the trainer needs of each sample besides its features, as columns (float32/int64/bool)."""

    labels: np.ndarray
    served: np.ndarray
    versions: np.ndarray
    corrections: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def of(samples: Sequence[LabeledSample]) -> SampleColumns:
        n = len(samples)
        return SampleColumns(
            labels=np.fromiter((s.label for s in samples), dtype=np.float32, count=n),
            served=np.fromiter((s.served_prediction for s in samples), dtype=np.float32, count=n),
            versions=np.fromiter((s.served_version for s in samples), dtype=np.int64, count=n),
            corrections=np.fromiter((s.is_correction for s in samples), dtype=bool, count=n),
            weights=np.fromiter((s.weight for s in samples), dtype=np.float32, count=n),
        )


@dataclass(frozen=True, slots=True)
class StepResult:
    """One optimisation step: how many samples, their pre-update scores, y_last and the loss parts
    (``samples``: the LabeledSamples when the step was fed objects, else None)."""

    samples: list[LabeledSample] | None
    scores: np.ndarray
    y_last: np.ndarray
    loss: LossStats
    rates: Mapping[str, float] = field(default_factory=dict)  # learning rate per optimizer (torch learners)
    skipped: bool = False  # the learner did not apply a step of this call (a gradient was not finite)
    skipped_samples: int = 0  # samples not learnt (skipped steps', rows left out; replayed ones included)
    # This batch's own rows that were not learnt (a bool mask; None when every row was) and why: the
    # callers keep them out of the ledger and dead-letter them (engine/train/unlearnt.py).
    unlearnt: np.ndarray | None = None
    unlearnt_why: str = ""
    replayed: int = 0  # samples of the replay buffer learnt again after this batch (train.replay_size)
    version_mismatches: int = 0  # samples served by another version than the previous snapshot

    @property
    def n(self) -> int:
        return len(self.scores)

    extra: dict[str, Any] = field(default_factory=dict)


class StreamTrainer:
    def __init__(self, *, learner: Any, featurizer: Any, config: StreamTrainerConfig) -> None:
        self.learner = learner
        self.featurizer = featurizer
        self.config = config
        self.counters = TrainCounters()
        self.progressive = BatchRollingMetrics(config.progressive_window)
        self.prev_model: Any | None = None
        self.prev_version: int | None = None
        self.last_loss: LossStats | None = None
        self.skipped_in_a_row = 0  # this trainer's steps in a row that learnt nothing (not in the state)
        self.diverged: str | None = None  # why a step raised TrainingDiverged (no state_dict() until a load)
        # A data-parallel rank: a step raises no TrainingDiverged of its own making (its peers would wait
        # for it in the next collective); it records why its step learnt nothing (``learnt_nothing``, None
        # when it learnt) and a learner state found not finite (``diverged``), and the rank stage decides
        # with every rank (engine/runtime/train_ranks.py).
        self.steps_together = False
        self.learnt_nothing: str | None = None
        self.replay: ReplayBuffer | None = None
        if config.replay_size > 0:
            self.replay = ReplayBuffer(
                config.replay_size,
                config.replay_ratio,
                config.replay_batch_size or config.batch_size,
                seed=int(getattr(getattr(learner, "config", None), "seed", 0)),
            )

    def train_batch(self, samples: Sequence[LabeledSample]) -> StepResult:
        """Score, then learn from, one mini-batch (any size >= 1; the pipeline sends full batches)."""
        samples = list(samples)
        if not samples:
            raise ValueError("train_batch needs at least one sample")
        batch = self.featurizer.transform([s.features for s in samples])
        result = self.train_columns(batch, SampleColumns.of(samples))
        return replace(result, samples=samples)

    def train_columns(self, batch: Any, cols: SampleColumns) -> StepResult:
        """``train_batch`` for an already featurised batch and its columns: no Python per sample."""
        try:
            return self._train_columns(batch, cols)
        except TrainingDiverged as exc:
            self.diverged = str(exc)  # weights merely too large pass the state's check: remembered
            raise

    def _train_columns(self, batch: Any, cols: SampleColumns) -> StepResult:
        n = len(cols)
        if n == 0:
            raise ValueError("train_columns needs at least one sample")
        # Bad input raises here, before the model, the counters or the replay buffer change (the
        # progressive metric would only refuse it after the step was learnt).
        self._check(batch, cols)
        labels = cols.labels
        w = None if bool(np.all(cols.weights == 1.0)) else cols.weights
        skipped_before = _skipped(self.learner)
        learn_scored = getattr(self.learner, "learn_scored", None)
        if learn_scored is not None:
            y_last, y_counts = self._y_last(cols, batch)
            scores, stats = learn_scored(batch, labels, y_last, w)
            scores = np.asarray(scores, dtype=np.float64)
        else:
            scores = np.asarray(self.learner.predict_proba(batch), dtype=np.float64)
            y_last, y_counts = self._y_last(cols, batch)
            stats = self.learner.learn(batch, labels, y_last, w)
            left_out = getattr(self.learner, "left_out", None)  # engine/models/finite.py
            model_nan = np.isnan(scores)  # from inputs the learner took: its weights are to blame
            if left_out is not None:
                model_nan[left_out] = False
                scores[left_out] = np.nan  # as a torch learner scores them: the model cannot
            if model_nan.any():
                self._check_finite()
        step_skipped = _skipped(self.learner)[0] > skipped_before[0]  # this batch's step, not a replayed one
        unscored = np.isnan(scores)
        unlearnt, why = _unlearnt(n, step_skipped, unscored)
        self._count_learnt_nothing(unlearnt is not None and bool(unlearnt.all()), why)
        c = self.counters
        for name, k in y_counts.items():  # counted once the step happened (a failed one counts nothing)
            setattr(c, name, getattr(c, name) + k)
        replayed_before = c.replayed
        if self.replay is not None:
            # Only rows this step learnt: a row the model cannot take (dead-lettered by the caller) would
            # come back in every draw that holds it and fail, or skip, that replayed step too.
            if unlearnt is None:
                self.replay.add(batch, labels, y_last, w)
            elif not unlearnt.all():
                kept = np.flatnonzero(~unlearnt)
                self.replay.add(batch.take(kept), labels[kept], y_last[kept], None if w is None else w[kept])
            learn_replay = getattr(self.learner, "learn_replay", self.learner.learn)
            for draw in self.replay.take():
                learn_replay(draw.batch, draw.labels, draw.y_last, draw.weights)
                c.replayed += len(draw.labels)
        steps_now, samples_now = _skipped(self.learner)  # the replayed steps' included
        skipped_steps, skipped_samples = steps_now - skipped_before[0], samples_now - skipped_before[1]
        c.skipped_steps += skipped_steps
        c.skipped_samples += skipped_samples
        c.steps += 1
        c.samples += n
        c.positives += int(labels.sum())
        corrections = cols.corrections
        k = int(corrections.sum())
        c.corrections += k
        # Corrections were scored before, and a sample the model cannot score (NaN: a value it cannot
        # take; a torch learner then skips the step) has no score to rank.
        keep = ~corrections if k else None
        if unscored.any():
            keep = ~unscored if keep is None else keep & ~unscored
        if keep is None:
            self.progressive.update_many(labels.astype(np.int64), scores)
        else:
            self.progressive.update_many(labels[keep].astype(np.int64), scores[keep])
        self.last_loss = stats
        rates = getattr(self.learner, "learning_rates", None)
        return StepResult(
            None,
            scores,
            y_last,
            stats,
            {} if rates is None else rates(),
            skipped_steps > 0,
            skipped_samples,
            unlearnt,
            why,
            c.replayed - replayed_before,
            y_counts.get("version_mismatches", 0),
        )

    def _count_learnt_nothing(self, nothing: bool, why: str) -> None:
        """Raise ``TrainingDiverged`` when this step learnt nothing and the learner's state is not finite
        (a state pass, only in such steps), or when ``max_consecutive_skipped`` steps in a row learnt
        nothing: a model that every sample fails is not repaired by dead-lettering the stream. With
        ``steps_together``, only record both (the rank stage decides with the other ranks)."""
        if nothing:
            self._check_finite()
        if self.steps_together:
            self.learnt_nothing = why if nothing else None
        else:
            self.count_learnt_nothing(nothing, why)

    def count_learnt_nothing(self, nothing: bool, why: str) -> None:
        """Count a step that learnt nothing (``why``), or reset the count after one that learnt; raise
        ``TrainingDiverged`` at ``max_consecutive_skipped`` in a row. Data-parallel ranks call it with the
        group's step (nothing learnt on any rank): every rank counts alike and stops at the same step."""
        if not nothing:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        limit = self.config.max_consecutive_skipped
        if limit and self.skipped_in_a_row >= limit:
            self.diverged = (
                f"training diverged: {self.skipped_in_a_row} steps in a row learnt nothing (the last: {why}):"
                " the model cannot learn, or the stream holds only values it cannot take; stopping"
                f" (train.max_consecutive_skipped = {limit}); {DIVERGED_HINT}"
            )
            raise TrainingDiverged(self.diverged)

    def _check_finite(self) -> None:
        """Raise ``TrainingDiverged`` when the learner's state is not finite; with ``steps_together``,
        record why in ``diverged`` instead (the rank stage stops every rank)."""
        if self.steps_together and self.diverged is not None:
            return
        where = learner_not_finite(self.learner)
        if where is None:
            return
        why = f"training diverged: the learner's {where}; {DIVERGED_HINT}"
        if not self.steps_together:
            raise TrainingDiverged(why)
        self.diverged = why

    def idle_step(self) -> None:
        """This rank's part of a data-parallel step in which it has no samples (the learner applies
        the other ranks' averaged gradients: engine/train/data_parallel.py)."""
        self.learner.idle_step()
        self.counters.steps += 1

    def _check(self, batch: Any, cols: SampleColumns) -> None:
        """Refuse a batch the trainer cannot learn as given (ValueError naming the first bad row)."""
        n = len(cols)
        for name in ("served", "versions", "corrections", "weights"):
            if len(getattr(cols, name)) != n:
                raise ValueError(f"sample columns: {len(getattr(cols, name))} {name} for {n} labels")
        if len(batch) != n:
            raise ValueError(f"{len(batch)} feature rows for {n} labels")
        bad = np.flatnonzero((cols.labels != 0) & (cols.labels != 1))  # NaN included
        if bad.size:
            raise ValueError(f"label must be 0 or 1, got {cols.labels[bad[0]]!r} (row {bad[0]})")
        if self.config.y_last == "logged":  # NaN: unknown (plain CE); anything else must be a probability
            served = cols.served
            bad = np.flatnonzero((served < 0) | (served > 1))
            if bad.size:
                raise ValueError(
                    f"served prediction must be in [0, 1], got {served[bad[0]]!r} (row {bad[0]})"
                )
        bad = np.flatnonzero(cols.weights < 0)  # a non-finite weight is the learner's to leave out
        if bad.size:
            raise ValueError(f"sample weight must be >= 0, got {cols.weights[bad[0]]!r} (row {bad[0]})")

    def _y_last(self, cols: SampleColumns, batch: Any) -> tuple[np.ndarray, dict[str, int]]:
        """y_last for the batch and what to add to the counters (by the caller, once the step is done)."""
        n = len(cols)
        if self.config.y_last == "snapshot":
            if self.prev_model is None:
                return np.full(n, np.nan, dtype=np.float32), {"y_last_missing": n}
            y = np.asarray(self.prev_model.predict_proba(batch), dtype=np.float32)
            return y, {"y_last_recomputed": n}
        y = cols.served.astype(np.float32, copy=True)
        if self.prev_version is None:
            return y, {}
        mismatch = cols.versions != self.prev_version
        k = int(mismatch.sum())
        if k == 0:
            return y, {}
        counts = {"version_mismatches": k}
        policy = self.config.version_mismatch
        if policy == "skip_sc":
            y[mismatch] = np.nan
            counts["y_last_skipped"] = k
        elif policy == "recompute":
            if self.prev_model is None:
                raise RuntimeError("version_mismatch=recompute needs the previous snapshot's model")
            y[mismatch] = np.asarray(self.prev_model.predict_proba(batch), dtype=np.float32)[mismatch]
            counts["y_last_recomputed"] = k
        return y, counts

    def on_snapshot(self, version: int) -> None:
        """The model as it is now was published as ``version``: it becomes the previous model."""
        self.prev_version = version
        if self.config.needs_previous_model:
            self.prev_model = self.learner.clone_frozen()

    # ------------------------------------------------------------------ snapshot
    def state_dict(self) -> dict[str, Any]:
        """The learner's state (``learner``: model, optimizers, RNG: tensors and plain types) and the
        trainer's own: counters, the progressive metric window, the replay buffer.

        Raises ``TrainingDiverged`` naming the first learner tensor that is not finite (weights,
        optimizer moments): such a state is never published, as a model version or a restart point."""
        if self.diverged is not None:
            raise TrainingDiverged(f"snapshot refused: {self.diverged}")
        learner = self.learner.state_dict()
        where = first_not_finite(learner)
        if where is not None:
            raise TrainingDiverged(
                f"snapshot refused: the learner's {where}; the last snapshot stays the production model"
                f" and the restart point. Training diverged: {DIVERGED_HINT}"
            )
        out = {
            "learner": learner,
            "counters": self.counters.as_dict(),
            "progressive": self.progressive.state_dict(),
            "prev_version": self.prev_version,
        }
        if self.replay is not None:
            out["replay"] = self.replay.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state_dict()``'s state (without ``learner`` the learner keeps its weights). Then call
        ``on_snapshot(version)`` with the version resumed from: its model is the previous model."""
        if "learner" in state:
            self.learner.load_state_dict(state["learner"])
            self.diverged = None
        self.skipped_in_a_row = 0
        self.learnt_nothing = None
        self.counters = TrainCounters(**state["counters"])
        # The previous model is not in the state: drop this object's own (on_snapshot gives it back), so
        # nothing of what it did before the load survives it.
        self.prev_version = state.get("prev_version")
        self.prev_model = None
        if self.replay is not None:
            if "replay" in state:
                self.replay.load_state_dict(state["replay"])
            else:  # a snapshot from a run without replay: start with an empty buffer
                self.replay = ReplayBuffer(
                    self.replay.capacity, self.replay.ratio, self.replay.batch_size, self.replay.seed
                )
        self.progressive = BatchRollingMetrics.from_state_dict(
            dict(state["progressive"], window_size=self.config.progressive_window)
        )


def _unlearnt(n: int, step_skipped: bool, unscored: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Which of a batch's ``n`` rows its step did not learn, and why: the rows scored NaN (a torch
    learner scores NaN exactly the rows it leaves out, and ``train_columns`` marks the others' left-out
    rows so: engine/models/finite.py); a skipped step learnt none of them."""
    if step_skipped:
        return np.ones(n, dtype=bool), f"its step was skipped: a gradient was not sound ({n} samples)"
    if unscored.any():
        return unscored, "the model cannot take it: an input or logit not finite, or a gradient not sound"
    return None, ""


def _skipped(learner: Any) -> tuple[int, int]:
    """The learner's (skipped steps, skipped samples) so far (0 for learners that never skip)."""
    return getattr(learner, "skipped_steps", 0), getattr(learner, "skipped_samples", 0)
