"""Tests of spade_sc.model on plain tensors (CPU, offline)."""

from __future__ import annotations

import logging
import math
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from spade_sc.model import (
    BatchedExperts,
    ExpertBatchSampler,
    ExpertHeads,
    GatedABMIL,
    InfoNCELoss,
    PairsDataset,
    ProjectionHead,
    SoftCLIPLoss,
    SpadeLightningModule,
    discrete_time_nll,
    make_dataloader,
    make_loss,
    mixture_embed,
    risk_from_hazards,
    route,
    soft_clip_loss,
)

# --------------------------------------------------------------------------- heads


def test_projection_head_structure_and_forward():
    head = ProjectionHead(10, proj_dim=8, dropout=0.1)
    assert isinstance(head.projection, nn.Linear)
    assert (head.projection.in_features, head.projection.out_features) == (10, 8)
    assert isinstance(head.gelu, nn.GELU)
    assert isinstance(head.fc, nn.Linear)
    assert (head.fc.in_features, head.fc.out_features) == (8, 8)
    assert isinstance(head.dropout, nn.Dropout)
    assert head.dropout.p == 0.1
    assert isinstance(head.layer_norm, nn.LayerNorm)
    assert head.layer_norm.normalized_shape == (8,)
    assert set(head.state_dict()) == {
        "projection.weight",
        "projection.bias",
        "fc.weight",
        "fc.bias",
        "layer_norm.weight",
        "layer_norm.bias",
    }
    head.eval()
    x = torch.randn(5, 10)
    out = head(x)
    assert out.shape == (5, 8)
    p = x @ head.projection.weight.T + head.projection.bias
    h = torch.nn.functional.gelu(p) @ head.fc.weight.T + head.fc.bias
    z = h + p
    expected = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * head.layer_norm.weight + head.layer_norm.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_projection_head_defaults_and_validation():
    head = ProjectionHead(7)
    assert head.proj_dim == 256
    assert head.dropout.p == 0.1
    assert head(torch.randn(3, 7)).shape == (3, 256)
    with pytest.raises(ValueError, match="in_dim"):
        ProjectionHead(0)
    with pytest.raises(ValueError, match="dropout"):
        ProjectionHead(4, dropout=1.5)


# --------------------------------------------------------------------------- experts

K, DI, DG, P = 3, 12, 9, 16


def _separate_heads(seed: int = 0, dropout: float = 0.1) -> list[tuple[ProjectionHead, ProjectionHead]]:
    torch.manual_seed(seed)
    heads = []
    for _ in range(K):
        img, gene = ProjectionHead(DI, P, dropout), ProjectionHead(DG, P, dropout)
        # non-trivial LayerNorm affine so that per-expert LN parameters are exercised
        with torch.no_grad():
            for h in (img, gene):
                h.layer_norm.weight.uniform_(0.5, 1.5)
                h.layer_norm.bias.uniform_(-0.5, 0.5)
        heads.append((img, gene))
    return heads


def test_batched_experts_state_dict_names_and_shapes():
    ex = BatchedExperts(K, DI, DG, proj_dim=P)
    shapes = {k: tuple(v.shape) for k, v in ex.state_dict().items()}
    assert shapes == {
        "image_heads.projection_weight": (K, DI, P),
        "image_heads.projection_bias": (K, P),
        "image_heads.fc_weight": (K, P, P),
        "image_heads.fc_bias": (K, P),
        "image_heads.layer_norm_weight": (K, P),
        "image_heads.layer_norm_bias": (K, P),
        "gene_heads.projection_weight": (K, DG, P),
        "gene_heads.projection_bias": (K, P),
        "gene_heads.fc_weight": (K, P, P),
        "gene_heads.fc_bias": (K, P),
        "gene_heads.layer_norm_weight": (K, P),
        "gene_heads.layer_norm_bias": (K, P),
    }
    assert ExpertHeads is BatchedExperts
    assert ex.get_config() == {"n_experts": K, "image_dim": DI, "gene_dim": DG, "proj_dim": P, "dropout": 0.1}


