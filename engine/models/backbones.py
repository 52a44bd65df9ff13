"""The torch backbones, each a short composition of blocks (architectures as in FuxiCTR / BARS).

Every ``forward`` returns ``{"logit": [B], "hidden": [B, H], "embeddings": [looked-up tensors]}``.
Defaults follow the BARS tuned settings (embedding dim 10, MLP [400, 400, 400], 3 cross layers).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from reloop.engine.features.featurizer import TorchFeatureBatch
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.blocks import (
    CIN,
    MLP,
    BatchNorm1d,
    CrossNet,
    CrossNetV2,
    FeatureEmbedding,
    FieldMatrixedInteraction,
    InnerProduct,
    LinearPart,
    LogarithmicTransformation,
    fm_bi_interaction,
    init_linear_layers,
)
from reloop.engine.models.config import BackboneConfig
from reloop.engine.models.learner import CTRModel
from torch import nn

# Layer widths of at least 1 (a negative width was a torch traceback at build, 0 a layer of nothing).
Hidden = tuple[PositiveInt, ...]
BARS_MLP: Hidden = (400, 400, 400)


class DeepConfig(BackboneConfig):
    hidden_units: Hidden = BARS_MLP
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False


def _out(logit: torch.Tensor, hidden: torch.Tensor, *embeddings: torch.Tensor) -> dict:
    return {"logit": logit.reshape(-1), "hidden": hidden, "embeddings": list(embeddings)}


class LinearConfig(BackboneConfig):
    embedding_dim: int = Field(default=1, ge=1, le=1)


class LR(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: LinearConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)

    def forward(self, x: TorchFeatureBatch) -> dict:
        logit, w = self.linear(x)
        return _out(logit, w.flatten(1), w)


class FMConfig(BackboneConfig):
    pass


class FM(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: FMConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        bi = fm_bi_interaction(emb)
        return _out(lin + bi.sum(-1), bi, w, emb)


class NFM(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: DeepConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.bn = BatchNorm1d(cfg.embedding_dim) if cfg.batch_norm else nn.Identity()
        self.mlp = MLP(cfg.embedding_dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm)
        self.fc = nn.Linear(self.mlp.out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        h = self.mlp(self.bn(fm_bi_interaction(emb)))
        return _out(lin + self.fc(h).reshape(-1), h, w, emb)


class PNN(CTRModel):
    """IPNN: flattened embeddings plus all pairwise inner products, into an MLP."""

    def __init__(self, spec: FeatureSpec, cfg: DeepConfig, sparse: bool) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.inner = InnerProduct(spec.num_fields)
        in_dim = spec.num_fields * cfg.embedding_dim + self.inner.num_pairs
        self.mlp = MLP(in_dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm)
        self.fc = nn.Linear(self.mlp.out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        emb = self.embedding(x)
        h = self.mlp(torch.cat([emb.flatten(1), self.inner(emb)], dim=1))
        return _out(self.fc(h), h, emb)


class WideDeep(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: DeepConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.mlp = MLP(
            spec.num_fields * cfg.embedding_dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm
        )
        self.fc = nn.Linear(self.mlp.out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        h = self.mlp(emb.flatten(1))
        return _out(lin + self.fc(h).reshape(-1), h, w, emb)


class DeepFM(WideDeep):
    """Wide & Deep's parts plus the FM second-order term on the shared embeddings."""

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        h = self.mlp(emb.flatten(1))
        logit = lin + fm_bi_interaction(emb).sum(-1) + self.fc(h).reshape(-1)
        return _out(logit, h, w, emb)


class DCNConfig(DeepConfig):
    cross_layers: int = Field(default=3, ge=1)


