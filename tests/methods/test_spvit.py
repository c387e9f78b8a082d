"""SPViT against the invariants of the implementation reference (methods.md section 4(h)) and the latency LUT."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import methods.latency as latency
import methods.spvit as spvit
from methods import BackboneConfig, CheckpointError, Geometry, MethodOutput, create_backbone, get_method
from methods._common import qkv_heads
from methods.latency import BlockLatencyTable, latency_cache_key, token_grid
from methods.spvit import MultiheadPredictorLG, SPViT, SPViTConfig

LOC = (1, 3, 5)
N = 64  # tiny backbone: 32 px / 4 px patches
C, H = 96, 3
DEFAULT = (0.617, 0.369, 0.137)
TINY_GEOMETRY = Geometry(depth=6, num_patches=N, grid=(8, 8), embed_dim=C, num_heads=H)
REPO = Path(__file__).resolve().parents[2]


def _model(vit, **overrides) -> SPViT:
    return SPViT(vit, SPViTConfig(**{"pruning_loc": LOC, **overrides}))


def _images(rng, b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=rng)


def _counts(ratios, n: int = N) -> list[int]:
    return [int(n * r) for r in ratios]  # the spec's floor, same float expression


def _record_blocks(model: SPViT):
    """Each block's input (norm1 pre-hook: sees it however the block runs) and output."""
    inputs, outputs, handles = {}, {}, []
    for i, blk in enumerate(model.vit.blocks):
        handles.append(blk.norm1.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())))
        handles.append(blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach())))
    return inputs, outputs, handles


class _FunctionalWith:
    """``torch.nn.functional`` with ``gumbel_softmax`` replaced (patched into ``methods.spvit``)."""

    def __init__(self, gumbel_softmax):
        self.gumbel_softmax = gumbel_softmax

    def __getattr__(self, name):
        return getattr(F, name)


class _TopKInsteadOfGumbel:
    """Hard, deterministic stand-in for the Gumbel sampler: keep the top ``K_k`` still-kept patches by
    the margin ``logit_keep - logit_drop`` (what a noiseless Gumbel-max compares)."""

    def __init__(self, counts: list[int]) -> None:
        self.counts, self.calls, self.prev = counts, 0, None

    def __call__(self, logits, tau=1.0, hard=False, dim=-1):
        assert hard and dim == -1 and logits.shape[-1] == 2
        stage = self.calls % len(self.counts)
        margin = (logits[..., 0] - logits[..., 1]).detach()
        if stage > 0:
            margin = margin.masked_fill(self.prev == 0, float("-inf"))
        keep = torch.zeros_like(margin).scatter(1, margin.topk(self.counts[stage], dim=1).indices, 1.0)
        self.prev, self.calls = keep, self.calls + 1
        return torch.stack([keep, 1.0 - keep], dim=-1)