@pytest.mark.parametrize("layout", ["random", "grouped", "subset", "subset_grouped"])
@pytest.mark.parametrize("mode", ["eval", "train_no_dropout"])
def test_batched_experts_match_separate_heads(mode, layout):
    dropout = 0.1 if mode == "eval" else 0.0
    heads = _separate_heads(dropout=dropout)
    ex = BatchedExperts.from_heads(heads)
    if mode == "eval":
        ex.eval()
        for img, gene in heads:
            img.eval()
            gene.eval()
    else:
        ex.train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, DI, generator=gen), torch.randn(40, DG, generator=gen)
    # every layout the forward pass distinguishes: all experts or a subset (weights indexed), rows in any order
    # (padded by a scatter) or expert by expert in equal numbers, as the sampler's steps (padded by a view)
    idx = {
        "random": torch.randint(0, K, (40,), generator=gen),
        "grouped": torch.arange(K).repeat_interleave(40 // K),
        "subset": torch.tensor([0, 2])[torch.randint(0, 2, (40,), generator=gen)],
        "subset_grouped": torch.tensor([0, 0, 2, 2]).repeat_interleave(10),
    }[layout]
    x, y = x[: len(idx)], y[: len(idx)]
    assert layout.startswith("subset") == (idx.unique().numel() < K)
    expected_img = torch.stack([heads[int(k)][0](x[i]) for i, k in enumerate(idx)])
    expected_gene = torch.stack([heads[int(k)][1](y[i]) for i, k in enumerate(idx)])
    torch.testing.assert_close(ex.image_embed(x, idx), expected_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.gene_embed(y, idx), expected_gene, atol=1e-5, rtol=1e-5)
    img_emb, gene_emb = ex(x, y, idx)
    torch.testing.assert_close(img_emb, expected_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gene_emb, expected_gene, atol=1e-5, rtol=1e-5)
    # all experts at once
    all_img, all_gene = ex.image_embed_all(x), ex.gene_embed_all(y)
    assert all_img.shape == (len(idx), K, P)
    for k in range(K):
        torch.testing.assert_close(all_img[:, k], heads[k][0](x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(all_gene[:, k], heads[k][1](y), atol=1e-5, rtol=1e-5)
    # single-expert batch (the training case)
    one = torch.full((len(idx),), 2, dtype=torch.long)
    torch.testing.assert_close(ex.image_embed(x, one), heads[2][0](x), atol=1e-5, rtol=1e-5)


def test_head_roundtrip_and_independence():
    heads = _separate_heads()
    ex = BatchedExperts.from_heads(heads).eval()
    for k in range(K):
        img, gene = ex.head(k)
        assert isinstance(img, ProjectionHead)
        for ref, got in ((heads[k][0], img), (heads[k][1], gene)):
            for name, value in ref.state_dict().items():
                torch.testing.assert_close(got.state_dict()[name], value, atol=0, rtol=0)
    # head(k) is a copy: modifying it does not touch the batched parameters
    img, _ = ex.head(0)
    with torch.no_grad():
        img.projection.weight.zero_()
    assert ex.image_heads.projection_weight[0].abs().sum() > 0
    # round-trip through from_heads
    ex2 = BatchedExperts.from_heads([ex.head(k) for k in range(K)])
    for name, value in ex.state_dict().items():
        torch.testing.assert_close(ex2.state_dict()[name], value, atol=0, rtol=0)


def test_experts_do_not_share_weights_and_gradients_are_per_expert():
    ex = BatchedExperts(K, DI, DG, proj_dim=P, dropout=0.0, seed=0)
    w = ex.image_heads.projection_weight
    assert not torch.allclose(w[0], w[1])
    x, y = torch.randn(8, DI), torch.randn(8, DG)
    idx = torch.ones(8, dtype=torch.long)
    loss = soft_clip_loss(*ex(x, y, idx))
    loss.backward()
    grad = ex.image_heads.projection_weight.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0
    assert grad[2].abs().sum() == 0
    assert ex.gene_heads.fc_weight.grad[1].abs().sum() > 0


def test_expert_init_is_seeded_and_linear_like():
    a = BatchedExperts(K, DI, DG, proj_dim=P, seed=3)
    b = BatchedExperts(K, DI, DG, proj_dim=P, seed=3)
    c = BatchedExperts(K, DI, DG, proj_dim=P, seed=4)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name])
    assert not torch.equal(a.image_heads.projection_weight, c.image_heads.projection_weight)
    torch.manual_seed(11)
    d = BatchedExperts(K, DI, DG, proj_dim=P)
    torch.manual_seed(11)
    e = BatchedExperts(K, DI, DG, proj_dim=P)
    for name, value in d.state_dict().items():
        assert torch.equal(value, e.state_dict()[name])
    # nn.Linear-like bounds: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm ones/zeros
    big = BatchedExperts(2, 400, 9, proj_dim=64, seed=0)
    w = big.image_heads.projection_weight
    bound = 1 / math.sqrt(400)
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound
    assert big.image_heads.fc_weight.abs().max() <= 1 / math.sqrt(64)
    assert torch.equal(big.gene_heads.layer_norm_weight, torch.ones(2, 64))
    assert torch.equal(big.gene_heads.layer_norm_bias, torch.zeros(2, 64))


def test_experts_safetensors_roundtrip_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    ex = BatchedExperts(K, DI, DG, proj_dim=P, seed=0)
    path = tmp_path / "experts.safetensors"
    save_file(ex.state_dict(), str(path))
    ex2 = BatchedExperts(**ex.get_config())
    ex2.load_state_dict(load_file(str(path)), strict=True)
    for name, value in ex.state_dict().items():
        assert torch.equal(value, ex2.state_dict()[name])


def test_experts_input_validation():
    ex = BatchedExperts(K, DI, DG, proj_dim=P)
    with pytest.raises(ValueError, match="expert_idx"):
        ex.image_embed(torch.randn(4, DI), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="expert_idx"):
        ex.image_embed(torch.randn(4, DI), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x"):
        ex.image_embed(torch.randn(4, DI + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="k"):
        ex.head(K)


# --------------------------------------------------------------------------- losses


def _reference_soft_clip(img: torch.Tensor, spot: torch.Tensor, tau: float) -> float:
    """Plain-python BLEEP/SPADE soft-target loss (targets multiplied by tau)."""
    img, spot = img.double().tolist(), spot.double().tolist()
    b = len(img)

    def dot(u, v):
        return sum(a * c for a, c in zip(u, v, strict=True))

    logits = [[dot(spot[i], img[j]) / tau for j in range(b)] for i in range(b)]
    sim = [[(dot(img[i], img[j]) + dot(spot[i], spot[j])) / 2 * tau for j in range(b)] for i in range(b)]
    targets = []
    for i in range(b):
        ex = [math.exp(v) for v in sim[i]]
        targets.append([v / sum(ex) for v in ex])

    def log_softmax(row):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        return [v - lse for v in row]

    spots_loss = [-sum(t * lp for t, lp in zip(targets[i], log_softmax(logits[i]), strict=True)) for i in range(b)]
    col_logits = [[logits[i][j] for i in range(b)] for j in range(b)]
    col_targets = [[targets[i][j] for i in range(b)] for j in range(b)]
    images_loss = [
        -sum(t * lp for t, lp in zip(col_targets[j], log_softmax(col_logits[j]), strict=True)) for j in range(b)
    ]
    return sum((a + c) / 2 for a, c in zip(images_loss, spots_loss, strict=True)) / b


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_soft_clip_matches_reference(tau):
    gen = torch.Generator().manual_seed(0)
    img, spot = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    got = soft_clip_loss(img, spot, temperature=tau)
    assert got.shape == ()
    assert float(got) == pytest.approx(_reference_soft_clip(img, spot, tau), rel=1e-5, abs=1e-6)
    assert float(SoftCLIPLoss(tau)(img, spot)) == pytest.approx(float(got))


def test_soft_clip_lower_for_matched_pairs():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(16, 8, generator=gen)
    spot = img + 0.05 * torch.randn(16, 8, generator=gen)
    shuffled = spot[torch.randperm(16, generator=gen)]
    assert soft_clip_loss(img, spot) < soft_clip_loss(img, shuffled)
    with pytest.raises(ValueError, match="temperature"):
        soft_clip_loss(img, spot, temperature=0.0)
    with pytest.raises(ValueError, match="gene_emb"):
        soft_clip_loss(img, spot[:, :4])


def test_infonce_temperature_is_learnable():
    loss_fn = InfoNCELoss(init_temperature=0.07)
    assert isinstance(loss_fn.logit_scale, nn.Parameter)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss_fn.temperature == pytest.approx(0.07, rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    img, spot = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    loss = loss_fn(img, spot)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None
    assert loss_fn.logit_scale.grad.abs() > 0
    # reference computation
    i_n, s_n = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(spot, dim=1)
    logits = (1 / 0.07) * s_n @ i_n.T
    lab = torch.arange(6)
    ref = (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab)) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # clamp at 100
    hot = InfoNCELoss(init_temperature=1e-4)
    assert hot.temperature == pytest.approx(0.01)
    # matched pairs lower than shuffled
    assert loss_fn(img, img) < loss_fn(img, spot)


def test_make_loss():
    assert isinstance(make_loss("soft_clip"), SoftCLIPLoss)
    assert isinstance(make_loss("infonce", init_temperature=0.1), InfoNCELoss)
    assert make_loss("soft_clip", temperature=0.3).temperature == 0.3
    with pytest.raises(ValueError, match="soft_clip"):
        make_loss("triplet")


def _per_expert_mean(loss_fn, img, spot, expert):
    """Row-weighted mean of the loss of each expert computed separately (a Python loop, the reference)."""
    total = 0.0
    for k in torch.unique(expert):
        rows = expert == k
        total = total + loss_fn(img[rows], spot[rows]) * rows.sum()
    return total / len(expert)


@pytest.mark.parametrize("kind", ["soft_clip", "soft_clip_tau", "infonce"])
@pytest.mark.parametrize("layout", ["padded", "sorted_equal", "shuffled_equal"])
def test_grouped_loss_equals_separate_per_expert_losses(kind, layout):
    gen = torch.Generator().manual_seed(1)
    expert = {
        "padded": torch.tensor([3, 0, 3, 1, 0, 3, 1, 1, 1, 0, 3, 3, 5, 5]),  # groups of 5, 3, 4, 2 rows
        "sorted_equal": torch.arange(4).repeat_interleave(3),  # the sampler's layout: padding is a view
        "shuffled_equal": torch.arange(4).repeat_interleave(3)[torch.randperm(12, generator=gen)],
    }[layout]
    n = len(expert)
    img = torch.randn(n, 6, generator=gen, requires_grad=True)
    spot = torch.randn(n, 6, generator=gen, requires_grad=True)
    loss_fn = {"soft_clip": SoftCLIPLoss(), "soft_clip_tau": SoftCLIPLoss(0.3), "infonce": InfoNCELoss(0.1)}[kind]
    params = [img, spot, *loss_fn.parameters()]
    got = loss_fn(img, spot, expert)
    ref = _per_expert_mean(loss_fn, img, spot, expert)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # one expert (or none given) is the plain loss; the functional form agrees with the module
    same = torch.full((n,), 2)
    assert torch.equal(loss_fn(img, spot, same), loss_fn(img, spot))
    if kind == "soft_clip":
        assert torch.equal(soft_clip_loss(img, spot, 1.0, expert), got)


def test_grouped_loss_is_finite_with_extreme_logits_and_validates():
    gen = torch.Generator().manual_seed(0)
    expert = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    for dtype in (torch.float32, torch.float64):
        img = (40 * torch.randn(11, 8, generator=gen)).to(dtype).requires_grad_()
        spot = (40 * torch.randn(11, 8, generator=gen)).to(dtype).requires_grad_()
        for loss_fn in (SoftCLIPLoss(0.05), SoftCLIPLoss(5.0), InfoNCELoss(1e-3)):
            loss = loss_fn(img, spot, expert)
            grads = torch.autograd.grad(loss, [img, spot])
            assert torch.isfinite(loss)
            assert all(torch.isfinite(g).all() for g in grads)
            torch.testing.assert_close(loss, _per_expert_mean(loss_fn, img, spot, expert).to(loss.dtype))
    img, spot = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="expert_idx"):
        soft_clip_loss(img, spot, 1.0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="expert_idx"):
        InfoNCELoss()(img, spot, torch.zeros(4))


@pytest.mark.parametrize("loss", ["soft_clip", "infonce"])
def test_grouped_loss_gradients_reach_only_experts_present(loss):
    ex = BatchedExperts(4, DI, DG, proj_dim=P, seed=0)
    gen = torch.Generator().manual_seed(0)
    expert = torch.tensor([2, 0, 2, 0, 0, 2, 2])
    x, y = torch.randn(7, DI, generator=gen), torch.randn(7, DG, generator=gen)
    image_emb, gene_emb = ex(x, y, expert)
    make_loss(loss)(image_emb, gene_emb, expert).backward()
    for name, param in ex.named_parameters():
        per_expert = param.grad.flatten(1).abs().sum(1)
        assert (per_expert[[0, 2]] > 0).all(), name
        assert (per_expert[[1, 3]] == 0).all(), name


def test_multi_expert_steps_train_like_separate_experts():
    """All experts per step (grouped loss, one AdamW on stacked weights) = K experts trained separately."""
    gen = torch.Generator().manual_seed(0)
    n = 24  # 3 batches of 8 per expert: every expert is in every step
    x, y = torch.randn(K * n, DI, generator=gen), torch.randn(K * n, DG, generator=gen)
    expert = torch.arange(K).repeat_interleave(n)[torch.randperm(K * n, generator=gen)]
    heads = _separate_heads(dropout=0.0)
    batched = BatchedExperts.from_heads(heads)
    b_opt = torch.optim.AdamW(batched.parameters(), lr=1e-2)
    opts = [torch.optim.AdamW([*img.parameters(), *gene.parameters()], lr=1e-2) for img, gene in heads]
    sampler = ExpertBatchSampler(expert, 8, seed=0, experts_per_step=None)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step in sampler.iter_steps():
            assert len(step) == K
            rows = torch.tensor([i for b in step for i in b])
            b_opt.zero_grad()
            SoftCLIPLoss()(*batched(x[rows], y[rows], expert[rows]), expert[rows]).backward()
            b_opt.step()
            for b in step:
                img, gene = heads[int(expert[b[0]])]
                opt = opts[int(expert[b[0]])]
                opt.zero_grad()
                soft_clip_loss(img(x[b]), gene(y[b])).backward()
                opt.step()
    for k, (img, gene) in enumerate(heads):
        b_img, b_gene = batched.head(k)
        for ours, theirs in ((b_img, img), (b_gene, gene)):
            for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"expert {k} {name}")


# --------------------------------------------------------------------------- routing


def _routing_problem():
    gen = torch.Generator().manual_seed(0)
    centroids = torch.randn(7, 5, generator=gen) * 3
    centroid_expert = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    feats = torch.randn(30, 5, generator=gen) * 3
    return feats, centroids, centroid_expert


def test_route_modes():
    feats, centroids, cexp = _routing_problem()
    for mode in ("soft", "hard", "uniform"):
        w = route(feats, centroids, cexp, 3, mode=mode)
        assert w.shape == (30, 3)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(1), torch.ones(30))
        assert (w >= 0).all()
    hard = route(feats, centroids, cexp, 3, mode="hard")
    nearest = ((feats[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    torch.testing.assert_close(hard, torch.nn.functional.one_hot(cexp[nearest], 3).float())
    assert route(feats, centroids, cexp, 3, mode="uniform").unique().tolist() == pytest.approx([1 / 3])
    # soft routing with a tiny temperature approaches hard routing
    torch.testing.assert_close(route(feats, centroids, cexp, 3, mode="soft", tau=1e-4), hard, atol=1e-4, rtol=0)
    # soft routing by hand
    d = torch.cdist(feats.double(), centroids.double())
    soft_c = torch.softmax(-d / 0.5, dim=1)
    expected = torch.stack([soft_c[:, cexp == k].sum(1) for k in range(3)], 1).float()
    torch.testing.assert_close(route(feats, centroids, cexp, 3, mode="soft", tau=0.5), expected, atol=1e-5, rtol=0)
    # chunking does not change the result
    torch.testing.assert_close(
        route(feats, centroids, cexp, 3, mode="soft", tau=0.5, chunk_size=7),
        route(feats, centroids, cexp, 3, mode="soft", tau=0.5),
    )
    # an expert without centroids gets zero weight
    w4 = route(feats, centroids, cexp, 4, mode="soft")
    assert w4.shape == (30, 4)
    assert (w4[:, 3] == 0).all()


def test_route_validation():
    feats, centroids, cexp = _routing_problem()
    with pytest.raises(ValueError, match=r"mode.*soft.*hard.*uniform"):
        route(feats, centroids, cexp, 3, mode="top2")
    with pytest.raises(ValueError, match="centroid_expert"):
        route(feats, centroids, cexp, 2)
    with pytest.raises(ValueError, match="centroids"):
        route(feats, centroids[:, :3], cexp, 3)
    with pytest.raises(ValueError, match="tau"):
        route(feats, centroids, cexp, 3, tau=0.0)


def test_mixture_embed():
    feats, centroids, cexp = _routing_problem()
    ex = BatchedExperts(3, 5, 4, proj_dim=P, seed=0).eval()
    with torch.no_grad():
        all_emb = ex.image_embed_all(feats)
        uni = mixture_embed(ex, feats, route(feats, centroids, cexp, 3, mode="uniform"), chunk_size=8)
        torch.testing.assert_close(uni, all_emb.mean(1), atol=1e-5, rtol=1e-5)
        hard_w = route(feats, centroids, cexp, 3, mode="hard")
        hard = mixture_embed(ex, feats, hard_w)
        chosen = hard_w.argmax(1)
        torch.testing.assert_close(hard, all_emb[torch.arange(30), chosen], atol=0, rtol=0)
        hard_chunked = mixture_embed(ex, feats, hard_w, chunk_size=8)
        torch.testing.assert_close(hard_chunked, hard, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hard, ex.image_embed(feats, chosen), atol=1e-5, rtol=1e-5)
        soft_w = route(feats, centroids, cexp, 3, mode="soft", tau=2.0)
        soft = mixture_embed(ex, feats, soft_w)
        torch.testing.assert_close(soft, (soft_w[:, :, None] * all_emb).sum(1), atol=1e-5, rtol=1e-5)
        assert soft.shape == (30, P)
    with pytest.raises(ValueError, match="weights"):
        mixture_embed(ex, feats, soft_w[:, :2])


# --------------------------------------------------------------------------- sampler


def _labels():
    # expert 0: 10 rows, expert 1: 4 (< batch), expert 2: 9 (leftover of 1 -> merged), expert 3: 8 (exact),
    # expert 5: 2 rows, expert 4: a single row (skipped)
    labels = [0] * 10 + [1] * 4 + [2] * 9 + [3] * 8 + [5] * 2 + [4]
    rng = np.random.default_rng(0)
    return rng.permutation(np.array(labels))


def _check_epoch(batches, labels, skipped=(4,)):
    assert all(len(b) >= 2 for b in batches)
    for b in batches:
        assert len(set(labels[b])) == 1
    seen = Counter(i for b in batches for i in b)
    expected = {i for i, lab in enumerate(labels) if lab not in skipped}
    assert set(seen) == expected
    assert all(v == 1 for v in seen.values())


def test_sampler_pure_batches_and_full_coverage(caplog):
    labels = _labels()
    with caplog.at_level(logging.WARNING, logger="spade_sc.model._sampler"):
        sampler = ExpertBatchSampler(labels, batch_size=4, seed=0)
    assert sampler.skipped_experts == [4]
    assert "[4]" in caplog.text
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        _check_epoch(batches, labels)
    sizes = sorted(Counter(int(labels[b[0]]) for b in batches).items())
    # 0: 4+4+2, 1: 4, 2: 4+5, 3: 4+4, 5: 2
    assert sizes == [(0, 3), (1, 1), (2, 2), (3, 2), (5, 1)]
    assert len(sampler) == 9
    assert sorted(len(b) for b in batches if labels[b[0]] == 2) == [4, 5]


def test_sampler_deterministic_and_epoch_dependent():
    labels = _labels()
    a = ExpertBatchSampler(labels, batch_size=4, seed=7)
    b = ExpertBatchSampler(labels, batch_size=4, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice in the same epoch gives the same batches
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1
    b.set_epoch(1)
    assert list(b) == e1
    c = ExpertBatchSampler(labels, batch_size=4, seed=8)
    assert list(c) != e0
    # batches of different experts are interleaved (not grouped by expert)
    big = np.repeat(np.arange(4), 40)
    order = [int(big[bt[0]]) for bt in ExpertBatchSampler(big, batch_size=4, seed=0)]
    assert order != sorted(order)


def test_sampler_no_shuffle_and_drop_last():
    labels = _labels()
    seq = list(ExpertBatchSampler(labels, batch_size=4, shuffle=False))
    _check_epoch(seq, labels)
    assert [int(labels[b[0]]) for b in seq] == sorted(int(labels[b[0]]) for b in seq)
    assert all(b == sorted(b) for b in seq)
    dl = ExpertBatchSampler(labels, batch_size=4, drop_last=True, seed=0)
    batches = list(dl)
    assert len(batches) == len(dl)
    per_expert = Counter(int(labels[b[0]]) for b in batches)
    # expert 0 loses its 2-row tail, expert 2 its 1-row tail; experts smaller than a batch keep one batch
    assert per_expert == Counter({0: 2, 1: 1, 2: 2, 3: 2, 5: 1})
    assert all(len(b) == 4 for b in batches if labels[b[0]] in (0, 2, 3))


def test_sampler_validation():
    with pytest.raises(ValueError, match="batch_size"):
        ExpertBatchSampler([0, 0, 1, 1], batch_size=1)
    with pytest.raises(ValueError, match="expert_labels"):
        ExpertBatchSampler(np.zeros((2, 2)), batch_size=2)
    with pytest.raises(ValueError, match="expert_labels"):
        ExpertBatchSampler([], batch_size=2)
    s = ExpertBatchSampler(torch.tensor([1, 1, 1]), batch_size=2)
    assert list(s) == [[0, 1, 2]] or sorted(next(iter(s))) == [0, 1, 2]


def _old_sampler_batches(labels, batch_size, seed, epoch, shuffle=True, drop_last=False):
    """The single-expert sampler before ``experts_per_step`` existed (reference for experts_per_step=1)."""
    ref = ExpertBatchSampler(labels, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(seed + epoch)
    batches = []
    for rows, sizes in zip(ref._groups, ref._sizes, strict=True):
        if shuffle:
            rows = rows[torch.randperm(rows.size, generator=generator).numpy()]
        start = 0
        for size in sizes:
            batches.append(rows[start : start + size].tolist())
            start += size
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_one_expert_per_step_is_unchanged(shuffle, drop_last):
    labels = _labels()
    s = ExpertBatchSampler(labels, batch_size=4, seed=3, shuffle=shuffle, drop_last=drop_last, experts_per_step=1)
    default = ExpertBatchSampler(labels, batch_size=4, seed=3, shuffle=shuffle, drop_last=drop_last)
    for epoch in range(3):
        s.set_epoch(epoch)
        default.set_epoch(epoch)
        expected = _old_sampler_batches(labels, 4, 3, epoch, shuffle=shuffle, drop_last=drop_last)
        assert list(s) == expected == list(default)
        assert [step for step in s.iter_steps()] == [[b] for b in expected]
        assert len(s) == len(expected)


@pytest.mark.parametrize("per_step", [2, 3, None])
def test_sampler_multi_expert_steps(per_step):
    labels = _labels()
    s = ExpertBatchSampler(labels, batch_size=4, seed=0, experts_per_step=per_step)
    single = ExpertBatchSampler(labels, batch_size=4, seed=0)
    # experts 0..5 (4 skipped) have 3, 1, 2, 2, 1 batches: fewest steps = max(3, ceil(9 / E))
    assert len(s) == {2: 5, 3: 3, None: 3}[per_step]
    for epoch in range(3):
        s.set_epoch(epoch)
        single.set_epoch(epoch)
        steps = list(s.iter_steps())
        flat = list(s)
        assert len(flat) == len(steps) == len(s)
        assert flat == [[i for b in step for i in b] for step in steps]
        sub_batches = [b for step in steps for b in step]
        _check_epoch(sub_batches, labels)  # pure single-expert sub-batches, no size 1, every row exactly once
        for step in steps:
            experts = [int(labels[b[0]]) for b in step]
            assert len(set(experts)) == len(experts)  # distinct experts
            assert len(experts) <= (per_step or 5)
            assert experts == sorted(experts)  # rows come expert by expert

        # the same per-expert cuts as single-expert batching (same sizes, same rows of the epoch's permutation)
        def cuts(batches):
            return sorted((int(labels[b[0]]), len(b), tuple(b)) for b in batches)

        assert cuts(sub_batches) == cuts(list(single))


def test_sampler_multi_expert_steps_deterministic_and_all_experts():
    labels = _labels()
    a = ExpertBatchSampler(labels, batch_size=4, seed=7, experts_per_step=None)
    b = ExpertBatchSampler(labels, batch_size=4, seed=7, experts_per_step=None)
    assert list(a) == list(b) == list(a)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    assert list(ExpertBatchSampler(labels, batch_size=4, seed=8, experts_per_step=None)) != e0
    # equal experts: every step holds one batch of every expert
    big = np.repeat(np.arange(4), 40)
    s = ExpertBatchSampler(big, batch_size=4, seed=0, experts_per_step=None)
    steps = list(s.iter_steps())
    assert len(s) == len(steps) == 10
    assert all([int(big[bt[0]]) for bt in step] == [0, 1, 2, 3] for step in steps)
    # E larger than the number of experts = all experts; no shuffle: rows in order
    seq = list(ExpertBatchSampler(big, batch_size=4, shuffle=False, experts_per_step=99))
    assert seq[0] == [0, 1, 2, 3, 40, 41, 42, 43, 80, 81, 82, 83, 120, 121, 122, 123]
    assert len(seq) == 10
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="experts_per_step"):
            ExpertBatchSampler(big, batch_size=4, experts_per_step=bad)


@pytest.mark.parametrize("per_step", [1, None])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_sampler_shards_steps_by_rank(per_step, world):
    labels = _labels()
    whole = ExpertBatchSampler(labels, batch_size=4, seed=5, experts_per_step=per_step)
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        steps = list(whole)
        shards, exact = [], []
        for rank in range(world):
            padded = ExpertBatchSampler(
                labels, batch_size=4, seed=5, experts_per_step=per_step, num_replicas=world, rank=rank
            )
            split = ExpertBatchSampler(
                labels, batch_size=4, seed=5, experts_per_step=per_step, num_replicas=world, rank=rank, even=False
            )
            padded.set_epoch(epoch)
            split.set_epoch(epoch)
            shards.append(list(padded))
            exact.append(list(split))
            assert len(padded) == len(shards[-1]) == -(-len(steps) // world)  # same number of steps everywhere
            assert len(split) == len(exact[-1])
        # even=False: the replicas split the epoch exactly (rank r takes steps r, r + world, ...)
        assert sorted(map(tuple, (b for shard in exact for b in shard))) == sorted(map(tuple, steps))
        assert all(shard == steps[r::world] for r, shard in enumerate(exact))
        # even=True: every step, then the epoch's first steps again (cycling) to fill the last round
        pad = (-len(steps)) % world
        seen = Counter(tuple(b) for shard in shards for b in shard)
        assert seen == Counter(tuple(steps[i % len(steps)]) for i in range(len(steps) + pad))
    for bad in ({"num_replicas": 0}, {"num_replicas": 2, "rank": 2}, {"rank": -1}, {"num_replicas": True}):
        with pytest.raises(ValueError, match=r"num_replicas|rank"):
            ExpertBatchSampler(labels, batch_size=4, **bad)


# --------------------------------------------------------------------------- lightning


def _synthetic(n=384, seed=0, n_experts=2):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=gen)
    image = z @ torch.randn(4, 16, generator=gen) + 0.1 * torch.randn(n, 16, generator=gen)
    gene = z @ torch.randn(4, 12, generator=gen) + 0.1 * torch.randn(n, 12, generator=gen)
    expert = torch.randint(0, n_experts, (n,), generator=gen)
    return image, gene, expert


def _fit(loss="soft_clip", seed=0, max_epochs=6, check_val_every_n_epoch=1, experts_per_step=1, n_experts=2):
    image, gene, expert = _synthetic(n_experts=n_experts)
    L.seed_everything(seed, verbose=False)
    module = SpadeLightningModule(
        BatchedExperts(n_experts, 16, 12, proj_dim=32), loss=loss, lr=1e-3, max_epochs=max_epochs
    )
    module.initial_state = {k: v.clone() for k, v in module.state_dict().items()}
    train = PairsDataset(image[:320], gene[:320], expert[:320])
    val = PairsDataset(image[320:], gene[320:], expert[320:])
    kw = {"batch_size": 32, "seed": seed, "experts_per_step": experts_per_step}
    train_dl = make_dataloader(train, train.expert_idx, shuffle=True, **kw)
    val_dl = make_dataloader(val, None, shuffle=False, **kw)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=check_val_every_n_epoch,
    )
    trainer.fit(module, train_dl, val_dl)
    return module, trainer, train_dl


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_training_reduces_loss_and_records_history():
    module, trainer, train_dl = _fit()
    hist = module.history
    assert [h["epoch"] for h in hist] == list(range(6))  # sanity-check pass not recorded
    assert all(h["train_loss"] is not None and h["val_loss"] is not None for h in hist)
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    # both sides of every expert are trained (the image embedding is part of the loss)
    final = module.state_dict()
    for side in ("image_heads", "gene_heads"):
        delta = final[f"experts.{side}.projection_weight"] - module.initial_state[f"experts.{side}.projection_weight"]
        assert delta.abs().flatten(1).sum(1).min() > 0, side
    assert "train_loss" in trainer.callback_metrics
    assert "val_loss" in trainer.callback_metrics
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(hist[-1]["train_loss"], rel=1e-4)
    # Lightning advanced the sampler epoch (different permutation each epoch)
    assert train_dl.sampler.epoch == 5
    # optimiser / scheduler configuration
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    sched = trainer.lr_scheduler_configs[0]
    assert isinstance(sched.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.interval == "epoch"
    assert sched.scheduler.T_max == 6


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_same_seed_same_weights_and_infonce():
    a, _, _ = _fit(loss="infonce", seed=1, max_epochs=2, check_val_every_n_epoch=2)
    b, _, _ = _fit(loss="infonce", seed=1, max_epochs=2, check_val_every_n_epoch=2)
    # validation only ran after epoch 1; the sanity-check pass (before epoch 0) is not recorded
    assert [h["epoch"] for h in a.history] == [0, 1]
    assert a.history[0]["val_loss"] is None
    assert a.history[1]["val_loss"] is not None
    assert "loss_fn.logit_scale" in dict(a.named_parameters())
    assert a.loss_fn.logit_scale.item() != pytest.approx(math.log(1 / 0.07))  # the temperature was trained
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert any(k.startswith("experts.image_heads.") for k in sa)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert a.history == b.history


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_all_experts_per_step_trains_and_is_deterministic():
    a, trainer, train_dl = _fit(seed=2, max_epochs=4, experts_per_step=None, n_experts=3)
    b, _, _ = _fit(seed=2, max_epochs=4, experts_per_step=None, n_experts=3)
    sampler = train_dl.sampler
    assert sampler.experts_per_step is None
    labels = train_dl.dataset.expert_idx.numpy()
    per_expert = Counter(int(labels[bt[0]]) for bt in ExpertBatchSampler(labels, 32))  # single-expert batches
    assert len(per_expert) == 3
    assert trainer.num_training_batches == len(sampler) == max(per_expert.values())  # every step: all experts left
    hist = a.history
    assert [h["epoch"] for h in hist] == list(range(4))
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert a.history == b.history
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, equal_nan=True, msg=name)
    # the validation loss (row-weighted) does not depend on how single-expert batches are grouped into steps
    image, gene, expert = _synthetic(n_experts=3)
    val = slice(320, None)
    a.eval()
    means = []
    with torch.no_grad():
        for per_step in (1, 2, None):
            total = 0.0
            for rows in ExpertBatchSampler(expert[val], 32, shuffle=False, experts_per_step=per_step):
                loss = a.loss_fn(*a(image[val][rows], gene[val][rows], expert[val][rows]), expert[val][rows])
                total += float(loss) * len(rows)
            means.append(total / len(expert[val]))
    assert means == pytest.approx([hist[-1]["val_loss"]] * 3, rel=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_spade_model_train_experts_per_step():
    from spade_sc.model import DataExperts, SpadeModel

    image, gene, expert = (t.numpy() for t in _synthetic(n=192, n_experts=3))
    experts = DataExperts(
        centroids=np.zeros((3, 16), dtype=np.float32),
        centroid_tissue=np.array(["all"] * 3),
        centroid_expert=np.arange(3),
        n_experts=3,
    )
    pairs = {"a": (image[:150], gene[:150], expert[:150]), "b": (image[150:], gene[150:], expert[150:])}
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for per_step in (None, 1):
            model = SpadeModel(experts, [f"g{i}" for i in range(12)], 16, features_key="X_test", proj_dim=16)
            kw = {} if per_step is None else {"experts_per_step": per_step}
            model.train(pairs, validation=["b"], max_epochs=2, batch_size=16, progress=False, **kw)
            assert model.train_params_["experts_per_step"] == per_step
            assert all(h["train_loss"] is not None and h["val_loss"] is not None for h in model.history_)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_expert_alignment_recovers_rotations():
    from spade_sc.model import expert_alignment

    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 8, generator=g, dtype=torch.float64)
    q = [torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    # three experts: the same embedding in three coordinate systems (plus a little noise in one)
    experts = torch.stack([base, base @ q[0], base @ q[1] + 1e-3 * torch.randn(200, 8, generator=g)], dim=1)
    rot = expert_alignment(experts.float())
    assert rot.shape == (3, 8, 8) and rot.dtype == torch.float32
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(8).expand(3, 8, 8), atol=1e-5, rtol=0)
    aligned = torch.einsum("nkd,kde->nke", experts.float(), rot)
    assert (aligned[:, 1] - aligned[:, 0]).norm() / aligned[:, 0].norm() < 1e-5
    assert (aligned[:, 2] - aligned[:, 0]).norm() / aligned[:, 0].norm() < 1e-2
    assert (experts[:, 1] - experts[:, 0]).norm() / experts[:, 0].norm() > 0.5  # they were not aligned before


def test_spade_model_aligns_its_experts(tmp_path):
    from spade_sc.model import DataExperts, SpadeModel
    from spade_sc.model._schema import ALIGNMENT_TENSOR

    image, gene, expert = (t.numpy() for t in _synthetic(n=192, n_experts=3))
    experts = DataExperts(
        centroids=np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32),
        centroid_tissue=np.array(["all"] * 3),
        centroid_expert=np.arange(3),
        n_experts=3,
    )
    pairs = {"a": (image[:150], gene[:150], expert[:150]), "b": (image[150:], gene[150:], expert[150:])}
    genes = [f"g{i}" for i in range(12)]
    models = {}
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        for align in (True, False):
            models[align] = SpadeModel(experts, genes, 16, features_key="X_test", proj_dim=16).train(
                pairs, validation=["b"], max_epochs=2, batch_size=16, progress=False, align_experts=align
            )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    aligned, plain = models[True], models[False]
    assert plain.alignment_ is None and plain.train_params_["align_experts"] is False
    rot = aligned.alignment_
    assert rot.shape == (3, 16, 16) and aligned.train_params_["align_experts"] is True
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(16), rot.shape), atol=1e-5)
    # the same weights (alignment comes after training); each expert's embedding is rotated by its own matrix
    torch.testing.assert_close(aligned.module.state_dict(), plain.module.state_dict(), atol=0, rtol=0)
    e_aligned, w = aligned.get_image_embedding(image, "hard")
    e_plain, _ = plain.get_image_embedding(image, "hard")
    k = w.argmax(1)
    np.testing.assert_allclose(e_aligned, np.einsum("nd,nde->ne", e_plain, rot[k]), atol=1e-5)
    # the experts' gene embeddings of the same expression now agree far better than before
    with torch.no_grad():
        g_all = aligned.module.gene_embed_all(torch.as_tensor(gene)).numpy()
    spread_before = np.linalg.norm(g_all - g_all.mean(1, keepdims=True))
    g_rot = np.einsum("nkd,kde->nke", g_all, rot)
    assert np.linalg.norm(g_rot - g_rot.mean(1, keepdims=True)) < 0.8 * spread_before
    # saved and loaded bit-identically; a corrupted rotation is refused, naming the tensor
    loaded = SpadeModel.load(aligned.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.alignment_, rot)
    np.testing.assert_array_equal(
        loaded.get_image_embedding(image, "soft")[0], aligned.get_image_embedding(image, "soft")[0]
    )
    assert loaded.fingerprint() == aligned.fingerprint() != plain.fingerprint()
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    tensors[ALIGNMENT_TENSOR] = 2 * tensors[ALIGNMENT_TENSOR]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"alignment\.rotations"):
        SpadeModel.load(tmp_path / "m")


