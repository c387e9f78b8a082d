"""Building blocks shared by several methods: token gathering, policy masks, ViT stem/head."""
from .tokens import gather_tokens, policy_attn_mask
from .vit import vit_head, vit_stem

__all__ = ["gather_tokens", "policy_attn_mask", "vit_head", "vit_stem"]
