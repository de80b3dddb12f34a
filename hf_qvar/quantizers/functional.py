"""Autograd primitives of hf_qvar: the only place where quantizer math lives.

Every quantizer module, every training feature (OBR, oscillation tracking) and every
accelerated path calls these functions, so the forward value and the gradient of a
site are defined exactly once. Each is a `torch.autograd.Function` (no detach tricks):
one fused backward, friendly to `torch.compile`.

Notation follows method.md §3: ``x̂ = α·round(clip((x − β)/α, Qn, Qp)) + β``.

On GPUs, eager calls of the LSQ quantizer and the binarizer run as fused Triton kernels (`triton_kernels`)
that compute the same values; the code here is the reference they are tested against.
"""

from __future__ import annotations

import torch

from . import triton_kernels as kernels


def signed_range(bits: int) -> tuple[int, int]:
    """Integer range of a signed b-bit code: ``[-2^(b-1), 2^(b-1) - 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """Integer range of an unsigned b-bit code: ``[0, 2^b - 1]``."""
    return 0, 2**bits - 1


GradScale = torch.Tensor | float


def _save(ctx, grad_scale: GradScale, *tensors) -> None:
    """Save tensors for backward; a float gradient scale rides on ``ctx`` (no host-to-device copy)."""
    if isinstance(grad_scale, torch.Tensor):
        ctx.save_for_backward(*tensors, grad_scale)
        ctx.grad_scale = None
    else:
        ctx.save_for_backward(*tensors)
        ctx.grad_scale = grad_scale


def _saved(ctx) -> tuple[tuple, GradScale]:
    if ctx.grad_scale is None:
        *tensors, grad_scale = ctx.saved_tensors
        return tuple(tensors), grad_scale
    return ctx.saved_tensors, ctx.grad_scale


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ / LSQ+ fake quantization with a straight-through round.

    Gradients (Esser et al. 2020; LSQ+ for the offset):
      * x: passes through inside ``[Qn, Qp]``, zero where clipped;
      * α: ``round(v) − v`` inside, ``Qn``/``Qp`` where clipped, times ``grad_scale``;
      * β: one where clipped, zero inside (no gradient scale, as the reference code).
    ``step`` and ``offset`` may be any shape that broadcasts against ``x``; their
    gradients are summed back to that shape.

    Oscillation freezing (``frozen_mask``/``frozen_codes``): a frozen element outputs
    ``frozen_code·α``, gets no x-gradient and gives α the gradient ``frozen_code`` (scaled
    like the rest), all inside this one function instead of extra autograd ops per layer.
    """

    @staticmethod
    def forward(ctx, x, step, offset, grad_scale, qn: int, qp: int, frozen_mask=None, frozen_codes=None):
        _save(ctx, grad_scale, x, step, offset, frozen_mask, frozen_codes)
        ctx.qn, ctx.qp = qn, qp
        ctx.axis = kernels.fused_layout(x, step, offset)
        if ctx.axis is not None:
            return kernels.fake_quantize_forward(x, step, offset, qn, qp, frozen_mask, frozen_codes, axis=ctx.axis)
        shifted = x if offset is None else x - offset
        q = torch.clamp(torch.round(shifted / step), qn, qp)
        if frozen_mask is not None:
            q = torch.where(frozen_mask, frozen_codes.to(q.dtype), q)
        out = q * step
        if offset is not None:
            out = out + offset
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x, step, offset, frozen_mask, frozen_codes), grad_scale = _saved(ctx)
        if ctx.axis is not None:
            grad_x, step_sums, grad_offset = kernels.fake_quantize_backward(
                grad_out, x, step, offset, ctx.qn, ctx.qp, frozen_mask, frozen_codes, axis=ctx.axis)
            return grad_x, step_sums * grad_scale, grad_offset, None, None, None, None, None
        shifted = x if offset is None else x - offset
        v = shifted / step
        inside = (v >= ctx.qn) & (v <= ctx.qp)
        q = torch.clamp(torch.round(v), ctx.qn, ctx.qp)
        # d x̂ / d α = q − v inside, q (= Qn or Qp) outside; the frozen code for frozen elements.
        d_step = torch.where(inside, q - v, q)
        if frozen_mask is not None:
            inside = inside & ~frozen_mask
            d_step = torch.where(frozen_mask, frozen_codes.to(d_step.dtype), d_step)
        grad_x = grad_out * inside
        grad_step = (grad_out * d_step).sum_to_size(step.shape) * grad_scale
        grad_offset = None
        if offset is not None:
            grad_offset = (grad_out * (~inside)).sum_to_size(offset.shape)
        return grad_x, grad_step, grad_offset, None, None, None, None, None


