"""Evo-ViT against the invariants of the implementation reference (methods.md section 3(h)) and the paper.

Expectations are derived independently of ``methods/evovit.py``: class attention is recomputed from
each block's recorded input with the block's own qkv weights, the selection/representative/fast
update are replayed by hand, and the reference checkpoint layout is built by hand from a model's weights.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from methods import BackboneConfig, Geometry, MethodOutput, count_gflops, create_backbone, get_method
from methods.evovit import EvoViT, EvoViTConfig

NUM_PATCHES = 64
C = 96


def _model(vit, **overrides) -> EvoViT:
    return EvoViT(vit, EvoViTConfig(**{"prune_location": 2, **overrides}))


def _images(rng, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=rng)


class _Recorder:
    """Block inputs (``norm1`` pre-hook), inputs of the MLP branch (``norm2`` pre-hook) and block outputs.

    The model runs a block's submodules rather than ``Block.forward``, so a block's output is taken as
    ``norm2 input + mlp output`` (layer scale and drop path are identities in these models).
    """

    def __init__(self, model: EvoViT) -> None:
        self.x_in, self.mid, self.out, self.final = {}, {}, {}, None
        self.handles = []
        for i, blk in enumerate(model.vit.blocks):
            self.handles.append(blk.norm1.register_forward_pre_hook(lambda m, a, i=i: self.x_in.__setitem__(i, a[0].detach())))
            self.handles.append(blk.norm2.register_forward_pre_hook(lambda m, a, i=i: self.mid.__setitem__(i, a[0].detach())))
            assert isinstance(blk.ls2, torch.nn.Identity) and isinstance(blk.drop_path2, torch.nn.Identity)
            self.handles.append(blk.mlp.register_forward_hook(lambda m, a, o, i=i: self.out.__setitem__(i, self.mid[i] + o.detach())))
        self.handles.append(model.vit.norm.register_forward_pre_hook(self._final))

    def _final(self, module, args):
        if args[0].ndim == 3:  # the per-token norm (the mean-pool head norms a [B, C] vector)
            self.final = args[0].detach()

    def lengths(self) -> list[int]:
        return [self.x_in[i].shape[1] for i in sorted(self.x_in)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model, x) -> tuple[MethodOutput, _Recorder]:
    rec = _Recorder(model)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        rec.remove()
    return out, rec


def _cls_row(blk, x: torch.Tensor, npre: int, keys: int) -> torch.Tensor:
    """The CLS query's softmax attention over patch keys ``npre:npre+keys``, summed over heads (from scratch)."""
    h = blk.norm1(x)
    b, n, c = h.shape
    heads = blk.attn.num_heads
    d = c // heads
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
    q = qkv[:, 0, :c].reshape(b, heads, d)
    k = qkv[:, :, c : 2 * c].reshape(b, n, heads, d)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(d)
    return logits.softmax(-1)[:, :, npre : npre + keys].sum(1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[b, index[b]] for b in range(x.shape[0])])


# ---------------------------------------------------------------- token flow


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tokens_per_block_deit_geometry(rng, fast, mode):
    """DeiT geometry (196 patches, 12 blocks, paper defaults): 4 x 197, then 8 x (1 + 98 [+ 1])."""
    torch.manual_seed(0)
    vit = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", embed_dim=48, num_heads=3, num_classes=10))
    model = EvoViT(vit, EvoViTConfig(fast_update=fast)).train(mode == "train")
    assert model.stage_segments == ((4, 7), (8, 11))
    out, rec = _run(model, _images(rng, 2, 224))
    assert rec.lengths() == [197] * 4 + [1 + 98 + int(fast)] * 8
    assert out.aux["tokens"].shape == (2, 196, 48)  # all patches are back after the last stage
    assert rec.final.shape == (2, 196, 48)
    assert len(out.aux["global_attn"]) == 2 and out.aux["kept_index"].shape == (2, 98)


