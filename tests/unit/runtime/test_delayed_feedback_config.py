"""join.emit_policy and train.delayed_feedback: FNW's stream and FNW's weights only together; the per-event
part, which the joiner's late labels undo, is warned about."""

from __future__ import annotations

import pytest
from reloop.engine.runtime.config import ConfigError, load_config_dict


def test_run_config_pairs_join_and_train() -> None:
    model = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    cfg = load_config_dict(
        {"model": model, "join": {"emit_policy": "fnw"}, "train": {"delayed_feedback": "fnw"}}
    )
    assert cfg.join.joiner_config().emit_policy == "fnw"
    with pytest.raises(ConfigError, match="emit_policy"):
        load_config_dict({"model": model, "join": {"emit_policy": "fnw"}})


def test_build_trainer_wraps_the_loss() -> None:
    from reloop.engine.loss.delayed import FakeNegativeWeighted
    from reloop.engine.runtime.build import build_trainer

    model = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    on = {"join": {"emit_policy": "fnw"}, "train": {"delayed_feedback": "fnw"}}
    assert isinstance(
        build_trainer(load_config_dict({"model": model, **on})).learner.loss, FakeNegativeWeighted
    )
    assert not isinstance(
        build_trainer(load_config_dict({"model": model})).learner.loss, FakeNegativeWeighted
    )


def test_fingerprints_unchanged_unless_fnw_is_used() -> None:
    model = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    plain = load_config_dict({"model": model})
    # what the fingerprint hashed before these keys existed
    import hashlib
    import json

    dump = plain.model_dump(mode="json")
    old = {k: dump[k] for k in ("model", "train", "join")}
    del old["join"]["emit_policy"], old["train"]["delayed_feedback"]
    del old["train"]["replay_size"], old["train"]["replay_ratio"], old["train"]["replay_batch_size"]
    del old["train"]["max_wait_ms"], old["train"]["max_consecutive_skipped"]  # runtime knobs: never in it
    del old["model"]["counters"]
    assert plain.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    fnw = load_config_dict(
        {"model": model, "join": {"emit_policy": "fnw"}, "train": {"delayed_feedback": "fnw"}}
    )
    assert fnw.fingerprint() != plain.fingerprint()
    assert fnw.join_fingerprint() != plain.join_fingerprint()


def test_train_replay_settings_reach_the_trainer_and_change_the_fingerprint() -> None:
    from reloop.engine.runtime.build import build_trainer

    model = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    plain = load_config_dict({"model": model})
    replay = load_config_dict({"model": model, "train": {"replay_size": 500, "replay_ratio": 0.5}})
    trainer = build_trainer(replay)
    assert trainer.replay is not None and trainer.replay.capacity == 500 and trainer.replay.ratio == 0.5
    assert build_trainer(plain).replay is None
    assert replay.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize("emit_policy", ["window", "fnw"])
def test_the_per_event_part_is_warned_about_where_the_joiner_makes_the_labels(caplog, emit_policy) -> None:
    from reloop.engine.runtime.build import build_trainer

    model = {"backbone": "dcn", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    fnw = {"join": {"emit_policy": "fnw"}, "train": {"delayed_feedback": "fnw"}}
    fnw = fnw if emit_policy == "fnw" else {}
    # Only reloop.run's records: a Kafka client an earlier test left running may log meanwhile.
    with caplog.at_level("WARNING", logger="reloop.run"):
        build_trainer(load_config_dict({"model": model, **fnw}))
        assert not [r for r in caplog.records if r.name == "reloop.run"]
        build_trainer(load_config_dict({"model": {**model, "optimizer": {"wide": "bayes"}}, **fnw}))
    (record,) = [r for r in caplog.records if r.name == "reloop.run"]
    assert record.fields == {"key": "model.optimizer.wide", "emit_policy": emit_policy}
    assert ("7.9e-3 AUC" in record.getMessage()) == (emit_policy == "fnw")
