"""Attention-probability quantization through transformers' attention-function registry.

hf_qvar registers an ``attn_implementation`` named ``"qvar"``: eager attention whose softmax
output passes through the attention module's ``attn_probs_quantizer`` (unsigned, no offset,
method.md §3.4). HF BERT, ViT, DeiT and Swin call it without any copied model code. Modules
without a probability quantizer fall back to SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_IMPLEMENTATION = "qvar"
PROBS_QUANTIZER = "attn_probs_quantizer"


def qvar_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with quantized probabilities; SDPA where the module has no quantizer."""
    quantizer = getattr(module, PROBS_QUANTIZER, None)
    if quantizer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = quantizer(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention() -> None:
    """Make ``attn_implementation="qvar"`` known to transformers (idempotent)."""
    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, qvar_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def set_attention_implementation(model: nn.Module, implementation: str = ATTN_IMPLEMENTATION) -> None:
    """Point the model's config (and every sub-config) at ``implementation``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation
