"""Build the stream processor's parts from a RunConfig and already-made connectors (Kafka, files or
memory): the single-process Pipeline, or the join stage and the train stage of the two-stage plane."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.config_common import env_setting
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.features.check import FeatureLimits, SpecChecker
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.metrics.online import OnlineMetricsBook
from reloop.engine.metrics.stats import STATS, EngineStats
from reloop.engine.models.registry import (
    available_backbones,
    backbone_entry,
    build_learner,
    learner_from_config,
    make_config,
    model_config_of,
)
from reloop.engine.runtime.clock import system_clock
from reloop.engine.runtime.config import ConfigError, RunConfig, load_feature_spec
from reloop.engine.runtime.cpu_limit import usable_cpus
from reloop.engine.runtime.intake import IntakeLimits
from reloop.engine.runtime.join_stage import GroupSource, JoinStage, JoinStageSettings
from reloop.engine.runtime.pipeline import Pipeline, PipelineSettings
from reloop.engine.runtime.train_stage import TrainStage, TrainStageSettings
from reloop.engine.streams import Positions, Sink, Source
from reloop.engine.train.data_parallel import RankGroup
from reloop.engine.train.ledger import Ledger, rank_ledger_path
from reloop.engine.train.period import PeriodTrigger
from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

log = logging.getLogger("reloop.run")


def _threads_are_the_users(cfg: RunConfig) -> bool:
    return cfg.train.threads is not None or cfg.train.deterministic or "OMP_NUM_THREADS" in os.environ


def apply_torch_settings(cfg: RunConfig) -> None:
    """The train stage's torch threads: ``train.threads`` where set; else torch's default capped by the
    CPUs the process may use, which torch does not know when a cgroup quota limits them
    (engine/runtime/cpu_limit.py). Deterministic CPU settings when asked (the resume-equals-uninterrupted
    guarantee is exact then)."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    elif not _threads_are_the_users(cfg):
        cpus = usable_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
            why = "torch's default (a thread per core) over the CPUs the cgroup's quota allows"
            log.info("train threads", extra={"fields": {"threads": cpus, "why": why}})
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)


def leave_a_core_to_join(cfg: RunConfig) -> int | None:
    """The train process of ``reloop run`` (its join process beside it on the same cores), with
    ``train.threads`` unset: torch's default intra-op threads (capped by the CPUs the process may use:
    engine/runtime/cpu_limit.py) less one, at least one; returns them (None
    where the threads are the user's: ``train.threads``, ``deterministic`` or ``OMP_NUM_THREADS``). With a
    thread on every core, each of torch's parallel regions waited for the thread the join process had
    taken the core from: on 2 cores the train stage ran at 0.57-0.75x its one-thread rate while the join
    stage worked (docs/data-plane.md)."""
    if _threads_are_the_users(cfg):
        return None
    threads = max(1, min(torch.get_num_threads(), usable_cpus()) - 1)
    torch.set_num_threads(threads)
    why = "train.threads unset: one core left to the join process"
    log.info("train threads", extra={"fields": {"threads": threads, "why": why}})
    return threads