class _SignedBinarize(torch.autograd.Function):
    """Elastic binary activation ``x̂ = α·sign(x)`` (BiT, Liu et al. 2022).

    x-gradient is straight-through where ``|x/α| ≤ 1``; α-gradient is
    ``Σ sign(x)·grad·grad_scale``.
    """

    @staticmethod
    def forward(ctx, x, step, grad_scale):
        _save(ctx, grad_scale, x, step)
        ctx.axis = kernels.fused_layout(x, step)
        if ctx.axis is not None:
            return kernels.fake_quantize_forward(x, step, None, -1, 1, binary=True, axis=ctx.axis)
        sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return (sign * step).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x, step), grad_scale = _saved(ctx)
        if ctx.axis is not None:
            grad_x, step_sums, _ = kernels.fake_quantize_backward(grad_out, x, step, None, -1, 1, binary=True,
                                                                  axis=ctx.axis)
            return grad_x, step_sums * grad_scale, None
        sign = torch.where(x >= 0, 1.0, -1.0).to(grad_out.dtype)
        grad_x = grad_out * ((x / step).abs() <= 1)
        grad_step = (grad_out * sign).sum_to_size(step.shape) * grad_scale
        return grad_x, grad_step, None


class _BinaryWeight(torch.autograd.Function):
    """BWN weight binarization ``ŵ = mean|W|·sign(W − mean W)`` with an identity STE.

    ``scale`` (mean |W| per group) and ``center`` (mean W per group) are computed by the
    caller without gradient, as in BiT's ``BwnQuantizer``. Frozen elements output
    ``frozen_code·scale`` and get no gradient.
    """

    @staticmethod
    def forward(ctx, w, scale, center, frozen_mask=None, frozen_codes=None):
        sign = torch.where(w >= center, 1.0, -1.0)
        if frozen_mask is not None:
            sign = torch.where(frozen_mask, frozen_codes.to(sign.dtype), sign)
        ctx.save_for_backward(frozen_mask)
        return (sign * scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (frozen_mask,) = ctx.saved_tensors
        grad_w = grad_out if frozen_mask is None else grad_out * ~frozen_mask
        return grad_w, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    grad_scale: GradScale,
    qn: int,
    qp: int,
    offset: torch.Tensor | None = None,
    frozen_mask: torch.Tensor | None = None,
    frozen_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` on the grid ``step·[qn..qp] (+ offset)``, frozen elements held at their code;
    see `_LSQFakeQuantize`."""
    return _LSQFakeQuantize.apply(x, step, offset, grad_scale, qn, qp, frozen_mask, frozen_codes)


def signed_binarize(x: torch.Tensor, step: torch.Tensor, grad_scale: GradScale) -> torch.Tensor:
    """``α·sign(x)`` with BiT's elastic gradients; see `_SignedBinarize`."""
    return _SignedBinarize.apply(x, step, grad_scale)


def binary_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    center: torch.Tensor,
    frozen_mask: torch.Tensor | None = None,
    frozen_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale·sign(w − center)`` with an identity straight-through gradient; frozen elements held at
    ``frozen_code·scale`` without gradient."""
    return _BinaryWeight.apply(w, scale, center, frozen_mask, frozen_codes)


def integer_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The integer codes ``round(clip(x/α, Qn, Qp))`` (no gradient), used by OBR and tracking."""
    with torch.no_grad():
        return torch.clamp(torch.round(x / step), qn, qp)
