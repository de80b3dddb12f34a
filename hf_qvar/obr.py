"""Oscillation-aware bin regularization (OBR, method.md §5.3): a stateless loss over quantized layers.

Per quantized layer, with ``w_clip = α·clip(W/α, Qn, Qp)`` and the detached target ``ŵ = α·code``:

* term 1 = ``mean((ŵ − w_clip)²)`` (reference code; ``sum`` = the paper's form): pulls latent weights to
  their grid point (Nagel et al.'s dampening loss);
* term 2 = Σ over bins of the unbiased variance of ``w_clip`` inside the bin (Han et al.'s bin
  regularization), bins = integer codes (never float equality, §10 #12), only bins with > 1 element.

``L_OBR = Σ_layers (term1 + term2)``, weighted by `obr_lambda`'s cosine ramp. Gradients reach W (inside the
clip range) and the step size α (clipped elements, scaled by the layer's step-size gradient scale, as in the
reference). Bins are per step-size group (a per-channel step makes one set of bins per channel). Elements
frozen by oscillation freezing are left out: their code is fixed and their latent value no longer matters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .nn.qlinear import QuantizedLayerMixin
from .quantizers.fake_quantizer import BinaryWeightQuantizer

REDUCTIONS = ("mean", "sum")


def obr_lambda(progress: float, lambda_max: float, start: float) -> float:
    """Cosine-ramped OBR weight at training ``progress`` ∈ [0, 1] (the reference's ``CosineTempDecay``).

    ``0`` before ``start``; then ``λ_max − λ_max/2·(1 + cos(π·(p − start)/(1 − start)))``, rising from 0 to λ_max.
    """
    if progress <= start or lambda_max == 0:
        return 0.0
    ramp = min((progress - start) / max(1.0 - start, 1e-12), 1.0)
    return lambda_max - lambda_max / 2 * (1 + math.cos(math.pi * ramp))


def _scale_grad(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Value of ``t``, gradient times ``scale`` (LSQ gradient-scale trick)."""
    return (t - t.detach()) * scale + t.detach()


def binned_variance_sum(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Σ over bins with > 1 element of the unbiased variance of ``values`` in the bin, without a loop over bins.

    ``bins`` holds integer bin ids in ``[0, num_bins)``, same shape as ``values``. Two-pass (mean, then squared
    deviations) so low-variance bins do not lose precision; the gradient flows through the bin means too,
    exactly as ``torch.var`` per bin.
    """
    values, bins = values.reshape(-1), bins.reshape(-1)
    counts = torch.bincount(bins, minlength=num_bins).to(values.dtype)
    sums = values.new_zeros(num_bins).index_add(0, bins, values)
    means = sums / counts.clamp_min(1)
    squared = values.new_zeros(num_bins).index_add(0, bins, (values - means[bins]) ** 2)
    valid = counts > 1
    return (squared[valid] / (counts[valid] - 1)).sum()


def obr_layer_terms(layer: QuantizedLayerMixin, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(term 1, term 2) of one quantized layer (see the module docstring)."""
    quantizer, weight = layer.weight_quantizer, layer.weight
    step = quantizer.step(weight)
    codes = quantizer.codes(weight)
    if isinstance(quantizer, BinaryWeightQuantizer):
        # BWN has an identity STE and a scale computed from W without gradient: no clip, α is not learnt.
        w_clip = weight
    else:
        step = _scale_grad(step, quantizer.grad_scale(weight))
        w_clip = torch.clamp(weight / step, quantizer.qn, quantizer.qp) * step
    target = (codes * step).detach()
    num_codes = quantizer.qp - quantizer.qn + 1
    group_ids = torch.arange(quantizer.num_groups, device=weight.device)[:, None]
    bins = group_ids * num_codes + quantizer.grouped((codes - quantizer.qn).long())
    w_clip, target = quantizer.grouped(w_clip), quantizer.grouped(target)
    mask = getattr(quantizer, "frozen_mask", None)
    if mask is not None:
        keep = ~quantizer.grouped(mask)
        w_clip, target, bins = w_clip[keep], target[keep], bins[keep]
    squared = (target - w_clip) ** 2
    if reduction == "mean":
        term1 = squared.mean() if squared.numel() else squared.sum()
    else:
        term1 = squared.sum()
    term2 = binned_variance_sum(w_clip, bins, quantizer.num_groups * num_codes)
    return term1, term2


def obr_layers(model: nn.Module, max_bits: int = 8) -> list[QuantizedLayerMixin]:
    """Quantized layers OBR applies to: those with a weight quantizer of at most ``max_bits`` bits."""
    return [
        m for m in model.modules()
        if isinstance(m, QuantizedLayerMixin) and m.weight_quantizer is not None and m.weight_quantizer.bits <= max_bits
    ]


def obr_loss(model: nn.Module, reduction: str = "mean", max_bits: int = 8) -> torch.Tensor:
    """``L_OBR = Σ_layers (term1 + term2)`` over `obr_layers` (the reference includes 8-bit boundary layers;
    lower ``max_bits`` to leave them out, method.md §10 #3).

    Args:
        model (`nn.Module`): a model holding `QuantizedLayerMixin` layers.
        reduction (`str`, *optional*, defaults to ``"mean"``): term 1 as ``mean`` (reference code) or ``sum`` (paper).
        max_bits (`int`, *optional*, defaults to 8): skip layers whose weights have more bits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    layers = obr_layers(model, max_bits)
    if not layers:
        raise ValueError(f"OBR found no quantized layer with at most {max_bits} weight bits in {type(model).__name__}.")
    total = None
    for layer in layers:
        term1, term2 = obr_layer_terms(layer, reduction)
        total = term1 + term2 if total is None else total + term1 + term2
    return total
