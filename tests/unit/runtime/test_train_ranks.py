"""The train stage as data-parallel ranks (real torch.distributed, gloo, one process per rank; each rank
reads its share of an in-memory samples topic built identically in every process): one snapshot per
boundary with every rank's part, the same weights on every rank, a stop-and-resume with the same ranks
equal to an uninterrupted run, and a restart with another number of ranks (or one process) that loses
and repeats no sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.runtime.synthetic import SPEC
from reloop.engine.train.ledger import Ledger

from ..procs import rank_context

PARTITIONS = 4
PER_PARTITION = 256
TOPIC = "samples"


def _log(partitions: int = PARTITIONS, odd: dict | None = None, x: dict | None = None):
    """The samples topic; ``odd``: features of partition 3's samples from its 101st on (rank 1 of 2 reads
    partitions 1 and 3); ``x``: the numeric feature ``x`` per partition (None: no such feature)."""
    from reloop.connectors.memory import MemoryLog
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample

    log = MemoryLog()
    log.create(TOPIC, partitions)
    rng = np.random.default_rng(11)
    t0 = 1_700_000_000_000
    for p in range(partitions):
        samples = [
            LabeledSample(
                f"p{p}-{i}",
                {"user": f"u{rng.integers(60)}", "item": f"i{rng.integers(90)}", "ctx": int(rng.integers(7))}
                | (odd if odd and p == 3 and i >= 100 else {})
                | ({"x": x[p]} if x else {}),
                int(rng.random() < 0.3),
                float(rng.uniform(0.05, 0.6)),
                0,
                t0 + 10 * i + p,
            )
            for i in range(PER_PARTITION)
        ]
        for i in range(0, PER_PARTITION, 32):
            chunk = samples[i : i + 32]
            log.append(
                TOPIC, encode_batch(batch_from_samples(chunk, task=p, first_seq=i)), None,
                chunk[-1].event_time_ms, partition=p,
            )  # fmt: skip
    return log


def _config(work: Path, deterministic: bool) -> dict:
    return {
        "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.3, "spec": SPEC,
                  "params": {"hidden_units": [16, 16]}},
        "train": {"batch_size": 64, "deterministic": deterministic, "threads": 1},
        "period": {"every_samples": 128},
        "stages": {"samples_topic": TOPIC},
        "checkpoint": {"dir": str(work / "snaps"), "keep": 50, "ledger": str(work / "ledger.jsonl")},
        "consumer": {"group_id": None},
        "distributed": {"max_wait_ms": 0},
    }  # fmt: skip


def _train(
    rank: int, world: int, init: str | None, cfg_dict: dict, until: int, out: str, perturb: bool = False
) -> None:
    """Train this rank until the ranks together trained ``until`` samples, then stop together
    (``perturb``: rank 1's weights are changed behind the group's back before the final save)."""
    from reloop.connectors.memory import MemorySource
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.streams import PartitionShare
    from reloop.engine.train.data_parallel import RankGroup, weights_digest

    torch.set_num_threads(1)
    cfg = load_config_dict(cfg_dict, env={})
    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=60) if init else None
    source = MemorySource(_log(), [TOPIC], share=PartitionShare(rank, world))
    stage = build_train_stage(cfg, source=source, stats=EngineStats(), group=group)
    stage.open()
    if group is None:
        # Taken = trained + buffered: after a resume from ranks that stopped on an uneven count, the last
        # partial batch stays buffered (it goes into the final checkpoint), so "trained" alone may never
        # reach ``until`` (it hung under load, where the ranks stop on other counts).
        while stage.trainer.counters.samples + stage.buffered_samples < until:
            stage.step()
    else:
        while not stage.stop_agreed:
            if stage._global_samples >= until:
                stage.request_stop()
            stage.step()
    published = stage.version  # the last period boundary before the stop
    if perturb and rank == 1:
        with torch.no_grad():
            next(stage.trainer.learner.model.parameters()).add_(1e-3)
    number = stage.close(final="checkpoint")
    summary = {
        "digest": weights_digest(stage.trainer.learner.model),
        "steps": stage.trainer.counters.steps,
        "final": number,
        "published": published,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    if group is not None:
        group.close()


def _run(work: Path, world: int, until: int, deterministic: bool = True, perturb: bool = False) -> list[dict]:
    cfg = _config(work, deterministic)
    out = work / f"out-{world}-{until}"
    out.mkdir(parents=True)
    if world == 1:
        _train(0, 1, None, cfg, until, str(out))
    else:
        ctx = rank_context()
        init = f"file://{out / 'store'}"
        args = (world, init, cfg, until, str(out), perturb)
        procs = [ctx.Process(target=_train, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(240)
        assert [p.exitcode for p in procs] == [0] * world
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _model(work: Path, version: int) -> dict:
    return SnapshotRegistry(work / "snaps").load(version, parts=["model"]).state["model"]["model"]


def _ids(work: Path) -> list[str]:
    return [sid for _, sid, _, _ in Ledger.read_ranks(work / "ledger.jsonl")]


def test_two_ranks_one_snapshot_per_boundary_same_weights_and_exact_resume(tmp_path):
    total = PARTITIONS * PER_PARTITION
    whole = tmp_path / "whole"
    ranks = _run(whole, 2, total)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    reg = SnapshotRegistry(whole / "snaps")
    assert reg.versions() == list(range(1, total // 128 + 1))
    manifest = reg.manifest(reg.latest_version())["meta"]
    assert manifest["ranks"] == 2 and manifest["samples_trained"] == total
    ids = _ids(whole)
    assert sorted(ids) == sorted(f"p{p}-{i}" for p in range(PARTITIONS) for i in range(PER_PARTITION))
    assert (whole / "ledger.jsonl").exists() and (whole / "ledger.jsonl.rank1").exists()

    # Stopped at 320 samples (between boundaries: a checkpoint), resumed by two new processes.
    split = tmp_path / "split"
    _run(split, 2, 320)
    assert SnapshotRegistry(split / "snaps").checkpoints.versions()
    _run(split, 2, total)
    for version in (3, total // 128):
        a, b = _model(whole, version), _model(split, version)
        for k in a:
            assert torch.equal(a[k], b[k]), (version, k)
    assert sorted(_ids(split)) == sorted(ids)


@pytest.mark.parametrize("after", [1, 3], ids=["two-ranks-to-one-process", "two-ranks-to-three"])
def test_a_rescale_loses_and_repeats_no_sample(tmp_path, after):
    total = PARTITIONS * PER_PARTITION
    _run(tmp_path, 2, 448, deterministic=False)
    first = _ids(tmp_path)
    assert 0 < len(first) < total
    ranks = _run(tmp_path, after, total, deterministic=False)
    assert len({r["digest"] for r in ranks}) == 1
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids))
    reg = SnapshotRegistry(tmp_path / "snaps")
    last = reg.checkpoints.load(reg.checkpoints.versions()[-1], parts=["state"]).state["state"]
    buffered = sum(int(part["buffered"]) for part in last["ranks"])
    assert len(ids) + buffered == total
    assert len(last["ranks"]) == after


def test_ranks_whose_weights_differ_publish_nothing(tmp_path):
    ranks = _run(tmp_path, 2, 256, perturb=True)
    assert ranks[0]["digest"] != ranks[1]["digest"]
    assert [r["final"] for r in ranks] == [None, None]  # both refused the final save together
    assert SnapshotRegistry(tmp_path / "snaps").checkpoints.versions() == []
    # The boundaries before it, all of them: how many depends on how much the ranks had buffered when
    # the stop was agreed (at least the two of the 256 samples asked for).
    published = {r["published"] for r in ranks}
    assert len(published) == 1 and published.pop() >= 2
    assert SnapshotRegistry(tmp_path / "snaps").versions() == list(range(1, ranks[0]["published"] + 1))


def test_a_rank_that_owns_no_partition_fails_with_a_message_saying_why(tmp_path):
    # Six ranks over the four partitions: ranks 4 and 5 own none. Each failed with "poll before open"
    # while the others waited for it in a collective.
    from reloop.connectors.memory import MemorySource
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import ConfigError, load_config_dict
    from reloop.engine.streams import PartitionShare

    share = PartitionShare(5, 6)
    source = MemorySource(_log(), [TOPIC], share=share)
    assert source.partitions() == []
    stage = build_train_stage(
        load_config_dict(_config(tmp_path, True), env={}), source=source, stats=EngineStats()
    )
    stage.share = share  # as the rank's stage holds it (build_train_stage takes it from a RankGroup)
    with pytest.raises(ConfigError, match="owns no partition.*multiple of 6"):
        stage.open()


def test_a_ranks_log_lines_say_which_count_is_its_own(caplog):
    # A rank's progress line counted its own samples and its snapshot line every rank's, both as
    # samples_trained, with nothing to tell them apart.
    import logging
    from types import SimpleNamespace

    from reloop.engine.runtime.kafka_stages import describe_train
    from reloop.engine.runtime.train_stage import TrainStage

    def stage(count: int) -> SimpleNamespace:
        return SimpleNamespace(
            share=SimpleNamespace(index=1, count=count), version=4, buffered_samples=0, partial_steps=0,
            samples_trained_all=300 * count,
            duplicates_dropped=0, samples_refused=0, seq_gaps=0, samples_missing=0, task_restarts=0,
            dead_letters=SimpleNamespace(counts={}),
            trainer=SimpleNamespace(counters=SimpleNamespace(samples=300, version_mismatches=0)),
            snapshots_written=0,
            _metrics=SimpleNamespace(snapshotted=lambda n: None),
        )  # fmt: skip

    progress = describe_train(stage(2))
    assert (progress["rank"], progress["ranks"]) == (1, 2)
    # One meaning per name in every line: samples_trained is every rank's, rank_samples_trained its own.
    assert (progress["samples_trained"], progress["rank_samples_trained"]) == (600, 300)
    alone = describe_train(stage(1))
    assert "rank" not in alone and "rank_samples_trained" not in alone and alone["samples_trained"] == 300
    with caplog.at_level(logging.INFO):
        TrainStage._durable(stage(2), "snapshot", 5, {"samples_trained": 600, "base_version": 4})
        TrainStage._durable(stage(1), "snapshot", 6, {"samples_trained": 300, "base_version": 5})
    two, one = (r.fields for r in caplog.records if r.getMessage() == "snapshot")
    assert two["samples_trained"] == 600 and two["rank_samples_trained"] == 300 and two["rank"] == 1
    assert one == {"number": 6, "version": 6, "samples_trained": 300}


def _open(
    rank: int, world: int, init: str, cfg_dict: dict, partitions: int, out: str, missing_on: tuple = ()
) -> None:
    """Open rank ``rank``'s stage over a topic of ``partitions``; write what it raised. ``missing_on``: the
    ranks that find no such topic (it is being created: the others see it already)."""
    from reloop.connectors.memory import MemorySource
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.streams import PartitionShare, TopicNotFound
    from reloop.engine.train.data_parallel import RankGroup

    class NotYet(MemorySource):
        def partitions(self):
            raise TopicNotFound(f"Kafka topic {TOPIC!r} does not exist")

    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=20)
    kind = NotYet if rank in missing_on else MemorySource
    source = kind(_log(partitions), [TOPIC], share=PartitionShare(rank, world))
    stage = build_train_stage(
        load_config_dict(cfg_dict, env={}), source=source, stats=EngineStats(), group=group
    )
    try:
        if missing_on:  # as the process runs it: what run() lets the supervisor see
            import threading

            stage.run(threading.Event())
        else:
            stage.open()
        error = None
    except Exception as exc:  # noqa: BLE001 - what the test looks at
        error = f"{type(exc).__name__}: {exc}"
    else:
        # An open stage's fetch thread featurises in torch and pyarrow: left running at interpreter exit,
        # it aborts the process (SIGABRT, "terminate called without an active exception") 1 run in ~50.
        stage.close(final=None)
    Path(out, f"rank{rank}.json").write_text(json.dumps(error))
    group.close()


def _two_ranks(target, out, timeout_s: float, *args) -> list:
    """Run ``target(rank, 2, store, *args)`` as two rank processes (``out`` holds the store); what each
    wrote to ``out/rank{r}.json``."""
    out.mkdir()
    procs = [
        rank_context().Process(target=target, args=(r, 2, f"file://{out / 'store'}", *args)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _opened_by_two_ranks(tmp_path, cfg_dict: dict, partitions: int, missing_on: tuple = ()) -> list:
    """What each of two rank processes raised opening its stage (``_open``), None where nothing."""
    out = tmp_path / "out"
    return _two_ranks(_open, out, 120, cfg_dict, partitions, str(out), missing_on)


@pytest.mark.parametrize(
    ("partitions", "deterministic", "refused"),
    [(3, True, "deterministic"), (1, False, r"ranks \[1\] would read none"), (3, False, None)],
)
def test_every_rank_refuses_a_split_it_cannot_train_before_reading(
    tmp_path, partitions, deterministic, refused
):
    # Three partitions over two deterministic ranks: rank 0 took two partitions' samples for every one of
    # rank 1's and buffered the rest without bound; one partition over two: rank 1 alone failed and the
    # other waited in a collective until torchrun restarted both, max_restarts times.
    errors = _opened_by_two_ranks(tmp_path, _config(tmp_path, deterministic), partitions)
    if refused is None:
        assert errors == [None, None]  # unequal shares without deterministic: partial steps even them out
    else:
        assert all(e is not None and e.startswith("ConfigError") for e in errors), errors
        assert all(re.search(refused, e) for e in errors) and errors[0] == errors[1]


@pytest.mark.parametrize("missing_on", [(0, 1), (0,)])
def test_ranks_wait_together_for_a_samples_topic_not_created_yet(tmp_path, missing_on):
    # `reloop train --world-size 2` started before the join stage: the ranks raised RankGroupFailed and
    # torchrun gave up after max_restarts, where one process waits ("waiting for a topic"). Every rank
    # now raises TopicNotFound (the supervisor's wait), also those that see the topic already: a rank
    # that alone went back to build again would meet its peers in another collective.
    errors = _opened_by_two_ranks(tmp_path, _config(tmp_path, False), 2, missing_on)
    assert all(e is not None and e.startswith("TopicNotFound") for e in errors), errors


@pytest.mark.parametrize(
    ("owned", "deterministic", "refused"),
    [([1, 1, 0], False, r"3 train ranks.*ranks \[2\] would read none"), ([2, 1], True, r"own \[2, 1\]"),
     ([2, 1], False, None), ([2, 2], True, None)],
)  # fmt: skip
def test_the_partition_split_check_names_what_to_change(owned, deterministic, refused, caplog):
    from reloop.engine.runtime.config import ConfigError
    from reloop.engine.runtime.train_ranks import check_partition_split

    if refused is None:
        with caplog.at_level("WARNING", logger="reloop.train"):
            check_partition_split(owned, deterministic=deterministic, topic="s")
        # Unequal shares start, said (a rank with more lags): the deterministic refusal alone named them.
        unequal = [r for r in caplog.records if "unequal shares" in r.getMessage()]
        assert [r.fields["owned"] for r in unequal] == ([owned] if len(set(owned)) > 1 else [])
    else:
        with pytest.raises(ConfigError, match=refused):
            check_partition_split(owned, deterministic=deterministic, topic="s")


# ---------------------------------------------------------------------------- divergence
def _diverging(rank: int, world: int, init: str, cfg_dict: dict, case: str, until: int, out: str) -> None:
    """Run rank ``rank``'s stage as the process does (``run``) until the ranks trained ``until`` samples or
    it raised; write what it raised, when, and where the ranks were."""
    import threading
    import time

    from reloop.connectors.memory import MemorySource
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.streams import PartitionShare
    from reloop.engine.train.data_parallel import RankGroup

    torch.set_num_threads(1)
    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=30)
    log = {
        "big_row": lambda: _log(odd={"item": "poison"}),
        "nan_row": _log,
        "rank1_unlearnable": lambda: _log(x={0: 0.5, 1: 1e30, 2: 0.5, 3: 1e30}),
        "all_unlearnable": lambda: _log(x=dict.fromkeys(range(PARTITIONS), 1e30)),
    }[case]()
    stage = build_train_stage(
        load_config_dict(cfg_dict, env={}),
        source=MemorySource(log, [TOPIC], share=PartitionShare(rank, world)),
        stats=EngineStats(),
        group=group,
    )
    featurizer, table = stage.trainer.featurizer, stage.trainer.learner.model.embedding.table.weight
    used = {
        int(r)
        for r in featurizer.transform(
            [{"user": f"u{k}", "item": f"i{k}", "ctx": k % 7} for k in range(90)]
        ).cat.ravel()
    }
    if case == "big_row":  # an embedding too large for any input, used by rank 1's rows alone
        row = int(featurizer.transform([{"user": "u0", "item": "poison", "ctx": 0}]).cat[0, 1])
        assert row not in used
        with torch.no_grad():
            table[row] = 1e30
    elif case == "nan_row":  # NaN where no sample looks: only a snapshot's check finds it
        with torch.no_grad():
            table[min(set(range(len(table))) - used)] = float("nan")
    stop = threading.Event()
    started = time.monotonic()
    try:
        stage.run(stop, lambda st: st._global_samples >= until and stop.set())
        error = None
    except Exception as exc:  # noqa: BLE001 - what the test looks at
        error = f"{type(exc).__name__}: {exc}"
        stage.abort()
    else:
        stage.close(final="checkpoint")
    summary = {
        "error": error,
        "seconds": time.monotonic() - started,
        "global_samples": stage._global_samples,
        "in_a_row": stage.trainer.skipped_in_a_row,
        "dead_letters": stage.dead_letters.total,
        "version": stage.version,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    group.close()


@pytest.mark.parametrize(
    ("case", "diverged"),
    [
        (
            "big_row",
            r"on rank 1 of 2; every rank stops at this step \(rank 1: the model's logits are not finite",
        ),
        ("nan_row", r"snapshot refused: the learner's 'model.embedding.table.weight' \(10 of"),
        ("rank1_unlearnable", None),
        ("all_unlearnable", r"2 steps in a row learnt nothing \(the last: on all 2 ranks; on rank [01]: "),
    ],
)
def test_a_divergence_on_any_rank_stops_every_rank_at_the_same_step(tmp_path, case, diverged):
    """Rank 1's rows alone overflowed the model (an embedding of 1e30): it raised TrainingDiverged and its
    peer waited in the step's gradient sync until distributed.timeout_s, both exited 1 (RankGroupFailed)
    and torchrun restarted them into the same divergence. A snapshot both refused (NaN) exited 1 too. A
    rank whose own rows were all unlearnable counted steps in a row on its own, stopped alone while the
    group learnt (from rank 0's rows), and hung its peer. Now: TrainingDiverged on every rank, at the
    same step, before any save (exit 2); unlearnable rows on one rank are dead-lettered, as they are when
    one process trains the whole stream."""
    cfg = _config(tmp_path, True)
    if "unlearnable" in case:
        cfg["model"]["spec"] = {"fields": [*SPEC["fields"], {"kind": "numeric", "name": "x"}]}
    cfg["train"]["max_consecutive_skipped"] = 2
    out = tmp_path / "out"
    until = PARTITIONS * PER_PARTITION // 2
    ranks = _two_ranks(_diverging, out, 200, cfg, case, until, str(out))
    assert ranks[0]["global_samples"] == ranks[1]["global_samples"]  # the same step
    assert all(r["seconds"] < 25 for r in ranks), ranks  # none waited for a peer (timeout_s = 30)
    if diverged is None:
        assert [r["error"] for r in ranks] == [None, None]
        assert ranks[0]["global_samples"] >= until and ranks[0]["dead_letters"] == 0
        assert ranks[1]["dead_letters"] == ranks[0]["global_samples"] // 2  # every rank-1 sample
        assert [r["in_a_row"] for r in ranks] == [0, 0]
        return
    for r in ranks:
        assert r["error"] is not None and r["error"].startswith("TrainingDiverged: "), r
        assert re.search(diverged, r["error"]), r["error"]
    registry = SnapshotRegistry(tmp_path / "snaps")
    assert registry.checkpoints.versions() == []  # nothing saved after the divergence
    assert registry.versions() == list(range(1, (ranks[0]["version"] or 0) + 1))
    if case == "all_unlearnable":
        assert [r["in_a_row"] for r in ranks] == [2, 2]


def test_a_broken_collective_is_told_as_another_ranks_failure_not_this_ones():
    # Rank 1 SIGKILLed: the survivor's only line read "rank 0 failed: RuntimeError('[...gloo...] Read
    # error ...: Connection reset by peer')", and an alert on it named the healthy rank.
    from reloop.engine.runtime.train_ranks import rank_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4496: "
                        "Connection reset by peer")  # fmt: skip
    told = str(rank_failure(0, gloo))
    assert "another rank exited" in told and "rank 0 failed" not in told
    assert str(rank_failure(1, ValueError("a bug here"))) == "rank 1 failed: ValueError('a bug here')"
