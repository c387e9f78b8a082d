"""DynamicViT against the invariants of the implementation reference (methods.md section 1(g), 1(h))."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import methods.dynamicvit as dyn
from methods import BackboneConfig, Geometry, MethodOutput, create_backbone, get_method
from methods._common import gather_tokens, merge_heads, policy_attention, qkv_heads
from timm.models.vision_transformer import Attention
from methods.dynamicvit import DynamicViT, DynamicViTConfig

LOC = (1, 3, 5)
NUM_PATCHES = 64
EPS = 1e-6


def _model(vit, **overrides) -> DynamicViT:
    return DynamicViT(vit, DynamicViTConfig(**{"pruning_loc": LOC, **overrides}))


def _expected_counts(n: int, rho: float, stages: int) -> list[int]:
    return [int(n * rho ** (k + 1)) for k in range(stages)]  # the spec's floor, same float expression


def _record_blocks(model: DynamicViT):
    """Hooks that record each block's input and output tokens; returns (inputs, outputs, handles)."""
    inputs, outputs, handles = {}, {}, []
    for i, blk in enumerate(model.vit.blocks):
        # norm1 sees each block's input whether the block runs as timm's forward or through block_forward
        handles.append(blk.norm1.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())))
        handles.append(blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach())))
    return inputs, outputs, handles


class _FunctionalWith:
    """``torch.nn.functional`` with ``gumbel_softmax`` replaced (patched into ``methods.dynamicvit``)."""

    def __init__(self, gumbel_softmax):
        self.gumbel_softmax = gumbel_softmax

    def __getattr__(self, name):
        return getattr(F, name)


# ---------------------------------------------------------------- keep counts and eval token flow


@pytest.mark.parametrize("rho", [0.9, 0.8, 0.7, 0.5, 0.25])
def test_keep_counts_floor(tiny_vit, rho):
    assert _model(tiny_vit, keep_ratio=rho).keep_counts == _expected_counts(NUM_PATCHES, rho, 3)


def test_keep_counts_deit_geometry_is_137_96_67():
    vit = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", img_size=224, patch_size=16, depth=12))
    assert vit.patch_embed.num_patches == 196
    model = DynamicViT(vit, DynamicViTConfig(keep_ratio=0.7, pruning_loc=(3, 6, 9)))
    assert model.keep_counts == [137, 96, 67]  # floor, not ceil's 138/97/68 (pitfall 1)


def test_keep_ratio_too_small_to_keep_a_token_raises(tiny_vit):
    with pytest.raises(ValueError, match="keep_ratio"):
        _model(tiny_vit, keep_ratio=0.2)  # int(64 * 0.2**3) == 0


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_eval_tokens_per_block_and_gather_in_score_order(tiny_vit, rng, rho):
    model = _model(tiny_vit, keep_ratio=rho).eval()
    counts = _expected_counts(NUM_PATCHES, rho, 3)
    inputs, outputs, handles = _record_blocks(model)
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()

    expected_len, stage = [], 0
    for i in range(len(model.vit.blocks)):
        if stage < len(LOC) and i == LOC[stage]:
            stage += 1
        expected_len.append(1 + (NUM_PATCHES if stage == 0 else counts[stage - 1]))
    assert [inputs[i].shape[1] for i in range(6)] == expected_len  # 65 | 45 45 | 32 32 | 22 for rho=.7
    assert out.aux["tokens"].shape == (2, counts[-1], 96)

    with torch.no_grad():
        for k, loc in enumerate(LOC):
            prev = outputs[loc - 1]
            # CLS stays first and passes through the pruning step unchanged.
            torch.testing.assert_close(inputs[loc][:, 0], prev[:, 0], rtol=0, atol=0)
            # The kept patches are the top-K by the predictor's keep score, in score order.
            patches = prev[:, 1:]
            logp = model.predictors[k](patches, patches.new_ones(*patches.shape[:2], 1))
            order = logp[..., 0].argsort(dim=1, descending=True)[:, : counts[k]]
            torch.testing.assert_close(inputs[loc][:, 1:], gather_tokens(patches, order), rtol=0, atol=0)


# ---------------------------------------------------------------- training path


