"""Checks on quantizer state loaded from a checkpoint: nothing missing, every step size usable."""

from __future__ import annotations

import torch
from torch import nn

from ..quantizers.fake_quantizer import FakeQuantizer, mark_step_parameters


def quantizer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer that belongs to a quantizer, by state-dict name."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            for key, tensor in module.state_dict(keep_vars=True).items():
                tensors[f"{name}.{key}"] = tensor
    return tensors


def validate_loaded_quantizers(model: nn.Module) -> None:
    """Refuse a checkpoint whose quantizer tensors are missing, non-finite or non-positive.

    Missing tensors are found from the loader's ``_is_hf_initialized`` flags (transformers 5.x), which every
    loaded tensor carries.
    """
    tensors = quantizer_tensors(model)
    flags_used = any(hasattr(p, "_is_hf_initialized") for p in model.parameters())
    missing = sorted(
        name for name, t in tensors.items()
        if flags_used and not getattr(t, "_is_hf_initialized", False)
    )
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(
            f"This qvar checkpoint lacks {len(missing)} quantizer tensor(s): {shown}. It was probably saved "
            "without `import hf_qvar` (as a plain model). Re-quantize it from the full-precision weights with "
            "`from_pretrained(..., quantization_config=QVarConfig(...))` instead."
        )
    for name, tensor in tensors.items():
        if name.endswith("step_size"):
            data = tensor.detach()
            if not torch.isfinite(data).all() or (data <= 0).any():
                raise ValueError(
                    f"Quantizer step size {name!r} in the checkpoint must be finite and positive, got "
                    f"{data.flatten()[:4].tolist()}. The checkpoint is corrupt or diverged during training."
                )
    mark_step_parameters(model)
    for module in model.modules():
        if hasattr(module, "sync_calibration_state"):
            module.sync_calibration_state()
