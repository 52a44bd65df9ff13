"""Ablation harness for the streaming learner: what makes a deep model learn well from a stream?

Runs the backtest's streaming protocol (predict-then-learn in time order, period 0 = warm-up, CE) on
MovieLens-100K or Frappe with one mechanism changed at a time, on the SELECTION periods only (the first
third of the evaluated periods: MovieLens weeks 1-10 of 30, Frappe chunks 1-3 of 9), and writes
per-period AUC / LogLoss to a CSV; ``--summary`` prints the table docs/backtest/ablation.md shows.

    .venv/bin/python -m reloop.bench.learner_ablation --dataset movielens-100k \\
        --data ../shared/data/movielens-100k --variants all --seeds 0,1,2,3,4 --river --out /tmp/abl-ml.csv
    .venv/bin/python -m reloop.bench.learner_ablation --summary /tmp/abl-ml.csv --ref new

Two kinds of variant:

* ``engine`` variants run the engine itself (``run_streaming`` / ``run_periodic`` of engine/replay/backtest.py
  with the learner ``build_learner`` makes from ``opt``): what ``reloop backtest`` runs.
* the others run ``ExperimentLearner`` below: a registry backbone with hand-made optimizer groups,
  optional micro-batches (update granularity), and wide parts the engine does not ship (per-event SGD or
  Adagrad, chunked updates, a backbone trained without the wide part's offset, drift). Its Bayesian
  wide part is the same filter as engine/models/wide.py (``new_harness`` = ``new`` within float noise).

Every setting was chosen on the selection periods; the reported periods are evaluated by
``reloop backtest --report-from`` (docs/backtest/README.md).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.metrics.offline import auc, logloss
from reloop.engine.models.config import adagrad_embedding_lr, adam_lr
from reloop.engine.replay.backtest import RIVER_LR, BacktestData

# ------------------------------------------------------------------------------------------ settings
# The harness's base is the learner of the first backtest reports: Adam at 1e-2 everywhere (SparseAdam
# on the tables), no wide part, batch 512, MLP 64x64, embedding dim 10, 10,000 buckets per field.
BASE: dict[str, Any] = {
    "backbone": "dcn",
    "hidden": (64, 64),
    "dim": 10,
    "buckets": 10_000,
    "batch": 512,  # featurisation / pipeline batch
    "micro": 0,  # update granularity inside the batch (0 = the whole batch)
    "dense_lr": 1e-2,
    "emb_opt": "adam",  # adam (SparseAdam) | adagrad | adagrad_decay (Adagrad whose accumulator forgets)
    "emb_lr": 1e-2,
    "emb_decay": 1.0,  # adagrad_decay: the per-row accumulator's factor per step that touches the row
    "linear_lr": None,  # adagrad: another rate for the one-column (first-order) tables, None = emb_lr
    "wide": "",  # "" | "sgd" | "adagrad" | "bayes": a per-row first-order part added to the logit
    "wide_lr": 0.05,  # sgd / adagrad
    "wide_every": 1,  # sgd / adagrad: update per event (1) or per chunk of this many events
    "wide_sweeps": 0,  # adagrad: > 0 = the whole batch at once, this many Jacobi sweeps (no loop)
    "wide_prior": 1.0,  # bayes: prior variance per weight
    "wide_moderate": 1,  # bayes: score with the predictive (variance-moderated) probability
    "wide_drift": 0.0,  # bayes: variance added to a row each time it is seen (forgetting)
    "joint": 1,  # 1: the backbone learns with the wide logits as an offset; 0: the backbone alone
    "warm_epochs": 1,  # epochs over period 0
    # engine variants
    "engine": 0,
    # OptimizerConfig settings. The study's rows predate the small-step rates (small_steps_below=0), so they
    # reproduce as ablation.md reports them; small_b8 spells those rates out.
    "opt": {"small_steps_below": 0},
    "protocol": "streaming",
    "epochs": 1,  # periodic protocol
    "replay": 0,
    "replay_ratio": 1.0,
    "strategy": "ce",  # engine variants: ce | kd | reloop | a variant (y_last = the last period's snapshot)
    "alpha": 0.0,
    "counters": 0.0,  # > 0: click counters of the data's user and item fields at this prior strength
    "counter_windows": (),  # and counts of theirs that forget with these time constants (seconds)
    "counter_crosses": False,  # and of COUNTED_CROSSES (a user's rate on each genre of the item)
}
NEW_DEEP = {"dense_lr": 1e-3, "emb_opt": "adagrad", "emb_lr": 0.03}  # the new defaults' backbone optimizer
# the previous defaults (first reports: lr 1e-2)
OLD = {"engine": 1, "opt": {"embedding_optimizer": "adam", "small_steps_below": 0}}
# the new defaults of the study: Adam 1e-3, Adagrad 0.03, no wide part. The tables' rate is spelled out:
# the engine's default became the backbone's own (0.1 for most; ablation.md, "The tables' rate, backbone by
# backbone"), and the study's rows must keep reproducing.
STUDY_TABLES = {"embedding_lr": 0.03}
NEW = {"engine": 1, "dense_lr": 1e-3, "opt": {**STUDY_TABLES, "small_steps_below": 0}}
# the new defaults plus the per-event Bayesian wide part
PER_EVENT = {**NEW, "opt": {**STUDY_TABLES, "wide": "bayes", "small_steps_below": 0}}


# the engine's learner defaults of today: each backbone's own rates
DEFAULTS = {"engine": 1, "dense_lr": None, "opt": {}}
# Click counters of the data's user and item fields (engine/features/counters.py) on top of the defaults, at
# three prior strengths, and with counts that forget with one or two time constants (seconds): group
# "counters".
COUNTERS = {
    f"{name}{suffix}": {**DEFAULTS, **over, **counters}
    for name, counters in (
        ("defaults", {}),
        *((f"counters{m:g}", {"counters": m}) for m in (2.0, 5.0, 20.0)),
        *((f"counters5_w{w}", {"counters": 5.0, "counter_windows": (float(w),)}) for w in (60, 600, 3600)),
        *(
            (f"counters5_w{a}_{b}", {"counters": 5.0, "counter_windows": (float(a), float(b))})
            for a, b in ((60, 600), (600, 3600), (600, 86400))
        ),
        # and a user's rate on each genre of the item (a cross; the data's that have both fields)
        ("counters5_w600_cross", {"counters": 5.0, "counter_windows": (600.0,), "counter_crosses": True}),
    )
    for suffix, over in (("", {}), ("_deepfm", {"backbone": "deepfm"}))
}


def _pe(**opt: Any) -> dict[str, Any]:
    """PER_EVENT with more OptimizerConfig settings."""
    return {**PER_EVENT, "opt": {**PER_EVENT["opt"], **opt}}


VARIANTS: dict[str, dict[str, Any]] = {
    # today's learner
    "old": OLD,
    "old_lr1e-3": {**OLD, "dense_lr": 1e-3},
    # 1. update granularity of the whole model (micro-batches inside the 512 batch)
    "old_micro128": {"micro": 128},
    "old_micro32": {"micro": 32},
    "old_micro8": {"micro": 8},
    "old_micro8_lr3e-3": {"micro": 8, "dense_lr": 3e-3, "emb_lr": 3e-3},
    "old_micro1_lr3e-3": {"micro": 1, "dense_lr": 3e-3, "emb_lr": 3e-3},
    # 2. optimizer of the embeddings and learning rate per group (no wide part)
    "adagrad0.01": {"emb_opt": "adagrad", "emb_lr": 0.01},
    "adagrad0.03": {"emb_opt": "adagrad", "emb_lr": 0.03},
    "adagrad0.1": {"emb_opt": "adagrad", "emb_lr": 0.1},
    "new": NEW,
    "new_replay32k_x2": {**NEW, "replay": 32768, "replay_ratio": 2.0},
    # the new defaults in smaller predict-then-learn batches (the whole model updated more often)
    "new_b128": {**NEW, "batch": 128},
    "new_b32": {**NEW, "batch": 32},
    "new_b8": {**NEW, "batch": 8},
    "new_deepfm_b8": {**NEW, "backbone": "deepfm", "batch": 8},
    "new_buckets100k": {**NEW, "buckets": 100_000},
    "old_buckets100k": {**OLD, "buckets": 100_000},
    "new_deepfm": {**NEW, "backbone": "deepfm"},
    "old_deepfm": {**OLD, "backbone": "deepfm"},
    # 3. a first-order (wide) part, per event, on top of the new backbone optimizer
    "wide_sgd0.05": {**NEW_DEEP, "wide": "sgd", "wide_lr": 0.05},
    "wide_adagrad0.1": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.1},
    "wide_adagrad0.3": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3},
    "wide_adagrad0.3_every4": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3, "wide_every": 4},
    "wide_adagrad0.3_every16": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3, "wide_every": 16},
    "wide_adagrad0.3_every64": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3, "wide_every": 64},
    "wide_adagrad0.3_every512": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3, "wide_every": 512},
    "wide_adagrad0.3_jacobi3": {**NEW_DEEP, "wide": "adagrad", "wide_lr": 0.3, "wide_sweeps": 3},
    "wide_bayes_prior0.1": _pe(wide_prior_variance=0.1),
    "wide_bayes_prior0.3": _pe(wide_prior_variance=0.3),
    "per_event": PER_EVENT,
    "wide_bayes_prior3": _pe(wide_prior_variance=3.0),
    "wide_bayes_unmoderated": _pe(wide_moderate=False),
    "wide_bayes_not_joint": {**NEW_DEEP, "wide": "bayes", "joint": 0},
    "wide_bayes_drift1e-3": {**NEW_DEEP, "wide": "bayes", "wide_drift": 1e-3},
    "wide_bayes_only": {**NEW_DEEP, "wide": "bayes", "dense_lr": 1e-9, "emb_lr": 1e-9},
    "per_event_harness": {**NEW_DEEP, "wide": "bayes"},
    # 4. on top of the per-event part
    "per_event_dense1e-2": {**PER_EVENT, "dense_lr": 1e-2},
    "per_event_sparseadam1e-3": _pe(embedding_optimizer="adam"),
    "per_event_micro64": {**NEW_DEEP, "wide": "bayes", "micro": 64},
    "per_event_replay8k_x1": {**PER_EVENT, "replay": 8192, "replay_ratio": 1.0},
    "per_event_replay32k_x2": {**PER_EVENT, "replay": 32768, "replay_ratio": 2.0},
    "per_event_warm3": {**NEW_DEEP, "wide": "bayes", "warm_epochs": 3},
    "per_event_buckets100k": {**PER_EVENT, "buckets": 100_000},
    "per_event_deepfm": {**PER_EVENT, "backbone": "deepfm"},
    # why Frappe's later chunks fall behind (ablation.md): the tables' rate, their rate for first-order
    # weights only, an Adagrad accumulator that forgets (per touch; 0.99: about the last 100 touches)
    "new_emb0.1": {**NEW, "opt": {"embedding_lr": 0.1, "small_steps_below": 0}},
    "new_deepfm_emb0.1": {**NEW, "backbone": "deepfm", "opt": {"embedding_lr": 0.1, "small_steps_below": 0}},
    "new_deepfm_harness": {**NEW_DEEP, "backbone": "deepfm"},  # the harness's new_deepfm: pairs the two below
    "new_deepfm_linear0.1": {**NEW_DEEP, "backbone": "deepfm", "linear_lr": 0.1},
    "new_decay0.99": {**NEW_DEEP, "emb_opt": "adagrad_decay", "emb_decay": 0.99},
    "new_deepfm_decay0.99": {**NEW_DEEP, "backbone": "deepfm", "emb_opt": "adagrad_decay", "emb_decay": 0.99},
}
STRATEGIES = {
    f"{prefix}{strategy}{alpha:g}": {**base, "strategy": strategy, "alpha": alpha}
    for prefix, base in (("", NEW), ("per_event_", PER_EVENT))
    for strategy, alpha in (("reloop", 0.2), ("reloop", 0.5), ("kd", 0.2), ("kd", 0.5))
}
# Issue 15 item 3: the self-corrections of our own against ReLoop, its logit-space variant and KD.
# Streaming, and periodic retraining as docs/backtest/ runs it (3 epochs per period).
SELF_CORRECTION = {
    f"{prefix}{strategy}{alpha:g}": {**base, "strategy": strategy, "alpha": alpha}
    for prefix, base in (("", NEW), ("periodic_", {**NEW, "protocol": "periodic", "epochs": 3}))
    for strategy, alpha in (
        ("ce", 0.0),
        *(
            (s, a)
            for s in ("reloop", "kd", "reloop_logit", "reloop_kl", "reloop_kd", "reloop_gated")
            for a in (0.2, 0.5)
        ),
    )
}
# The tables' Adagrad rate for every torch backbone at the defaults' dense rate (group "embedding-rate").
TORCH_BACKBONES = ("afn", "dcn", "dcnv2", "deepfm", "fm", "fmfm", "lr", "nfm", "pnn", "wide_deep", "xdeepfm")
EMBEDDING_RATE = {
    f"rate{rate:g}_{backbone}": {
        **NEW,
        "backbone": backbone,
        "dim": 1 if backbone == "lr" else BASE["dim"],  # the LR backbone's one-column table
        "opt": {"embedding_lr": rate, "small_steps_below": 0},
    }
    for backbone in TORCH_BACKBONES
    for rate in (0.03, 0.1, 0.3)
}
# One bisection of the step each backbone's climb failed ("embedding-rate-midpoints"): the geometric midpoint
# of the rate it stopped at and the next (0.03 -> 0.055 for DeepFM and FmFM; 0.1 -> 0.17 for those that
# stopped at 0.1; AFN+ stopped at the grid's top). Compared with the rate it stopped at, by the same rule.
RATE_MIDPOINTS = {0.03: 0.055, 0.1: 0.17}
STOPPED_AT = {b: {"afn": 0.3, "deepfm": 0.03, "fmfm": 0.03}.get(b, 0.1) for b in TORCH_BACKBONES}
EMBEDDING_RATE_MIDPOINTS = {
    f"rate{RATE_MIDPOINTS[stopped]:g}_{backbone}": {
        **EMBEDDING_RATE[f"rate0.03_{backbone}"],
        "opt": {"embedding_lr": RATE_MIDPOINTS[stopped], "small_steps_below": 0},
    }
    for backbone, stopped in STOPPED_AT.items()
    if stopped in RATE_MIDPOINTS
}
# DeepFM's trade-off (group "deepfm-l2"): its tables at 0.1 gain on Frappe and lose on MovieLens, where
# its field embeddings over-fit rare ids. Does an L2 penalty on the rows a step looks up
# (OptimizerConfig.embedding_l2) keep the gain without the loss? Paired with rate0.03_deepfm (its default).
DEEPFM_L2 = {
    f"rate{rate:g}_l2{l2:g}_deepfm": {
        **EMBEDDING_RATE["rate0.03_deepfm"],
        "opt": {"embedding_lr": rate, "embedding_l2": l2, "small_steps_below": 0},
    }
    for rate, l2 in (
        *((0.1, l2) for l2 in (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)),
        *((0.055, l2) for l2 in (1e-4, 1e-3)),
    )
}
# The dense (Adam) rate above the defaults' 1e-3 (group "dense-rate"), with the tables at the backbone's
# rate (DeepFM 0.03, DCN 0.1) and, for DeepFM, at 0.055 and 0.1: is its table-rate trade-off one of
# the dense rate? Paired with rate0.03_deepfm / rate0.1_dcn (the defaults).
DENSE_RATE = {
    f"rate{rate:g}_dense{lr:g}_{backbone}": {
        **EMBEDDING_RATE[f"rate0.03_{backbone}"],
        "dense_lr": lr,
        "opt": {"embedding_lr": rate, "small_steps_below": 0},
    }
    for backbone, rates in (("deepfm", (0.03, 0.055, 0.1)), ("dcn", (0.1,)))
    for rate in rates
    for lr in (2e-3, 4e-3, 8e-3)
}
# The dense rate for every torch backbone at its own tables' rate (group "dense-rate-all"): dense1e-3 is
# the defaults, the reference of each backbone's rows.
DENSE_RATE_ALL = {
    f"dense{lr:g}_{backbone}": {
        **EMBEDDING_RATE[f"rate0.03_{backbone}"],
        "dense_lr": lr,
        "opt": {"embedding_lr": adagrad_embedding_lr(backbone), "small_steps_below": 0},
    }
    for backbone in TORCH_BACKBONES
    for lr in (1e-3, 2e-3, 4e-3)
}
# FmFM gained at each step up to the grid's top (4e-3): the next steps (group "dense-rate-fmfm", paired
# with dense0.004_fmfm, its default).
DENSE_RATE_FMFM = {
    f"dense{lr:g}_fmfm": {**DENSE_RATE_ALL["dense0.004_fmfm"], "dense_lr": lr}
    for lr in (4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
}
# The per-event part at the rates it was studied with (Adam 1e-3, tables 0.03) and at each backbone's own
# (group "per-event-rates"; DCN also with one of the two moved at a time).
PER_EVENT_RATES = {
    f"pe_dense{lr:g}_tables{rate:g}_{backbone}": {
        **PER_EVENT,
        "backbone": backbone,
        "dense_lr": lr,
        "opt": {**PER_EVENT["opt"], "embedding_lr": rate},
    }
    for backbone, lr, rate in (
        ("dcn", 1e-3, 0.03),
        ("dcn", 2e-3, 0.1),
        ("dcn", 1e-3, 0.1),
        ("dcn", 2e-3, 0.03),
        ("deepfm", 1e-3, 0.03),
        ("deepfm", 4e-3, 0.03),
    )
}
# The same pair for the other torch backbones (group "per-event-rates-all"): the study's rates and the
# backbone's own (adam_lr, adagrad_embedding_lr).
PER_EVENT_RATES_ALL = {
    f"pe_dense{lr:g}_tables{rate:g}_{backbone}": {
        **PER_EVENT,
        "backbone": backbone,
        "dense_lr": lr,
        "opt": {**PER_EVENT["opt"], "embedding_lr": rate},
    }
    for backbone in TORCH_BACKBONES
    if backbone not in ("dcn", "deepfm")
    for lr, rate in ((1e-3, 0.03), (adam_lr(backbone), adagrad_embedding_lr(backbone)))
}
# The same rates in periodic retraining (3 epochs a period, group "dense-rate-periodic"): the protocol's
# dense rate was chosen at 1e-3 (PERIODIC_GRID); do the backbones' new rates serve it as well?
DENSE_RATE_PERIODIC = {
    f"periodic_{name}": {**DENSE_RATE_ALL[name], "protocol": "periodic", "epochs": 3}
    for name in ("dense0.001_dcn", "dense0.002_dcn", "dense0.001_deepfm", "dense0.004_deepfm")
}
SLOW = {"old_micro1_lr3e-3"}  # minutes per seed: run with --variants NAME
PERIODIC_GRID = {
    f"{prefix}periodic_lr{lr:g}_ep{ep}": {**base, "protocol": "periodic", "dense_lr": lr, "epochs": ep}
    for prefix, base in (("", NEW), ("per_event_", PER_EVENT))
    for lr, ep in ((1e-3, 1), (1e-3, 3), (3e-3, 1), (3e-3, 3), (1e-2, 1))
}
CATALOGUE = {  # every variant by name (the summary's row order)
    **VARIANTS,
    **PERIODIC_GRID,
    **STRATEGIES,
    **SELF_CORRECTION,
    **EMBEDDING_RATE,
    **EMBEDDING_RATE_MIDPOINTS,
    **DEEPFM_L2,
    **DENSE_RATE,
    **DENSE_RATE_ALL,
    **DENSE_RATE_PERIODIC,
    **DENSE_RATE_FMFM,
    **PER_EVENT_RATES,
    **PER_EVENT_RATES_ALL,
    **COUNTERS,
}
# Delayed feedback (run_delayed): what the learner serves, not what it scores while training.
DELAYED_LEARNERS = {"old": OLD, "new": NEW, "per_event": PER_EVENT}
# The strategies under delayed feedback (--learners NAME,...; not run by default): the new defaults' learner.
DELAYED_STRATEGIES = {
    f"{strategy}{alpha:g}": {**NEW, "strategy": strategy, "alpha": alpha}
    for strategy in ("kd", "reloop")
    for alpha in (0.2, 0.5)
}
# Other batch sizes of the new defaults (--learners new_b1024,new_b128,...; new_b1024: train.batch_size's
# default): the served model is at most a batch old; small_b8: batches of 8 with the small-step learning
# rates (now the defaults' for such steps).
DELAYED_BATCHES = {
    **{f"new_b{b}": {**NEW, "batch": b} for b in (1024, 256, 128, 32, 8)},
    "small_b8": {**NEW, "batch": 8, "dense_lr": 3e-4, "opt": {"embedding_lr": 0.1, "small_steps_below": 0}},
}
# flush: full batches, and at each publish a step on what has arrived (its snapshots hold back nothing).
# wait1s: what the train stage's train.max_wait_ms (1000) does on a slow stream: a step on what arrived within
# each second of event time (at most a batch). Both with the engine's rate rule (small_steps_below 256).
DELAYED_PARTIAL = {
    "flush": {**NEW, "flush": 1, "opt": STUDY_TABLES},
    "wait1s": {**NEW, "wait_s": 1.0, "opt": STUDY_TABLES},
}
# Another backbone with the defaults' learner (--learners new_deepfm): its rows' "vs new" pairs it with DCN.
DELAYED_BACKBONES = {"new_deepfm": {**NEW, "backbone": "deepfm"}}
# The engine's defaults of today without and with the click counters chosen on the selection periods
# (prior strength 5, a 600-s window; engine/features/counters.py): each impression's counters as served at
# its time, its impression counted then and a click when it arrives (--learners defaults,counters5_w600,...).
COUNTED_FIELDS = ("user_id", "item_id", "user", "item")  # MovieLens's user and item; Frappe's
COUNTED_CROSSES = ("user_id*genres",)  # MovieLens's user x the item's genres
DELAYED_COUNTERS = {
    n: COUNTERS[n]
    for n in ("defaults", "defaults_deepfm", "counters5_w600", "counters5_w600_deepfm")
    + ("counters5_w600_cross", "counters5_w600_cross_deepfm")
}
DELAYED_ALL = {
    **DELAYED_LEARNERS,
    **DELAYED_STRATEGIES,
    **DELAYED_BATCHES,
    **DELAYED_PARTIAL,
    **DELAYED_BACKBONES,
    **DELAYED_COUNTERS,
}
DELAYED_SETTINGS = (("asym", 900.0), ("asym", 3600.0), ("neutral", 60.0), ("fnw", 60.0))


# ------------------------------------------------------------------------------------------ learner
class DecayedAdagrad(torch.optim.Optimizer):
    """Sparse Adagrad whose per-row accumulator forgets: ``sum = decay * sum + g**2`` on the rows a step
    touches (``decay`` 1: torch's Adagrad). Bounds how small a frequent row's step can get on a long
    stream (at about ``lr * sqrt(1 - decay)``)."""

    def __init__(self, params: Any, lr: float, decay: float, eps: float = 1e-10) -> None:
        super().__init__(params, {"lr": lr, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros_like(p)
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                acc = state["sum"][rows] * group["decay"] + values * values
                state["sum"][rows] = acc
                p[rows] -= group["lr"] * values / (acc.sqrt() + group["eps"])


class ExperimentLearner:
    """A registry backbone with its own optimizer groups and an optional per-row wide part."""

    def __init__(self, s: dict[str, Any], spec: Any, seed: int) -> None:
        from reloop.engine.loss.losses import make_loss
        from reloop.engine.models.registry import backbone_entry, build_learner

        known = backbone_entry(s["backbone"]).config_cls.model_fields
        opts = {k: v for k, v in (("embedding_dim", s["dim"]), ("hidden_units", s["hidden"])) if k in known}
        base = build_learner(s["backbone"], spec, "ce", 0.0, seed=seed, optimizer={"wide": "off"}, **opts)
        self.model = base.model
        self.loss = make_loss("ce")
        self.s = s
        self.spec = spec
        tables = [m.weight for m in self.model.modules() if isinstance(m, torch.nn.Embedding)]
        table_ids = {id(p) for p in tables}
        dense = [p for p in self.model.parameters() if id(p) not in table_ids]
        self.opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=s["dense_lr"])]
        if s["emb_opt"] == "adam":
            self.opts.append(torch.optim.SparseAdam(tables, lr=s["emb_lr"]))
        elif s["emb_opt"] == "adagrad_decay":
            self.opts.append(DecayedAdagrad(tables, lr=s["emb_lr"], decay=s["emb_decay"]))
        else:
            linear = [t for t in tables if t.shape[1] == 1]
            rest = [t for t in tables if t.shape[1] != 1]
            groups = [{"params": rest}]
            if linear:
                groups.append({"params": linear, "lr": s["linear_lr"] or s["emb_lr"]})
            self.opts.append(torch.optim.Adagrad(groups, lr=s["emb_lr"]))
        self.wide = None
        if s["wide"] == "bayes":
            from reloop.engine.models.wide import OnlineWide

            self.wide = OnlineWide(spec, s["wide_prior"], bool(s["wide_moderate"]))
        elif s["wide"]:
            self.w = np.zeros(spec.total_rows + 1)
            self.n = np.zeros(spec.total_rows + 1)

    def deep_logits(self, batch: FeatureBatch) -> np.ndarray:
        self.model.eval()
        with torch.inference_mode():
            return self.model(batch.to_torch())["logit"].double().numpy()

    def deep_learn(self, batch: FeatureBatch, labels: np.ndarray, offset: np.ndarray | None) -> None:
        self.model.train()
        logit = self.model(batch.to_torch())["logit"]
        if offset is not None and self.s["joint"]:
            logit = logit + torch.from_numpy(offset.astype(np.float32))
        loss, _ = self.loss(logit, torch.from_numpy(labels.astype(np.float32)), None, None)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()

    # -- wide parts: return (scoring logits of each event before it was learned, offset after learning)
    def wide_step(
        self, batch: FeatureBatch, deep: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        s = self.s
        if not s["wide"]:
            return deep, None
        if self.wide is not None:
            if s["wide_drift"]:
                self._drift(batch)
            z = self.wide.learn(batch, deep, labels, self.loss)
            return z, self.wide.moments(batch)[0]
        from reloop.engine.models.ftrl import _active

        rows, vals = _active(self.spec, batch)
        if s["wide_sweeps"]:
            wide = self._jacobi(deep, rows, vals, labels)
        else:
            wide = self._sequential(deep, rows, vals, labels)
        return deep + wide, (self.w[rows] * vals).sum(axis=1)

    def _drift(self, batch: FeatureBatch) -> None:
        """Forgetting, applied per batch to the rows it touches (a row's variance grows by drift per
        sighting, bounded by the prior)."""
        from reloop.engine.models.ftrl import _active

        assert self.wide is not None
        rows, vals = _active(self.spec, batch)
        r, counts = np.unique(rows[vals != 0], return_counts=True)
        self.wide.var[r] = np.minimum(
            self.wide.var[r] + self.s["wide_drift"] * counts, self.wide.prior_variance
        )

    def _sequential(
        self, deep: np.ndarray, rows: np.ndarray, vals: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """Per chunk of ``wide_every`` events: score with the current weights, then update them (SGD or
        Adagrad on the summed gradient of each row)."""
        every, lr = self.s["wide_every"], self.s["wide_lr"]
        out = np.empty(len(labels))
        w, n = self.w, self.n
        for a in range(0, len(labels), every):
            r, v = rows[a : a + every], vals[a : a + every]
            z = (w[r] * v).sum(axis=1)
            out[a : a + every] = z
            g = (1.0 / (1.0 + np.exp(-(z + deep[a : a + every]))) - labels[a : a + every])[:, None] * v
            coords, inv = np.unique(r.reshape(-1), return_inverse=True)
            gs = np.bincount(inv, weights=g.reshape(-1), minlength=coords.size)
            if self.s["wide"] == "adagrad":
                n[coords] += gs * gs
                w[coords] -= lr * gs / (np.sqrt(n[coords]) + 1e-8)
            else:
                w[coords] -= lr * gs
        return out

    def _jacobi(self, deep: np.ndarray, rows: np.ndarray, vals: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-event Adagrad for the whole batch without a Python loop: ``wide_sweeps`` Jacobi sweeps of
        the triangular system "event i is scored after events < i were learned" (exact after B sweeps)."""
        lr, sweeps = self.s["wide_lr"], self.s["wide_sweeps"]
        b, k = rows.shape
        ev = np.repeat(np.arange(b), k)
        c, x = rows.reshape(-1), vals.reshape(-1)
        keep = x != 0
        ev, c, x = ev[keep], c[keep], x[keep]
        order = np.argsort(c, kind="stable")
        ev, c, x = ev[order], c[order], x[order]
        start = np.ones(len(c), dtype=bool)
        start[1:] = c[1:] != c[:-1]
        gid = np.cumsum(start) - 1
        firsts = np.flatnonzero(start)

        def seg_cumsum(v: np.ndarray) -> np.ndarray:
            cs = np.cumsum(v)
            return cs - np.concatenate([[0.0], cs[firsts[1:] - 1]])[gid]

        n0 = self.n[c]
        z0 = deep + np.bincount(ev, weights=self.w[c] * x, minlength=b)
        z = z0
        for _ in range(sweeps + 1):
            g = 1.0 / (1.0 + np.exp(-np.clip(z, -35, 35))) - labels
            ge = g[ev] * x
            ncum = n0 + seg_cumsum(ge * ge)
            step = -lr * ge / np.sqrt(np.maximum(ncum, 1e-30))
            z_prev, z = z, z0 + np.bincount(ev, weights=(seg_cumsum(step) - step) * x, minlength=b)
        coords = c[firsts]
        self.w[coords] += np.add.reduceat(step, firsts)
        self.n[coords] = ncum[np.concatenate([firsts[1:] - 1, [len(c) - 1]])]
        return z_prev - deep


# ------------------------------------------------------------------------------------------ protocols
def _trim(data: BacktestData, last_period: int) -> BacktestData:
    return BacktestData(
        spec=data.spec,
        batch=data.batch,
        labels=data.labels,
        logged=data.logged,
        times_ms=data.times_ms,
        bounds=data.bounds[: last_period + 2],
        raw_features=data.raw_features,
    )


def run_harness(data: BacktestData, s: dict[str, Any], seed: int, last_period: int) -> list[dict[str, Any]]:
    """The streaming protocol (CE) with ExperimentLearner, periods 0..last_period; rows for periods >= 1."""
    torch.manual_seed(seed)
    learner = ExperimentLearner(s, data.spec, seed)
    micro = s["micro"] or s["batch"]
    rows: list[dict[str, Any]] = []
    for t in range(last_period + 1):
        sl = data.period(t)
        probs = np.empty(sl.stop - sl.start)
        epochs = s["warm_epochs"] if t == 0 else 1
        for _ in range(epochs):
            for a in range(sl.start, sl.stop, s["batch"]):
                end = min(a + s["batch"], sl.stop)
                for m in range(a, end, micro):
                    idx = slice(m, min(m + micro, end))
                    batch, labels = data.batch.take(idx), data.labels[idx].astype(np.float64)
                    z, offset = learner.wide_step(batch, learner.deep_logits(batch), labels)
                    probs[idx.start - sl.start : idx.stop - sl.start] = 1.0 / (1.0 + np.exp(-z))
                    learner.deep_learn(batch, labels, offset)
        if t > 0:
            y = data.labels[sl]
            rows.append({"period": t, "n": len(y), "auc": auc(y, probs), "logloss": logloss(y, probs)})
    return rows


def counted(data: BacktestData, s: dict[str, Any], label_times_ms: np.ndarray | None = None) -> BacktestData:
    """``data`` with click counters of its user and item fields when ``s["counters"]`` (their prior
    strength) is set, served with the labels arrived by each row's time (None: known once it passed)."""
    if not s.get("counters"):
        return data
    from reloop.engine.replay.backtest import with_click_counters

    names = {f.name for f in data.spec.fields}
    fields = [f for f in COUNTED_FIELDS if f in names]
    if not fields:
        raise ValueError(f"counters: the data has none of the user and item fields {COUNTED_FIELDS}")
    if s.get("counter_crosses"):
        crosses = [c for c in COUNTED_CROSSES if set(c.split("*")) <= names]
        if not crosses:
            raise ValueError(f"counters: the data has the fields of none of the crosses {COUNTED_CROSSES}")
        fields += crosses
    return with_click_counters(data, fields, s["counters"], label_times_ms, s["counter_windows"])


def run_engine(data: BacktestData, s: dict[str, Any], seed: int, last_period: int) -> list[dict[str, Any]]:
    """The engine's protocol (``reloop backtest``'s code) on periods 0..last_period."""
    from reloop.engine.replay.backtest import RunSpec, Strategy, run_one

    data = counted(data, s)
    run = RunSpec(
        protocol=s["protocol"],
        backbone=s["backbone"],
        strategy=Strategy(s["strategy"], s["alpha"]),
        seed=seed,
        epochs=s["epochs"],
        batch_size=s["batch"],
        model_options=(("embedding_dim", s["dim"]), ("hidden_units", tuple(s["hidden"]))),
        optimizer=(("lr", s["dense_lr"]), *s["opt"].items()),
        replay_size=s["replay"],
        replay_ratio=s["replay_ratio"],
    )
    return [
        {k: r[k] for k in ("period", "n", "auc", "logloss")} for r in run_one(_trim(data, last_period), run)
    ]


def run_delayed(
    data: BacktestData,
    s: dict[str, Any],
    seed: int,
    mode: str,
    window_s: float,
    mean_delay_s: float = 60.0,
    publish_s: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Delayed feedback, every period: samples reach the learner in label-ARRIVAL order and each
    impression is scored at its own time by the learner as it is then (after its last complete batch).
    ``publish_s`` > 0: by the snapshot published at the last multiple of ``publish_s`` seconds of event
    time instead (the learner as it was then), as a server that hot-reloads only published versions.

    ``asym``: a click arrives after an exponential delay (mean ``mean_delay_s``), a negative when the join
    window (``window_s``) closes: what the joiner emits. ``neutral``: every label arrives ``window_s``
    after its impression. ``fnw``: FNW emission and loss (``_training_samples``). With ``s["strategy"]``
    KD or ReLoop, y_last is the period snapshot's prediction. Returns (rows of the served scores, rows of
    the training-time progressive scores); the progressive ones see samples in arrival order, which leaks
    the labels' order."""
    from reloop.engine.models.registry import build_learner

    t, y, arrival = _arrivals(data, seed, mode, window_s, mean_delay_s)
    data = counted(data, s, arrival * 1000.0)
    served_at = _published_at(t, publish_s)
    rows, y_train, arrival = _training_samples(t, y, arrival, mode)
    order = np.argsort(arrival, kind="stable")
    strategy = s.get("strategy", "ce")
    learner = build_learner(
        s["backbone"],
        data.spec,
        strategy,
        s.get("alpha", 0.0),
        seed=seed,
        optimizer={"lr": s["dense_lr"], **s["opt"]},
        embedding_dim=s["dim"],
        hidden_units=tuple(s["hidden"]),
    )
    if mode == "fnw":
        from reloop.engine.loss.delayed import with_delayed_feedback

        learner.loss = with_delayed_feedback(learner.loss, "fnw")
    # KD / ReLoop: y_last = the production model's prediction, the model as it was when the impression's
    # period began (the period snapshot, taken before the first batch reaching that period; period 0: none).
    y_last = np.full(len(y), np.nan) if strategy != "ce" else None
    next_period = 1
    served = np.empty(len(y))
    progressive = np.empty(len(y))
    scored = 0  # impressions are in time order: all before this index are scored
    # An impression is served before a sample arriving at its own time is learned (FNW's negative).
    side = "right" if mode == "fnw" else "left"
    cut_s = s.get("wait_s") or (publish_s if s.get("flush") else 0.0)
    for idx in _delayed_batches(arrival[order], order, s["batch"], cut_s, side):
        while y_last is not None and next_period < data.n_periods:
            per = data.period(next_period)
            if arrival[idx[-1]] < t[per.start]:
                break
            y_last[per] = learner.predict_proba(data.batch.take(per))
            next_period += 1
        until = int(np.searchsorted(served_at, arrival[idx[-1]], side=side))
        if until > scored:
            served[scored:until] = learner.predict_proba(data.batch.take(slice(scored, until)))
            scored = until
        yl = None if y_last is None else y_last[rows[idx]]
        scores, _ = learner.learn_scored(data.batch.take(rows[idx]), y_train[idx], yl)
        first = idx < len(y)  # under FNW: an impression's score is its (fake negative's) first one
        progressive[rows[idx][first]] = np.asarray(scores)[first]
    if scored < len(y):
        served[scored:] = learner.predict_proba(data.batch.take(slice(scored, len(y))))
    return _period_rows(data, served), _period_rows(data, progressive)


def _arrivals(
    data: BacktestData, seed: int, mode: str, window_s: float, mean_delay_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(impression times s, labels, label arrival times s) of a delayed-feedback setting; the draws
    depend on the seed only, so every learner of one seed sees the same delays."""
    rng = np.random.default_rng([seed, 7])
    t = data.times_ms.astype(np.float64) / 1000.0
    y = data.labels
    delay = np.full(len(y), window_s)
    if mode in ("asym", "fnw"):  # fnw: ``window_s`` is unused, the clicks come as in asym
        delay = np.where(y > 0.5, rng.exponential(mean_delay_s, len(y)), window_s)
    return t, y, t + delay


def _delayed_batches(
    arrived: np.ndarray, order: np.ndarray, batch: int, cut_s: float, side: str
) -> Iterator[np.ndarray]:
    """Batches of ``batch`` samples in arrival order; with ``cut_s`` > 0 also cut at every multiple of
    ``cut_s`` seconds (``flush``: each publish, so a snapshot holds every sample that arrived before it;
    ``wait1s``: each second), a partial step there. ``side`` as ``run_delayed``'s: "left", a sample arriving
    at a cut is in the step before it."""
    if cut_s <= 0:
        yield from (order[k : k + batch] for k in range(0, len(order), batch))
        return
    group = np.ceil(arrived / cut_s) if side == "left" else np.floor(arrived / cut_s)
    cuts = np.flatnonzero(np.diff(group)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
        yield from (order[k : min(k + batch, hi)] for k in range(lo, hi, batch))


def _published_at(t: np.ndarray, publish_s: float) -> np.ndarray:
    """When the model that serves each impression was taken: the impression's own time (the live learner)
    or, every ``publish_s`` seconds, the last publish at or before it. Non-decreasing, as ``t`` is."""
    return t if publish_s <= 0 else np.floor(t / publish_s) * publish_s


def _training_samples(
    t: np.ndarray, y: np.ndarray, arrival: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(impression of each training sample, its label, its arrival time). One sample per impression,
    except under FNW: every impression a negative at its own time, and a click's positive when it arrives."""
    if mode != "fnw":
        return np.arange(len(y)), y, arrival
    clicked = np.flatnonzero(y > 0.5)
    rows = np.concatenate([np.arange(len(y)), clicked])
    labels = np.concatenate([np.zeros(len(y), dtype=y.dtype), np.ones(len(clicked), dtype=y.dtype)])
    return rows, labels, np.concatenate([t, arrival[clicked]])


def _period_rows(data: BacktestData, scores: np.ndarray) -> list[dict[str, Any]]:
    y = data.labels
    return [
        {"period": per, "n": sl.stop - sl.start, "auc": auc(y[sl], scores[sl]),
         "logloss": logloss(y[sl], scores[sl])}
        for per in range(1, data.n_periods)
        for sl in (data.period(per),)
    ]  # fmt: skip


def run_delayed_river(
    data: BacktestData,
    seed: int,
    mode: str,
    window_s: float,
    mean_delay_s: float = 60.0,
    lr: float = RIVER_LR,
    publish_s: float = 0.0,
) -> list[dict[str, Any]]:
    """The river per-event LR peer (``run_river_baseline``'s model and step) under the same delays as
    ``run_delayed``: it learns each label the moment it arrives and scores each impression at its own time
    with the model as it is then (every label that arrived at or before it learned, none after), or with
    ``publish_s`` > 0 as it was at the last publish (``_published_at``)."""
    from reloop.engine.loss.delayed import fnw_weights
    from reloop.engine.replay.backtest import RiverInputs
    from river import linear_model, optim

    t, y, arrival = _arrivals(data, seed, mode, window_s, mean_delay_s)
    served_at = _published_at(t, publish_s)
    rows, y_train, arrival = _training_samples(t, y, arrival, mode)
    fnw = mode == "fnw"  # with FNW's importance weights from the model's own prediction
    order = np.argsort(arrival, kind="stable")
    inputs = RiverInputs()
    xs = [inputs(f) for f in data.raw_features]
    model = linear_model.LogisticRegression(optimizer=optim.SGD(lr))
    served = np.empty(len(y))
    k = 0
    for j in range(len(y)):
        # Under FNW an impression is served before the samples arriving at its own time (its own negative).
        at = served_at[j]
        while k < len(order) and (arrival[order[k]] < at or (not fnw and arrival[order[k]] == at)):
            i = order[k]
            x, label = xs[rows[i]], float(y_train[i])
            w = float(fnw_weights(model.predict_proba_one(x).get(True, 0.0), label)) if fnw else 1.0
            model.learn_one(x, bool(label), w)
            k += 1
        served[j] = model.predict_proba_one(xs[j]).get(True, 0.0)
    return _period_rows(data, served)


def run_river(data: BacktestData, last_period: int) -> list[dict[str, Any]]:
    from reloop.engine.replay.backtest import run_river_baseline

    return [
        {k: r[k] for k in ("period", "n", "auc", "logloss")}
        for r in run_river_baseline(_trim(data, last_period))
    ]


# ------------------------------------------------------------------------------------------ data
_CACHE: dict[tuple, BacktestData] = {}


def load(dataset: str, path: Path, buckets: int) -> BacktestData:
    """Periods as in docs/backtest: MovieLens weeks (smaller than 500 merged), Frappe 10 chunks."""
    key = (dataset, str(path), buckets)
    if key not in _CACHE:
        from reloop.connectors.files.datasets import open_dataset, to_samples
        from reloop.connectors.files.datasets.spec import feature_spec
        from reloop.engine.replay.backtest import period_bounds_by_count, period_bounds_by_time, prepare

        ds = open_dataset(dataset, path)
        spec = feature_spec(ds.fields, buckets=buckets)
        if ds.time_kind == "pseudo":
            period = lambda t: period_bounds_by_count(len(t), 10)  # noqa: E731
        else:
            period = lambda t: period_bounds_by_time(t, 7 * 86_400_000, 500)  # noqa: E731
        _CACHE[key] = prepare(to_samples(ds.rows()), spec, period)
    return _CACHE[key]


def selection_last_period(data: BacktestData) -> int:
    """The last period of the first third of the evaluated periods 1..P-1."""
    return max(1, (data.n_periods - 1) // 3)


COLUMNS = ("dataset", "variant", "seed", "period", "n", "auc", "logloss", "seconds")


def burst_stats(data: BacktestData, user_field: str) -> str:
    """How much of a user's activity falls inside one batch: the fraction of events whose user's previous
    event is among the last ``b`` events (for a batch of b, about that many are scored before the model
    has learned anything of that user's burst), and the users' active time spans."""
    users = [f.get(user_field) for f in data.raw_features]
    last: dict[Any, int] = {}
    prev = np.full(len(users), -1)
    first_t: dict[Any, int] = {}
    last_t: dict[Any, int] = {}
    for i, u in enumerate(users):
        prev[i] = last.get(u, -1)
        last[u] = i
        first_t.setdefault(u, int(data.times_ms[i]))
        last_t[u] = int(data.times_ms[i])
    gap = np.where(prev >= 0, np.arange(len(users)) - prev, np.iinfo(np.int64).max)
    parts = [f"{len(users):,} events, {len(last):,} users ({user_field})"]
    parts += [
        f"previous event of the same user within the last {b}: {np.mean(gap <= b):.1%}" for b in (8, 32, 512)
    ]
    if data.times_ms[-1] - data.times_ms[0] > 86_400_000:
        span_h = np.array([last_t[u] - first_t[u] for u in last]) / 3.6e6
        q = np.percentile(span_h, [25, 50, 75])
        parts.append(f"user active span (hours) quartiles {q[0]:.1f} / {q[1]:.1f} / {q[2]:.0f}")
    return "; ".join(parts)


def summarise(path: Path, ref: str, order: list[str] | None = None) -> str:
    """Per dataset and variant: mean AUC / LogLoss over seeds and selection periods, and the paired
    difference to ``ref`` (same seed and period) with a 95% t half-width over seeds. river_lr (one
    deterministic run) is paired by period with the reference's mean over seeds."""
    from reloop.engine.replay.report import t_interval

    cells: dict[tuple[str, str], dict[tuple[int, int], tuple[float, float]]] = {}
    secs: dict[tuple[str, str], list[float]] = {}
    for r in csv.DictReader(path.open()):
        key = (r["dataset"], r["variant"])
        cells.setdefault(key, {})[(int(r["seed"]), int(r["period"]))] = (float(r["auc"]), float(r["logloss"]))
        secs.setdefault(key, []).append(float(r["seconds"]))
    rank = {name: i for i, name in enumerate(order or list(VARIANTS))}
    lines = [
        "| dataset | variant | seeds | AUC | LogLoss | ΔAUC ×1e3 vs ref | ΔLogLoss ×1e3 vs ref |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ds, name in sorted(cells, key=lambda k: (k[0], rank.get(k[1], -1), k[1])):
        cell = cells[(ds, name)]
        refc = cells.get((ds, ref), {})
        seeds = sorted({s for s, _ in cell})
        diffs = []
        for m in (0, 1):
            per_seed = []
            for s in seeds:
                if name == "river_lr":
                    pairs = [
                        (v[m], np.mean([refc[k][m] for k in refc if k[1] == p]))
                        for (_, p), v in cell.items()
                        if any(k[1] == p for k in refc)
                    ]
                else:
                    pairs = [
                        (v[m], refc[(s, p)][m]) for (s2, p), v in cell.items() if s2 == s and (s, p) in refc
                    ]
                if pairs:
                    per_seed.append(float(np.mean([x - y for x, y in pairs])))
            mean, half = t_interval(per_seed)
            diffs.append(
                ""
                if math.isnan(mean)
                else f"{mean * 1e3:+.2f}" + ("" if math.isnan(half) else f" ± {half * 1e3:.2f}")
            )
        a = np.mean([v[0] for v in cell.values()])
        ll = np.mean([v[1] for v in cell.values()])
        lines.append(f"| {ds} | {name} | {len(seeds)} | {a:.4f} | {ll:.4f} | {diffs[0]} | {diffs[1]} |")
    return "\n".join(lines)


Cell = dict[tuple[int, int], tuple[float, float]]  # (seed, period) -> (AUC, LogLoss)


def _delayed_cells(path: Path) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for r in csv.DictReader(path.open()):
        cells.setdefault(r["variant"], {})[(int(r["seed"]), int(r["period"]))] = (
            float(r["auc"]),
            float(r["logloss"]),
        )
    return cells


def _paired_interval(
    cell: Cell, ref: Cell, m: int, periods: Callable[[int], bool] = lambda _: True
) -> tuple[float, float]:
    """Mean difference of metric ``m`` (0 AUC, 1 LogLoss) to ``ref``, paired by seed and period (the periods
    ``periods`` keeps), and its 95% half-width over seeds (of the per-seed means)."""
    from reloop.engine.replay.report import t_interval

    kept = {k: v[m] - ref[k][m] for k, v in cell.items() if periods(k[1]) and k in ref}
    per_seed = [
        float(np.mean(diffs))
        for seed in sorted({s for s, _ in cell})
        if (diffs := [d for k, d in kept.items() if k[0] == seed])
    ]
    return t_interval(per_seed) if per_seed else (math.nan, math.nan)


def _paired(cell: Cell, ref: Cell, later: bool, first_later_period: int, m: int) -> str:
    """``_paired_interval`` over the selection or the later periods, ×1e3, as the tables print it."""
    mu, half = _paired_interval(cell, ref, m, lambda p: (p >= first_later_period) == later)
    return f"{mu * 1e3:+.2f} ± {half * 1e3:.2f}" if not math.isnan(half) else f"{mu * 1e3:+.2f}"


def _mean_auc(cell: Cell, first_later_period: int) -> float:
    """Mean AUC over the selection periods."""
    return float(np.mean([v[0] for (_, p), v in cell.items() if p < first_later_period]))


def _paired_both(cell: Cell, ref: Cell, later: bool, first_later_period: int) -> str:
    return " / ".join(_paired(cell, ref, later, first_later_period, m) for m in (0, 1))


def summarise_rates(paths: list[Path], base: float = 0.03) -> str:
    """The "embedding-rate" group: per backbone and tables' rate, the paired difference to the same
    backbone at ``base`` (same seed and period) on each dataset, ×1e3 with a 95% t half-width over seeds;
    **bold** where the interval is clear of zero on the better side."""
    cells: dict[tuple[str, str, float], Cell] = {}
    for path in paths:
        for r in csv.DictReader(path.open()):
            if not r["variant"].startswith("rate"):
                continue
            rate, backbone = r["variant"][4:].split("_", 1)
            key = (r["dataset"], backbone, float(rate))
            cells.setdefault(key, {})[(int(r["seed"]), int(r["period"]))] = (
                float(r["auc"]),
                float(r["logloss"]),
            )
    datasets = sorted({k[0] for k in cells})
    head = " | ".join(f"{ds} ΔAUC | {ds} ΔLogLoss" for ds in datasets)
    lines = [f"| backbone | rate | {head} |", "| --- | --- |" + " --- |" * (2 * len(datasets))]
    for backbone, rate in sorted({(k[1], k[2]) for k in cells if k[2] != base}):
        row = []
        for ds in datasets:
            cell, ref = cells.get((ds, backbone, rate), {}), cells.get((ds, backbone, base), {})
            for m, better in ((0, 1.0), (1, -1.0)):
                mean, half = _paired_interval(cell, ref, m)
                text = "" if math.isnan(mean) else f"{mean * 1e3:+.2f} ± {half * 1e3:.2f}"
                row.append(f"**{text}**" if text and better * mean - half > 0 else text)
        lines.append(f"| {backbone} | {rate:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarise_per_event_rates(paths: list[Path]) -> str:
    """The "per-event-rates" groups: per backbone, the part at the backbone's own rates against the part at
    the study's (Adam 1e-3, tables 0.03), paired by seed and period on each dataset, ×1e3 with a 95% t
    half-width over seeds; **bold** where clear of zero on the better side. The rule's verdict: the own
    rates are kept where nowhere worse (every interval) and better somewhere."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for path in paths:
        for r in csv.DictReader(path.open()):
            if not r["variant"].startswith("pe_dense"):
                continue
            _, dense, tables, backbone = r["variant"].split("_", 3)
            key = (r["dataset"], backbone, f"{dense}_{tables}")
            cells.setdefault(key, {})[(int(r["seed"]), int(r["period"]))] = (
                float(r["auc"]),
                float(r["logloss"]),
            )
    study = "dense0.001_tables0.03"
    datasets = sorted({k[0] for k in cells})
    head = " | ".join(f"{ds} ΔAUC | {ds} ΔLogLoss" for ds in datasets)
    lines = [
        f"| backbone | own rates | {head} | verdict |",
        "| --- | --- |" + " --- |" * (2 * len(datasets) + 1),
    ]
    for backbone in sorted({k[1] for k in cells}):
        own = f"dense{adam_lr(backbone):g}_tables{adagrad_embedding_lr(backbone):g}"
        row, worse, better = [], False, False
        for ds in datasets:
            cell, ref = cells.get((ds, backbone, own), {}), cells.get((ds, backbone, study), {})
            for m, sign in ((0, 1.0), (1, -1.0)):
                mean, half = _paired_interval(cell, ref, m)
                text = "" if math.isnan(mean) else f"{mean * 1e3:+.2f} ± {half * 1e3:.2f}"
                worse |= math.isnan(mean) or -sign * mean - half > 0
                better |= sign * mean - half > 0
                row.append(f"**{text}**" if text and sign * mean - half > 0 else text)
        verdict = "own rates" if better and not worse else "the study's"
        lines.append(f"| {backbone} | {own.replace('_', ', ')} | " + " | ".join(row) + f" | {verdict} |")
    return "\n".join(lines)


def summarise_published(path: Path, first_later_period: int) -> str:
    """What a server that loads only published snapshots serves (``--publish-every``): per label-arrival
    setting, publish interval and learner, served AUC / LogLoss on the selection and the later periods,
    paired differences to the river peer published the same way (of its steps run, the one with the best
    selection-period AUC there), to the defaults' learner at batch 512 (``new``) published the same way and
    to the same learner served live."""
    cells = _delayed_cells(path)
    publishes = sorted({float(v.rsplit("/pub", 1)[1]) for v in cells if "/pub" in v})
    rivers = sorted({v.split("@")[0] for v in cells if v.startswith("river_lr")})
    learners = [*DELAYED_ALL, *rivers]

    def mean(cell: Cell, later: bool) -> str:
        picked = [v for (_, p), v in cell.items() if (p >= first_later_period) == later]
        return f"{np.mean([v[0] for v in picked]):.4f} / {np.mean([v[1] for v in picked]):.4f}"

    def every(seconds: float) -> str:
        for unit, size in (("week", 604800), ("day", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size and seconds % size == 0:
                return f"every {seconds / size:g} {unit}"
        return f"every {seconds:g} s"

    lines = [
        "| labels arrive | served | learner | AUC / LogLoss, selection | AUC / LogLoss, later "
        "| Δ vs river served the same way, selection (AUC / LogLoss ×1e3) | Δ vs river, later "
        "| Δ vs `new` served the same way, selection | Δ vs `new`, later "
        "| Δ vs the same learner served live, later |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, window in DELAYED_SETTINGS:
        for publish in (0.0, *publishes):
            peers = [c for r in rivers if (c := cells.get(_delayed_tag(r, mode, window, publish)))]
            river = max(peers, key=lambda c: _mean_auc(c, first_later_period), default={})
            for name in learners:
                cell = cells.get(_delayed_tag(name, mode, window, publish))
                live = cells.get(_delayed_tag(name, mode, window, 0.0), {})
                if not cell:
                    continue
                first = first_later_period
                vs_river = [
                    _paired_both(cell, river, later, first) if river and cell is not river else "—"
                    for later in (False, True)
                ]
                base = cells.get(_delayed_tag("new", mode, window, publish), {})
                vs_new = [
                    _paired_both(cell, base, later, first) if base and cell is not base else "—"
                    for later in (False, True)
                ]
                vs_live = _paired_both(cell, live, True, first) if publish and live else "—"
                served = every(publish) if publish else "live"
                lines.append(
                    f"| {mode} {window:g} s | {served} | `{name}` | {mean(cell, False)} | {mean(cell, True)} "
                    f"| {vs_river[0]} | {vs_river[1]} | {vs_new[0]} | {vs_new[1]} | {vs_live} |"
                )
    return "\n".join(lines)


def summarise_delayed(path: Path, first_later_period: int) -> str:
    """The delayed-feedback table: per setting and learner, served AUC / LogLoss on the selection periods
    and on the later ones, the later ones' paired difference to ``new`` (×1e3, 95% over seeds), and the
    training-time (progressive, label-order-leaking) scores on the later periods."""
    cells = _delayed_cells(path)

    def mean(cell: dict, later: bool, m: int) -> float:
        return float(np.mean([v[m] for (_, p), v in cell.items() if (p >= first_later_period) == later]))

    lines = [
        "| labels arrive | learner | served AUC / LogLoss, selection periods | served, later periods "
        "| Δ later vs new, AUC ×1e3 | Δ LogLoss ×1e3 | training-time scores, later periods |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, window in DELAYED_SETTINGS:
        setting = {
            "asym": f"click after ~60 s, negative at {window / 60:g} min (window close)",
            "neutral": f"every label {window:g} s after its impression",
            "fnw": "FNW: a negative at once, a click's positive after ~60 s",
        }[mode]
        ref = cells.get(f"new@{mode}{window:g}", {})
        for name in (*DELAYED_ALL, "river_lr"):
            tag = f"{name}@{mode}{window:g}"
            cell = cells.get(tag)
            if not cell:
                continue
            diffs = [_paired(cell, ref, True, first_later_period, m) for m in (0, 1)]
            prog = cells.get(f"{tag}/progressive", {})
            # The river peer learns each label as it arrives and scores live: no separate training-time score.
            prog_text = f"{mean(prog, True, 0):.4f} / {mean(prog, True, 1):.4f}" if prog else "—"
            lines.append(
                f"| {setting} | `{name}` | {mean(cell, False, 0):.4f} / {mean(cell, False, 1):.4f} "
                f"| {mean(cell, True, 0):.4f} / {mean(cell, True, 1):.4f} | {diffs[0]} | {diffs[1]} "
                f"| {prog_text} |"
            )
    return "\n".join(lines)


def _main_delayed(args: argparse.Namespace) -> int:
    new_file = not args.out.exists()
    data = load(args.dataset, args.data, BASE["buckets"])
    with args.out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            w.writeheader()
        for mode, window in DELAYED_SETTINGS:
            if args.settings and not {mode, f"{mode}{window:g}"} & set(args.settings.split(",")):
                continue
            for name, over in DELAYED_ALL.items():
                if name not in args.learners.split(","):
                    continue
                s = {**BASE, **over}
                for seed, publish in _seeds_and_publishes(args):
                    t0 = time.perf_counter()
                    served, prog = run_delayed(data, s, seed, mode, window, publish_s=publish)
                    dt = time.perf_counter() - t0
                    tag = _delayed_tag(name, mode, window, publish)
                    # The training-time scores do not depend on what is served: written with the live rows.
                    outputs = ((tag, served),) if publish else ((tag, served), (f"{tag}/progressive", prog))
                    for variant, rows in outputs:
                        for r in rows:
                            w.writerow(
                                {
                                    "dataset": args.dataset,
                                    "variant": variant,
                                    "seed": seed,
                                    **r,
                                    "seconds": dt,
                                }
                            )
                    fh.flush()
                    _print_later(args.dataset, tag, seed, served, data, dt)
            for lr in (float(x) for x in args.river_lr.split(",")) if args.river else ():
                for seed, publish in _seeds_and_publishes(args):
                    t0 = time.perf_counter()
                    rows = run_delayed_river(data, seed, mode, window, lr=lr, publish_s=publish)
                    dt = time.perf_counter() - t0
                    name = "river_lr" if lr == RIVER_LR else f"river_lr{lr:g}"
                    tag = _delayed_tag(name, mode, window, publish)
                    for r in rows:
                        row = {"dataset": args.dataset, "variant": tag, "seed": seed, **r, "seconds": dt}
                        w.writerow(row)
                    fh.flush()
                    _print_later(args.dataset, tag, seed, rows, data, dt)
    return 0


def _seeds_and_publishes(args: argparse.Namespace) -> list[tuple[int, float]]:
    return [
        (int(seed), float(publish))
        for publish in args.publish_every.split(",")
        for seed in args.seeds.split(",")
    ]


def _delayed_tag(name: str, mode: str, window: float, publish_s: float) -> str:
    """LEARNER@MODEWINDOW, served live; LEARNER@MODEWINDOW/pubSECONDS, served from published snapshots."""
    return f"{name}@{mode}{window:g}" + (f"/pub{publish_s:g}" if publish_s else "")


def _print_later(
    dataset: str, tag: str, seed: int, rows: list[dict[str, Any]], data: BacktestData, dt: float
) -> None:
    held = [r for r in rows if r["period"] > selection_last_period(data)]
    a, ll = np.mean([r["auc"] for r in held]), np.mean([r["logloss"] for r in held])
    print(
        f"{dataset} {tag} seed {seed}: served AUC {a:.4f} LogLoss {ll:.4f} on the later periods ({dt:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--data", type=Path)
    p.add_argument(
        "--variants",
        default="all",
        help="comma-separated names, 'all' (but the slow ones), or a group: 'periodic', 'strategies', "
        "'self-correction', 'embedding-rate', 'embedding-rate-midpoints', 'deepfm-l2', 'dense-rate', "
        "'dense-rate-all', 'dense-rate-periodic', 'dense-rate-fmfm', "
        "'per-event-rates', 'per-event-rates-all', 'counters'",
    )
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--river", action="store_true", help="also the per-event river LR peer")
    p.add_argument("--out", type=Path, help="CSV (appended to)")
    p.add_argument("--summary", type=Path, help="print the table of this CSV and exit")
    p.add_argument("--ref", default="new", help="--summary: the reference variant")
    p.add_argument(
        "--summary-rates",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="print the embedding-rate group's table (each backbone against itself at --rates-base) and exit",
    )
    p.add_argument(
        "--summary-per-event-rates",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="print the per-event-rates groups' table (each backbone's own rates against the study's), exit",
    )
    p.add_argument(
        "--rates-base",
        type=float,
        default=0.03,
        help="--summary-rates: the rate each backbone is compared with (default 0.03)",
    )
    p.add_argument(
        "--summary-delayed",
        type=Path,
        metavar="CSV",
        help="print the delayed-feedback table of this CSV (--later-from: first later period) and exit",
    )
    p.add_argument(
        "--summary-published",
        type=Path,
        metavar="CSV",
        help="print the table of served-from-published-snapshots runs (--delayed --publish-every) and exit",
    )
    p.add_argument("--later-from", type=int, default=11)
    p.add_argument("--bursts", metavar="USER_FIELD", help="print how bursty the stream's users are, and exit")
    p.add_argument(
        "--delayed",
        action="store_true",
        help="the delayed-feedback protocol over EVERY period (old, new, per_event; asym 900 s and 3600 s, "
        "neutral 60 s, fnw: FNW emission with its loss); variants are written as "
        "LEARNER@MODEWINDOW[/progressive]; with --river also the "
        "river LR peer under the same delays (river_lr@MODEWINDOW)",
    )
    p.add_argument(
        "--settings",
        help="--delayed: the label-arrival settings to run (comma list of asym, neutral, fnw, or one with "
        "its window: asym900; default all)",
    )
    p.add_argument(
        "--publish-every",
        default="0",
        metavar="SECONDS",
        help="--delayed: comma list of publish intervals in event-time seconds; 0 (the default) serves the "
        "live learner, N > 0 the snapshot taken at the last multiple of N s (variants .../pubN)",
    )
    p.add_argument(
        "--river-lr",
        default=str(RIVER_LR),
        help="--delayed --river: comma list of the river peer's SGD steps (variants river_lrSTEP; the "
        "published table pairs each row with the step best on the selection periods)",
    )
    p.add_argument(
        "--learners",
        default=",".join(DELAYED_LEARNERS),
        help="--delayed: the deep learners to run (comma list; 'none' for the river peer alone; also "
        f"{', '.join(DELAYED_STRATEGIES)}: the new defaults with KD / ReLoop against the period snapshot; "
        f"{', '.join(DELAYED_BATCHES)}: the new defaults in other batch sizes; "
        f"{', '.join(DELAYED_BACKBONES)}: the new defaults with another backbone)",
    )
    args = p.parse_args(argv)
    if args.summary_per_event_rates:
        print(summarise_per_event_rates(args.summary_per_event_rates))
        return 0
    if args.summary_rates:
        print(summarise_rates(args.summary_rates, base=args.rates_base))
        return 0
    if args.summary_published:
        print(summarise_published(args.summary_published, args.later_from))
        return 0
    if args.summary_delayed:
        print(summarise_delayed(args.summary_delayed, args.later_from))
        return 0
    if args.summary:
        print(summarise(args.summary, args.ref, list(CATALOGUE)))
        return 0
    if args.bursts:
        if args.data is None:
            p.error("--bursts needs --data")
        print(burst_stats(load(args.dataset, args.data, BASE["buckets"]), args.bursts))
        return 0
    if args.data is None or args.out is None:
        p.error("--data and --out are required (or --summary)")
    torch.set_num_threads(1)
    if args.delayed:
        return _main_delayed(args)
    catalogue = CATALOGUE
    groups = {
        "periodic": PERIODIC_GRID,
        "strategies": STRATEGIES,
        "self-correction": SELF_CORRECTION,
        "embedding-rate": EMBEDDING_RATE,
        "embedding-rate-midpoints": EMBEDDING_RATE_MIDPOINTS,
        "deepfm-l2": {n: EMBEDDING_RATE[n] for n in ("rate0.03_deepfm", "rate0.1_deepfm")} | DEEPFM_L2,
        "dense-rate": {n: EMBEDDING_RATE[n] for n in ("rate0.03_deepfm", "rate0.1_dcn")} | DENSE_RATE,
        "counters": COUNTERS,
        "dense-rate-all": DENSE_RATE_ALL,
        "dense-rate-periodic": DENSE_RATE_PERIODIC,
        "dense-rate-fmfm": DENSE_RATE_FMFM,
        "per-event-rates": PER_EVENT_RATES,
        "per-event-rates-all": PER_EVENT_RATES_ALL,
    }
    if args.variants == "all":
        names = [n for n in VARIANTS if n not in SLOW]
    elif args.variants in groups:
        names = list(groups[args.variants])
    else:
        names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(catalogue)}")
    new_file = not args.out.exists()
    with args.out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            w.writeheader()
        if args.river:
            data = load(args.dataset, args.data, BASE["buckets"])
            t0 = time.perf_counter()
            rows = run_river(data, selection_last_period(data))
            dt = time.perf_counter() - t0
            for r in rows:
                w.writerow({"dataset": args.dataset, "variant": "river_lr", "seed": 0, **r, "seconds": dt})
            fh.flush()
        for name in names:
            s = {**BASE, **catalogue[name]}
            data = load(args.dataset, args.data, s["buckets"])
            last = selection_last_period(data)
            for seed in (int(x) for x in args.seeds.split(",")):
                t0 = time.perf_counter()
                rows = (run_engine if s["engine"] else run_harness)(data, s, seed, last)
                dt = time.perf_counter() - t0
                for r in rows:
                    w.writerow({"dataset": args.dataset, "variant": name, "seed": seed, **r, "seconds": dt})
                fh.flush()
                print(
                    f"{args.dataset} {name} seed {seed}: AUC {np.mean([r['auc'] for r in rows]):.4f} "
                    f"LogLoss {np.mean([r['logloss'] for r in rows]):.4f} ({dt:.0f} s, "
                    f"load {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