def test_train_decisions_binary_nested_and_full_length_sequence(tiny_vit, rng):
    model = _model(tiny_vit).train()
    inputs, _, handles = _record_blocks(model)
    out = model(torch.randn(4, 3, 32, 32, generator=rng))
    for h in handles:
        h.remove()

    assert [inputs[i].shape[1] for i in range(6)] == [1 + NUM_PATCHES] * 6
    d = out.aux["decisions"]
    assert len(d) == len(LOC)
    for dk in d:
        assert dk.shape == (4, NUM_PATCHES)
        assert set(dk.detach().unique().tolist()) <= {0.0, 1.0}
    assert (d[1] <= d[0]).all() and (d[2] <= d[1]).all()
    assert torch.equal(out.aux["final_mask"], d[-1].detach())
    assert out.aux["tokens"].shape == (4, NUM_PATCHES, 96)
    stats = get_method("dynamicvit").stats(model, out)
    assert stats == {f"keep_ratio_stage{k + 1}": pytest.approx(float(d[k].detach().mean())) for k in range(3)}


def test_train_mask_hides_dropped_tokens_from_kept_ones(tiny_vit, rng, monkeypatch):
    """After the first pruning step, changing a dropped token must not change the logits (beyond eps leakage)."""
    model = _model(tiny_vit).train()
    x = torch.randn(2, 3, 32, 32, generator=rng)
    first = model(x)
    kept = first.aux["decisions"][0]
    j = int((kept[0] == 0).nonzero()[0])  # a patch sample 0 drops at the first stage
    i = int(kept[0].nonzero()[0])  # a patch sample 0 keeps throughout stage 1
    noise = 3.0 * torch.randn(96, generator=rng)

    # Replay the same decisions, and perturb patch j (or i) in the tokens that enter the first pruned block.
    def rerun(patch: int) -> MethodOutput:
        decisions = iter([torch.stack([d, 1 - d], -1) for d in first.aux["decisions"]])
        monkeypatch.setattr(dyn, "F", _FunctionalWith(lambda logits, **kw: next(decisions).to(logits)))

        def perturb(module, args, out):
            out = out.clone()
            out[0, 1 + patch] += noise  # not a constant shift, which LayerNorm would remove
            return out

        handle = model.vit.blocks[LOC[0] - 1].register_forward_hook(perturb)
        try:
            return model(x)
        finally:
            handle.remove()

    dropped = rerun(j)
    torch.testing.assert_close(dropped.logits, first.logits, atol=1e-4, rtol=0)
    assert not torch.allclose(dropped.aux["tokens"][0, j], first.aux["tokens"][0, j], atol=1e-2)
    # The same perturbation on a kept patch does change the logits: the check above can fail.
    assert not torch.allclose(rerun(i).logits[0], first.logits[0], atol=1e-3)


# ---------------------------------------------------------------- the policy attention


def _allowed(policy: torch.Tensor) -> torch.Tensor:
    """[B, N, N] bool: key j visible to query i iff policy_j or i == j."""
    n = policy.shape[1]
    return (policy[:, None, :] > 0.5) | torch.eye(n, dtype=torch.bool)


def _policy(rng, b: int, n: int) -> torch.Tensor:
    policy = (torch.rand(b, n, generator=rng) > 0.5).float()
    policy[:, 0] = 1.0  # CLS
    return policy


def _attention(dim: int = 16, heads: int = 2, qk_scale: float = 1.0, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, qkv_bias=True).eval()
    with torch.no_grad():  # scale q and k so the logits span a chosen range
        attn.qkv.weight[: 2 * dim] *= qk_scale
    return attn


