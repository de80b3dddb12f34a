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

from .compile_utils import cuda_compiled
from .cuda_graphs import GraphedStep
from .nn.qlinear import QuantizedLayerMixin, latent_tensor_reader
from .quantizers import functional as F
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


#: Code levels handled per pass of the one-hot moments (≤ 4-bit codes: one pass; 8-bit: 16 passes).
_LEVELS_PER_PASS = 16


def _one_hot_moments(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> list[tuple[torch.Tensor, ...]]:
    """Per-bin (count, Σx, Σx²) of ``(G, n)`` rows from masked row reductions, one per bin and moment: no
    scatter atomics, and compiled (the GPU path) they fuse into one pass over the rows per `_LEVELS_PER_PASS`
    bins (a ``(G, n, bins)`` one-hot tensor made Inductor re-read the rows once per bin)."""
    moments, squares = [], values * values
    for first in range(0, num_bins, _LEVELS_PER_PASS):
        members = [bins == level for level in range(first, min(first + _LEVELS_PER_PASS, num_bins))]
        moments.append(tuple(torch.stack(per_bin, dim=1) for per_bin in (
            [m.sum(dim=1).to(values.dtype) for m in members],
            [torch.where(m, values, 0).sum(dim=1) for m in members],
            [torch.where(m, squares, 0).sum(dim=1) for m in members],
        )))
    return moments


def _scatter_moments(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> list[tuple[torch.Tensor, ...]]:
    """Per-bin (count, Σx, Σx²) of ``(G, n)`` rows by ``index_add``: one pass over the weights whatever the
    number of bins (the CPU path: the one-hot form materialises ``n × bins`` temporaries there)."""
    rows, width = values.shape[0], num_bins + 1  # slot ``num_bins`` collects the left-out elements
    ids = (bins + torch.arange(rows, device=bins.device).unsqueeze(1) * width).reshape(-1)
    flat = values.reshape(-1)

    def per_bin(source: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(rows * width).index_add(0, ids, source).reshape(rows, width)[:, :num_bins]

    return [(per_bin(torch.ones_like(flat)), per_bin(flat), per_bin(flat * flat))]


def binned_variance_sum(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Σ over bins with > 1 element of the unbiased variance of ``values`` in the bin, without a loop over bins.

    ``values`` and ``bins`` are ``(G, n)`` rows (or 1-D, one row); ``bins`` holds ids in ``[0, num_bins)``
    (``num_bins`` = left out). Per-bin counts, sums and sums of squares (one-hot reductions on GPUs, ``index_add``
    elsewhere; no host synchronisation either way), then ``(Σx² − (Σx)²/n)/(n − 1)``; the gradient equals that
    of ``torch.var`` per bin. Callers pass values centred per bin (OBR passes ``w_clip − code·α``), which keeps
    that formula free of cancellation.
    """
    rows = values.shape[0] if values.ndim > 1 else 1
    values, bins = values.reshape(rows, -1), bins.reshape(rows, -1)
    moments = _one_hot_moments if values.is_cuda else _scatter_moments
    total = values.new_zeros(())
    for counts, sums, squares in moments(values, bins, num_bins):
        variance = (squares - sums * sums / counts.clamp_min(1)) / (counts - 1).clamp_min(1)
        total = total + torch.where(counts > 1, variance, 0).sum()
    return total


def _terms(residual: torch.Tensor, codes: torch.Tensor, frozen_mask: torch.Tensor | None, qn: int,
           num_codes: int, layers: int, groups: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both OBR terms from ``residual = w_clip − code·α`` of ``layers`` stacked layers with ``groups`` step-size
    groups in all (term 1 = its square, averaged per layer; term 2 = per-bin variance per group)."""
    residual = residual.reshape(groups, -1)
    bins = (codes.reshape(groups, -1) - qn).long()
    squared = residual * residual
    if frozen_mask is not None:  # frozen weights leave both terms: masked, not indexed (no host sync)
        keep = ~frozen_mask.reshape(groups, -1)
        bins = torch.where(keep, bins, num_codes)
        squared = squared * keep
        count = keep.reshape(layers, -1).sum(dim=1).clamp_min(1)
    else:
        count = squared.numel() // layers
    per_layer = squared.reshape(layers, -1).sum(dim=1)
    term1 = (per_layer / count).sum() if mean else per_layer.sum()
    # One set of bins per step-size group: each row is one group's weights.
    return term1, binned_variance_sum(residual, bins, num_codes)


@cuda_compiled
def lsq_obr_terms(weight: torch.Tensor, quantizer: nn.Module, step_size: torch.Tensor, frozen_codes: torch.Tensor | None,
                  layers: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """OBR terms of ``layers`` stacked LSQ layers quantized like ``quantizer`` (their step sizes stacked in
    ``step_size``); gradients reach W inside the clip range and α (scaled by the step-size gradient scale)."""
    qn, qp = quantizer.qn, quantizer.qp
    step = quantizer.expand(step_size, weight.ndim)
    scaled_step = (step - step.detach()) * quantizer.grad_scale(weight, lead=1) + step.detach()
    w_clip = torch.clamp(weight / scaled_step, qn, qp) * scaled_step
    codes = F.integer_codes(weight, step.detach(), qn, qp)
    frozen = F.is_frozen(frozen_codes, qn) if frozen_codes is not None else None
    return _terms(w_clip - codes * step.detach(), codes, frozen, qn, qp - qn + 1, layers,
                  layers * quantizer.num_groups, mean)


@cuda_compiled
def binary_obr_terms(weight: torch.Tensor, quantizer: nn.Module, frozen_codes: torch.Tensor | None, layers: int,
                     mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """OBR terms of stacked BWN layers: no clip, the scale is not learnt, bins are the two signs."""
    scale, center = quantizer._stats(weight, lead=1)
    codes = torch.where(weight.detach() >= center, 1.0, -1.0).to(weight.dtype)
    # Codes are ±1: bin ids (code + 1) / 2 ∈ {0, 1}.
    frozen = F.is_frozen(frozen_codes, quantizer.qn) if frozen_codes is not None else None
    return _terms(weight - codes * scale, (codes + 1) / 2, frozen, 0, 2, layers, layers * quantizer.num_groups, mean)


def _stack_key(layer: QuantizedLayerMixin) -> tuple:
    """Layers with equal keys have the same quantizer settings and weight shape: their terms are one pass."""
    q, w = layer.weight_quantizer, layer.weight
    return (type(q), q.qn, q.qp, q.granularity, q.channels, q.num_heads, q.gradient_scale, tuple(w.shape), w.dtype,
            w.device, q.frozen_codes is not None)


def stacked_obr_terms(layers: list[QuantizedLayerMixin], reduction: str = "mean", weight: torch.Tensor | None = None,
                      step_size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ term1, Σ term2)`` of layers with one `_stack_key`, computed on their stacked weights: a handful of
    kernels for all of them instead of a handful per layer (per-layer launches made OBR host-bound).

    ``weight`` and ``step_size`` stand in for the stacked weights and step sizes (`OBRGradient` differentiates
    with respect to leaves of its own); by default the layers' parameters are stacked, so gradients reach them.
    """
    q = layers[0].weight_quantizer
    if weight is None:
        weight = torch.stack([layer.weight for layer in layers])
    frozen = torch.stack([layer.weight_quantizer.frozen_codes for layer in layers]) if q.frozen_codes is not None else None
    mean = reduction == "mean"
    if isinstance(q, BinaryWeightQuantizer):
        return binary_obr_terms(weight, q, frozen, len(layers), mean)
    if step_size is None:
        step_size = torch.stack([layer.weight_quantizer.step_size for layer in layers])
    return lsq_obr_terms(weight, q, step_size, frozen, len(layers), mean)


def obr_layer_terms(layer: QuantizedLayerMixin, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(term 1, term 2) of one quantized layer (see the module docstring)."""
    return stacked_obr_terms([layer], reduction)


def obr_stacks(layers: list[QuantizedLayerMixin]) -> list[list[QuantizedLayerMixin]]:
    """``layers`` grouped by `_stack_key`: each group's terms are one stacked pass."""
    stacks: dict[tuple, list[QuantizedLayerMixin]] = {}
    for layer in layers:
        stacks.setdefault(_stack_key(layer), []).append(layer)
    return list(stacks.values())


def layers_obr_terms(layers: list[QuantizedLayerMixin], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ term1, Σ term2)`` over ``layers``, one stacked pass per group of alike layers."""
    dampening, bin_variance = zip(*(stacked_obr_terms(stack, reduction) for stack in obr_stacks(layers)))
    return torch.stack(dampening).sum(), torch.stack(bin_variance).sum()


def obr_layers(model: nn.Module, max_bits: int = 8) -> list[QuantizedLayerMixin]:
    """Quantized layers OBR applies to: those with a weight quantizer of at most ``max_bits`` bits."""
    return [
        m for m in model.modules()
        if isinstance(m, QuantizedLayerMixin) and m.weight_quantizer is not None and m.weight_quantizer.bits <= max_bits
    ]


def _checked_obr_layers(model: nn.Module, reduction: str, max_bits: int) -> list[QuantizedLayerMixin]:
    """`obr_layers`, after checking ``reduction``; an error if there are none."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    layers = obr_layers(model, max_bits)
    if not layers:
        raise ValueError(f"OBR found no quantized layer with at most {max_bits} weight bits in {type(model).__name__}.")
    return layers


def obr_terms(model: nn.Module, reduction: str = "mean", max_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_layers term1, Σ_layers term2)`` over `obr_layers`: the dampening term and the summed per-bin
    variance, which `QVarTrainer` logs separately (the bin variance over training is what OBR shrinks).

    Args:
        model (`nn.Module`): a model holding `QuantizedLayerMixin` layers.
        reduction (`str`, *optional*, defaults to ``"mean"``): term 1 as ``mean`` (reference code) or ``sum`` (paper).
        max_bits (`int`, *optional*, defaults to 8): skip layers whose weights have more bits (the reference
            includes 8-bit boundary layers; lower it to leave them out, method.md §10 #3).
    """
    return layers_obr_terms(_checked_obr_layers(model, reduction, max_bits), reduction)


def obr_loss(model: nn.Module, reduction: str = "mean", max_bits: int = 8) -> torch.Tensor:
    """``L_OBR = Σ_layers (term1 + term2)``; arguments as `obr_terms`."""
    dampening, bin_variance = obr_terms(model, reduction, max_bits)
    return dampening + bin_variance


class OBRGradient:
    """Adds ``λ·∇L_OBR`` to the gradients of the OBR layers' weights and step sizes, after the backward pass.

    The gradient is autograd's own, of the same `layers_obr_terms`, but taken apart from the training loss:
    the whole computation then touches the same tensors every step, so on GPUs it is captured once and replayed
    from a CUDA graph (`GraphedStep`: one launch instead of a few hundred), and only a multi-tensor add remains.
    The weights do not change between the micro-batches of one optimizer step, so adding it once, to the
    accumulated (and, under DDP, all-reduced) gradient, equals adding ``λ·L_OBR`` to every micro-batch's loss.
    Gradients must be plain tensors that hold the true gradient: not sharded (FSDP, DeepSpeed) nor scaled (fp16
    `GradScaler`); there, add `obr_loss` to the loss instead.

    Args:
        model (`nn.Module`): a model holding `QuantizedLayerMixin` layers.
        reduction, max_bits: as `obr_terms`.
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", max_bits: int = 8):
        self.layers = _checked_obr_layers(model, reduction, max_bits)
        self.model, self.reduction = model, reduction
        # It reads the weights, step sizes and frozen codes.
        self._step = GraphedStep(self._terms_and_gradients, latent_tensor_reader(self.layers, frozen_codes=True))

    def _terms_and_gradients(self) -> tuple[torch.Tensor, torch.Tensor, list[nn.Parameter], list[torch.Tensor]]:
        """Both terms, and the gradient of their sum for every weight and step size that requires one.

        Autograd differentiates with respect to detached stacked copies (leaves created here), never the
        parameters themselves: their gradient accumulators belong to the training graph (and to DDP), on the
        default stream, which a CUDA-graph capture on its own stream must not touch."""
        terms, leaves, owners = [], [], []
        with torch.enable_grad():
            for stack in obr_stacks(self.layers):
                weight = torch.stack([layer.weight.detach() for layer in stack]).requires_grad_()
                leaves.append(weight)
                owners.append([layer.weight for layer in stack])
                step_size = None
                if not isinstance(stack[0].weight_quantizer, BinaryWeightQuantizer):
                    step_size = torch.stack([layer.weight_quantizer.step_size.detach() for layer in stack]).requires_grad_()
                    leaves.append(step_size)
                    owners.append([layer.weight_quantizer.step_size for layer in stack])
                terms.append(stacked_obr_terms(stack, self.reduction, weight, step_size))
            dampening, bin_variance = (torch.stack(t).sum() for t in zip(*terms))
            grads = torch.autograd.grad(dampening + bin_variance, leaves)
        params, per_param = [], []
        for group, grad in zip(owners, grads):
            for param, g in zip(group, grad.unbind(0)):
                if param.requires_grad:
                    params.append(param)
                    per_param.append(g)
        return dampening.detach(), bin_variance.detach(), params, per_param

    @torch.no_grad()
    def accumulate(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``p.grad += λ·∂L_OBR/∂p`` for every parameter the loss reaches; returns ``(term1, term2)`` as
        `obr_terms` (detached copies)."""
        dampening, bin_variance, params, grads = self._step()
        targets, updates = [param.grad for param in params], grads
        if any(grad is None for grad in targets):  # a parameter the training loss did not reach (rare)
            targets, updates = [], []
            for param, grad in zip(params, grads):
                if param.grad is None:
                    param.grad = grad * lam
                else:
                    targets.append(param.grad)
                    updates.append(grad)
        if targets:
            torch._foreach_add_(targets, updates, alpha=lam)
        return dampening.clone(), bin_variance.clone()
