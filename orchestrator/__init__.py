"""prunetune's orchestration: configs, search spaces, Ray Train trials, Ray Tune sweeps, MLflow.

Importing the package imports nothing: Ray Train's controller unpickles ``train_reports`` without
torch. Every module that needs timm or torchvision imports ``methods`` first (directly, or through
``config``), whose CPU torchvision guard (``methods/_compat.py``) must run before timm is imported.
"""