@pytest.mark.parametrize("fast", [True, False])
def test_selection_follows_independently_computed_global_attention(tiny_vit, rng, fast):
    """Replays g (layer 0 row, replace before prune_location, (1-t) g + t row for kept tokens after) and both selections."""
    t, keep, npre = 0.3, 32, 1  # t != 0.5: swapped weights would show
    model = _model(tiny_vit, tradeoff=t, fast_update=fast).eval()
    assert model.stage_segments == ((2, 3), (4, 5))
    out, rec = _run(model, _images(rng))
    blocks = model.vit.blocks
    assert rec.lengths() == [65, 65] + [1 + keep + int(fast)] * 4

    with torch.no_grad():
        g = _cls_row(blocks[0], rec.x_in[0], npre, NUM_PATCHES)
        g = _cls_row(blocks[1], rec.x_in[1], npre, NUM_PATCHES)  # tradeoff 1 before prune_location: replaced
        rank = g.argsort(dim=1, descending=True)
        g = _take(g, rank)
        patches = _take(rec.out[1][:, 1:], rank)
        kept, held = patches[:, :keep], patches[:, keep:]
        torch.testing.assert_close(rec.x_in[2][:, 1 : 1 + keep], kept, rtol=0, atol=0)
        torch.testing.assert_close(rec.x_in[2][:, 0], rec.out[1][:, 0], rtol=0, atol=0)  # CLS passes unchanged
        torch.testing.assert_close(out.aux["global_attn"][0], g, rtol=1e-5, atol=1e-7)
        if fast:
            w = g[:, keep:] / g[:, keep:].sum(1, keepdim=True)
            torch.testing.assert_close(rec.x_in[2][:, -1], (w[..., None] * held).sum(1), rtol=1e-5, atol=1e-6)

        for i in (2, 3):  # kept tokens update their g, placeholders keep theirs
            g = torch.cat([(1 - t) * g[:, :keep] + t * _cls_row(blocks[i], rec.x_in[i], npre, keep), g[:, keep:]], 1)
        if fast:  # the representative's residual increments of all four branches
            delta = sum((rec.mid[i] - rec.x_in[i])[:, -1:] + (rec.out[i] - rec.mid[i])[:, -1:] for i in (2, 3))
            held = held + delta
        seq = torch.cat([rec.out[3][:, 1 : 1 + keep], held], 1)
        rank2 = g.argsort(dim=1, descending=True)
        torch.testing.assert_close(rec.x_in[4][:, 1 : 1 + keep], _take(seq, rank2)[:, :keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.aux["global_attn"][1], _take(g, rank2), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.aux["kept_index"], _take(rank, rank2)[:, :keep], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_global_attention_non_increasing_after_each_selection(tiny_vit, rng, mode):
    model = _model(tiny_vit).train(mode == "train")
    out = model(_images(rng, 3))
    assert len(out.aux["global_attn"]) == 2
    for g in out.aux["global_attn"]:
        assert g.shape == (3, NUM_PATCHES)
        assert (g[:, 1:] <= g[:, :-1]).all()


@pytest.mark.parametrize("fast", [True, False])
def test_placeholders_skip_or_get_the_representative_increments(tiny_vit, rng, fast):
    """One stage over blocks 2-5: placeholders come out bit-identical (DeiT code) or + the representative's increments."""
    keep = 32
    model = _model(tiny_vit, stage_starts=(2,), fast_update=fast).eval()
    assert model.stage_segments == ((2, 5),)
    out, rec = _run(model, _images(rng))
    held_index = torch.stack([torch.tensor([j for j in range(NUM_PATCHES) if j not in set(k.tolist())]) for k in out.aux["kept_index"]])
    with torch.no_grad():
        g = _cls_row(model.vit.blocks[1], rec.x_in[1], 1, NUM_PATCHES)
        rank = g.argsort(dim=1, descending=True)
        held = _take(rec.out[1][:, 1:], rank[:, keep:])  # in rank order
        final = _take(rec.final, rank[:, keep:])  # the same patches at the end, pre-norm
    assert torch.equal(rank[:, keep:].sort(1).values, held_index)
    if not fast:
        assert torch.equal(final, held)  # bit-identical
        return
    delta = sum((rec.mid[i] - rec.x_in[i])[:, -1:] + (rec.out[i] - rec.mid[i])[:, -1:] for i in range(2, 6))
    assert delta.abs().max() > 1e-2  # the update is not a no-op
    torch.testing.assert_close(final, held + delta, rtol=1e-5, atol=1e-5)
    # The kept tokens come back where they came from: the final sequence in spatial order.
    kept = _take(rec.final, out.aux["kept_index"])
    torch.testing.assert_close(kept, rec.out[5][:, 1 : 1 + keep], rtol=0, atol=0)


def test_representative_token_is_the_g_weighted_mean_brute_force(tiny_vit, rng):
    model = _model(tiny_vit, tradeoff=0.7).eval()
    out, rec = _run(model, _images(rng, 3))
    keep = 32
    with torch.no_grad():
        g = _cls_row(model.vit.blocks[1], rec.x_in[1], 1, NUM_PATCHES)
        for b in range(3):
            order = sorted(range(NUM_PATCHES), key=lambda j: -float(g[b, j]))
            held = order[keep:]
            total = sum(float(g[b, j]) for j in held)
            rep = sum(float(g[b, j]) / total * rec.out[1][b, 1 + j].double() for j in held)
            torch.testing.assert_close(rec.x_in[2][b, -1].double(), rep, rtol=1e-5, atol=1e-6)


def test_token_counts_and_logits_do_not_depend_on_the_batch(tiny_vit, rng):
    model = _model(tiny_vit).eval()
    x = _images(rng, 4)
    out, rec = _run(model, x)
    for b in range(4):
        one, rec1 = _run(model, x[b : b + 1])
        assert rec1.lengths() == rec.lengths()
        torch.testing.assert_close(one.logits, out.logits[b : b + 1], rtol=1e-5, atol=1e-5)
        assert torch.equal(one.aux["kept_index"], out.aux["kept_index"][b : b + 1])


def test_training_really_drops_and_equals_eval_without_dropout(tiny_vit, rng):
    model = _model(tiny_vit)
    x = _images(rng, 3)
    train, rec_train = _run(model.train(), x)
    ev, rec_eval = _run(model.eval(), x)
    assert rec_train.lengths() == rec_eval.lengths() == [65, 65] + [34] * 4
    torch.testing.assert_close(train.logits, ev.logits, rtol=1e-5, atol=1e-5)
    assert "cls_logits" in train.aux and "cls_logits" not in ev.aux


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("fast", [True, False])
def test_keep_ratio_one_equals_dense_vit_with_mean_pool_head(tiny_vit, rng, fast):
    dense = copy.deepcopy(tiny_vit).eval()
    model = _model(tiny_vit, prune_ratio=1.0, fast_update=fast).eval()
    x = _images(rng, 3)
    out, rec = _run(model, x)
    assert rec.lengths() == [65] * 6  # no representative without placeholders
    with torch.no_grad():
        feats = dense.blocks(dense.norm_pre(dense._pos_embed(dense.patch_embed(x))))
        expected = dense.head(dense.norm(feats[:, 1:].mean(1)))
        tokens = dense.norm(feats)[:, 1:]
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux["tokens"], tokens, rtol=1e-5, atol=1e-5)  # spatial order restored


def test_cls_eval_head_with_keep_ratio_one_is_plain_timm_also_distilled(make_tiny_vit, rng):
    for name in ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"):
        vit = make_tiny_vit(0, name=name)
        plain = copy.deepcopy(vit).eval()
        model = _model(vit, prune_ratio=1.0, eval_head="cls").eval()
        x = _images(rng)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, plain(x), rtol=1e-5, atol=1e-5)


