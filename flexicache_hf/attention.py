"""Registers attn_implementation="flexicache": an attention function and its mask function.

Both must be registered under the same name: without a mask function transformers silently drops the
padding mask. The mask is HF's sdpa boolean mask (None when a plain causal mask suffices), so prefill
runs exactly as sdpa does. With a FlexiCache the model hands us the `FlexiKV` that `update()` returned
and the layer does the rest; with any other cache (or none), and on sliding-window layers (which a
FlexiCache keeps as transformers' own dense window), we are plain sdpa.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flexicache_hf.cache import FlexiKV

NAME = "flexicache"


class _InferenceOnly(torch.autograd.Function):
    """Identity forward; a backward through FlexiCache attention says why it cannot be (the cache stores
    detached K/V and selects pages: there is no gradient to give)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "FlexiCache is inference-only: no gradient flows through its attention. Run generation under "
            "torch.no_grad() (generate() does), and train with another cache or none (use_cache=False)")


def flexicache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if isinstance(key, FlexiKV):
        out, weights = key.layer.attend(module, query, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if out.requires_grad:
            out = _InferenceOnly.apply(out)
        return out, weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def flexicache_mask(*args, **kwargs):
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, flexicache_attention)
    AttentionMaskInterface.register(NAME, flexicache_mask)
