"""The training loop on CUDA as a Ray Train GPU worker runs it: NCCL, DDP, AMP, every method. Skipped without CUDA.

One NCCL rank: the lent machines have one GPU, and NCCL refuses two ranks on one device. The
all-reduce is then trivial, but the NCCL process group, DDP over it (its broadcast and buckets),
the AMP step (bf16 autocast, or fp16 with the GradScaler), each method's hooks (SViTE's prune and
grow), calibration (DVT), latency tables (SPViT) and the measurement of the trained model all run
on the device, through the same ``loop.build_run`` + ``loop.fit`` as ``orchestrator.worker``.
Ray itself is not on those machines (its wheel is over the tool's transfer limit).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from orchestrator import loop
from orchestrator.config import experiment_from_dict, to_yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)

#: Each method on the 4-block tiny ViT, as the CPU integration sweeps configure it.
TINY = {
    "dynamicvit": {"pruning_loc": [1, 2, 3]},
    "evovit": {"prune_location": 1, "stage_starts": [1, 2]},
    "spvit": {"pruning_loc": [1, 2, 3], "latency_batch_size": 64},
    "tome": {"r": 6},
    "dvt": {},
    "svite": {"update_frequency": 5, "t_end": 0.8},
    "s2vite": {"update_frequency": 5, "t_end": 0.8},
}


@pytest.fixture(scope="module")
def nccl():
    """A one-rank NCCL process group for the module, destroyed after it."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=CUDA)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """The quickstart's tiny ViT on the digits (as in ``orchestrator.quickstart``; that module imports Ray), AMP on."""
    from orchestrator.data import write_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    write_digits(root)
    return experiment_from_dict({
        "name": "gpu-loop",
        "method": {"name": "dynamicvit", **TINY["dynamicvit"]},
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10},
        "data": {"path": str(root), "hflip": 0.0, "scale": [0.8, 1.0], "ratio": [0.9, 1.1], "color_jitter": None, "crop_pct": 1.0,
                 "loader_workers": 0},
        "pretrain": {"epochs": 10, "batch_size": 64, "lr": 2.0e-3, "warmup_epochs": 1, "amp": True},
        "train": {"epochs": 2, "batch_size": 64, "lr": 5.0e-4, "warmup_epochs": 0.5, "amp": True},
        "measure": {"batch_size": 64, "warmup": 2, "iters": 5, "rounds": 1},
    })


def _fit(run: loop.Run) -> tuple[dict, list[dict]]:
    run.model = DistributedDataParallel(run.raw, device_ids=[CUDA.index], **loop.ddp_options(run.method))
    reports: list[dict] = []
    final = loop.fit(run, lambda metrics, state: reports.append(dict(metrics)))
    return final, reports


@pytest.fixture(scope="module")
def pretrained(nccl, exp, tmp_path_factory):
    run = loop.build_run(exp, "pretrain", CUDA)
    final, reports = _fit(run)
    path = tmp_path_factory.mktemp("weights") / "dense_backbone.pt"
    torch.save({"model": {k.removeprefix("vit."): v.cpu() for k, v in run.raw.state_dict().items()}}, path)
    return {"final": final, "reports": reports, "path": path, "amp": loop._amp_dtype(run)}


def test_dense_pretraining_learns_under_bf16_autocast(pretrained):
    assert pretrained["amp"] is torch.bfloat16  # every CUDA GPU these machines lend supports bf16
    losses = [r["train_loss"] for r in pretrained["reports"]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert pretrained["final"]["val_top1"] > 50.0  # chance is 10%


@pytest.mark.parametrize("method", list(TINY))
def test_every_method_trains_and_is_measured_on_the_gpu(method, exp, pretrained):
    cfg = _with_method(exp, method)
    run = loop.build_run(cfg, "trial", CUDA, pretrained_path=str(pretrained["path"]))
    assert next(run.raw.parameters()).device.type == "cuda"
    final, reports = _fit(run)
    epochs = [r for r in reports if "train_loss" in r]
    assert len(epochs) == cfg.train.epochs and all(math.isfinite(r["train_loss"]) for r in epochs)
    # Fine-tuned from a dense model that reached > 50%: a method that broke the model on CUDA lands near 10%.
    assert final["val_top1"] > 30.0, final
    for key in ("latency_ms", "dense_latency_ms", "throughput_ips", "dense_throughput_ips", "gflops", "dense_gflops"):
        assert final[key] > 0 and math.isfinite(final[key]), (key, final)
    if method != "svite":  # SViTE's unstructured masks keep the dense compute; the others drop tokens or channels
        assert final["gflops"] < final["dense_gflops"], final


def test_fp16_autocast_with_the_grad_scaler(exp, pretrained, monkeypatch):
    """The fp16 path (GPUs without bf16): the GradScaler is on and the step still learns."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = _with_method(exp, "dynamicvit")
    run = loop.build_run(cfg, "trial", CUDA, pretrained_path=str(pretrained["path"]))
    assert loop._amp_dtype(run) is torch.float16 and run.scaler.is_enabled()
    final, reports = _fit(run)
    assert all(math.isfinite(r["train_loss"]) for r in reports if "train_loss" in r)
    assert final["val_top1"] > 30.0, final


def _with_method(exp, method: str):
    data = yaml.safe_load(to_yaml(exp))
    data["method"] = {"name": method, **TINY[method]}
    return experiment_from_dict(data)
