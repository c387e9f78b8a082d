"""ToMe against the invariants of the implementation reference (methods.md section 6).

Expectations are derived independently of ``methods/tome.py``: token counts by hand, the merge by a
per-sample loop over tokens, proportional attention by an explicit ``s_j exp(logit)`` softmax.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import methods.tome as tome
from methods import BackboneConfig, Geometry, MethodOutput, count_gflops, create_backbone, get_method
from methods.tome import ToMeConfig, ToMeMethod, ToMeViT, bipartite_merge, tome_attention, tome_block_forward

NUM_PATCHES = 64  # the tiny ViT: 32 px in 4 px patches, + CLS = 65 tokens, 6 blocks, C = 96, 3 heads


def _images(rng, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=rng)


def _block_lengths(model: ToMeViT, x: torch.Tensor) -> list[int]:
    """Sequence length entering each block (norm1 sees every block's input)."""
    lengths, handles = {}, []
    for i, blk in enumerate(model.vit.blocks):
        handles.append(blk.norm1.register_forward_pre_hook(lambda m, a, i=i: lengths.__setitem__(i, a[0].shape[1])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [lengths[i] for i in range(len(model.vit.blocks))]


def _record_sizes(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Record every block's (output tokens, output sizes) by wrapping ``tome_block_forward``."""
    records = []
    inner = tome.tome_block_forward

    def wrapper(*args, **kwargs):
        x, sizes = inner(*args, **kwargs)
        records.append((x.detach(), None if sizes is None else sizes.detach()))
        return x, sizes

    monkeypatch.setattr(tome, "tome_block_forward", wrapper)
    return records


# ---------------------------------------------------------------- token counts


@pytest.fixture(scope="module")
def deit_s() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name="deit_small_patch16_224")).eval()


def test_deit_s_r13_token_counts_end_at_41(deit_s):
    model = ToMeViT(deit_s, ToMeConfig(r=13)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    # By hand: the cap floor((N - 1) / 2) never binds (the last block enters with 54), so 13 go per block.
    expected = [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54]
    assert _block_lengths(model, torch.randn(1, 3, 224, 224)) == expected
    assert out.aux["tokens"].shape == (1, 40, 384)  # 41 tokens leave the last block: CLS + 40
    assert out.aux["sizes"].sum().item() == 196
    assert ToMeConfig(r=13).tokens_per_block(197, 12) == expected + [41]


def test_deit_s_r13_gmacs_match_a_hand_count(deit_s):
    """fvcore GMACs of ToMe r=13 on DeiT-S: ~2.7 against ~4.6 dense, as an analytic count of the merged sequence."""
    c, blocks = 384, 12
    lengths = [197 - 13 * i for i in range(blocks + 1)]

    def block_macs(n_attn: int, n_mlp: int) -> int:
        # qkv + proj at n_attn tokens, QK^T and AV at n_attn^2, the MLP (4C hidden) after the merge.
        return 4 * n_attn * c * c + 2 * n_attn * n_attn * c + 8 * n_mlp * c * c

    stem_head = 196 * (3 * 16 * 16) * c + c * 1000
    dense = stem_head + blocks * block_macs(197, 197)
    merged = stem_head + sum(block_macs(lengths[i], lengths[i + 1]) for i in range(blocks))
    got_dense = count_gflops(copy.deepcopy(deit_s), (3, 224, 224)) * 1e9
    got = count_gflops(ToMeViT(copy.deepcopy(deit_s), ToMeConfig(r=13)), (3, 224, 224)) * 1e9
    assert got_dense == pytest.approx(dense, rel=0.01)  # fvcore adds the norms' few MACs
    assert got == pytest.approx(merged, rel=0.01)
    assert 2.6e9 < got < 2.8e9 and 4.5e9 < got_dense < 4.7e9


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # 65 tokens; each block merges min(r, floor((N - 1) / 2)), worked out by hand.
        ({"r": 8}, [65, 57, 49, 41, 33, 25, 17]),
        ({"r": 20}, [65, 45, 25, 13, 7, 4, 3]),  # caps 32, 22, 12, 6, 3, 1
        ({"r": 0}, [65] * 7),
        ({"r_per_layer": (10, 0, 5, 40, 3, 1)}, [65, 55, 55, 50, 26, 23, 22]),  # 40 capped at 24
        ({"r": 6, "inflect": -1.0}, [65, 53, 44, 37, 33, 31, 31]),  # schedule 12, 9, 7, 4, 2, 0
    ],
)
def test_tokens_per_block_and_merge_counts(tiny_vit, rng, overrides, expected):
    cfg = ToMeConfig(**overrides)
    model = ToMeViT(tiny_vit, cfg).eval()
    x = _images(rng)
    assert _block_lengths(model, x) == expected[:-1]
    with torch.no_grad():
        out = model(x)
    assert out.aux["tokens"].shape == (2, expected[-1] - 1, 96)
    assert cfg.tokens_per_block(65, 6) == expected
    assert cfg.tokens_for(Geometry.of(tiny_vit)) == expected


def test_distilled_deit_protects_cls_and_distillation_token(make_tiny_vit, rng, monkeypatch):
    vit = make_tiny_vit(name="deit_tiny_distilled_patch16_224")
    assert vit.num_prefix_tokens == 2
    model = ToMeViT(vit, ToMeConfig(r=20)).eval()
    x = _images(rng)
    # 66 tokens, caps floor((N - 2) / 2): 32, 22, 12, 6, 3, 1.
    expected = [66, 46, 26, 14, 8, 5, 4]
    assert _block_lengths(model, x) == expected[:-1]
    assert ToMeConfig(r=20).tokens_per_block(66, 6, protected=2) == expected

    records = _record_sizes(monkeypatch)
    with torch.no_grad():
        out = model(x)
    for (tokens, sizes), n in zip(records, expected[1:]):
        assert tokens.shape[1] == n
        assert (sizes[:, :2] == 1).all()
        assert (sizes.sum(1) == 66).all()
    assert out.aux["sizes"].shape == (2, 2, 1) and (out.aux["sizes"].sum(1) == 64).all()


# ---------------------------------------------------------------- sizes and CLS through the model


def test_sizes_sum_to_input_tokens_and_cls_stays_first_with_size_one(tiny_vit, rng, monkeypatch):
    model = ToMeViT(tiny_vit, ToMeConfig(r=12)).eval()
    records = _record_sizes(monkeypatch)
    x = _images(rng, batch=3)
    with torch.no_grad():
        out = model(x)
    assert len(records) == 6
    lengths = [65 - 12 * (i + 1) for i in range(4)] + [9, 5]  # 53 41 29 17, then caps 8 and 4
    for (tokens, sizes), n in zip(records, lengths):
        assert tokens.shape == (3, n, 96) and sizes.shape == (3, n, 1)
        assert (sizes.sum(1) == 65).all()
        assert (sizes == sizes.round()).all() and (sizes >= 1).all()
        assert (sizes[:, 0] == 1).all()  # CLS never merges
    assert torch.equal(out.aux["sizes"], records[-1][1][:, 1:])
    assert (out.aux["sizes"].sum(1) == NUM_PATCHES).all()


def test_cls_is_first_and_unchanged_by_the_merge(rng):
    x = torch.randn(2, 17, 8, generator=rng)
    metric = torch.randn(2, 17, 5, generator=rng)
    sizes = torch.randint(1, 4, (2, 17, 1), generator=rng).float()
    out, out_sizes = bipartite_merge(x, sizes, metric, r=8, protected=1)
    assert out.shape == (2, 9, 8)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out_sizes[:, 0], sizes[:, 0])