def _attention_weights(attn: Attention, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """The attention map policy_attention applies, read off by running it with v = identity rows."""
    n = x.shape[1]
    probe = Attention(attn.qkv.in_features, num_heads=attn.num_heads, qkv_bias=True).eval()
    probe.load_state_dict(attn.state_dict())
    captured = {}
    original = torch.Tensor.__matmul__

    def spy(a, b):
        if a.dim() == 4 and a.shape[-1] == n and a.shape[-2] == n and not captured:
            captured["w"] = a.detach().clone()
        return original(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        policy_attention(probe, x, policy)
    finally:
        torch.Tensor.__matmul__ = original
    return captured["w"]


def _brute_force_attention(attn: Attention, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Each sample and query separately, over its visible keys only (a gather, in float64)."""
    b, n, c = x.shape
    h, d = attn.num_heads, c // attn.num_heads
    qkv = attn.qkv(x).double().reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    allowed = _allowed(policy)
    for s in range(b):
        for i in range(n):
            keys = allowed[s, i].nonzero().squeeze(1)
            logits = (q[s, :, i:i + 1] @ k[s][:, keys].transpose(-2, -1)) * d ** -0.5
            out[s, :, i] = (logits.softmax(-1) @ v[s][:, keys]).squeeze(1)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c).float())


@pytest.mark.parametrize("qk_scale", [1.0, 12.0])  # logits within a few units, and spanning ~75
def test_policy_attention_equals_attention_over_the_visible_keys(rng, qk_scale):
    attn = _attention(qk_scale=qk_scale)
    x = torch.randn(3, 12, 16, generator=rng)
    policy = _policy(rng, 3, 12)
    with torch.no_grad():
        q, k, _ = qkv_heads(attn, x)
        span = ((q @ k.transpose(-2, -1)) * attn.scale).amax() - ((q @ k.transpose(-2, -1)) * attn.scale).amin()
        got = policy_attention(attn, x, policy)
        expected = _brute_force_attention(attn, x, policy)
    assert span > (60 if qk_scale > 1 else 0)  # the large case really has large logit gaps
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_policy_attention_gives_dropped_keys_exactly_zero_weight(rng):
    attn = _attention(qk_scale=12.0)
    x = torch.randn(2, 10, 16, generator=rng)
    policy = _policy(rng, 2, 10)
    with torch.no_grad():
        w = _attention_weights(attn, x, policy)
    allowed = _allowed(policy)[:, None].expand_as(w)
    assert (w[~allowed] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))  # no empty rows: every token sees itself


def test_policy_attention_with_all_ones_is_timm_attention(rng):
    attn = _attention()
    x = torch.randn(2, 10, 16, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(policy_attention(attn, x, torch.ones(2, 10)), attn(x), atol=1e-5, rtol=1e-5)


def test_policy_attention_with_every_patch_dropped_is_finite(rng):
    attn = _attention(qk_scale=12.0)
    policy = torch.zeros(2, 8)
    policy[:, 0] = 1.0
    with torch.no_grad():
        out = policy_attention(attn, torch.randn(2, 8, 16, generator=rng), policy)
    assert torch.isfinite(out).all()


def _softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The reference's ``Attention.softmax_with_policy`` (methods.md 1(a)), written from the spec."""
    b, n = policy.shape
    p = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=p.dtype).view(1, 1, n, n)
    p = p + (1.0 - p) * eye
    e = (logits - logits.max(dim=-1, keepdim=True)[0]).float().exp() * p.float()
    return ((e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)).type_as(logits)


def test_policy_gradient_matches_the_reference_softmax_with_policy(rng):
    """At ordinary logit ranges the reference's eps is negligible: outputs and the policy's
    gradient (the multiplicative form's, reaching dropped tokens too) must agree."""
    attn = _attention(dim=24, heads=3)
    x = torch.randn(2, 10, 24, generator=rng)
    upstream = torch.randn(2, 10, 24, generator=rng)
    hard = _policy(rng, 2, 10)

    def reference(p):
        q, k, v = qkv_heads(attn, x)
        w = _softmax_with_policy((q @ k.transpose(-2, -1)) * attn.scale, p)
        return merge_heads(attn, w @ v)

    def grads(attend):
        policy = hard.clone().requires_grad_(True)
        out = attend(policy)
        (g_policy,) = torch.autograd.grad((out * upstream).sum(), policy)
        return out.detach(), g_policy

    ours_out, ours_g = grads(lambda p: policy_attention(attn, x, p))
    ref_out, ref_g = grads(reference)
    torch.testing.assert_close(ours_out, ref_out, atol=5e-5, rtol=1e-4)
    assert ref_g.abs().max() > 1e-2  # the check below is not vacuous
    assert (ref_g[hard == 0] != 0).any()  # dropped tokens get a gradient too (straight-through)
    torch.testing.assert_close(ours_g, ref_g, atol=1e-4, rtol=1e-3)


def test_reference_eps_form_leaks_at_large_logits_and_ours_does_not(rng):
    """The reason for the exact form: with logits spanning ~75 the eps form puts visible weight on a
    dropped key whose logit dominates; ours matches the forward that really removes it."""
    attn = _attention(qk_scale=12.0)
    x = torch.randn(2, 12, 16, generator=rng)
    policy = _policy(rng, 2, 12)
    with torch.no_grad():
        q, k, v = qkv_heads(attn, x)
        leaky = merge_heads(attn, _softmax_with_policy((q @ k.transpose(-2, -1)) * attn.scale, policy) @ v)
        exact = _brute_force_attention(attn, x, policy)
        ours = policy_attention(attn, x, policy)
    assert (leaky - exact).abs().max() > 1e-2
    torch.testing.assert_close(ours, exact, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- gather equivalence


class _TopKInsteadOfGumbel:
    """Deterministic stand-in for the hard Gumbel-softmax: keep the top ``K_k`` among the still-kept tokens."""

    def __init__(self, counts: list[int]) -> None:
        self.counts, self.calls, self.prev = counts, 0, None

    def __call__(self, logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1) -> torch.Tensor:
        assert hard and dim == -1 and logits.shape[-1] == 2
        stage = self.calls % len(self.counts)
        score = logits[..., 0].detach()
        if stage > 0:  # nested: only tokens kept at the previous stage may stay
            score = score.masked_fill(self.prev == 0, float("-inf"))
        index = score.topk(self.counts[stage], dim=1).indices
        keep = torch.zeros_like(score).scatter(1, index, 1.0)
        self.prev, self.calls = keep, self.calls + 1
        return torch.stack([keep, 1.0 - keep], dim=-1)


@pytest.mark.parametrize("rho", [0.7, 0.5])
def test_masked_training_forward_equals_gather_forward_with_topk(tiny_vit, rng, monkeypatch, rho):
    model = _model(tiny_vit, keep_ratio=rho)
    assert all(getattr(m, "p", 0.0) == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    topk = _TopKInsteadOfGumbel(model.keep_counts)
    monkeypatch.setattr(dyn, "F", _FunctionalWith(topk))
    x = torch.randn(4, 3, 32, 32, generator=rng)
    with torch.no_grad():
        masked = model.train()(x)
        gathered = model.eval()(x)
    assert topk.calls == len(LOC)
    assert [d.sum(1).tolist() for d in masked.aux["decisions"]] == [[float(c)] * 4 for c in model.keep_counts]
    torch.testing.assert_close(masked.logits, gathered.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- loss


def _ce(logits, target):
    return F.cross_entropy(logits, target)


def _hand_output(decisions: list[torch.Tensor], logits: torch.Tensor, tokens=None) -> MethodOutput:
    b, n = decisions[0].shape
    tokens = torch.zeros(b, n, 4) if tokens is None else tokens
    return MethodOutput(logits, {"decisions": decisions, "tokens": tokens, "final_mask": decisions[-1]})


def _decisions_with_counts(b: int, counts: list[int], n: int = NUM_PATCHES) -> list[torch.Tensor]:
    out = []
    for c in counts:
        d = torch.zeros(b, n)
        d[:, :c] = 1.0  # nested by construction
        out.append(d)
    return out


NO_DISTILL = {"distill_weight": 0.0, "token_distill_weight": 0.0}


@pytest.mark.parametrize("rho", [0.5, 0.75])
def test_ratio_loss_is_zero_when_mean_decisions_equal_rho_k(rho, rng):
    counts = [round(NUM_PATCHES * rho ** (k + 1)) for k in range(3)]
    assert [c / NUM_PATCHES for c in counts] == [rho ** (k + 1) for k in range(3)]  # exact in binary
    cfg = DynamicViTConfig(keep_ratio=rho, pruning_loc=LOC, **NO_DISTILL)
    logits, target = torch.randn(3, 10, generator=rng), torch.tensor([0, 4, 9])
    loss = get_method("dynamicvit").loss(_hand_output(_decisions_with_counts(3, counts), logits), target, cfg, _ce)
    assert loss.terms["ratio_loss"] == 0.0
    torch.testing.assert_close(loss.total, F.cross_entropy(logits, target))
    assert "distill_kl" not in loss.terms and "token_mse" not in loss.terms


def test_ratio_loss_value_and_per_image_mean(rng):
    rho = 0.5
    cfg = DynamicViTConfig(keep_ratio=rho, pruning_loc=LOC, ratio_weight=2.0, **NO_DISTILL)
    logits, target = torch.randn(2, 10, generator=rng), torch.tensor([1, 2])
    method = get_method("dynamicvit")

    all_kept = _hand_output(_decisions_with_counts(2, [NUM_PATCHES] * 3), logits)
    expected = sum((1 - rho ** (k + 1)) ** 2 for k in range(3)) / 3
    loss = method.loss(all_kept, target, cfg, _ce)
    assert loss.terms["ratio_loss"].item() == pytest.approx(expected)
    torch.testing.assert_close(loss.total, F.cross_entropy(logits, target) + 2.0 * torch.tensor(expected))

    # One image keeps everything, the other nothing: the batch mean matches rho but each image misses it.
    half = [torch.stack([torch.ones(NUM_PATCHES), torch.zeros(NUM_PATCHES)])] * 3
    per_image = sum(0.5 * ((1 - rho ** (k + 1)) ** 2 + (rho ** (k + 1)) ** 2) for k in range(3)) / 3
    assert method.loss(_hand_output(half, logits), target, cfg, _ce).terms["ratio_loss"].item() == pytest.approx(per_image)


def test_distillation_terms(rng):
    method = get_method("dynamicvit")
    cfg = DynamicViTConfig(keep_ratio=0.5, pruning_loc=LOC, ratio_weight=0.0, distill_weight=0.5, token_distill_weight=0.25)
    target = torch.tensor([3, 7])
    decisions = _decisions_with_counts(2, [32, 16, 8])
    student = _hand_output(decisions, torch.randn(2, 10, generator=rng), torch.randn(2, NUM_PATCHES, 4, generator=rng))
    teacher = MethodOutput(torch.randn(2, 10, generator=rng), {"tokens": torch.randn(2, NUM_PATCHES, 4, generator=rng)})

    loss = method.loss(student, target, cfg, _ce, teacher=teacher)
    p_t = teacher.logits.softmax(-1)
    kl = (p_t * (p_t.log() - student.logits.log_softmax(-1))).sum(-1).mean()
    mse = ((student.aux["tokens"][:, :8] - teacher.aux["tokens"][:, :8]) ** 2).mean()  # final mask keeps 8
    torch.testing.assert_close(loss.terms["distill_kl"], kl)
    torch.testing.assert_close(loss.terms["token_mse"], mse)
    torch.testing.assert_close(loss.total, F.cross_entropy(student.logits, target) + 0.5 * kl + 0.25 * mse)

    # Teacher equal to the student: both terms vanish.
    same = method.loss(student, target, cfg, _ce, teacher=MethodOutput(student.logits, {"tokens": student.aux["tokens"]}))
    assert abs(same.terms["distill_kl"].item()) < 1e-6 and same.terms["token_mse"].item() == 0.0

    # Nothing kept at the last stage: the token term is 0, not NaN.
    empty = _hand_output(_decisions_with_counts(2, [32, 16, 0]), student.logits, student.aux["tokens"])
    assert method.loss(empty, target, cfg, _ce, teacher=teacher).terms["token_mse"].item() == 0.0


def test_zero_distill_weights_need_no_teacher_and_ignore_one(rng):
    method = get_method("dynamicvit")
    cfg = DynamicViTConfig(keep_ratio=0.5, pruning_loc=LOC, **NO_DISTILL)
    out = _hand_output(_decisions_with_counts(2, [40, 20, 10]), torch.randn(2, 10, generator=rng))
    target = torch.tensor([0, 1])
    alone = method.loss(out, target, cfg, _ce)
    teacher = MethodOutput(torch.randn(2, 10, generator=rng), {"tokens": torch.randn(2, NUM_PATCHES, 4, generator=rng)})
    with_teacher = method.loss(out, target, cfg, _ce, teacher=teacher)
    assert torch.equal(alone.total, with_teacher.total)
    assert set(alone.terms) == set(with_teacher.terms) == {"task_loss", "ratio_loss"}


@pytest.mark.parametrize("weights", [{"distill_weight": 0.5, "token_distill_weight": 0.0},
                                     {"distill_weight": 0.0, "token_distill_weight": 0.5}])
def test_distillation_without_teacher_raises(weights, rng):
    cfg = DynamicViTConfig(pruning_loc=LOC, **weights)
    out = _hand_output(_decisions_with_counts(2, [40, 20, 10]), torch.randn(2, 10, generator=rng))
    with pytest.raises(ValueError, match="teacher"):
        get_method("dynamicvit").loss(out, torch.tensor([0, 1]), cfg, _ce, teacher=None)


@pytest.mark.parametrize("term", ["ratio", "task"])
def test_loss_gradients_reach_every_predictor_parameter(tiny_vit, rng, term):
    """Both the ratio term and the task term reach all predictors (straight-through Gumbel + mask)."""
    weights = {"ratio_weight": 1.0} if term == "ratio" else {"ratio_weight": 0.0}
    cfg = DynamicViTConfig(pruning_loc=LOC, keep_ratio=0.7, **weights, **NO_DISTILL)
    model = DynamicViT(tiny_vit, cfg).train()
    x, y = torch.randn(4, 3, 32, 32, generator=rng), torch.randint(0, 10, (4,), generator=rng)
    zero = (lambda logits, target: logits.sum() * 0.0) if term == "ratio" else _ce
    get_method("dynamicvit").loss(model(x), y, cfg, zero).total.backward()
    for name, p in model.predictors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient in predictors.{name}"


def test_param_groups_scale_the_backbone_learning_rate(tiny_vit):
    cfg = DynamicViTConfig(pruning_loc=LOC, backbone_lr_scale=0.01)
    model = DynamicViT(tiny_vit, cfg)
    groups = get_method("dynamicvit").param_groups(model, cfg, lr=1e-3, weight_decay=0.05)
    predictor_ids = {id(p) for p in model.predictors.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        is_predictor = ids <= predictor_ids
        assert is_predictor or not ids & predictor_ids, "a group mixes predictor and backbone parameters"
        assert g["lr"] == pytest.approx(1e-3 if is_predictor else 1e-5)
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": -0.3}, "keep_ratio"),
        ({"ratio_weight": -1.0}, "ratio_weight"),
        ({"distill_weight": -0.5}, "distill_weight"),
        ({"token_distill_weight": -0.5}, "token_distill_weight"),
        ({"backbone_lr_scale": -0.01}, "backbone_lr_scale"),
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"pruning_loc": (3, 3, 5)}, "pruning_loc"),
        ({"pruning_loc": (5, 3, 1)}, "pruning_loc"),
        ({"pruning_loc": ()}, "pruning_loc"),
        ({"pruning_loc": (-1, 2)}, "pruning_loc"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DynamicViTConfig(**kwargs)


@pytest.mark.parametrize("loc", [(1, 3, 6), (2, 9)])
def test_pruning_loc_beyond_depth_raises(tiny_vit, loc):
    cfg = DynamicViTConfig(pruning_loc=loc)
    with pytest.raises(ValueError, match="pruning_loc"):
        cfg.validate_for(Geometry(6, 64, (8, 8), 96, 3))
    with pytest.raises(ValueError, match="pruning_loc"):
        DynamicViT(tiny_vit, cfg)
    DynamicViTConfig(pruning_loc=(1, 3, 5)).validate_for(Geometry(6, 64, (8, 8), 96, 3))  # the last block is a valid location


def test_gather_tokens_picks_each_samples_rows_by_a_python_loop(rng):
    """``gather_tokens`` (flattened ``index_select``) against per-sample indexing written out, with
    ``start`` reading a slice it must not copy, ``prefixed`` putting the prefix in front, and the
    gradient reaching exactly the picked rows (a row picked twice gets both)."""
    from methods._common import prefixed

    x = torch.randn(3, 9, 5, generator=rng, requires_grad=True)
    index = torch.tensor([[0, 6, 2], [5, 5, 1], [3, 0, 4]])
    for start in (0, 2):
        got = gather_tokens(x, index, start)
        expected = torch.stack([torch.stack([x[b, start + i] for i in index[b].tolist()]) for b in range(3)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    whole = gather_tokens(x, prefixed(index, 2))
    torch.testing.assert_close(whole[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(whole[:, 2:], gather_tokens(x, index, 2), rtol=0, atol=0)
    gather_tokens(x, index, 2).sum().backward()
    counts = torch.zeros(3, 9)
    for b in range(3):
        for i in index[b].tolist():
            counts[b, 2 + i] += 1
    torch.testing.assert_close(x.grad, counts.unsqueeze(-1).expand(-1, -1, 5))
