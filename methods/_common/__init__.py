"""Building blocks shared by several methods: token gathering, policy attention, ViT stem/head."""
from .attention import block_forward, check_block, fit_backbone, merge_heads, policy_attention, qkv_heads, sdpa
from .tokens import batch_rows, gather_tokens, policy_attn_mask, prefixed
from .vit import vit_head, vit_stem

__all__ = [
    "block_forward", "check_block", "fit_backbone", "merge_heads", "policy_attention", "qkv_heads", "sdpa",
    "batch_rows", "gather_tokens", "policy_attn_mask", "prefixed", "vit_head", "vit_stem",
]
