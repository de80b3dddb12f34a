"""The one module swap: Linear/Conv2d -> QLinear/QConv2d by name, with the skip list and overrides."""

from __future__ import annotations

import torch
from torch import nn

from ..config import PAPER_BOUNDARY_OVERRIDES, QVarConfig
from ..quantizers.fake_quantizer import make_activation_quantizer
from .attention import PROBS_QUANTIZER
from .qlinear import QUANTIZABLE, QuantizedLayerMixin
from .sites import module_role, name_matches, site_spec


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Task heads: every Linear/Conv2d outside the backbone (``model.base_model``), plus output embeddings.

    Robust across transformers versions (5.x's own helper returns ``classifier.bias`` and so misses the head).
    """
    base = getattr(model, "base_model", model)
    backbone = {id(m) for m in base.modules()} if base is not model else set()
    heads = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and backbone and id(m) not in backbone]
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads += [n for n, m in model.named_modules() if output_embeddings is not None and m is output_embeddings]
    return sorted(set(heads))


def _user_overrides(config: QVarConfig) -> dict[str, dict]:
    """Overrides the user wrote (the paper defaults are allowed to match nothing, e.g. on BERT)."""
    return {p: s for p, s in config.module_overrides.items() if PAPER_BOUNDARY_OVERRIDES.get(p) != s}


def _check_patterns_match(names: list[str], patterns: list[str], field: str, model: nn.Module) -> None:
    for pattern in patterns:
        if not any(name_matches(name, pattern) for name in names):
            examples = ", ".join(names[:4])
            raise ValueError(
                f"`{field}` pattern {pattern!r} matches no Linear/Conv2d module of {type(model).__name__} "
                f"(names look like: {examples}, ...)."
            )


def modules_to_quantize(model: nn.Module, config: QVarConfig) -> dict[str, nn.Module]:
    """Name -> module for every layer the config converts (validated)."""
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n}
    names = list(candidates)
    user_overrides = _user_overrides(config)
    _check_patterns_match(names, list(user_overrides), "module_overrides", model)
    if config.modules_to_not_convert is not None:
        _check_patterns_match(names, config.modules_to_not_convert, "modules_to_not_convert", model)
        skip = list(config.modules_to_not_convert)
    else:
        skip = [h for h in default_modules_to_not_convert(model) if not any(name_matches(h, p) for p in user_overrides)]
    selected = {}
    for name, module in candidates.items():
        if any(name_matches(name, pattern) for pattern in skip):
            continue
        explicit = any(name_matches(name, p) for p in config.module_overrides)
        if isinstance(module, nn.Conv2d) and not (module_role(name) == "patch_embedding" or explicit):
            continue
        selected[name] = module
    if not selected:
        raise ValueError(f"QVarConfig converts no module of {type(model).__name__}: check `modules_to_not_convert`.")
    return selected


def replace_with_qvar_layers(model: nn.Module, config: QVarConfig, create_quantizers: bool) -> list[str]:
    """Swap every selected layer for its quantized twin in place; returns the converted names.

    With ``create_quantizers`` (reloading a quantized checkpoint) the quantizer modules are built now,
    on the layer's device (meta while loading), so the checkpoint's step sizes load into them.
    """
    converted = []
    for name, module in modules_to_quantize(model, config).items():
        spec = site_spec(config, model, name)
        if spec.weight_granularity == "per_head" and module.weight.shape[0] % spec.num_heads:
            raise ValueError(
                f"`granularity='per_head'` cannot split module {name!r}: its {module.weight.shape[0]} output "
                f"channels are not divisible by its {spec.num_heads} heads."
            )
        for float_cls, quant_cls, convert in QUANTIZABLE:
            if type(module) is float_cls:
                layer = convert(module, spec)
                break
        else:
            continue
        if create_quantizers:
            layer.attach_quantizers(spec, device=module.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        converted.append(name)
    if create_quantizers:
        attach_attention_probs_quantizers(model, config)
    return converted


def attach_missing_quantizers(model: nn.Module, config: QVarConfig) -> None:
    """After loading full-precision weights: build the quantizers on the weights' device and init steps."""
    for module in model.modules():
        if isinstance(module, QuantizedLayerMixin) and module.weight_quantizer is None:
            module.attach_quantizers(module.spec)
            module.weight_quantizer.initialize(module.weight)
    attach_attention_probs_quantizers(model, config)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention blocks whose query projection was quantized (they own the softmax site)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayerMixin) and module.spec.role == "query":
            blocks.append(model.get_submodule(name.rpartition(".")[0]))
    return blocks


def attach_attention_probs_quantizers(model: nn.Module, config: QVarConfig) -> None:
    if not (config.quantize_activations and config.quantize_attention_probs):
        return
    for block in attention_modules(model):
        if getattr(block, PROBS_QUANTIZER, None) is None:
            device = next(p.device for p in block.parameters())
            quantizer = make_activation_quantizer(config.act_bits, signed=False, gradient_scale=config.gradient_scale)
            setattr(block, PROBS_QUANTIZER, quantizer.to(device=device, dtype=torch.float32))