def test_lightning_step_accepts_dict_batch_and_validates():
    module = SpadeLightningModule(BatchedExperts(2, 16, 12, proj_dim=32, seed=0))
    module.log = lambda *args, **kwargs: None  # not attached to a Trainer
    image, gene, expert = _synthetic(8)
    out = module._shared_step({"image": image, "gene": gene, "expert": torch.zeros(8, dtype=torch.long)}, "train")
    assert out.shape == ()
    with pytest.raises(ValueError, match="batch"):
        module._shared_step({"image": image}, "train")
    with pytest.raises(ValueError, match="name"):
        make_loss("nope")
    with pytest.raises(ValueError, match="experts"):
        SpadeLightningModule(nn.Linear(2, 2))
    ds = PairsDataset(image.numpy().astype(np.float64), gene, expert.numpy())
    assert ds.image_feats.dtype == torch.float32
    assert len(ds) == 8
    x, y, e = ds[3]
    assert x.shape == (16,) and y.shape == (12,) and e.dtype == torch.int64
    with pytest.raises(ValueError, match="gene_feats"):
        PairsDataset(image, gene[:4], expert)


# --------------------------------------------------------------------------- ABMIL / survival


def test_abmil_structure_and_shapes():
    model = GatedABMIL(20, n_classes=3)
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout]
    assert model.fc[0].out_features == 512 and model.fc[3].out_features == 512
    assert model.fc[2].p == 0.25
    assert isinstance(model.attention_a[1], nn.Tanh) and model.attention_a[0].out_features == 384
    assert isinstance(model.attention_b[1], nn.Sigmoid) and model.attention_b[0].out_features == 384
    assert (model.attention_c.in_features, model.attention_c.out_features) == (384, 1)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 3)
    model.eval()
    bag = torch.randn(17, 20)
    logits, att = model(bag)
    assert logits.shape == (3,)
    assert att.shape == (17,)
    torch.testing.assert_close(torch.softmax(att, 0).sum(), torch.tensor(1.0))
    # logits are the classifier applied to the attention-pooled hidden features
    h = model.fc(bag)
    pooled = torch.softmax(att, 0) @ h
    torch.testing.assert_close(logits, model.classifier(pooled))
    logits1, _ = model(bag[None])
    torch.testing.assert_close(logits1, logits)
    with pytest.raises(ValueError, match="bag"):
        model(torch.randn(5, 3))


