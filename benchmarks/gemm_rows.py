"""What a ViT block's linear layers cost per token as the token count falls (the BLAS, not the method).

Token methods shrink the sequence, so their late blocks multiply matrices with few rows. The FLOPs
bound assumes the cost per row stays the same; on a CPU it does not once the rows are few. This
times one transformer block's four linear layers (qkv, proj, fc1, fc2 of width ``--dim``) at each
row count, interleaved call by call (``methods.measure.time_rounds``), and prints the cost per row
relative to the first row count.

    python benchmarks/gemm_rows.py --dim 384 --rows 197,184,160,121,98,72,54,41,29 --batch 1
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import methods  # noqa: F401  (the CPU torchvision guard, before timm)
from methods.measure import MeasureConfig, time_rounds


class _Linears(nn.Module):
    """A ViT block's linear layers, applied one after another (the shapes of a block, not its function)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.qkv(x)
        x = self.proj(x)
        return self.fc2(self.fc1(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=384, help="channels (DeiT-Ti 192, DeiT-S 384, DeiT-B 768)")
    p.add_argument("--rows", default="197,184,160,121,98,72,54,41,29", help="token counts, the reference first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    layers = _Linears(args.dim).eval()
    names = {m: f"M={m}" for m in rows}
    calls = {names[m]: _Call(layers, torch.randn(args.batch, m, args.dim)) for m in rows}
    cfg = MeasureConfig(warmup=5, iters=args.iters, rounds=args.rounds)
    with torch.no_grad():
        timed = time_rounds(calls, torch.empty(0), cfg)
    ref = names[rows[0]]
    print(f"dim {args.dim}, batch {args.batch}, {torch.get_num_threads()} threads: per-row cost relative to M = {rows[0]} "
          f"(cycle-by-cycle ratios, median over {args.rounds} x {args.iters})")
    for m in rows:
        faster, _ = timed.ratio(names[m], ref)  # median of t_ref / t_M
        ms = 1e3 * statistics.median(timed.seconds(names[m]))
        print(f"  M = {m:4d}: {ms:8.3f} ms per call, per row {rows[0] / m / faster:.2f}")


class _Call(nn.Module):
    """The layers on their own input (``time_rounds`` gives every model the same ``x``; it is ignored)."""

    def __init__(self, layers: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.layers, self.x = layers, x

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.x)


if __name__ == "__main__":
    main()
