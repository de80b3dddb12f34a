"""Quantization sites: which role a module plays in a transformer block and how the paper
quantizes that role (method.md §3.4, "module-dependent quantization").

Roles are read from module names, which covers BERT, ViT, DeiT and Swin across transformers
4.x (``query``/``intermediate.dense``) and 5.x (``q_proj``/``mlp.fc1``) layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config import QVarConfig

_ROLE_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("query", ("query", "q_proj")),
    ("key", ("key", "k_proj")),
    ("value", ("value", "v_proj")),
    ("attention_output", ("attention.output.dense", "o_proj", "out_proj")),
    ("mlp_input", ("intermediate.dense", "fc1")),
    ("mlp_output", ("output.dense", "fc2")),
    ("patch_embedding", ("patch_embeddings.projection",)),
    ("patch_merging", ("downsample.reduction",)),
)
QKV_ROLES = ("query", "key", "value")


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is ``name``, a dotted suffix of it, or a regex matching it fully."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def module_role(name: str) -> str:
    """The role of the module called ``name`` (``"other"`` when none applies)."""
    for role, suffixes in _ROLE_SUFFIXES:
        if any(name_matches(name, suffix) for suffix in suffixes):
            return role
    return "other"


def head_count(model: nn.Module, name: str) -> int:
    """Number of attention heads of the attention block holding module ``name``."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    for attr in ("num_attention_heads", "num_heads"):
        if isinstance(getattr(parent, attr, None), int):
            return getattr(parent, attr)
    return int(getattr(model.config, "num_attention_heads", 1))


@dataclass(frozen=True)
class SiteSpec:
    """How one layer is quantized: weight bits, input quantizer, optional output quantizer."""

    role: str
    weight_bits: int
    weight_granularity: str
    input_bits: int | None
    input_signed: bool
    input_offset: bool
    output_bits: int | None
    output_granularity: str
    num_heads: int
    gradient_scale: str


def site_spec(config: QVarConfig, model: nn.Module, name: str) -> SiteSpec:
    """Resolve the config (defaults, role rules, per-module overrides) for module ``name``."""
    role = module_role(name)
    override: dict = {}
    for pattern, settings in config.module_overrides.items():
        if name_matches(name, pattern):
            override = {**override, **settings}
    weight_bits = override.get("weight_bits", config.weight_bits)
    act_bits = override.get("act_bits", config.act_bits)
    quantize_input = override.get("quantize_input", config.quantize_activations)
    is_qkv = role in QKV_ROLES
    heads = head_count(model, name) if is_qkv else 1
    granularity = config.granularity
    if granularity == "per_head" and not is_qkv:
        granularity = "per_tensor"
    output_bits = act_bits if (is_qkv and config.quantize_activations and config.quantize_qkv_outputs) else None
    unsigned_input = role == "mlp_output"
    return SiteSpec(
        role=role,
        weight_bits=weight_bits,
        weight_granularity=granularity,
        input_bits=act_bits if quantize_input else None,
        input_signed=not unsigned_input,
        input_offset=unsigned_input and config.mlp_output_offset,
        output_bits=output_bits,
        output_granularity="per_head" if granularity == "per_head" else "per_tensor",
        num_heads=heads,
        gradient_scale=config.gradient_scale,
    )