def _expected_lengths(loc, counts, depth: int, n: int, npre: int = 1) -> list[int]:
    """Inference tokens per block from the spec: 1 + K_k + (package tokens so far) after stage k."""
    lengths, stage, patches, packages = [], 0, n, 0
    for i in range(depth):
        if stage < len(loc) and i == loc[stage]:
            if counts[stage] < patches:  # something is dropped: one more package token
                packages += 1
            patches = counts[stage]
            stage += 1
        lengths.append(npre + patches + packages)
    return lengths


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"keep_ratios": (0.5, 0.7, 0.2)}, "keep_ratios"),  # increasing
        ({"keep_ratios": (0.5, 0.3, 0.0)}, "keep_ratios"),
        ({"keep_ratios": (1.5, 0.3, 0.2)}, "keep_ratios"),
        ({"keep_ratios": (0.5, 0.3)}, "keep_ratios"),  # one per stage
        ({"pruning_loc": (3, 3, 5)}, "pruning_loc"),
        ({"pruning_loc": ()}, "pruning_loc"),
        ({"pruning_loc": (-1, 2, 4)}, "pruning_loc"),
        ({"ratio_weight": -1.0}, "ratio_weight"),
        ({"distill_weight": -0.1}, "distill_weight"),
        ({"token_distill_weight": -0.1}, "token_distill_weight"),
        ({"backbone_lr_scale": -1.0}, "backbone_lr_scale"),
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"latency_target_ms": 5.0, "latency_target_ratio": 0.5}, "latency_target"),
        ({"latency_target_ms": 0.0}, "latency_target_ms"),
        ({"latency_target_ratio": 1.2}, "latency_target_ratio"),
        ({"latency_target_ratio": 0.0}, "latency_target_ratio"),
        ({"latency_batch_size": 0}, "latency_batch_size"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SPViTConfig(**kwargs)


def test_validate_for_names_the_bad_value(tiny_vit):
    with pytest.raises(ValueError, match="pruning_loc"):
        SPViTConfig(pruning_loc=(1, 3, 6)).validate_for(TINY_GEOMETRY)
    with pytest.raises(ValueError, match="pruning_loc"):
        SPViT(tiny_vit, SPViTConfig())  # (3, 6, 9) on 6 blocks
    with pytest.raises(ValueError, match=r"keep_ratios\[2\]"):
        SPViTConfig(pruning_loc=LOC, keep_ratios=(0.5, 0.2, 0.01)).validate_for(TINY_GEOMETRY)  # int(64 * .01) = 0
    with pytest.raises(ValueError, match="num_heads"):
        SPViTConfig(pruning_loc=LOC).validate_for(dataclasses.replace(TINY_GEOMETRY, num_heads=1))
    SPViTConfig(pruning_loc=LOC, keep_ratios=(1.0, 1.0, 1.0)).validate_for(TINY_GEOMETRY)
    SPViTConfig(pruning_loc=LOC, keep_ratios=(0.5, 0.5, 1 / 64)).validate_for(TINY_GEOMETRY)  # equal ratios, one token


def test_search_space_values_fit_the_tiny_quickstart_backbone():
    """Every bound of search_spaces/spvit.yaml is a valid SPViTConfig on a depth-4, 64-patch backbone."""
    space = yaml.safe_load((REPO / "search_spaces" / "spvit.yaml").read_text())
    assert {"latency_target_ratio", "ratio_weight", "distill_weight", "train.lr"} <= set(space)
    quick = Geometry(depth=4, num_patches=64, grid=(8, 8), embed_dim=96, num_heads=3)
    fields = set(SPViTConfig.field_names())
    for name, spec in space.items():
        if "." in name:
            continue
        assert name in fields
        for value in (spec["low"], spec["high"]) if "low" in spec else spec.get("values", [spec.get("value")]):
            SPViTConfig(pruning_loc=(1, 2, 3), **{name: value}).validate_for(quick)


# ---------------------------------------------------------------- selector


def test_selector_equals_a_per_head_loop(rng):
    """The vectorised selector computes the reference's per-head loop (shared MLP, SE weights, pooled global half)."""
    torch.manual_seed(0)
    sel = MultiheadPredictorLG(C, H)
    x = torch.randn(2, 10, C, generator=rng)
    policy = (torch.rand(2, 10, 1, generator=rng) > 0.3).float()
    score, keep_prob = sel(x, policy)

    hd = C // H
    head_means = torch.nn.AdaptiveAvgPool2d((10, H))(x)  # as the reference computes them
    w = sel.senet(head_means)
    log_sum, prob_sum = 0.0, 0.0
    for h in range(H):
        y = sel.in_conv(x[..., h * hd:(h + 1) * hd])
        glob = (y[..., hd // 2:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
        y = sel.out_conv(torch.cat([y[..., :hd // 2], glob.expand(-1, 10, -1)], -1))
        log_sum = log_sum + y.log_softmax(-1) * w[..., h:h + 1]
        prob_sum = prob_sum + y.softmax(-1) * w[..., h:h + 1]
    torch.testing.assert_close(score, log_sum / w.sum(-1, keepdim=True))
    torch.testing.assert_close(keep_prob, (prob_sum / w.sum(-1, keepdim=True))[..., 0])
    assert len(list(sel.children())) == 3  # senet, in_conv, out_conv: one MLP for all heads


# ---------------------------------------------------------------- inference token flow


@pytest.mark.parametrize("ratios", [DEFAULT, (0.5, 0.5, 0.25), (0.9, 0.4, 0.05)])
def test_eval_tokens_per_block(tiny_vit, rng, ratios):
    model = _model(tiny_vit, keep_ratios=ratios).eval()
    inputs, _, handles = _record_blocks(model)
    with torch.no_grad():
        out = model(_images(rng, 2))
    for h in handles:
        h.remove()
    counts = _counts(ratios)
    expected = _expected_lengths(LOC, counts, 6, N)
    assert [inputs[i].shape[1] for i in range(6)] == expected
    if ratios == DEFAULT:
        assert expected == [65, 41, 41, 26, 26, 12]  # 1+39+1 | 1+23+2 | 1+8+3
    assert out.aux["tokens"].shape == (2, counts[-1], C)  # package tokens excluded


def test_eval_tokens_per_block_deit_geometry(rng):
    vit = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", img_size=224, patch_size=16, depth=12, num_classes=10))
    model = SPViT(vit, SPViTConfig()).eval()
    inputs, _, handles = _record_blocks(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224, generator=rng))
    for h in handles:
        h.remove()
    k = _counts(DEFAULT, 196)
    assert k == [120, 72, 26]
    assert [inputs[i].shape[1] for i in range(12)] == [197] * 3 + [1 + k[0] + 1] * 3 + [1 + k[1] + 2] * 3 + [1 + k[2] + 3] * 3


def test_eval_package_token_and_gather_against_a_brute_force_loop(tiny_vit, rng):
    model = _model(tiny_vit).eval()
    counts = _counts(DEFAULT)
    inputs, outputs, handles = _record_blocks(model)
    b = 3
    with torch.no_grad():
        model(_images(rng, b))
    for h in handles:
        h.remove()
    n = N
    with torch.no_grad():
        for k, loc in enumerate(LOC):
            prev = outputs[loc - 1]  # [B, 1 + n + k, C]: CLS, patches, k package tokens
            new = inputs[loc]
            score, keep_prob = model.predictors[k](prev[:, 1:], torch.ones(b, prev.shape[1] - 1, 1))
            for s in range(b):
                margin = [(float(score[s, j, 0] - score[s, j, 1]), j) for j in range(n)]
                ranked = [j for _, j in sorted(margin, reverse=True)]
                kept, dropped = ranked[:counts[k]], ranked[counts[k]:]
                num, den = torch.zeros(C), 0.0
                for j in dropped:
                    num += float(keep_prob[s, j]) * prev[s, 1 + j]
                    den += float(keep_prob[s, j])
                assert torch.equal(new[s, 0], prev[s, 0])  # CLS first, unchanged
                torch.testing.assert_close(new[s, 1:1 + counts[k]], prev[s, [1 + j for j in kept]], rtol=0, atol=0)
                torch.testing.assert_close(new[s, 1 + counts[k]:-1], prev[s, 1 + n:], rtol=0, atol=0)  # older packages kept
                torch.testing.assert_close(new[s, -1], num / den, rtol=1e-5, atol=1e-6)  # the new package, last
            n = counts[k]


def test_eval_is_batch_size_independent_and_deterministic(tiny_vit, rng):
    model = _model(tiny_vit).eval()
    x = _images(rng, 5)
    with torch.no_grad():
        batched = model(x).logits
        again = model(x).logits
        single = torch.cat([model(x[i:i + 1]).logits for i in range(5)])
    assert torch.equal(batched, again)
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)


def test_keep_ratios_one_is_plain_timm_with_no_package(tiny_vit, rng):
    plain = copy.deepcopy(tiny_vit).eval()
    model = _model(tiny_vit, keep_ratios=(1.0, 1.0, 1.0)).eval()
    inputs, _, handles = _record_blocks(model)
    x = _images(rng)
    with torch.no_grad():
        got = model(x)
        expected = plain(x)
        features = plain.forward_features(x)  # timm's, final norm included
    for h in handles:
        h.remove()
    assert [inputs[i].shape[1] for i in range(6)] == [65] * 6
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux["tokens"], features[:, 1:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training path


def test_train_policy_sequence_and_nested_decisions(tiny_vit, rng, monkeypatch):
    model = _model(tiny_vit).train()
    policies = []
    real = spvit.policy_attention

    def recording(attn, x, policy):
        policies.append(policy.detach())
        return real(attn, x, policy)

    monkeypatch.setattr(spvit, "policy_attention", recording)
    inputs, _, handles = _record_blocks(model)
    out = model(_images(rng, 4))
    for h in handles:
        h.remove()

    stage_of = [sum(i >= loc for loc in LOC) for i in range(6)]
    assert [inputs[i].shape[1] for i in range(6)] == [65 + s for s in stage_of]  # 1 + N + k after stage k
    assert len(policies) == 6 - LOC[0]
    for policy, block in zip(policies, range(LOC[0], 6)):
        k = stage_of[block]
        assert policy.shape == (4, 65 + k)
        assert (policy[:, 0] == 1).all()  # CLS
        assert (policy[:, 1 + N:] == 1).all()  # package tokens (each stage dropped something here)
    d = out.aux["decisions"]
    assert len(d) == 3 and all(dk.shape == (4, N) for dk in d)
    for dk in d:
        assert set(dk.detach().unique().tolist()) <= {0.0, 1.0}
    assert (d[1] <= d[0]).all() and (d[2] <= d[1]).all()
    assert torch.equal(out.aux["final_mask"], d[-1].detach())
    assert out.aux["tokens"].shape == (4, N, C)  # no package token among the features
    stats = get_method("spvit").stats(model, out)
    assert stats == {f"keep_ratio_stage{k + 1}": pytest.approx(float(d[k].detach().mean())) for k in range(3)}


def test_train_package_token_against_a_brute_force_loop(tiny_vit, rng):
    model = _model(tiny_vit).train()
    inputs, outputs, handles = _record_blocks(model)
    b = 3
    out = model(_images(rng, b))
    for h in handles:
        h.remove()
    d = [dk.detach() for dk in out.aux["decisions"]]
    with torch.no_grad():
        for k, loc in enumerate(LOC):
            prev_tokens = inputs[loc][:, :-1]  # [B, 1 + N + k, C]: the new package is appended last
            if loc - 1 in outputs:  # timm's own forward ran (no policy yet): the rest passes unchanged
                torch.testing.assert_close(prev_tokens, outputs[loc - 1], rtol=0, atol=0)
            prev_d = torch.ones(b, N) if k == 0 else d[k - 1]
            # the selector sees the patches and the earlier package tokens (policy 1: each one holds something)
            policy = torch.cat([prev_d, torch.ones(b, k)], 1).unsqueeze(-1)
            _, keep_prob = model.predictors[k](prev_tokens[:, 1:], policy)
            for s in range(b):
                num, den = torch.zeros(C), 0.0
                for j in range(N):
                    if prev_d[s, j] == 1 and d[k][s, j] == 0:
                        num += float(keep_prob[s, j]) * prev_tokens[s, 1 + j]
                        den += float(keep_prob[s, j])
                expected = num / den if den > 0 else torch.zeros(C)
                torch.testing.assert_close(inputs[loc][s, -1], expected, rtol=1e-5, atol=1e-6)
    assert 0 in outputs and 2 not in outputs  # block_forward runs after the first stage


def test_train_stage_that_drops_nothing_hides_its_empty_package(tiny_vit, rng, monkeypatch):
    model = _model(tiny_vit, keep_ratios=(0.5, 0.5, 0.25)).train()
    policies = []
    real = spvit.policy_attention
    monkeypatch.setattr(spvit, "policy_attention", lambda a, x, p: (policies.append(p.detach()), real(a, x, p))[1])
    monkeypatch.setattr(spvit, "F", _FunctionalWith(_TopKInsteadOfGumbel(model.keep_counts)))
    inputs, _, handles = _record_blocks(model)
    with torch.no_grad():
        model(_images(rng, 2))
    for h in handles:
        h.remove()
    last = policies[-1]  # after stage 3: [CLS, 64 patches, 3 packages]
    assert last[:, 1 + N:].tolist() == [[1.0, 0.0, 1.0]] * 2
    assert torch.equal(inputs[LOC[1]][:, -1], torch.zeros(2, C))  # empty package: zero content


def _attention_logit_span(model: SPViT, x: torch.Tensor) -> float:
    """Largest max-min spread of one attention row's logits over every block (dense run)."""
    spans = []

    def hook(attn, args):
        q, k, _ = qkv_heads(attn, args[0])
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        spans.append(float((logits.amax(-1) - logits.amin(-1)).max()))

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in model.vit.blocks]
    with torch.no_grad():
        model.vit.eval()(x)
    for h in handles:
        h.remove()
    return max(spans)


@pytest.mark.parametrize("ratios", [DEFAULT, (0.5, 0.5, 0.25), (0.9, 0.4, 0.05)])
@pytest.mark.parametrize("logit_range", ["normal", "large"])
def test_hard_topk_training_forward_equals_inference_forward(tiny_vit, rng, monkeypatch, ratios, logit_range):
    model = _model(tiny_vit, keep_ratios=ratios)
    assert all(getattr(m, "p", 0.0) == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    x = _images(rng, 4)
    if logit_range == "large":
        span = _attention_logit_span(model, x)
        with torch.no_grad():
            for blk in model.vit.blocks:
                blk.attn.qkv.weight[: 2 * C] *= math.sqrt(75.0 / span)  # q and k rows; biases are zero
        assert 60.0 < _attention_logit_span(model, x) < 200.0
    topk = _TopKInsteadOfGumbel(model.keep_counts)
    monkeypatch.setattr(spvit, "F", _FunctionalWith(topk))
    with torch.no_grad():
        masked = model.train()(x)
        gathered = model.eval()(x)
    assert topk.calls == len(LOC)
    assert [d.sum(1).tolist() for d in masked.aux["decisions"]] == [[float(c)] * 4 for c in model.keep_counts]
    torch.testing.assert_close(masked.logits, gathered.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- loss


def _hand_output(decisions, logits, tokens=None) -> MethodOutput:
    b, n = decisions[0].shape
    tokens = torch.zeros(b, n, 4) if tokens is None else tokens
    return MethodOutput(logits, {"decisions": decisions, "tokens": tokens, "final_mask": decisions[-1]})


NO_DISTILL = {"distill_weight": 0.0, "token_distill_weight": 0.0}


def test_ratio_loss_is_batch_level(rng):
    method = get_method("spvit")
    cfg = SPViTConfig(pruning_loc=LOC, keep_ratios=(0.5, 0.5, 0.5), ratio_weight=2.0, **NO_DISTILL)
    logits, target = torch.randn(2, 10, generator=rng), torch.tensor([1, 2])
    # One image keeps everything, the other nothing: the batch keeps half, as targeted.
    half = [torch.stack([torch.ones(N), torch.zeros(N)])] * 3
    loss = method.loss(_hand_output(half, logits), target, cfg, F.cross_entropy)
    assert loss.terms["ratio_loss"].item() == 0.0
    torch.testing.assert_close(loss.total, F.cross_entropy(logits, target))
    assert set(loss.terms) == {"task_loss", "ratio_loss"}

    cfg = SPViTConfig(pruning_loc=LOC, ratio_weight=2.0, **NO_DISTILL)
    all_kept = [torch.ones(2, N)] * 3
    expected = sum((1 - r) ** 2 for r in DEFAULT) / 3
    loss = method.loss(_hand_output(all_kept, logits), target, cfg, F.cross_entropy)
    assert loss.terms["ratio_loss"].item() == pytest.approx(expected)
    torch.testing.assert_close(loss.total, F.cross_entropy(logits, target) + 2.0 * torch.tensor(expected))


def test_distillation_terms_and_teacher(rng):
    method = get_method("spvit")
    cfg = SPViTConfig(pruning_loc=LOC, ratio_weight=0.0, distill_weight=0.5, token_distill_weight=0.25)
    decisions = []
    for c in (32, 16, 8):
        dk = torch.zeros(2, N)
        dk[:, :c] = 1.0
        decisions.append(dk)
    student = _hand_output(decisions, torch.randn(2, 10, generator=rng), torch.randn(2, N, 4, generator=rng))
    teacher = MethodOutput(torch.randn(2, 10, generator=rng), {"tokens": torch.randn(2, N, 4, generator=rng)})
    target = torch.tensor([3, 7])
    loss = method.loss(student, target, cfg, F.cross_entropy, teacher=teacher)
    p_t = teacher.logits.softmax(-1)
    kl = (p_t * (p_t.log() - student.logits.log_softmax(-1))).sum(-1).mean()
    mse = ((student.aux["tokens"][:, :8] - teacher.aux["tokens"][:, :8]) ** 2).mean()
    torch.testing.assert_close(loss.terms["distill_kl"], kl)
    torch.testing.assert_close(loss.terms["token_mse"], mse)
    torch.testing.assert_close(loss.total, F.cross_entropy(student.logits, target) + 0.5 * kl + 0.25 * mse)
    with pytest.raises(ValueError, match="teacher"):
        method.loss(student, target, cfg, F.cross_entropy, teacher=None)
    assert method.uses_teacher(cfg) and not method.uses_teacher(SPViTConfig(**NO_DISTILL))


@pytest.mark.parametrize("term", ["ratio", "task"])
def test_loss_is_finite_and_gradients_reach_every_selector_parameter(tiny_vit, rng, term):
    cfg = SPViTConfig(pruning_loc=LOC, ratio_weight=1.0 if term == "ratio" else 0.0, **NO_DISTILL)
    model = SPViT(tiny_vit, cfg).train()
    x, y = _images(rng), torch.randint(0, 10, (4,), generator=rng)
    task = (lambda logits, target: logits.sum() * 0.0) if term == "ratio" else F.cross_entropy
    loss = get_method("spvit").loss(model(x), y, cfg, task)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    names = [n for n, _ in model.predictors.named_parameters()]
    assert any(".senet." in n for n in names)
    for name, p in model.predictors.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"predictors.{name}"
        assert p.grad.abs().sum() > 0, f"no gradient in predictors.{name}"


def test_param_groups_scale_the_backbone_learning_rate(tiny_vit):
    cfg = SPViTConfig(pruning_loc=LOC, backbone_lr_scale=0.01)
    model = SPViT(tiny_vit, cfg)
    groups = get_method("spvit").param_groups(model, cfg, lr=1e-3, weight_decay=0.05)
    selector = {id(p) for p in model.predictors.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= selector or not ids & selector
        assert g["lr"] == pytest.approx(1e-3 if ids <= selector else 1e-5)


# ---------------------------------------------------------------- reference checkpoints


def _reference_state(model: SPViT) -> dict[str, torch.Tensor]:
    """``model``'s weights laid out as PeiyanFlying/SPViT saves VisionTransformerDiffPruning."""
    state = {k[len("vit."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("vit.")}
    for k, pred in enumerate(model.predictors):
        for name, v in pred.senet.state_dict().items():
            state[f"score_predictor.{k}.senet.{name}"] = v.clone()
        for h in range(H):  # the shared module, saved once per head
            for part in ("in_conv", "out_conv"):
                for name, v in getattr(pred, part).state_dict().items():
                    state[f"score_predictor.{k}.{part}.{h}.{name}"] = v.clone()
    return state


def test_convert_reference_state(make_tiny_vit, rng):
    method = get_method("spvit")
    cfg = SPViTConfig(pruning_loc=LOC)
    source = SPViT(make_tiny_vit(seed=0), cfg).eval()
    with torch.no_grad():
        for p in source.predictors.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.1)
    ref = _reference_state(source)
    assert "score_predictor.2.out_conv.2.4.weight" in ref and "blocks.5.mlp.fc2.bias" in ref
    assert "score_predictor.0.in_conv.1.0.weight" in ref  # LayerNorm of head 1's (shared) copy

    target = SPViT(make_tiny_vit(seed=1), cfg).eval()
    converted = method.convert_reference_state(ref, cfg)
    assert set(converted) == set(target.state_dict())
    target.load_state_dict(converted, strict=True)
    x = _images(rng)
    with torch.no_grad():
        assert torch.equal(target(x).logits, source(x).logits)
    assert set(method.convert_reference_state({"model": ref}, cfg)) == set(converted)

    bad = dict(ref)
    bad["score_predictor.1.out_conv.2.0.weight"] = bad["score_predictor.1.out_conv.2.0.weight"] + 1
    with pytest.raises(CheckpointError, match="shared"):
        method.convert_reference_state(bad, cfg)
    # keys the map does not know pass through, for the loader to report as unexpected
    extra = method.convert_reference_state({**ref, "score_predictor.0.mystery.weight": torch.zeros(1)}, cfg)
    assert set(extra) - set(converted) == {"score_predictor.0.mystery.weight"}
    extra = method.convert_reference_state({**ref, "score_predictor.3.senet.0.weight": torch.zeros(1)}, cfg)
    assert set(extra) - set(converted) == {"predictors.3.senet.0.weight"}  # a fourth selector: not in this model


# ---------------------------------------------------------------- latency lookup table


class _FakeTimer:
    """Stands in for ``time_forward``: counts calls, seconds linear in the token count (deterministic)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, x, warmup, iters, amp=False):
        self.calls += 1
        per_token = 1e-5 if isinstance(model, spvit._SelectorProbe) else 1e-4
        return per_token * (1.0 + x.shape[1])


def test_table_predict_interpolates_and_is_exact_at_measured_points():
    table = BlockLatencyTable((2, 10, 30), (0.1, 0.3, 0.7))
    assert [table.predict(n) for n in (2, 10, 30)] == [0.1, 0.3, 0.7]
    assert table.predict(6) == pytest.approx(0.2)
    assert table.predict(25) == pytest.approx(0.6)
    for outside in (1, 31):
        with pytest.raises(ValueError, match="outside"):
            table.predict(outside)
    with pytest.raises(ValueError, match="increasing"):
        BlockLatencyTable((3, 2), (0.1, 0.2))
    assert token_grid(2, 65, 4) == [2, 23, 44, 65]


def test_table_build_times_the_block_at_each_count(tiny_vit):
    table = BlockLatencyTable.build(tiny_vit.blocks[0], C, [65, 2, 30], "cpu", batch_size=2, warmup=0, iters=2)
    assert table.token_counts == (2, 30, 65)
    assert all(t > 0 for t in table.latency_ms)
    assert tiny_vit.blocks[0].training  # measured a copy; the model is untouched


def test_table_cache_written_once_and_reused(tiny_vit, tmp_path, monkeypatch):
    timer = _FakeTimer()
    monkeypatch.setattr(latency, "time_forward", timer)
    block, grid = tiny_vit.blocks[0], [2, 33, 65]
    key = latency_cache_key("vit_block", block, C, grid, "cpu", batch_size=1)
    assert {"device", "architecture", "batch_size", "dtype", "torch", "threads"} <= set(key)

    first = BlockLatencyTable.load_or_build(tmp_path, key, block, C, grid, "cpu")
    assert timer.calls == 3
    files = list(tmp_path.glob("latency-vit_block-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"] == key and data["token_counts"] == grid and data["format"] == "prunetune.latency/1"
    mtime = files[0].stat().st_mtime_ns

    second = BlockLatencyTable.load_or_build(tmp_path, key, block, C, grid, "cpu")
    assert timer.calls == 3  # read back, not measured again
    assert second == first and files[0].stat().st_mtime_ns == mtime

    other = latency_cache_key("vit_block", block, C, grid, "cpu", batch_size=8)
    BlockLatencyTable.load_or_build(tmp_path, other, block, C, grid, "cpu", batch_size=8)
    assert timer.calls == 6 and len(list(tmp_path.glob("latency-*.json"))) == 2

    files[0].write_text("{not json")  # a damaged file is measured again and replaced
    BlockLatencyTable.load_or_build(tmp_path, key, block, C, grid, "cpu")
    assert timer.calls == 9 and json.loads(files[0].read_text())["key"] == key


def _linear_tables(per_token: float = 0.01, fixed: float = 0.05) -> tuple[BlockLatencyTable, BlockLatencyTable]:
    counts = list(range(1, N + 2))
    block = BlockLatencyTable(counts, [fixed + per_token * n for n in counts])
    selector = BlockLatencyTable(counts, [0.001 * n for n in counts])
    return block, selector


def test_bisection_meets_the_target_and_tighter_targets_keep_fewer_tokens():
    block, selector = _linear_tables()
    dense = 6 * block.predict(1 + N)
    results = {}
    for ratio in (0.9, 0.7, 0.5):
        cfg = SPViTConfig(pruning_loc=LOC, latency_target_ratio=ratio)
        got = spvit.schedule_for_target(cfg, TINY_GEOMETRY, block, selector)
        counts = got.keep_counts(N)
        predicted = spvit.predict_latency_ms(TINY_GEOMETRY, LOC, counts, block, selector)
        assert got.predicted_latency_ms == pytest.approx(predicted)
        assert got.predicted_dense_latency_ms == pytest.approx(dense)
        assert predicted <= ratio * dense
        # the shape is kept: keep_ratios = DEFAULT ** t for one t
        t = [math.log(r) / math.log(s) for r, s in zip(got.keep_ratios, DEFAULT)]
        assert max(t) - min(t) < 1e-9
        # and it is the largest such schedule: a slightly smaller t keeps more and misses the target
        looser = [int(N * s ** (t[0] * 0.98)) for s in DEFAULT]
        if looser != counts:
            assert spvit.predict_latency_ms(TINY_GEOMETRY, LOC, looser, block, selector) > ratio * dense
        results[ratio] = got.keep_ratios
    assert all(a > b for a, b in zip(results[0.9], results[0.7]))
    assert all(a > b for a, b in zip(results[0.7], results[0.5]))


def test_unreachable_target_raises_with_the_best_latency():
    block, selector = _linear_tables(fixed=1.0)  # a large per-block constant no pruning removes
    with pytest.raises(ValueError, match=r"latency target .*best achievable"):
        spvit.schedule_for_target(SPViTConfig(pruning_loc=LOC, latency_target_ratio=0.3), TINY_GEOMETRY, block, selector)
    with pytest.raises(ValueError, match="0.5 ms"):
        spvit.schedule_for_target(SPViTConfig(pruning_loc=LOC, latency_target_ms=0.5), TINY_GEOMETRY, block, selector)
    # a target the dense model already meets keeps every token
    loose = spvit.schedule_for_target(SPViTConfig(pruning_loc=LOC, latency_target_ms=100.0), TINY_GEOMETRY, block, selector)
    assert loose.keep_ratios == (1.0, 1.0, 1.0)


def test_resolve_builds_the_tables_once_and_the_model_follows(tiny_vit, tmp_path, monkeypatch, rng):
    timer = _FakeTimer()
    monkeypatch.setattr(latency, "time_forward", timer)
    monkeypatch.setattr(spvit, "LUT_POINTS", 5)
    method = get_method("spvit")
    cfg = SPViTConfig(pruning_loc=LOC, latency_target_ratio=0.6)
    with pytest.raises(ValueError, match="resolve"):
        method.build_model(cfg, copy.deepcopy(tiny_vit))

    resolved = method.resolve(cfg, tiny_vit, torch.device("cpu"), tmp_path)
    assert timer.calls == 10  # 5 block + 5 selector points
    assert len(list(tmp_path.glob("latency-*.json"))) == 2
    assert resolved.latency_target_ratio == 0.6 and resolved.predicted_latency_ms <= 0.6 * resolved.predicted_dense_latency_ms
    assert resolved.keep_ratios != DEFAULT
    again = method.resolve(cfg, tiny_vit, torch.device("cpu"), tmp_path)
    assert timer.calls == 10 and again == resolved  # the cached tables give the same schedule

    model = method.build_model(resolved, tiny_vit)
    assert model.keep_counts == _counts(resolved.keep_ratios)
    stats = method.stats(model)
    assert stats["predicted_latency_ms"] == resolved.predicted_latency_ms
    assert [stats[f"target_keep_ratio_stage{k + 1}"] for k in range(3)] == list(resolved.keep_ratios)
    assert method.resolve(SPViTConfig(pruning_loc=LOC), tiny_vit, torch.device("cpu"), tmp_path) == SPViTConfig(pruning_loc=LOC)
    assert timer.calls == 10  # no target: nothing measured