def check_model(cfg: RunConfig, *, trains_here: bool = True) -> None:
    """ConfigError naming the key when no learner can be built from ``cfg.model``. Commands call this
    before their supervised stage starts: inside it the same error would be retried as a failure until
    ``recovery.give_up_after_s`` and end with exit 1 instead of 2. ``trains_here`` False (the join
    stage, on a machine of its own): whether the tables fit this machine's memory is not its concern."""
    spec = load_feature_spec(cfg.model)
    model = cfg.model
    try:
        model_config_of(model.backbone, **model.params)
    except ValueError as exc:
        key = "model.backbone" if model.backbone not in available_backbones() else "model.params"
        raise ConfigError(f"invalid config: {key}: {exc}{env_setting(key)}") from None
    entry = backbone_entry(model.backbone)
    if model.optimizer and entry.kind != "torch":  # it would be ignored without a word
        own = ", ".join(entry.config_cls.model_fields)
        raise ConfigError(
            f"invalid config: model.optimizer: backbone {model.backbone!r} ({entry.kind}) takes no optimizer "
            f"settings (they apply to the torch backbones); its own are in model.params: {own}"
        )
    try:
        config = make_config(
            model.backbone,
            spec,
            model.strategy,
            model.alpha,
            model.seed,
            model.optimizer or None,
            counters=model.counters,
            **model.params,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid config: model.optimizer: {exc}{env_setting('model.optimizer')}") from None
    try:
        with torch.device("meta"):  # the constructors' own checks, without allocating the tables
            learner = learner_from_config(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"invalid config: model: backbone {model.backbone!r} cannot be built: {exc}"
        ) from None
    module = getattr(learner, "model", None)
    if trains_here and isinstance(module, torch.nn.Module):  # river and FTRL keep their own weights
        _check_fits_in_memory(model.backbone, module)


def _check_fits_in_memory(backbone: str, module: torch.nn.Module) -> None:
    """ConfigError when the model's weights and one optimizer state per weight (Adagrad's; Adam keeps
    two) need more than this machine's memory: the allocation failed inside the stage, and the
    supervisor retried it as a transient failure for ``recovery.give_up_after_s``."""
    need = 2 * sum(p.numel() * p.element_size() for p in module.parameters())
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(
            f"invalid config: model: backbone {backbone!r} needs {need / 2**30:,.1f} GiB for its weights and "
            f"one optimizer state each, more than this machine's {have / 2**30:,.1f} GiB of memory; "
            "lower the buckets of the spec's fields (or model.params' embedding_dim)"
        )


def build_trainer(cfg: RunConfig) -> StreamTrainer:
    apply_torch_settings(cfg)
    spec = load_feature_spec(cfg.model)
    learner = build_learner(
        cfg.model.backbone,
        spec,
        cfg.model.strategy,
        cfg.model.alpha,
        seed=cfg.model.seed,
        optimizer=cfg.model.optimizer or None,
        counters=cfg.model.counters,
        **cfg.model.params,
    )
    if cfg.train.delayed_feedback != "none":
        from reloop.engine.loss.delayed import with_delayed_feedback

        learner.loss = with_delayed_feedback(learner.loss, cfg.train.delayed_feedback)
    if getattr(learner, "wide", None) is not None:
        warn_per_event_part(cfg)
    warn_unused_rates(cfg)
    return StreamTrainer(
        learner=learner,
        featurizer=Featurizer(spec),
        config=StreamTrainerConfig(
            batch_size=cfg.train.batch_size,
            y_last=cfg.train.y_last,
            version_mismatch=cfg.train.version_mismatch,
            progressive_window=cfg.train.progressive_window,
            replay_size=cfg.train.replay_size,
            replay_ratio=cfg.train.replay_ratio,
            replay_batch_size=cfg.train.replay_batch_size,
            max_consecutive_skipped=cfg.train.max_consecutive_skipped,
        ),
    )


def warn_per_event_part(cfg: RunConfig) -> None:
    """The per-event part pays only where labels arrive with their events and scores come from the live
    learner (the streaming backtest); the joiner's labels come late, and in the wrong order for it."""
    if cfg.join.emit_policy == "fnw":
        measured = "7.9e-3 AUC below the same learner without it"
    else:
        measured = "served AUC 0.59 and LogLoss 3.8, against 0.71 and 0.62 without it"
    log.warning(
        "model.optimizer.wide is 'bayes': the per-event part learns from each label as it arrives, and "
        "the joiner's labels arrive late (a click's positive first, the negatives when join.window_ms "
        'closes). Replayed that way on MovieLens it gave %s (docs/backtest/ablation.md, "Delayed '
        "feedback\"). Set it to 'off' unless this stream's labels come with their events.",
        measured,
        extra={"fields": {"key": "model.optimizer.wide", "emit_policy": cfg.join.emit_policy}},
    )


def unused_rates(cfg: RunConfig) -> list[str]:
    """The rates ``model.optimizer`` pins that no step will use: with ``train.batch_size`` below
    ``small_steps_below`` every step learns at the small-step rates (``lr`` 0.02 in the demo's config
    was inert for five days, its dense part learning at 3e-4)."""
    from reloop.engine.models.config import OptimizerConfig

    given = cfg.model.optimizer or {}
    if not given:
        return []
    settings = OptimizerConfig.model_validate(given)
    if cfg.train.batch_size >= settings.small_steps_below:
        return []
    unused = ["lr"] if "lr" in given and "small_step_lr" not in given else []
    # SparseAdam's small steps take embedding_lr itself when it is given (effective_small_step_embedding_lr).
    if (
        "embedding_lr" in given
        and "small_step_embedding_lr" not in given
        and settings.embedding_optimizer == "adagrad"
    ):
        unused.append("embedding_lr")
    return unused


# The configs already warned about: a stage rebuilt from its config at every retry (waiting for the samples
# topic) said it again each time. By identity, and weakly: a config that is gone leaves its id free.
_RATES_SAID: weakref.WeakValueDictionary[int, RunConfig] = weakref.WeakValueDictionary()


def warn_unused_rates(cfg: RunConfig) -> None:
    if _RATES_SAID.get(id(cfg)) is cfg:
        return
    _RATES_SAID[id(cfg)] = cfg
    for key in unused_rates(cfg):
        small = "small_step_lr" if key == "lr" else "small_step_embedding_lr"
        log.warning(
            "model.optimizer.%s is never used: train.batch_size (%d) is below "
            "model.optimizer.small_steps_below, so every step learns at the small-step rates; pin "
            "model.optimizer.%s for them, or set "
            "small_steps_below: 0 to learn at %s whatever a step's size",
            key,
            cfg.train.batch_size,
            small,
            key,
            extra={"fields": {"key": f"model.optimizer.{key}"}},
        )


def _period(cfg: RunConfig) -> PeriodTrigger:
    p = cfg.period
    return PeriodTrigger(
        every_samples=p.every_samples, every_event_ms=p.every_event_ms, every_wall_s=p.every_wall_s
    )


def _checker(cfg: RunConfig) -> SpecChecker:
    v = cfg.validation
    return SpecChecker(
        load_feature_spec(cfg.model),
        FeatureLimits(max_chars=v.max_feature_chars, max_list=v.max_feature_list),
    )


def _limits(cfg: RunConfig) -> IntakeLimits:
    v = cfg.validation
    return IntakeLimits(
        max_event_bytes=v.max_event_bytes, max_future_ms=v.max_future_ms, max_past_ms=v.max_past_ms
    )


def build_pipeline(
    cfg: RunConfig,
    *,
    source: Source,
    samples_sink: Sink | None = None,
    dead_letter_sink: Sink | None = None,
    commit: Callable[[Positions], None] | None = None,
    clock: Callable[[], int] = system_clock,
    stats: EngineStats = STATS,
    checkpoint_dir: str | Path | None = None,
    replay: bool = False,
) -> Pipeline:
    """The single-process pipeline (source -> join -> train in one loop). ``replay``: a bounded replay,
    whose versions are a function of the range, never of the wall clock (no idle period clock)."""
    trainer = build_trainer(cfg)
    lim = _limits(cfg)
    return Pipeline(
        source=source,
        joiner_config=cfg.join.joiner_config(),
        trainer=trainer,
        registry=SnapshotRegistry(checkpoint_dir or cfg.checkpoint.dir, keep=cfg.checkpoint.keep),
        period=_period(cfg),
        settings=PipelineSettings(
            impressions_topic=cfg.source.impressions_topic,
            clicks_topic=cfg.source.clicks_topic,
            poll_max_records=cfg.consumer.poll_max_records,
            poll_timeout_s=cfg.consumer.poll_timeout_s,
            merge_idle_ms=cfg.consumer.merge_idle_ms,
            merge_lookahead=cfg.consumer.merge_lookahead,
            fingerprint=cfg.fingerprint(),
            allow_fingerprint_change=cfg.checkpoint.allow_fingerprint_change,
            flush_timeout_s=cfg.recovery.flush_timeout_s,
            background_writes=cfg.checkpoint.background_writes,
            max_event_bytes=lim.max_event_bytes,
            max_future_ms=lim.max_future_ms,
            max_past_ms=lim.max_past_ms,
            periods_when_idle=not (replay or cfg.train.deterministic),
        ),
        clock=clock,
        samples_sink=samples_sink,
        dead_letters=DeadLetterSink(dead_letter_sink),
        served_metrics=OnlineMetricsBook(window_size=cfg.metrics.window_size, max_arms=cfg.metrics.max_arms),
        ledger=Ledger(cfg.checkpoint.ledger) if cfg.checkpoint.ledger else None,
        commit=commit,
        meta={"config": cfg.redacted_dump()},
        stats=stats,
        checker=_checker(cfg),
    )


def build_join_stage(
    cfg: RunConfig,
    *,
    source: GroupSource,
    samples_sink: Sink,
    dead_letter_sink: Sink | None = None,
    clock: Callable[[], int] = system_clock,
    stats: EngineStats = STATS,
    checkpoint_dir: str | Path | None = None,
    retention_ms: Mapping[str, int] | None = None,
    topic_ids: Mapping[str, str] | None = None,
) -> JoinStage:
    """The join stage: this process's share of the join tasks, into the samples topic. ``retention_ms``:
    the topics' time-based retention, where known (warns of records stamped longer ago); ``topic_ids``:
    the input topics' ids, where known (tells a topic created again since a task's checkpoint)."""
    st = cfg.stages
    return JoinStage(
        source=source,
        samples=samples_sink,
        dead_letters=DeadLetterSink(dead_letter_sink),
        checkpoint_root=checkpoint_dir or cfg.checkpoint.dir,
        joiner_config=cfg.join.joiner_config(),
        limits=_limits(cfg),
        settings=JoinStageSettings(
            impressions_topic=cfg.source.impressions_topic,
            clicks_topic=cfg.source.clicks_topic,
            samples_topic=st.samples_topic,
            poll_max_records=cfg.consumer.poll_max_records,
            poll_timeout_s=cfg.consumer.poll_timeout_s,
            merge_idle_ms=cfg.consumer.merge_idle_ms,
            merge_lookahead=cfg.consumer.merge_lookahead,
            batch_samples=st.batch_samples,
            max_delay_ms=st.max_delay_ms,
            checkpoint_every_s=st.join_checkpoint_every_s,
            checkpoint_max_share=st.join_checkpoint_max_share,
            flush_timeout_s=cfg.recovery.flush_timeout_s,
            fingerprint=cfg.join_fingerprint(),
            fingerprinted=cfg.join_fingerprinted(),
            allow_fingerprint_change=cfg.checkpoint.allow_fingerprint_change,
            stall_timeout_s=st.stall_timeout_s,
        ),
        clock=clock,
        checker=_checker(cfg),
        stats=stats,
        retention_ms=retention_ms,
        topic_ids=topic_ids,
    )


def build_train_stage(
    cfg: RunConfig,
    *,
    source: Source,
    dead_letter_sink: Sink | None = None,
    commit: Callable[[Positions], None] | None = None,
    clock: Callable[[], int] = system_clock,
    stats: EngineStats = STATS,
    checkpoint_dir: str | Path | None = None,
    group: RankGroup | None = None,
    replay: bool = False,
    samples_topic_id: str | None = None,
) -> TrainStage:
    """The train stage: the samples topic in, model versions (snapshots) out. With ``group`` (more
    than one rank) one data-parallel rank of it, reading ``source`` = its share of the partitions.
    ``replay``: a bounded replay (no idle period clock, as ``build_pipeline``). ``samples_topic_id``: the
    samples topic's id, where known (each save records it: a topic created again since is read from its
    oldest record)."""
    rank = group.rank if group is not None else 0
    trainer = build_trainer(cfg)
    stage = dict(
        source=source,
        trainer=trainer,
        registry=SnapshotRegistry(checkpoint_dir or cfg.checkpoint.dir, keep=cfg.checkpoint.keep),
        period=_period(cfg),
        settings=TrainStageSettings(
            samples_topic=cfg.stages.samples_topic,
            poll_max_records=cfg.stages.train_poll_messages,
            poll_timeout_s=cfg.consumer.poll_timeout_s,
            merge_idle_ms=cfg.consumer.merge_idle_ms,
            merge_lookahead=cfg.consumer.merge_lookahead,
            fingerprint=cfg.fingerprint(),
            allow_fingerprint_change=cfg.checkpoint.allow_fingerprint_change,
            flush_timeout_s=cfg.recovery.flush_timeout_s,
            background_writes=cfg.checkpoint.background_writes,
            max_wait_ms=None if cfg.train.deterministic else cfg.train.max_wait_ms,
            idle_timeout_ms=None if replay or cfg.train.deterministic else cfg.join.idle_timeout_ms,
        ),
        clock=clock,
        dead_letters=DeadLetterSink(dead_letter_sink),
        served_metrics=OnlineMetricsBook(window_size=cfg.metrics.window_size, max_arms=cfg.metrics.max_arms),
        ledger=Ledger(rank_ledger_path(cfg.checkpoint.ledger, rank)) if cfg.checkpoint.ledger else None,
        commit=commit,
        meta={
            "config": cfg.redacted_dump(),
            **({"samples_topic_id": samples_topic_id} if samples_topic_id else {}),
        },
        stats=stats,
    )
    if group is None or group.world_size == 1:
        return TrainStage(**stage)
    from reloop.engine.runtime.train_ranks import RankedTrainStage
    from reloop.engine.train.data_parallel import GradientSync

    check_data_parallel(cfg, trainer)
    d = cfg.distributed
    return RankedTrainStage(
        group=group,
        sync=GradientSync(group, trainer.learner.model, d.embedding_sync),
        batch_per_rank=d.batch_per_rank or max(1, cfg.train.batch_size // group.world_size),
        deterministic=cfg.train.deterministic,
        max_wait_ms=d.max_wait_ms,
        **stage,
    )


def check_data_parallel(cfg: RunConfig, trainer: StreamTrainer) -> None:
    """What data parallelism cannot do (yet), refused at start with the key to change."""
    from reloop.engine.models.learner import TorchLearner

    if not isinstance(trainer.learner, TorchLearner):
        raise ConfigError(
            f"model.backbone: {cfg.model.backbone!r} is not a torch model; data-parallel ranks need one"
        )
    if trainer.learner.wide is not None:
        raise ConfigError(
            "model.optimizer.wide: the per-event wide part learns on one rank's events only; "
            "set it to 'off' for more than one rank"
        )
    if getattr(trainer, "replay", None) is not None:
        raise ConfigError("train.replay_size: the replay buffer is per process; set 0 for more than one rank")
