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


class _BinSum(torch.autograd.Function):
    """Per-bin sums through ``torch.bincount(weights=...)``: privatised histograms, no contended atomics
    (``index_add`` into a handful of bins serialises millions of atomic adds on a GPU); backward is a gather."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
        ctx.save_for_backward(bins)
        return torch.bincount(bins, weights=values, minlength=num_bins)[:num_bins]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (bins,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1)])  # excluded elements carry the bin id ``num_bins``
        return padded[bins.clamp_max(grad.numel())], None, None


def binned_variance_sum(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Σ over bins with > 1 element of the unbiased variance of ``values`` in the bin, without a loop over bins.

    ``bins`` holds integer bin ids in ``[0, num_bins)`` (id ``num_bins`` = left out), same shape as ``values``.
    Uses ``(Σx² − (Σx)²/n)/(n − 1)`` accumulated in float64, so it needs no per-element gather of bin means and
    no host synchronisation; the gradient equals that of ``torch.var`` per bin.
    """
    x, b = values.reshape(-1).double(), bins.reshape(-1)
    counts = torch.bincount(b, minlength=num_bins)[:num_bins].double()
    sums = _BinSum.apply(x, b, num_bins)
    squares = _BinSum.apply(x * x, b, num_bins)
    variance = (squares - sums * sums / counts.clamp_min(1)) / (counts - 1).clamp_min(1)
    return torch.where(counts > 1, variance, torch.zeros_like(variance)).sum().to(values.dtype)


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
    num_bins = quantizer.num_groups * num_codes
    squared = (target - w_clip) ** 2
    mask = getattr(quantizer, "frozen_mask", None)
    if mask is not None:  # frozen weights leave both terms: masked, not indexed (no host sync)
        keep = ~quantizer.grouped(mask)
        bins = torch.where(keep, bins, num_bins)
        squared = squared * keep
        count = keep.sum()
    else:
        count = squared.numel()
    term1 = squared.sum() / (count if isinstance(count, int) else count.clamp_min(1)) if reduction == "mean" else squared.sum()
    term2 = binned_variance_sum(w_clip, bins, num_bins)
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
