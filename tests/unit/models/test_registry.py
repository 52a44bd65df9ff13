"""The registry: typed configs that fail fast, config round trips, state compatibility checks, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models import cli
from reloop.engine.models.learner import Learner
from reloop.engine.models.registry import (
    available_backbones,
    available_strategies,
    build_learner,
    config_from_dict,
    learner_from_config,
    learner_from_state,
    make_config,
)

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=20), CategoricalField(name="i", buckets=20)))
PAPER_BACKBONES = {
    "ftrl",
    "lr",
    "fm",
    "nfm",
    "pnn",
    "wide_deep",
    "deepfm",
    "dcn",
    "dcnv2",
    "xdeepfm",
    "fmfm",
    "afn",
}


def _batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"u": str(rng.integers(8)), "i": str(rng.integers(8))} for _ in range(n)]
    return Featurizer(SPEC).transform(rows), rng.integers(0, 2, n).astype(np.float32)


def test_all_paper_backbones_and_strategies_are_registered():
    assert set(available_backbones()) >= PAPER_BACKBONES
    assert available_strategies() == [
        *("ce", "kd", "reloop"),
        *("reloop_norm", "reloop_logit", "reloop_kl", "reloop_kd", "reloop_gated"),
    ]


def test_learners_satisfy_the_protocol():
    for name in sorted(PAPER_BACKBONES):
        learner = build_learner(
            name, SPEC, "ce", 0.0, seed=0, **({"hidden_units": (8,)} if name == "dcn" else {})
        )
        assert isinstance(learner, Learner)
        assert isinstance(learner.clone_frozen(), Learner)


def test_bad_config_fails_fast_naming_the_key():
    with pytest.raises(ValueError, match="unknown backbone 'dcnn'"):
        build_learner("dcnn", SPEC, "ce", 0.0)
    with pytest.raises(ValueError, match="cross_layer"):
        build_learner("dcn", SPEC, "ce", 0.0, cross_layer=2)
    with pytest.raises(ValueError, match="hidden_units"):
        build_learner("dcn", SPEC, "ce", 0.0, hidden_units="big")
    for widths in ([-5, 3], [0]):  # a torch traceback at build; a layer of width 0 that learnt nothing
        with pytest.raises(ValueError, match="hidden_units.0"):
            build_learner("dcn", SPEC, "ce", 0.0, hidden_units=widths)
    with pytest.raises(ValueError, match="cin_hidden_units.1"):
        build_learner("xdeepfm", SPEC, "ce", 0.0, cin_hidden_units=[4, 0])
    with pytest.raises(ValueError, match="unknown strategy 'sc'"):
        build_learner("fm", SPEC, "sc", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        build_learner("fm", SPEC, "reloop", 2.0)
    with pytest.raises(ValueError, match="lrate"):
        build_learner("fm", SPEC, "ce", 0.0, optimizer={"lrate": 0.1})


@pytest.mark.parametrize(
    ("backbone", "model", "optimizer", "key"),
    [
        ("fm", {}, {"lr": math.inf}, "lr"),
        ("fm", {}, {"embedding_lr": math.inf}, "embedding_lr"),
        ("fm", {}, {"embedding_l2": math.inf}, "embedding_l2"),
        ("fm", {}, {"wide": "bayes", "wide_prior_variance": math.inf}, "wide_prior_variance"),
        ("ftrl", {"ftrl_alpha": math.inf}, None, "ftrl_alpha"),
        ("ftrl", {"l1": math.inf}, None, "l1"),
        ("river_lr", {"lr": math.inf}, None, "lr"),
        ("river_fm_np", {"init_sigma": math.inf}, None, "init_sigma"),
    ],
)
def test_an_infinite_rate_or_penalty_fails_fast_naming_the_key(backbone, model, optimizer, key):
    # YAML's .inf passed every gt=0/ge=0 bound; an infinite rate turned every prediction into 1.0 at
    # the first step (and every later step was refused), an infinite l1 left FTRL at zero for ever.
    with pytest.raises(ValueError, match=rf"\b{key}: Input should be a finite number"):
        make_config(backbone, SPEC, "ce", 0.0, optimizer=optimizer, **model)


def test_infinity_still_means_no_clipping_where_it_is_a_limit():
    assert make_config("fm", SPEC, "ce", 0.0, optimizer={"grad_clip_norm": math.inf}).optimizer.grad_clip_norm
    assert make_config("river_lr", SPEC, "ce", 0.0, clip_gradient=math.inf).model.clip_gradient == math.inf
    with pytest.raises(ValueError, match="grad_clip_norm"):
        make_config("fm", SPEC, "ce", 0.0, optimizer={"grad_clip_norm": math.nan})


def test_config_round_trips_through_json_with_its_typed_model_section():
    cfg = make_config("dcnv2", SPEC, "reloop", 0.2, seed=4, optimizer={"lr": 0.005}, structure="stacked")
    back = config_from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert back.model.structure == "stacked" and back.model.cross_layers == 3
    assert learner_from_config(cfg.to_dict()).config == cfg


def test_state_of_another_architecture_is_refused():
    a = build_learner("dcn", SPEC, "ce", 0.0, seed=0, hidden_units=(8,))
    b = build_learner("dcn", SPEC, "ce", 0.0, seed=0, hidden_units=(16,))
    with pytest.raises(ValueError, match="different model") as refused:
        b.load_state_dict(a.state_dict())
    # It names the setting that differs (it said "'dcn' state, 'dcn' learner", the same name twice).
    assert "hidden_units: [8] in the state, [16] now" in str(refused.value)
    # A different loss is fine: continue a CE-trained state under ReLoop.
    c = build_learner("dcn", SPEC, "reloop", 0.3, seed=0, hidden_units=(8,))
    c.load_state_dict(a.state_dict())
    batch, _ = _batch()
    np.testing.assert_array_equal(c.predict_proba(batch), a.predict_proba(batch))
    assert learner_from_state(a.state_dict()).config == a.config


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("embedding_optimizer", ["adam", "adagrad"])
def test_sparse_and_dense_embedding_optimizers_both_reduce_the_loss(sparse, embedding_optimizer):
    batch, y = _batch(256)
    opt = {
        "lr": 0.02,
        "sparse_embeddings": sparse,
        "embedding_optimizer": embedding_optimizer,
        "embedding_l2": 1e-4,
    }
    learner = build_learner("deepfm", SPEC, "ce", 0.0, seed=0, optimizer=opt, hidden_units=(16,))
    first = learner.learn(batch, y).ce
    for _ in range(30):
        last = learner.learn(batch, y).ce
    assert last < first - 0.02
    table = learner.model.embedding.table
    assert table.sparse is sparse
    assert ("embedding" in learner.optimizers) is sparse


def test_labels_and_y_last_must_match_the_batch():
    batch, y = _batch(10)
    learner = build_learner("fm", SPEC, "reloop", 0.5)
    with pytest.raises(ValueError, match="y_last has 3 values for a batch of 10"):
        learner.learn(batch, y, y_last=np.zeros(3))


@pytest.mark.parametrize("which", ["y_last", "weights"])
def test_ftrl_refuses_a_single_y_last_or_weight_for_a_batch(which):
    # FTRL hands its inputs to the loss unchecked: one value used to broadcast over the whole batch.
    batch, y = _batch(10)
    learner = build_learner("ftrl", SPEC, "reloop", 0.5)
    with pytest.raises(ValueError, match=f"{which} has 1 values for a batch of 10"):
        learner.learn(batch, y, **{which: np.full(1, 0.5)})
    assert learner.steps == 0 and not learner.z.any()


def test_cli_lists_backbones_with_their_defaults(capsys):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.main(parser.parse_args(["--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    by_name = {b["name"]: b for b in out["backbones"]}
    assert by_name["dcn"]["config"]["cross_layers"] == 3
    assert by_name["dcn"]["config"]["hidden_units"] == [400, 400, 400]
    assert by_name["dcn"]["config"]["embedding_dim"] == 10
    assert out["strategies"][:3] == ["ce", "kd", "reloop"]


def test_embedding_weight_decay_is_fuxictr_whole_table_l2_and_needs_dense_tables():
    with pytest.raises(ValueError, match="embedding_weight_decay needs sparse_embeddings=false"):
        build_learner("fm", SPEC, "ce", 0.0, optimizer={"embedding_weight_decay": 0.1})
    batch, y = _batch(64)
    # A row this batch never looks up: only weight decay can move it.
    untouched = min(set(range(SPEC.total_rows)) - set(batch.cat.ravel().tolist()))

    def row_after_one_step(decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        # lr is Adam's in every step here: the small-step rates off
        opt = {"sparse_embeddings": False, "embedding_weight_decay": decay, "lr": 0.01}
        opt["small_steps_below"] = 0
        learner = build_learner("fm", SPEC, "ce", 0.0, seed=0, optimizer=opt)
        before = learner.model.embedding.table.weight[untouched].detach().clone()
        learner.learn(batch, y)
        return before, learner.model.embedding.table.weight[untouched].detach()

    before, after = row_after_one_step(0.0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Its gradient is decay * w; Adam's first step is lr * sign(gradient): towards zero by lr (as FuxiCTR).
    before, after = row_after_one_step(0.5)
    torch.testing.assert_close(after, before - 0.01 * before.sign(), rtol=0, atol=2e-4)  # Adam eps


def test_learn_tensors_is_learn_for_batches_already_on_the_device():
    batch, y = _batch(64)
    a = build_learner("dcn", SPEC, "reloop", 0.3, seed=2, hidden_units=(8,))
    b = build_learner("dcn", SPEC, "reloop", 0.3, seed=2, hidden_units=(8,))
    assert b.to("cpu") is b
    y_last = np.full(64, 0.4, dtype=np.float32)
    sa = a.learn(batch, y, y_last)
    sb = b.learn_tensors(batch.to_torch(), torch.from_numpy(y), torch.from_numpy(y_last))
    assert sa == sb
    np.testing.assert_array_equal(a.predict_proba(batch), b.predict_proba(batch))


@pytest.mark.parametrize("backbone", ["ftrl", "dcn", "river_lr"])
def test_a_learner_state_of_a_newer_format_is_a_rollback_not_a_broken_state(backbone):
    # A broken state falls back to an older restore point; a newer one stops the stage (exit 2): the older
    # point is from before the upgrade.
    from reloop.engine.checkpoint.registry import NewerFormat

    learner = build_learner(backbone, SPEC, "ce", 0.0)
    state = learner.state_dict()
    with pytest.raises(NewerFormat, match=f"format {state['format'] + 1}, written by a newer reloop"):
        learner.load_state_dict({**state, "format": state["format"] + 1})
    with pytest.raises(ValueError, match="unknown .* format 'x'"):
        learner.load_state_dict({**state, "format": "x"})


def test_optimizer_state_of_another_kind_is_refused_at_load_naming_the_key():
    # Resumed with checkpoint.allow_fingerprint_change, SparseAdam took Adagrad's state without a word and
    # its first step failed with KeyError('betas'), retried as a transient failure until the give-up.
    adagrad = build_learner("dcn", SPEC, "ce", 0.0, seed=0, optimizer={"embedding_optimizer": "adagrad"})
    adam = build_learner("dcn", SPEC, "ce", 0.0, seed=0, optimizer={"embedding_optimizer": "adam"})
    batch, labels = _batch()
    adagrad.learn(batch, labels)
    with pytest.raises(ValueError, match=r"embedding optimizer is adagrad, this config's is adam "
                                         r"\(model.optimizer.embedding_optimizer\)"):  # fmt: skip
        adam.load_state_dict(adagrad.state_dict())
    again = build_learner("dcn", SPEC, "ce", 0.0, seed=0, optimizer={"embedding_optimizer": "adagrad"})
    again.load_state_dict(adagrad.state_dict())  # the same kind (another rate would be fine too)
    np.testing.assert_array_equal(again.predict_proba(batch), adagrad.predict_proba(batch))


def test_reloop_models_lists_as_live_strategies_exactly_those_model_strategy_takes(capsys):
    # It listed the ReLoop variants with the paper's three, and `reloop run` refused them.
    import argparse
    import typing

    from reloop.engine.models import cli
    from reloop.engine.runtime.config import ModelSection

    cli.main(argparse.Namespace(json=False))
    lines = capsys.readouterr().out.splitlines()
    live = (
        next(ln for ln in lines if ln.startswith("strategies: ")).split("  ")[0].removeprefix("strategies: ")
    )
    taken = typing.get_args(ModelSection.model_fields["strategy"].annotation)
    assert live.split(", ") == list(taken)
    backtest_only = next(ln for ln in lines if "reloop backtest only:" in ln)
    assert "reloop_gated" in backtest_only and "reloop_gated" not in live


def test_a_spec_that_differs_names_the_field_and_setting() -> None:
    # The message showed the two specs' JSON cut at 80 characters, before the field that differed.
    from reloop.engine.features.spec import FeatureSpec

    fields = [{"kind": "categorical", "name": f"f{i}", "buckets": 64} for i in range(4)]
    a = build_learner("fm", FeatureSpec.from_dict({"fields": fields}), "ce", 0.0)
    fields[3] = {**fields[3], "buckets": 65}
    b = build_learner("fm", FeatureSpec.from_dict({"fields": fields}), "ce", 0.0)
    with pytest.raises(ValueError, match=r"fields\[3\]\.buckets: 64 in the state, 65 now"):
        b.load_state_dict(a.state_dict())


def test_a_torch_modules_state_dict_is_told_apart_from_a_learners() -> None:
    # PyTorch habits: learner.load_state_dict(learner.model.state_dict()) said "unknown learner state
    # format None", and learner_from_state(model.state_dict()) raised a bare KeyError('config_json').
    from reloop.engine.models.registry import learner_from_state

    learner = build_learner("dcn", SPEC, "ce", 0.0, hidden_units=(8,))
    with pytest.raises(ValueError, match="looks like a torch module's state_dict"):
        learner.load_state_dict(learner.model.state_dict())
    with pytest.raises(ValueError, match="not a learner's state"):
        learner_from_state(learner.model.state_dict())


def test_a_spec_with_other_fields_names_them() -> None:
    # With a field more or less, the message fell back to both specs' JSON cut at 80 characters.
    from reloop.engine.features.spec import FeatureSpec

    fields = [{"kind": "categorical", "name": f"f{i}", "buckets": 8} for i in range(3)]
    a = build_learner("fm", FeatureSpec.from_dict({"fields": fields}), "ce", 0.0)
    b = build_learner(
        "fm", FeatureSpec.from_dict({"fields": [*fields[:2], {**fields[2], "name": "g"}]}), "ce", 0.0
    )
    with pytest.raises(ValueError, match="fields: only in the state: f2; only now: g"):
        b.load_state_dict(a.state_dict())


def test_a_spec_with_a_field_more_names_it_alone() -> None:
    from reloop.engine.features.spec import FeatureSpec

    fields = [{"kind": "categorical", "name": f"f{i}", "buckets": 8} for i in range(2)]
    a = build_learner("fm", FeatureSpec.from_dict({"fields": fields}), "ce", 0.0)
    more = [*fields, {"kind": "categorical", "name": "extra", "buckets": 8}]
    b = build_learner("fm", FeatureSpec.from_dict({"fields": more}), "ce", 0.0)
    with pytest.raises(ValueError, match=r"fields: only now: extra; a model") as refused:
        b.load_state_dict(a.state_dict())
    assert "only in the state" not in str(refused.value)