# ---------------------------------------------------------------- the merge against a brute-force loop


def _brute_force_merge(x, sizes, metric, r, protected):
    """Bipartite soft matching written as loops over samples and tokens (methods.md 6, steps 2-6)."""
    b, n, _ = x.shape
    r = min(r, (n - protected) // 2)
    outs, out_sizes, largest = [], [], 0
    for s in range(b):
        even = [i for i in range(n) if i % 2 == 0]
        odd = [i for i in range(n) if i % 2 == 1]

        def cos(i, j):
            u, v = metric[s, i], metric[s, j]
            return float((u * v).sum() / (u.norm() * v.norm()))

        edges = []
        for a in even:
            if a < protected:
                continue
            candidates = [(cos(a, j), j) for j in odd if j >= protected]
            score, best = max(candidates)
            edges.append((score, a, best))
        edges.sort(reverse=True)
        merged = {a: j for _, a, j in edges[:r]}
        groups = {j: [j] for j in odd}
        for a, j in merged.items():
            groups[j].append(a)
        largest = max(largest, max(len(g) for g in groups.values()))
        order = list(range(protected)) + [a for a in even if a >= protected and a not in merged]
        order += [j for j in odd if j >= protected]
        rows, row_sizes = [], []
        for t in order:
            members = groups.get(t, [t])
            total = sum(float(sizes[s, m, 0]) for m in members)
            rows.append(sum(float(sizes[s, m, 0]) * x[s, m] for m in members) / total)
            row_sizes.append(total)
        outs.append(torch.stack(rows))
        out_sizes.append(torch.tensor(row_sizes).unsqueeze(-1))
    return torch.stack(outs), torch.stack(out_sizes), largest


@pytest.mark.parametrize("b", [3, 1])  # batch 1 takes the merge's path without per-sample row offsets
@pytest.mark.parametrize("n, r, protected", [(17, 5, 1), (17, 8, 1), (16, 30, 1), (18, 6, 2), (18, 8, 2), (11, 3, 0)])
def test_merge_equals_brute_force_bipartite_matching(rng, n, r, protected, b):
    x = torch.randn(b, n, 6, generator=rng)
    # Clustered metric, so that several A tokens pick the same B token.
    centers = torch.randn(b, 3, 4, generator=rng)
    metric = centers[:, torch.randint(0, 3, (n,), generator=rng)] + 0.3 * torch.randn(b, n, 4, generator=rng)
    sizes = torch.randint(1, 5, (b, n, 1), generator=rng).float()

    got, got_sizes = bipartite_merge(x, sizes, metric, r, protected)
    expected, expected_sizes, largest = _brute_force_merge(x, sizes, metric, r, protected)
    assert got.shape == (b, n - min(r, (n - protected) // 2), 6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sizes, expected_sizes, atol=0, rtol=0)
    if b > 1:
        assert largest >= 3, "no B token absorbed two A tokens: the example does not test that case"


def test_merge_gradient_matches_the_brute_force_weighted_average(rng):
    """Merging is differentiable: gradients equal those through the loop implementation (s_i / sum s per member)."""
    x = torch.randn(2, 13, 4, generator=rng)
    metric = torch.randn(2, 13, 3, generator=rng)
    sizes = torch.randint(1, 6, (2, 13, 1), generator=rng).float()
    upstream = torch.randn(2, 7, 4, generator=rng)
    ours, brute = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (bipartite_merge(ours, sizes, metric, r=6, protected=1)[0] * upstream).sum().backward()
    (_brute_force_merge(brute, sizes, metric, 6, 1)[0] * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, brute.grad)
    assert (ours.grad.abs().sum(-1) > 0).all()  # every input token reaches some output


# ---------------------------------------------------------------- proportional attention


def _brute_force_attention(attn, x, sizes):
    """Per head, explicitly: softmax over keys of (q k / sqrt(d) + log s_j), i.e. s_j e^{l_ij} / sum_j s_j e^{l_ij}."""
    b, n, c = x.shape
    h = attn.num_heads
    d = c // h
    w, bias = attn.qkv.weight, attn.qkv.bias
    heads, keys = [], []
    for head in range(h):
        rows = slice(head * d, (head + 1) * d)
        q = x @ w[rows].T + bias[rows]
        k = x @ w[c:][rows].T + bias[c:][rows]
        v = x @ w[2 * c:][rows].T + bias[2 * c:][rows]
        logits = q @ k.transpose(1, 2) / math.sqrt(d)
        e = torch.exp(logits - logits.amax(-1, keepdim=True)) * sizes.transpose(1, 2)
        heads.append((e / e.sum(-1, keepdim=True)) @ v)
        keys.append(k)
    return attn.proj(torch.cat(heads, dim=-1)), sum(keys) / h


def test_proportional_attention_equals_explicit_size_weighted_softmax(tiny_vit, rng):
    attn = tiny_vit.blocks[2].attn.eval()
    x = torch.randn(2, 13, 96, generator=rng)
    sizes = torch.randint(1, 7, (2, 13, 1), generator=rng).float()
    with torch.no_grad():
        got, metric = tome_attention(attn, x, sizes)
        expected, mean_keys = _brute_force_attention(attn, x, sizes)
        unweighted, _ = tome_attention(attn, x, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metric, mean_keys, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, unweighted, atol=1e-3)  # the sizes matter


@pytest.mark.parametrize("b, n", [(2, 13), (64, 80)])
def test_compiled_proportional_attention_equals_the_brute_force(tiny_vit, rng, b, n):
    # Under torch.compile a small biased attention is written out (``biased_attention``), a large one SDPA's.
    assert (b * 3 * n * n <= tome.WRITTEN_OUT_MAX_SCORES) == (n == 13)  # one of each
    attn = tiny_vit.blocks[2].attn.eval()
    x = torch.randn(b, n, 96, generator=rng)
    sizes = torch.randint(1, 7, (b, n, 1), generator=rng).float()
    with torch.no_grad():
        got, metric = torch.compile(tome_attention, fullgraph=True)(attn, x, sizes)
        written_out = tome.biased_attention(attn, *tome.qkv_heads(attn, x), sizes.log().transpose(1, 2).unsqueeze(1))
        expected, mean_keys = _brute_force_attention(attn, x, sizes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metric, mean_keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tome.merge_heads(attn, written_out), expected, atol=1e-5, rtol=1e-4)


def _ls_qknorm_vit():
    """A tiny timm ViT with layer scale and q/k norms, which the reference's patch ignores."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3, embed_dim=96, num_heads=3,
        num_classes=10, init_values=0.3, qk_norm=True,
    ).eval()


@pytest.mark.parametrize("backbone", ["tiny", "layer_scale_qk_norm"])
def test_block_with_unit_sizes_and_no_merge_is_the_timm_block(tiny_vit, rng, backbone):
    vit = tiny_vit.eval() if backbone == "tiny" else _ls_qknorm_vit()
    x = torch.randn(2, 65, 96, generator=rng)
    with torch.no_grad():
        for blk in vit.blocks:
            expected = blk(x)
            ones, out_sizes = tome_block_forward(blk, x, torch.ones(2, 65, 1), r=0, prop_attn=True)
            torch.testing.assert_close(ones, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(out_sizes, torch.ones(2, 65, 1))
            x = expected


@pytest.mark.parametrize("backbone", ["tiny", "layer_scale_qk_norm"])
def test_r0_equals_plain_timm(tiny_vit, rng, backbone):
    vit = tiny_vit.eval() if backbone == "tiny" else _ls_qknorm_vit()
    plain = copy.deepcopy(vit)
    model = ToMeViT(vit, ToMeConfig(r=0)).eval()
    x = _images(rng)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits, plain(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.aux["sizes"], torch.ones(2, NUM_PATCHES, 1))


def test_prop_attn_changes_logits_only_once_tokens_are_merged(tiny_vit, rng):
    x = _images(rng)
    on = ToMeViT(copy.deepcopy(tiny_vit), ToMeConfig(r=8, prop_attn=True)).eval()
    off = ToMeViT(copy.deepcopy(tiny_vit), ToMeConfig(r=8, prop_attn=False)).eval()
    late_on = ToMeViT(copy.deepcopy(tiny_vit), ToMeConfig(r_per_layer=(0, 0, 0, 0, 0, 8), prop_attn=True)).eval()
    late_off = ToMeViT(copy.deepcopy(tiny_vit), ToMeConfig(r_per_layer=(0, 0, 0, 0, 0, 8), prop_attn=False)).eval()
    with torch.no_grad():
        assert not torch.allclose(on(x).logits, off(x).logits, atol=1e-4)
        # Merging only in the last block: no attention ever sees a size > 1.
        torch.testing.assert_close(late_on(x).logits, late_off(x).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- batch, training, re-entrancy


def test_token_count_and_result_do_not_depend_on_the_batch(tiny_vit, rng):
    model = ToMeViT(tiny_vit, ToMeConfig(r=10)).eval()
    x = _images(rng, batch=3)
    assert _block_lengths(model, x) == _block_lengths(model, x[:1]) == [65, 55, 45, 35, 25, 15]
    with torch.no_grad():
        together = model(x).logits
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_training_forward_merges_and_gradients_flow(tiny_vit, rng):
    method = get_method("tome")
    cfg = ToMeConfig(r=8)
    model = method.build_model(cfg, tiny_vit).train()
    x, y = _images(rng, batch=4), torch.randint(0, 10, (4,), generator=rng)
    assert _block_lengths(model, x) == [65, 57, 49, 41, 33, 25]  # merging is not an eval-only path
    out = model(x)
    with torch.no_grad():
        eval_logits = model.eval()(x).logits
    torch.testing.assert_close(out.logits, eval_logits, atol=1e-6, rtol=1e-6)  # no dropout: same forward
    loss = method.loss(out, y, cfg, F.cross_entropy)
    assert torch.isfinite(loss.total)
    torch.testing.assert_close(loss.total, F.cross_entropy(out.logits, y))
    loss.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"all-zero gradient in {name}"


def test_model_is_reentrant(tiny_vit, rng):
    """A forward started inside another forward (other batch, other length) leaves the outer one unchanged."""
    model = ToMeViT(tiny_vit, ToMeConfig(r=8)).eval()
    x, other = _images(rng, batch=2), _images(rng, batch=3)
    with torch.no_grad():
        expected = model(x).logits
        inner_expected = model(other).logits
    state, inner = {"depth": 0}, []

    def nested(module, args):
        if state["depth"] == 0:
            state["depth"] += 1
            inner.append(model(other).logits)
            state["depth"] -= 1

    handle = model.vit.blocks[3].norm1.register_forward_pre_hook(nested)
    try:
        with torch.no_grad():
            got = model(x).logits
    finally:
        handle.remove()
    assert len(inner) == 1
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(inner[0], inner_expected, atol=0, rtol=0)


# ---------------------------------------------------------------- schedule and config


@pytest.mark.parametrize(
    "depth, r, inflect, expected",
    [
        # ToMe's parse_r: linear from int(r (1 - inflect)) to 2r minus that, truncated; by hand.
        (12, 13, 0.0, [13] * 12),
        (12, 13, -1.0, [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]),  # floor(26 (11 - i) / 11)
        (12, 13, 1.0, [0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 26]),  # floor(26 i / 11)
        (4, 8, 0.5, [4, 6, 9, 12]),  # 4 + 8i/3
        (6, 7, -0.5, [10, 8, 7, 6, 5, 4]),  # int(10.5) = 10 down to 14 - 10 = 4, step -6/5
        (1, 5, -1.0, [10]),
    ],
)
def test_schedule_inflect(depth, r, inflect, expected):
    assert list(ToMeConfig(r=r, inflect=inflect).schedule(depth)) == expected


def test_r_per_layer_overrides_r_and_inflect():
    cfg = ToMeConfig(r=13, inflect=-1.0, r_per_layer=[3, 0, 2])
    assert cfg.r_per_layer == (3, 0, 2)
    assert cfg.schedule(3) == (3, 0, 2)
    assert cfg.tokens_per_block(17, 3) == [17, 14, 14, 12]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": -1}, "r"),
        ({"r": 1.5}, "r"),
        ({"r": True}, "r"),
        ({"r": "13"}, "r"),
        ({"inflect": 1.5}, "inflect"),
        ({"inflect": -2.0}, "inflect"),
        ({"inflect": float("nan")}, "inflect"),
        ({"r_per_layer": (1, -2)}, "r_per_layer"),
        ({"r_per_layer": (1.5,)}, "r_per_layer"),
        ({"prop_attn": "yes"}, "prop_attn"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ToMeConfig(**kwargs)


def test_r_per_layer_length_must_match_depth(tiny_vit):
    cfg = ToMeConfig(r_per_layer=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="r_per_layer"):
        cfg.validate_for(Geometry(6, 64, (8, 8), 96, 3))
    with pytest.raises(ValueError, match="r_per_layer"):
        ToMeViT(tiny_vit, cfg)
    ToMeConfig(r_per_layer=(1,) * 6).validate_for(Geometry(6, 64, (8, 8), 96, 3))
    ToMeConfig(r=100).validate_for(Geometry(6, 64, (8, 8), 96, 3))  # a large r is capped, not an error


def test_registered_method(tiny_vit):
    method = get_method("tome")
    assert isinstance(method, ToMeMethod) and method.config_cls is ToMeConfig
    assert method.needs_teacher is False and method.needs_pretrained is True
    assert ToMeConfig() == ToMeConfig(r=13, inflect=0.0, r_per_layer=(), prop_attn=True)
    model = method.build_model(ToMeConfig(), tiny_vit)
    assert isinstance(model, ToMeViT) and model.vit is tiny_vit
    assert {n for n, _ in model.named_parameters()} == {f"vit.{n}" for n, _ in tiny_vit.named_parameters()}
    assert isinstance(model(torch.zeros(1, 3, 32, 32)), MethodOutput)
