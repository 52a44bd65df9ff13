"""Blocks against their textbook definitions, computed the slow way."""

from __future__ import annotations

import itertools

import torch
from reloop.engine.models.blocks import (
    CIN,
    CrossNet,
    CrossNetV2,
    FieldMatrixedInteraction,
    InnerProduct,
    fm_bi_interaction,
)

torch.manual_seed(0)
B, F, D = 5, 4, 3
EMB = torch.randn(B, F, D, dtype=torch.float64)


def test_fm_bi_interaction_is_the_sum_of_pairwise_products():
    brute = sum(EMB[:, i] * EMB[:, j] for i, j in itertools.combinations(range(F), 2))
    torch.testing.assert_close(fm_bi_interaction(EMB), brute)


def test_inner_product_lists_every_pair_in_order():
    brute = torch.stack([(EMB[:, i] * EMB[:, j]).sum(-1) for i, j in itertools.combinations(range(F), 2)], 1)
    torch.testing.assert_close(InnerProduct(F).double()(EMB), brute)


def test_field_matrixed_interaction_equals_the_sum_of_bilinear_forms_and_has_gradients():
    block = FieldMatrixedInteraction(F, D).double()
    pairs = list(itertools.combinations(range(F), 2))
    brute = sum(
        torch.einsum("bd,de,be->b", EMB[:, i], block.matrices[p], EMB[:, j]) for p, (i, j) in enumerate(pairs)
    )
    out = block(EMB)
    torch.testing.assert_close(out, brute)
    out.sum().backward()
    assert block.matrices.grad is not None and block.matrices.grad.abs().sum() > 0


def test_cross_networks_follow_their_recurrences():
    x0 = EMB.flatten(1)
    v1 = CrossNet(F * D, 2).double()
    x = x0
    for w, b in zip(v1.w, v1.b, strict=True):
        x = x0 * (x @ w)[:, None] + b + x
    torch.testing.assert_close(v1(x0), x)
    v2 = CrossNetV2(F * D, 2).double()
    x = x0
    for layer in v2.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(v2(x0), x)


def test_cin_first_layer_is_a_weighted_sum_of_field_hadamard_products():
    cin = CIN(F, [2]).double()
    w = cin.convs[0].weight[:, :, 0].reshape(2, F, F)  # [H, i, m]
    z = torch.einsum("him,bid,bmd->bhd", w, EMB, EMB) + cin.convs[0].bias[None, :, None]
    torch.testing.assert_close(cin(EMB), cin.fc(z.sum(-1)))


def test_cin_equals_the_fuxictr_hadamard_and_conv_formulation_over_layers():
    cin = CIN(F, [3, 2, 4]).double()
    x, pooled = EMB, []
    for conv in cin.convs:  # FuxiCTR: materialise the Hadamard tensor, then a 1x1 convolution
        x = conv(torch.einsum("bhd,bmd->bhmd", EMB, x).reshape(B, -1, D))
        pooled.append(x.sum(-1))
    torch.testing.assert_close(cin(EMB), cin.fc(torch.cat(pooled, -1)))
