"""prunetune's orchestration: configs, search spaces, Ray Train trials, Ray Tune sweeps, MLflow.

Uses ``methods`` (imported first, so torchvision/timm import on CPU-only torch in every process).
"""
import methods  # noqa: F401  (the CPU torchvision guard runs before timm is imported anywhere)