def test_abmil_learns_positive_instance():
    torch.manual_seed(0)
    d = 8

    def make_bags(gen, n_bags):
        bags, labels, pos_idx = [], [], []
        for i in range(n_bags):
            bag = torch.randn(12, d, generator=gen)
            label = i % 2
            j = int(torch.randint(0, 12, (1,), generator=gen))
            if label:
                bag[j, 0] += 6.0
            bags.append(bag)
            labels.append(float(label))
            pos_idx.append(j)
        return bags, torch.tensor(labels), pos_idx

    train_bags, train_y, _ = make_bags(torch.Generator().manual_seed(1), 120)
    test_bags, test_y, test_pos = make_bags(torch.Generator().manual_seed(2), 40)
    model = GatedABMIL(d, n_classes=1, hidden=32, attention_dim=16, dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(3):
        for bag, y in zip(train_bags, train_y, strict=True):
            logit, _ = model(bag)
            loss = loss_fn(logit, y.view(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        preds, hits = [], []
        for bag, y, j in zip(test_bags, test_y, test_pos, strict=True):
            logit, att = model(bag)
            preds.append(float(logit[0] > 0))
            if y == 1:
                hits.append(int(att.argmax()) == j)
    acc = (torch.tensor(preds) == test_y).float().mean()
    assert acc >= 0.9
    assert np.mean(hits) >= 0.8  # attention points at the positive instance


def test_discrete_time_nll_hand_computation():
    logits = torch.tensor([[0.2, -0.5, 1.0], [-1.0, 0.3, 0.0]])
    bins = torch.tensor([1, 0])
    event = torch.tensor([1, 0])  # sample 0 had the event in bin 1, sample 1 censored in bin 0

    def sig(v):
        return 1 / (1 + math.exp(-v))

    h00, h01, h10 = sig(0.2), sig(-0.5), sig(-1.0)
    loss0 = -math.log(1 - h00) - math.log(h01)  # -log S_0 - log h_1
    loss1 = -math.log(1 - h10)  # -log S_0
    expected = (loss0 + loss1) / 2
    assert float(discrete_time_nll(logits, bins, event)) == pytest.approx(expected, rel=1e-6)
    # event in the first bin: -log h_0 only
    got = discrete_time_nll(logits[:1], torch.tensor([0]), torch.tensor([1]))
    assert float(got) == pytest.approx(-math.log(h00), rel=1e-6)
    # alpha adds weight on the uncensored term
    got = discrete_time_nll(logits, bins, event, alpha=0.4)
    assert float(got) == pytest.approx((loss0 + 0.6 * loss1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="bin_idx"):
        discrete_time_nll(logits, torch.tensor([3, 0]), event)


def test_risk_from_hazards():
    logits = torch.tensor([[0.2, -0.5, 1.0], [3.0, 3.0, 3.0]])
    h = torch.sigmoid(logits)
    s = torch.cumprod(1 - h, dim=1)
    torch.testing.assert_close(risk_from_hazards(logits), -s.sum(1))
    first = logits[0].tolist()
    s0 = 1 - 1 / (1 + math.exp(-first[0]))
    s1 = s0 * (1 - 1 / (1 + math.exp(-first[1])))
    s2 = s1 * (1 - 1 / (1 + math.exp(-first[2])))
    assert float(risk_from_hazards(logits)[0]) == pytest.approx(-(s0 + s1 + s2), rel=1e-6)
    r = risk_from_hazards(logits)
    assert r[1] > r[0]  # higher hazards -> higher risk
