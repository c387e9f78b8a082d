"""``SparsityMethod.token_trace``: which input patches each token stage keeps or merges, checked against
hand computations from the methods' own scorers (not the traced forward's bookkeeping)."""
from __future__ import annotations

import pytest
import torch

from methods import get_method
from methods._common import vit_stem

N = 64  # the tiny ViT's patches (8 x 8 grid)


@pytest.fixture
def images(rng) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=rng)


def _build(name: str, vit, **cfg):
    method = get_method(name)
    model = method.build_model(method.config_cls(**cfg), vit)
    torch.manual_seed(1)
    for p in model.parameters():  # random non-trivial predictor/selector weights (no ties in the scores)
        p.data.add_(0.05 * torch.randn_like(p))
    return method, model


def _kept_sets(stage) -> list[set[int]]:
    return [set(torch.nonzero(row >= 0).flatten().tolist()) for row in stage.token]


def test_dynamicvit_keeps_the_predictors_top_k_at_every_stage(tiny_vit, images):
    method, model = _build("dynamicvit", tiny_vit, keep_ratio=0.7, pruning_loc=(1, 3, 5))
    model.train()
    stages = method.token_trace(model, images)
    assert model.training  # the trace restored the mode
    assert [s.block for s in stages] == [1, 3, 5]
    # By hand, per image: run the blocks, and before each pruning block score the remaining patch
    # tokens with that stage's predictor and keep the int(64 * 0.7**k) best (44, 30, 21).
    counts = [int(N * 0.7 ** k) for k in (1, 2, 3)]
    vit = model.vit
    with torch.no_grad():
        for b in range(images.shape[0]):
            x = vit_stem(vit, images[b : b + 1])
            alive = list(range(N))  # original patch index of each patch token, in sequence order
            stage = 0
            for i, blk in enumerate(vit.blocks):
                if stage < 3 and i == (1, 3, 5)[stage]:
                    scores = model.predictors[stage](x[:, 1:], torch.ones(1, len(alive), 1))[0, :, 0]
                    best = sorted(range(len(alive)), key=lambda j: -float(scores[j]))[: counts[stage]]
                    assert _kept_sets(stages[stage])[b] == {alive[j] for j in best}
                    x = torch.cat([x[:, :1], x[:, 1:][:, best]], dim=1)
                    alive = [alive[j] for j in best]
                    stage += 1
                x = blk(x)
            # each kept patch's token index is its slot in the sequence
            assert [int(stages[2].token[b, p]) for p in alive] == list(range(len(alive)))


def test_spvit_packages_the_dropped_patches(tiny_vit, images):
    method, model = _build("spvit", tiny_vit, pruning_loc=(1, 3, 5))
    stages = method.token_trace(model, images)
    counts = model.keep_counts
    assert [s.block for s in stages] == [1, 3, 5]
    # stage 1 by hand: the top-K patches by the selector's keep margin on block 0's output
    with torch.no_grad():
        x = model.vit.blocks[0](vit_stem(model.vit, images))
        score, _ = model.predictors[0](x[:, 1:], torch.ones(x.shape[0], N, 1))
        margin = score[:, :, 0] - score[:, :, 1]
    for b in range(images.shape[0]):
        assert _kept_sets_at(stages, counts, 0, b) == set(margin[b].topk(counts[0]).indices.tolist())
    prev_kept = [set(range(N))] * images.shape[0]
    for j, (stage, k) in enumerate(zip(stages, counts)):
        for b, row in enumerate(stage.token.tolist()):
            kept = {p for p, t in enumerate(row) if 0 <= t < k}
            assert len(kept) == k and kept <= prev_kept[b]  # nested selections
            # every other patch sits in the package token of the stage that dropped it
            for p, t in enumerate(row):
                if p not in kept:
                    dropped_at = next(i for i in range(j + 1) if p not in _kept_sets_at(stages, counts, i, b))
                    assert t == k + dropped_at
            prev_kept[b] = kept


def _kept_sets_at(stages, counts, i, b) -> set[int]:
    return {p for p, t in enumerate(stages[i].token[b].tolist()) if 0 <= t < counts[i]}


def test_evovit_first_stage_keeps_the_top_cls_attention_patches(tiny_vit, images):
    method, model = _build("evovit", tiny_vit, prune_ratio=0.5, prune_location=1, stage_starts=(1, 3))
    stages = method.token_trace(model, images)
    assert [s.block for s in stages] == [1, 3]
    # by hand: block 0's CLS-query attention over the patch keys, summed over heads; the top 32 run stage 1
    attn = model.vit.blocks[0].attn
    with torch.no_grad():
        x = vit_stem(model.vit, images)
        h = model.vit.blocks[0].norm1(x)
        qkv = attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        g = ((q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0, 1:].sum(1)
    for b in range(images.shape[0]):
        assert _kept_sets(stages[0])[b] == set(g[b].topk(32).indices.tolist())
        assert len(_kept_sets(stages[1])[b]) == 32


def test_svite_keeps_the_selectors_top_k_once(tiny_vit, make_tiny_vit, images):
    method, model = _build("svite", tiny_vit, token_number=20)
    (stage,) = method.token_trace(model, images)
    with torch.no_grad():
        scores = model.selector(vit_stem(model.vit, images)[:, 1:])
    for b in range(images.shape[0]):
        assert _kept_sets(stage)[b] == set(scores[b].topk(20).indices.tolist())
    # kept in spatial order: slot i holds the i-th kept patch by position
    row = stage.token[0]
    assert row[row >= 0].tolist() == list(range(20))
    method, plain = _build("svite", make_tiny_vit(0), token_number=0)
    assert method.token_trace(plain, images) is None


@pytest.mark.parametrize("r", [5, 9])
def test_tome_groups_partition_the_patches_and_match_the_token_sizes(tiny_vit, images, r):
    method, model = _build("tome", tiny_vit, r=r)
    stages = method.token_trace(model, images)
    # tokens after each block by ToMe's formula (N_l = N_{l-1} - min(r, floor((N_{l-1} - 1) / 2)))
    expected, n = [], N + 1
    for _ in range(6):
        n -= min(r, (n - 1) // 2)
        expected.append(n - 1)
    assert [s.block for s in stages] == list(range(6))  # every block merges
    for stage, groups in zip(stages, expected):
        for row in stage.token.tolist():
            assert min(row) >= 0  # merging drops nothing: every patch is in exactly one group
            assert len(set(row)) == groups and set(row) == set(range(groups))
    # the groups of the last stage are the final tokens: their patch counts are the forward's own sizes
    model.eval()
    with torch.no_grad():
        sizes = model(images).aux["sizes"][..., 0]
    for b in range(images.shape[0]):
        counts = torch.bincount(stages[-1].token[b], minlength=expected[-1]).float()
        assert torch.equal(counts, sizes[b])
    # and a merged group is a set of patches ToMe's own merging put together: nested across stages
    for earlier, later in zip(stages, stages[1:]):
        for b in range(images.shape[0]):
            pairs = set(zip(earlier.token[b].tolist(), later.token[b].tolist()))
            assert len({e for e, _ in pairs}) == len(pairs)  # each earlier group lands in one later group


def test_methods_without_token_stages_return_none(make_tiny_vit, images):
    method, model = _build("dense", make_tiny_vit(0))
    assert method.token_trace(model, images) is None
    tome, zero = _build("tome", make_tiny_vit(0), r=0)
    assert tome.token_trace(zero, images) == []  # nothing merged: no stage