def test_training_heads_shapes_loss_and_gradients(tiny_vit, rng):
    model = _model(tiny_vit).train()
    x, y = _images(rng, 4), torch.randint(0, 10, (4,), generator=rng)
    out = model(x)
    assert out.logits.shape == out.aux["cls_logits"].shape == (4, 10)
    assert "dist_logits" not in out.aux
    # head_cls/norm_cls start as the dense head/norm: the CLS head is timm's output at first.
    plain = copy.deepcopy(tiny_vit).eval()
    assert torch.equal(model.head_cls.weight, plain.head.weight) and model.head_cls is not model.vit.head
    loss = get_method("evovit").loss(out, y, model.cfg, F.cross_entropy)
    expected = 0.5 * F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(out.aux["cls_logits"], y)
    torch.testing.assert_close(loss.total, expected)
    assert set(loss.terms) == {"task_loss", "mean_head_loss", "cls_head_loss"}
    loss.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("head_cls.weight", "norm_cls.weight", "vit.head.weight", "vit.norm.weight", "vit.blocks.5.mlp.fc2.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_loss_refuses_an_eval_output(tiny_vit, rng):
    model = _model(tiny_vit).eval()
    with torch.no_grad():
        out = model(_images(rng))
    with pytest.raises(ValueError, match="cls_logits"):
        get_method("evovit").loss(out, torch.tensor([0, 1]), model.cfg, F.cross_entropy)


# ---------------------------------------------------------------- distillation


def _kd_soft(student, teacher, tau):
    """DeiT's soft distillation written out: sum p_t (log p_t - log p_s) at temperature tau, * tau^2 / numel."""
    p_t = (teacher / tau).softmax(1)
    return (p_t * (p_t.log() - (student / tau).log_softmax(1))).sum() * tau * tau / student.numel()


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distilled_backbone_teacher_loss_by_hand(make_tiny_vit, rng, kind):
    vit = make_tiny_vit(0, name="deit_tiny_distilled_patch16_224")
    assert Geometry.of(vit).num_prefix_tokens == 2
    method = get_method("evovit")
    cfg = EvoViTConfig(prune_location=2, distill_type=kind, distill_alpha=0.3, distill_tau=2.0)
    assert method.uses_teacher(cfg) and not method.uses_teacher(EvoViTConfig())
    model = EvoViT(vit, cfg).train()
    x, y = _images(rng, 4), torch.randint(0, 10, (4,), generator=rng)
    out, rec = _run(model, x)
    assert rec.lengths() == [66, 66] + [2 + 32 + 1] * 4  # CLS and distillation token are never pruned
    dist = out.aux["dist_logits"]
    assert dist.shape == out.aux["cls_logits"].shape == (4, 10)
    teacher = MethodOutput(torch.randn(4, 10, generator=rng))
    loss = method.loss(out, y, cfg, F.cross_entropy, teacher=teacher)
    base = 0.5 * F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(out.aux["cls_logits"], y)
    kd = _kd_soft(dist, teacher.logits, 2.0) if kind == "soft" else F.cross_entropy(dist, teacher.logits.argmax(1))
    torch.testing.assert_close(loss.terms["distill_loss"], kd)
    torch.testing.assert_close(loss.total, 0.7 * base + 0.3 * kd)
    with pytest.raises(ValueError, match="teacher"):
        method.loss(out, y, cfg, F.cross_entropy)


def test_distillation_without_dist_token_uses_the_mean_head(tiny_vit, rng):
    method = get_method("evovit")
    cfg = EvoViTConfig(prune_location=2, distill_type="soft", distill_alpha=0.5, distill_tau=1.0)
    out = MethodOutput(torch.randn(3, 10, generator=rng), {"cls_logits": torch.randn(3, 10, generator=rng)})
    teacher = MethodOutput(torch.randn(3, 10, generator=rng))
    y = torch.tensor([1, 2, 3])
    loss = method.loss(out, y, cfg, F.cross_entropy, teacher=teacher)
    base = 0.5 * F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(out.aux["cls_logits"], y)
    torch.testing.assert_close(loss.total, 0.5 * base + 0.5 * _kd_soft(out.logits, teacher.logits, 1.0))


def test_distilled_backbone_without_distillation_trains_both_prefix_heads(make_tiny_vit, rng):
    vit = make_tiny_vit(0, name="deit_tiny_distilled_patch16_224")
    cfg = EvoViTConfig(prune_location=2)
    model = EvoViT(vit, cfg).train()
    x, y = _images(rng, 4), torch.randint(0, 10, (4,), generator=rng)
    out = model(x)
    loss = get_method("evovit").loss(out, y, cfg, F.cross_entropy, teacher=MethodOutput(torch.randn(4, 10)))
    prefix = (out.aux["cls_logits"] + out.aux["dist_logits"]) / 2
    torch.testing.assert_close(loss.total, 0.5 * F.cross_entropy(out.logits, y) + 0.5 * F.cross_entropy(prefix, y))
    loss.total.backward()
    assert all(p.grad is not None for p in model.parameters())  # head_dist too: no unused parameter under DDP


# ---------------------------------------------------------------- layer-wise mode


def test_layerwise_epochs_train_layerwise_eval_stagewise_and_resume(tiny_vit, rng, make_tiny_vit):
    method = get_method("evovit")
    cfg = EvoViTConfig(prune_location=2, layerwise_epochs=2)
    model = method.build_model(cfg, tiny_vit)
    hooks = method.hooks(model, cfg)
    x = _images(rng)

    train, rec = _run(model.train(), x)
    assert len(train.aux["global_attn"]) == 4  # a selection before every block from 2
    assert rec.lengths() == [65, 65] + [34] * 4
    assert len(_run(model.eval(), x)[0].aux["global_attn"]) == 2  # evaluation is always stage-wise

    hooks.on_epoch_end(0)
    assert len(_run(model.train(), x)[0].aux["global_attn"]) == 4
    hooks.on_epoch_end(1)
    assert len(_run(model.train(), x)[0].aux["global_attn"]) == 2

    resumed = method.build_model(cfg, make_tiny_vit(1))
    resumed.load_state_dict(model.state_dict())
    assert len(_run(resumed.train(), x)[0].aux["global_attn"]) == 2  # the epoch counter is in the state dict
    assert "layerwise._extra_state" not in EvoViT(make_tiny_vit(0), EvoViTConfig(prune_location=2)).state_dict()


# ---------------------------------------------------------------- reference checkpoint layout


def _reference_layout(model: EvoViT) -> dict[str, torch.Tensor]:
    """The authors' EvoVisionTransformer state dict, written by hand from ``model``'s weights."""
    vit, c = model.vit, model.vit.embed_dim
    ref = {
        "cls_token": vit.cls_token, "pos_embed": vit.pos_embed,
        "patch_embed.proj.weight": vit.patch_embed.proj.weight, "patch_embed.proj.bias": vit.patch_embed.proj.bias,
        "norm.weight": vit.norm.weight, "norm.bias": vit.norm.bias,
        "head.weight": vit.head.weight, "head.bias": vit.head.bias,
        "head_cls.weight": model.head_cls.weight, "head_cls.bias": model.head_cls.bias,
        "norm_cls.weight": model.norm_cls.weight, "norm_cls.bias": model.norm_cls.bias,
    }
    for i, blk in enumerate(vit.blocks):
        for part in ("weight", "bias"):
            ref[f"norms.{i}.{part}"] = blk.norm1.state_dict()[part]
            ref[f"qks.{i}.qk.{part}"] = blk.attn.qkv.state_dict()[part][: 2 * c]
            ref[f"vs.{i}.v.{part}"] = blk.attn.qkv.state_dict()[part][2 * c :]
            ref[f"projs.{i}.{part}"] = blk.attn.proj.state_dict()[part]
            ref[f"blocks.{i}.norm2.{part}"] = blk.norm2.state_dict()[part]
            ref[f"blocks.{i}.mlp.fc1.{part}"] = blk.mlp.fc1.state_dict()[part]
            ref[f"blocks.{i}.mlp.fc2.{part}"] = blk.mlp.fc2.state_dict()[part]
    return {k: v.detach().clone() for k, v in ref.items()}


def test_reference_checkpoint_round_trip_gives_identical_logits(make_tiny_vit, rng):
    method = get_method("evovit")
    cfg = EvoViTConfig(prune_location=2)
    source = EvoViT(make_tiny_vit(0), cfg)
    with torch.no_grad():  # the CLS head differs from the mean head in a trained model
        source.head_cls.weight.add_(0.1 * torch.randn(source.head_cls.weight.shape, generator=rng))
    target = EvoViT(make_tiny_vit(1), cfg)
    converted = method.convert_reference_state(_reference_layout(source), cfg)
    assert set(converted) == set(target.state_dict())
    target.load_state_dict(converted)
    x = _images(rng, 3)
    with torch.no_grad():
        assert torch.equal(source.eval()(x).logits, target.eval()(x).logits)
        a, b = source.train()(x), target.train()(x)
    assert torch.equal(a.aux["cls_logits"], b.aux["cls_logits"])


def test_reference_keys_the_map_does_not_know_stay_visible(tiny_vit):
    method = get_method("evovit")
    cfg = EvoViTConfig(prune_location=2)
    ref = _reference_layout(EvoViT(tiny_vit, cfg))
    ref["mystery.weight"] = torch.zeros(3)
    del ref["vs.0.v.weight"]  # a qk without its v cannot become a qkv
    converted = method.convert_reference_state(ref, cfg)
    assert converted["mystery.weight"] is ref["mystery.weight"]
    assert "qks.0.qk.weight" in converted and "vit.blocks.0.attn.qkv.weight" not in converted
    assert "vit.blocks.0.attn.qkv.bias" in converted  # the bias pair is complete
    fresh = EvoViT(copy.deepcopy(tiny_vit), cfg)
    with pytest.raises(RuntimeError, match="qks.0.qk.weight"):
        fresh.load_state_dict(converted)


# ---------------------------------------------------------------- config and FLOPs


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prune_ratio": 0.0}, "prune_ratio"),
        ({"prune_ratio": 1.5}, "prune_ratio"),
        ({"prune_location": 0}, "prune_location"),
        ({"stage_starts": (3, 8)}, "stage_starts"),
        ({"stage_starts": (4, 4)}, "stage_starts"),
        ({"tradeoff": 1.5}, "tradeoff"),
        ({"tradeoff": -0.1}, "tradeoff"),
        ({"eval_head": "avg"}, "eval_head"),
        ({"layerwise_epochs": -1}, "layerwise_epochs"),
        ({"distill_type": "kl"}, "distill_type"),
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"distill_tau": 0.0}, "distill_tau"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvoViTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"prune_location": 6}, "prune_location"), ({"prune_location": 2, "stage_starts": (2, 6)}, "stage_starts"),
     ({"prune_location": 2, "prune_ratio": 0.01}, "prune_ratio")],
)
def test_validate_for_names_the_value_that_cannot_apply(tiny_vit, kwargs, field):
    cfg = EvoViTConfig(**kwargs)
    with pytest.raises(ValueError, match=field):
        cfg.validate_for(Geometry(6, 64, (8, 8), 96, 3))
    with pytest.raises(ValueError, match=field):
        EvoViT(tiny_vit, cfg)


def test_stage_schedule_defaults():
    assert EvoViTConfig().stages(12) == (4, 8)
    assert EvoViTConfig(prune_location=2).stages(6) == (2, 4)
    assert EvoViTConfig(prune_location=3).stages(4) == (3,)
    assert EvoViTConfig(prune_location=1, stage_starts=(1, 2, 3)).stages(4) == (1, 2, 3)
    assert EvoViTConfig().tradeoffs(12) == [1.0] * 4 + [0.5] * 8
    EvoViTConfig(prune_location=5).validate_for(Geometry(6, 64, (8, 8), 96, 3))  # the last block may start a stage


def test_eval_gflops_follow_the_token_counts(make_tiny_vit):
    """Halving the patches after block 2 of 6 cuts FLOPs to between 1/2 and 2/3 + a little of dense."""
    vit = make_tiny_vit(0)
    dense = count_gflops(copy.deepcopy(vit), (3, 32, 32))
    fast = count_gflops(_model(copy.deepcopy(vit)), (3, 32, 32))
    slow = count_gflops(_model(copy.deepcopy(vit), fast_update=False), (3, 32, 32))
    assert 0.5 * dense < slow < fast < 0.7 * dense
