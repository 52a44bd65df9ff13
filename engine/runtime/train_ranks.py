"""The train stage as M data-parallel ranks (``reloop train --world-size M``, torchrun in a cluster).

Rank r reads the partitions p of the samples topic with ``p % M == r`` and keeps the same model
replica as every other rank (engine/train/data_parallel.py). The ranks decide everything together, in
rounds: each round they exchange (samples buffered, stop wanted, period boundary due, samples waited
too long); every rank sees the same table, so every rank takes the same decision and the collectives
always match:

* a boundary due anywhere: all ranks save together, rank 0 writes the one snapshot (model once, every
  rank's positions, seqs, buffered samples, counters and ledger length: engine/runtime/train_state.py),
  after checking that every rank's weights hash the same (a divergence stops the group, never a
  silently wrong model);
* a stop wanted anywhere (SIGTERM reaches the ranks at slightly different moments): all ranks stop at
  this round and save one final checkpoint;
* every rank has ``batch_per_rank`` samples: one step, each rank on its own; in ``deterministic`` mode
  only this, so a run is a function of the topic's content and a restart resumes exactly; otherwise,
  once a rank's oldest sample waited ``max_wait_ms``, a step on what each rank has (a rank with none
  contributes zero gradients) so a quiet partition cannot hold the others;
* divergence (engine/models/finite.py), in the same exchange: whether the last step learnt nothing on
  this rank, and whether this rank found the model diverged (its rows' logits not finite whatever their
  dense inputs, a learner state not finite). A divergence anywhere stops every rank at this round with
  ``TrainingDiverged`` naming the rank and why, before any save; ``train.max_consecutive_skipped``
  counts the group's steps that learnt nothing on every rank (one without samples counts as nothing),
  alike on every rank. A rank whose step
  diverged still takes part in that step's gradient sync (zero gradients), so no peer waits for it.

Before reading, the ranks compare how many partitions each owns and refuse together (a ConfigError on
every rank, before any other collective) when one owns none, or, in ``deterministic`` mode, when the
shares differ: a step takes ``batch_per_rank`` from every rank, so a rank with more partitions would
buffer without bound.

A failure on any rank breaks the group: every rank exits (``RankGroupFailed``) and torchrun restarts all
of them from the last save, as its elastic agent does for any worker failure. A divergence is no
failure to restart: every rank raises ``TrainingDiverged`` (exit 2, which ``reloop train --world-size``
turns into a stop of the group without restarts: engine/runtime/train_cmd.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
from reloop.engine.models.finite import TrainingDiverged
from reloop.engine.runtime.config import ConfigError
from reloop.engine.runtime.restore import RestorePoint
from reloop.engine.runtime.supervisor import ProcessFatal
from reloop.engine.runtime.train_stage import TrainStage
from reloop.engine.streams import PartitionShare, TopicNotFound
from reloop.engine.train.data_parallel import GradientSync, RankGroup, weights_digest

log = logging.getLogger("reloop.train")

_BUFFERED, _STOP, _DUE, _WAITED, _LEARNT_NOTHING, _DIVERGED = range(6)


class RankGroupFailed(ProcessFatal):
    """A data-parallel rank failed: the group cannot go on without it (torchrun restarts all ranks)."""


def rank_failure(rank: int, exc: Exception) -> RankGroupFailed:
    """What rank ``rank`` says as it leaves the group on ``exc``. A collective that broke (gloo's "Read
    error ... Connection reset by peer", a timeout) is another rank's failure seen from here: the
    survivors' lines said "rank 0 failed" when rank 1 was killed, and an alert on them named the wrong one."""
    import torch.distributed as dist

    text = str(exc)
    if isinstance(exc, dist.DistError) or "gloo" in text or "Connection reset by peer" in text:
        return RankGroupFailed(
            f"rank {rank}: the rank group broke, another rank exited or stopped answering ({exc!r}); "
            "torchrun's log names a rank that exited"
        )
    return RankGroupFailed(f"rank {rank} failed: {exc!r}")


class RanksDiverged(RankGroupFailed):
    """The ranks' weights differ at a save: refuse to publish a model nobody can vouch for."""


def check_partition_split(owned: Sequence[int], *, deterministic: bool, topic: str) -> None:
    """Refuse a split of the samples topic's partitions (``owned[r]``: rank r's count) that the ranks
    cannot train: a rank with none, or unequal shares in deterministic mode. Every rank sees the same
    table, so every rank raises the same error."""
    partitions, ranks = sum(owned), len(owned)
    idle = [r for r, n in enumerate(owned) if n == 0]
    if idle:
        raise ConfigError(
            f"the samples topic {topic!r} has {partitions} partitions for {ranks} train ranks (rank r reads "
            f"the partitions p with p % {ranks} == r): ranks {idle} would read none; run at most "
            f"{partitions} ranks, or give the topic a multiple of {ranks} partitions"
        )
    if len(set(owned)) > 1 and not deterministic:
        log.warning(
            "the train ranks own unequal shares of the samples topic's partitions: a rank with more trains "
            "its share more slowly and lags behind the others (keep the partitions a multiple of the ranks)",
            extra={"fields": {"topic": topic, "partitions": partitions, "owned": list(owned)}},
        )
    if deterministic and len(set(owned)) > 1:
        raise ConfigError(
            f"train.deterministic: the samples topic {topic!r} has {partitions} partitions for {ranks} "
            f"train ranks, so they own {list(owned)} partitions; a deterministic step takes the same count "
            f"from every rank and the ranks with more would buffer without bound: run a number of ranks "
            f"that divides {partitions}, or set train.deterministic: false"
        )


class RankedTrainStage(TrainStage):
    def __init__(
        self,
        *,
        group: RankGroup,
        sync: GradientSync,
        batch_per_rank: int,
        deterministic: bool,
        max_wait_ms: int,
        **stage: Any,
    ) -> None:
        # Set before TrainStage.__init__: it restores, which calls the hooks below.
        self.group = group
        self.sync = sync
        self.batch_per_rank = batch_per_rank
        self.deterministic = deterministic
        self.max_wait_ms = max_wait_ms
        self.stop_agreed = False
        self._want_stop = False
        self._global_samples = 0
        self._restored_point: tuple[int, int] = (-1, -1)
        self._stepped = False  # a step since the last exchange: the next one counts it
        self._idle = False  # this rank had no samples in that step
        super().__init__(share=PartitionShare(group.rank, group.world_size), **stage)
        self.trainer.learner.grad_sync = sync
        self.trainer.steps_together = True  # divergence is decided in _rounds, with every rank
        self._agree_on_restore()

    # ------------------------------------------------------------------ restore
    def _restore(self, point: RestorePoint, snap: Any) -> None:
        super()._restore(point, snap)
        self._restored_point = (int(point.kind == "checkpoint"), point.number)

    def _restored_parts(self, parts: list[dict[str, Any]]) -> None:
        super()._restored_parts(parts)
        self._global_samples = sum(int(p["trainer"]["counters"]["samples"]) for p in parts)

    @property
    def samples_trained_all(self) -> int:
        return self._global_samples

    def _agree_on_restore(self) -> None:
        view = self.group.exchange(self._restored_point)
        if not (view == view[0]).all():
            raise RankGroupFailed(
                f"the ranks restored different saves ((checkpoint?, number) per rank: {view.tolist()}); "
                "they must share one checkpoint directory"
            )

    # ------------------------------------------------------------------ the loop
    def request_stop(self) -> None:
        """This rank wants to stop; all ranks stop at the next round."""
        self._want_stop = True

    def open(self) -> None:
        if not self._opened:
            # A samples topic not created yet (train started before join) is every rank's to wait for,
            # decided together: a rank that alone raised would rebuild into its peers' next collective.
            try:
                mine, missing = len(self.source.partitions()), None
            except TopicNotFound as exc:
                mine, missing = -1, exc
            owned = self.group.exchange([mine])[:, 0]
            if (owned < 0).any():
                ranks = np.flatnonzero(owned < 0).tolist()
                raise missing or TopicNotFound(f"the samples topic does not exist yet on ranks {ranks}")
            check_partition_split(
                owned.tolist(), deterministic=self.deterministic, topic=self.settings.samples_topic
            )
        super().open()

    def run(self, stop: threading.Event, on_step: Callable[[TrainStage], None] | None = None) -> None:
        try:
            self.open()
            while not self.stop_agreed:
                if stop.is_set():
                    self.request_stop()
                self.step()
                if on_step is not None:
                    on_step(self)
        # A ConfigError here is every rank's (check_partition_split); a TrainingDiverged too: decided in
        # _rounds, or a snapshot refused (every rank refuses: they hold the same state). A TopicNotFound
        # from open() too: every rank waits for the topic (the supervisor's back-off) and builds again.
        except (RankGroupFailed, ConfigError, TrainingDiverged):
            raise
        except TopicNotFound as exc:
            if self._opened:  # a partition check while running: this rank's alone
                raise RankGroupFailed(f"rank {self.group.rank}: the samples topic is gone") from exc
            raise
        except Exception as exc:  # the peers are inside a collective this rank will never join
            raise rank_failure(self.group.rank, exc) from exc
        stop.set()  # a peer's stop is this rank's stop: the supervisor closes (one final checkpoint)

    def step(self) -> int:
        items = self._fetch()
        self._rounds()
        self._metrics.publish(self)
        return len(items)

    def _train_ready(self) -> None:
        """Nothing alone: the ranks step together in ``_rounds``."""

    def _rounds(self) -> None:
        b = self.batch_per_rank
        while not self.stop_agreed:
            waited = self._waited(self.max_wait_ms)
            due = self.period.due(
                samples=self._global_samples, event_time_ms=self._period_time_ms(), now_ms=self.clock()
            )
            trainer = self.trainer
            nothing = self._idle or trainer.learnt_nothing is not None
            view = self.group.exchange(
                [self._buffered, int(self._want_stop), int(due), int(waited), int(nothing),
                 int(trainer.diverged is not None)]
            )  # fmt: skip
            if view[:, _DIVERGED].any():
                self._stop_diverged(view[:, _DIVERGED])
            if self._stepped:
                self._stepped = False
                self._count_learnt_nothing(view[:, _LEARNT_NOTHING])
            if view[:, _DUE].any():
                self.snapshot()
            if view[:, _STOP].any():
                self.stop_agreed = True
                return
            counts = view[:, _BUFFERED]
            if (counts >= b).all():
                takes = np.full(len(counts), b)
            elif not self.deterministic and view[:, _WAITED].any() and counts.any():
                takes = np.minimum(counts, b)
                self.partial_steps += 1
            else:
                return
            self._step_together(takes)

    def _step_together(self, takes: np.ndarray) -> None:
        n, total = int(takes[self.group.rank]), int(takes.sum())
        self.sync.total = total
        synced = self.sync.calls
        self._stepped, self._idle = True, n == 0
        try:
            if n:
                self._train(self._cut(n))
            else:
                self.trainer.idle_step()
        except TrainingDiverged as exc:
            # This rank's rows found the model diverged (their logits not finite whatever their dense
            # inputs) before its gradients were synced: its peers wait in this step's sync. It takes part
            # with zero gradients, and every rank stops at the next exchange (_stop_diverged).
            self.trainer.diverged = self.trainer.diverged or str(exc)
            if self.sync.calls == synced:
                self.trainer.learner.idle_step()
        self._global_samples += total
        self._waiting_since = None  # what is left starts its wait at the next round

    def _count_learnt_nothing(self, nothing: np.ndarray) -> None:
        """The last step learnt nothing when it learnt nothing on any rank (``nothing[r]``; a rank without
        samples in it counts as nothing): every rank counts the same steps and reaches
        ``train.max_consecutive_skipped`` at the same step."""
        here = "no samples" if self._idle else self.trainer.learnt_nothing
        why = f"on all {len(nothing)} ranks; on rank {self.group.rank}: {here}"
        self.trainer.count_learnt_nothing(bool(nothing.all()), why)

    def _stop_diverged(self, flags: np.ndarray) -> None:
        """Some rank found the model diverged: every rank raises ``TrainingDiverged`` here, at the same
        round, before any save, with every such rank's reason (one gather, once)."""
        whys = self.group.gather_bytes((self.trainer.diverged or "").encode())
        ranks = np.flatnonzero(flags).tolist()
        told = "; ".join(f"rank {r}: {whys[r].decode().removeprefix('training diverged: ')}" for r in ranks)
        why = (
            f"training diverged on rank {ranks[0]}"
            if len(ranks) == 1
            else f"training diverged on ranks {ranks}"
        )
        why = f"{why} of {len(flags)}; every rank stops at this step ({told})"
        self.trainer.diverged = self.trainer.diverged or why  # no rank saves it
        raise TrainingDiverged(why)

    def _maybe_snapshot(self) -> None:
        """Boundaries are decided in ``_rounds`` (all ranks at once)."""

    # ------------------------------------------------------------------ saving together
    def _part_extra(self) -> dict[str, Any]:
        return {"weights": weights_digest(self.trainer.learner.model)}

    def _gather_parts(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        parts = [msgspec.msgpack.decode(b) for b in self.group.gather_bytes(msgspec.msgpack.encode(mine))]
        digests = [p["weights"] for p in parts]
        if len(set(digests)) != 1:
            raise RanksDiverged(f"the ranks' weights differ at a save (hash per rank: {digests})")
        return parts

    def _agree_number(self, number: int | None) -> int | None:
        agreed = int(self.group.exchange([-1 if number is None else number])[0, 0])
        return None if agreed < 0 else agreed

    def close(self, *, final: Any = "checkpoint") -> int | None:
        """The final save is collective: only after the ranks agreed to stop (``stop_agreed``)."""
        return super().close(final=final if self.stop_agreed else None)