class DCN(CTRModel):
    """Deep & Cross: a cross network and an MLP in parallel over the flattened embeddings."""

    def __init__(self, spec: FeatureSpec, cfg: DCNConfig, sparse: bool) -> None:
        super().__init__()
        dim = spec.num_fields * cfg.embedding_dim
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.cross = CrossNet(dim, cfg.cross_layers)
        self.mlp = MLP(dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm)
        self.fc = nn.Linear(dim + self.mlp.out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        emb = self.embedding(x)
        flat = emb.flatten(1)
        h = torch.cat([self.cross(flat), self.mlp(flat)], dim=1)
        return _out(self.fc(h), h, emb)


class DCNv2Config(DCNConfig):
    structure: Literal["parallel", "stacked", "crossnet_only"] = "parallel"


class DCNv2(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: DCNv2Config, sparse: bool) -> None:
        super().__init__()
        dim = spec.num_fields * cfg.embedding_dim
        self.structure = cfg.structure
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.cross = CrossNetV2(dim, cfg.cross_layers)
        self.mlp = None
        out_dim = dim
        if cfg.structure != "crossnet_only":
            self.mlp = MLP(dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm)
            out_dim = dim + self.mlp.out_dim if cfg.structure == "parallel" else self.mlp.out_dim
        self.fc = nn.Linear(out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        emb = self.embedding(x)
        flat = emb.flatten(1)
        crossed = self.cross(flat)
        if self.mlp is None:
            h = crossed
        elif self.structure == "parallel":
            h = torch.cat([crossed, self.mlp(flat)], dim=1)
        else:
            h = self.mlp(crossed)
        return _out(self.fc(h), h, emb)


class XDeepFMConfig(DeepConfig):
    cin_hidden_units: Hidden = (16, 16, 16)


class XDeepFM(CTRModel):
    def __init__(self, spec: FeatureSpec, cfg: XDeepFMConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.cin = CIN(spec.num_fields, cfg.cin_hidden_units)
        self.mlp = MLP(
            spec.num_fields * cfg.embedding_dim, cfg.hidden_units, None, cfg.dropout, cfg.batch_norm
        )
        self.fc = nn.Linear(self.mlp.out_dim, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        h = self.mlp(emb.flatten(1))
        logit = lin + self.cin(emb).reshape(-1) + self.fc(h).reshape(-1)
        return _out(logit, h, w, emb)


class FmFM(CTRModel):
    """Field-matrixed FM: one D x D matrix per field pair, plus the linear part."""

    def __init__(self, spec: FeatureSpec, cfg: FMConfig, sparse: bool) -> None:
        super().__init__()
        self.linear = LinearPart(spec, sparse)
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.interaction = FieldMatrixedInteraction(spec.num_fields, cfg.embedding_dim)

    def forward(self, x: TorchFeatureBatch) -> dict:
        lin, w = self.linear(x)
        emb = self.embedding(x)
        return _out(lin + self.interaction(emb), emb.flatten(1), w, emb)


class AFNConfig(BackboneConfig):
    logarithmic_neurons: int = Field(default=400, ge=1)
    afn_hidden_units: Hidden = BARS_MLP
    dnn_hidden_units: Hidden = BARS_MLP
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    ensemble_dnn: bool = True


class AFN(CTRModel):
    """AFN (+ with ``ensemble_dnn``): logarithmic neurons into an MLP, ensembled with a plain DNN that
    has its own embeddings, mixed by a learned 2 -> 1 layer (FuxiCTR's AFN+)."""

    def __init__(self, spec: FeatureSpec, cfg: AFNConfig, sparse: bool) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
        self.log_layer = LogarithmicTransformation(
            spec.num_fields, cfg.embedding_dim, cfg.logarithmic_neurons
        )
        self.afn_mlp = MLP(self.log_layer.out_dim, cfg.afn_hidden_units, 1, cfg.dropout, cfg.batch_norm)
        self.dnn_embedding = None
        if cfg.ensemble_dnn:
            self.dnn_embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
            self.dnn = MLP(
                spec.num_fields * cfg.embedding_dim, cfg.dnn_hidden_units, 1, cfg.dropout, cfg.batch_norm
            )
            self.ensemble = nn.Linear(2, 1)
        init_linear_layers(self)

    def forward(self, x: TorchFeatureBatch) -> dict:
        emb = self.embedding(x)
        crossed = self.log_layer(emb)
        afn = self.afn_mlp(crossed)
        if self.dnn_embedding is None:
            return _out(afn, crossed, emb)
        dnn_emb = self.dnn_embedding(x)
        dnn = self.dnn(dnn_emb.flatten(1))
        return _out(self.ensemble(torch.cat([afn, dnn], dim=1)), crossed, emb, dnn_emb)
