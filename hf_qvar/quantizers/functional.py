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


def unfrozen_code(qn: int) -> int:
    """The code that marks a weight as not frozen in a ``frozen_codes`` tensor: one below the grid."""
    return qn - 1


def frozen_codes_dtype(qn: int) -> torch.dtype:
    """The smallest integer dtype holding the grid ``[qn, …]`` and `unfrozen_code` (int16 only for 8 bits)."""
    return torch.int8 if unfrozen_code(qn) >= -128 else torch.int16


def is_frozen(frozen_codes: torch.Tensor, qn: int) -> torch.Tensor:
    """Which weights oscillation freezing holds: a ``frozen_codes`` tensor holds each frozen weight's integer code
    and `unfrozen_code` elsewhere (one tensor, not a mask and codes: half the inputs for compiled graphs and
    kernel launches)."""
    return frozen_codes >= qn


def hold_frozen(codes: torch.Tensor, frozen_codes: torch.Tensor, qn: int) -> torch.Tensor:
    """``codes`` with every frozen weight's code replaced by its frozen code (what the forward uses)."""
    return torch.where(is_frozen(frozen_codes, qn), frozen_codes.to(codes.dtype), codes)


def freeze_codes(frozen_codes: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``frozen_codes`` with the weights under ``mask`` frozen at ``codes`` (the others as they were)."""
    return torch.where(mask, codes.to(frozen_codes.dtype), frozen_codes)


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fake-quantized ``x`` is produced in: in eager autocast, fp32 sites go straight to the autocast
    dtype, which their consumer (a matmul) would cast them to anyway; the values are the same and the cast
    kernel (one per weight each step) is saved. The backward's gradient reaches ``x`` in ``x.dtype``. Under
    ``torch.compile`` the cast is left to Inductor, which fuses it: producing bf16 inside the function made the
    GPU-bound BERT-base W4A4 step (CUDA graphs) 13.7 → 15.6 ms on the H100."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device) and not torch.compiler.is_compiling():
        return torch.get_autocast_dtype(device)
    return x.dtype


def l1_grad_scale(x: torch.Tensor, step_shape: torch.Size, group_size: int, qp: int) -> torch.Tensor:
    """The paper's step-size gradient scale ``1/sqrt(‖x_g‖₁·Qp)`` (method.md §3.2), shaped like the step.

    Each step entry's ``x_g`` is every element of ``x`` it quantizes, together with those of the ``group_size − 1``
    entries that follow it (per-head steps are expanded to one entry per channel: a head's channels share one norm).
    Leading stacked-layer dimensions are kept apart (OBR stacks alike layers)."""
    with torch.no_grad():
        l1 = x.float().abs().sum_to_size(step_shape)
        if group_size > 1:
            l1 = l1.reshape(-1, group_size).sum(-1, keepdim=True).expand(-1, group_size).reshape(step_shape)
        return torch.rsqrt(l1.clamp_min(1e-12) * qp)


def fake_quantize_values(x, step, offset, qn: int, qp: int, frozen_codes=None, binary: bool = False,
                         axis: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The forward value of `lsq_fake_quantize` (``binary=False``) or `signed_binarize` (``binary=True``), in
    ``dtype`` (default `output_dtype`), without autograd: the fused kernels when ``axis`` (from
    `triton_kernels.fused_layout`) is given, the reference ops otherwise."""
    dtype = output_dtype(x) if dtype is None else dtype
    if axis is not None:
        return kernels.fake_quantize_forward(x, step, offset, qn, qp, frozen_codes, binary=binary, axis=axis,
                                             dtype=dtype)
    if binary:
        return (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * step).to(dtype)
    shifted = x if offset is None else x - offset
    q = torch.clamp(torch.round(shifted / step), qn, qp)
    if frozen_codes is not None:
        q = hold_frozen(q, frozen_codes, qn)
    out = q * step
    if offset is not None:
        out = out + offset
    return out.to(dtype)


def fake_quantize_grads(grad_out, x, step, offset, qn: int, qp: int, frozen_codes=None, binary: bool = False,
                        grad_scale=None, l1_group_size: int = 0, axis: int | None = None,
                        values_dtype: torch.dtype | None = None):
    """``(grad_x, grad_step, grad_offset, values)`` of `fake_quantize_values` given the gradient of its output (see
    `_FakeQuantize` for the formulas), without autograd; kernels or reference ops as for the values. ``values`` is
    the forward value in ``values_dtype`` when that is given (on the kernels, from the same pass over ``x``), else
    None."""
    if axis is not None:
        return kernels.fake_quantize_backward(grad_out, x, step, offset, qn, qp, frozen_codes, binary=binary,
                                              grad_scale=grad_scale, l1_group_size=l1_group_size, axis=axis,
                                              values_dtype=values_dtype)
    values = None
    if values_dtype is not None:
        values = fake_quantize_values(x, step, offset, qn, qp, frozen_codes, binary, dtype=values_dtype)
    if binary:
        sign = torch.where(x >= 0, 1.0, -1.0)  # fp32: the α-gradient is summed in fp32, as the kernels do
        grad_x = grad_out * ((x / step).abs() <= 1)
        return grad_x, (grad_out * sign).sum_to_size(step.shape) * grad_scale, None, values
    shifted = x if offset is None else x - offset
    v = shifted / step
    inside = (v >= qn) & (v <= qp)
    q = torch.clamp(torch.round(v), qn, qp)
    # d x̂ / d α = q − v inside, q (= Qn or Qp) outside; the frozen code for frozen elements.
    d_step = torch.where(inside, q - v, q)
    if frozen_codes is not None:
        frozen = is_frozen(frozen_codes, qn)
        inside = inside & ~frozen
        d_step = torch.where(frozen, frozen_codes.to(d_step.dtype), d_step)
    grad_x = grad_out * inside
    if l1_group_size:
        grad_scale = l1_grad_scale(x, step.shape, l1_group_size, qp)
    grad_step = (grad_out * d_step).sum_to_size(step.shape) * grad_scale
    grad_offset = None
    if offset is not None:
        # Summed in (at least) fp32, as the kernels do: bf16 sums would round the result.
        grad_offset = (grad_out.to(torch.promote_types(grad_out.dtype, torch.float32)) * (~inside)).sum_to_size(
            offset.shape)
    return grad_x, grad_step, grad_offset, values


class _FakeQuantize(torch.autograd.Function):
    """LSQ / LSQ+ fake quantization with a straight-through round, or BiT's elastic binarizer (``binary``).

    LSQ gradients (Esser et al. 2020; LSQ+ for the offset):
      * x: passes through inside ``[Qn, Qp]``, zero where clipped;
      * α: ``round(v) − v`` inside, ``Qn``/``Qp`` where clipped, times ``grad_scale``;
      * β: one where clipped, zero inside (no gradient scale, as the reference code).
    Binarizer ``x̂ = α·sign(x)`` (Liu et al. 2022): x passes where ``|x/α| ≤ 1``; α gets ``Σ sign(x)·grad``,
    times ``grad_scale``.
    ``step`` and ``offset`` may be any shape that broadcasts against ``x``; their
    gradients are summed back to that shape.

    The α-gradient scale is a number (``grad_scale``) or, with ``l1_group_size > 0``, the paper's
    `l1_grad_scale` of ``x``: computed here in the backward, from the saved ``x``, so the forward of a weight
    quantizer is one kernel and the norm's reduction shares the backward's pass over ``x``.

    Oscillation freezing (``frozen_codes``, see `is_frozen`): a frozen element outputs
    ``frozen_code·α``, gets no x-gradient and gives α the gradient ``frozen_code`` (scaled
    like the rest), all inside this one function instead of extra autograd ops per layer.
    """

    @staticmethod
    def forward(ctx, x, step, offset, grad_scale, qn: int, qp: int, frozen_codes=None, l1_group_size: int = 0,
                binary: bool = False):
        ctx.save_for_backward(x, step, offset, frozen_codes)
        ctx.args = qn, qp, binary, grad_scale, l1_group_size
        ctx.axis = kernels.fused_layout(x, step, offset)
        return fake_quantize_values(x, step, offset, qn, qp, frozen_codes, binary, ctx.axis)

    @staticmethod
    def backward(ctx, grad_out):
        x, step, offset, frozen_codes = ctx.saved_tensors
        qn, qp, binary, grad_scale, l1_group_size = ctx.args
        grads = fake_quantize_grads(grad_out, x, step, offset, qn, qp, frozen_codes, binary, grad_scale,
                                    l1_group_size, ctx.axis)[:3]
        return *grads, None, None, None, None, None, None


class _FakeQuantizedInputLinear(torch.autograd.Function):
    """``F.linear(x̂, weight, bias)`` with ``x̂`` an activation fake-quantized as by `_FakeQuantize` (no freezing).

    Why one function: composed, the quantizer keeps ``x`` for its backward and the matmul keeps ``x̂``, two
    activation-sized tensors per layer. Here only ``x`` is kept and ``x̂`` is recomputed in the backward (on the
    kernels, by the pass that computes x's gradient), which cut the eager peak memory of a quantized training step
    (see the README's Performance section). Values and gradients are those of the composed ops, and are tested
    against them."""

    @staticmethod
    def forward(ctx, x, weight, bias, step, offset, grad_scale, qn: int, qp: int, binary: bool):
        ctx.axis = kernels.fused_layout(x, step, offset)
        quantized = fake_quantize_values(x, step, offset, qn, qp, None, binary, ctx.axis)
        ctx.save_for_backward(x, weight, step, offset)
        ctx.args = qn, qp, binary, grad_scale, quantized.dtype
        return torch.nn.functional.linear(quantized, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, step, offset = ctx.saved_tensors
        qn, qp, binary, grad_scale, dtype = ctx.args
        needs_x, needs_weight, needs_bias, needs_step, needs_offset = ctx.needs_input_grad[:5]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = grad_x = grad_step = grad_offset = quantized = None
        if needs_x or needs_step or needs_offset:
            grad_quantized = grad_out.matmul(weight.to(grad_out.dtype))
            # The weight gradient's recomputed quantized input comes out of the same pass.
            grad_x, grad_step, grad_offset, quantized = fake_quantize_grads(
                grad_quantized, x, step, offset, qn, qp, None, binary, grad_scale, 0, ctx.axis,
                values_dtype=dtype if needs_weight else None)
        if needs_weight:
            if quantized is None:
                quantized = fake_quantize_values(x, step, offset, qn, qp, None, binary, ctx.axis, dtype)
            grad_weight = grad_rows.t().mm(quantized.reshape(-1, quantized.shape[-1]))
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias, grad_step, grad_offset, None, None, None, None


class _BinaryWeight(torch.autograd.Function):
    """BWN weight binarization ``ŵ = mean|W|·sign(W − mean W)`` with an identity STE.

    ``scale`` (mean |W| per group) and ``center`` (mean W per group) are computed by the
    caller without gradient, as in BiT's ``BwnQuantizer``. Frozen elements output
    ``frozen_code·scale`` and get no gradient.
    """

    @staticmethod
    def forward(ctx, w, scale, center, frozen_codes=None):
        sign = torch.where(w >= center, 1.0, -1.0)
        frozen = is_frozen(frozen_codes, -1) if frozen_codes is not None else None
        if frozen is not None:
            sign = torch.where(frozen, frozen_codes.to(sign.dtype), sign)
        ctx.save_for_backward(frozen)
        return (sign * scale).to(output_dtype(w))

    @staticmethod
    def backward(ctx, grad_out):
        (frozen,) = ctx.saved_tensors
        grad_w = grad_out if frozen is None else grad_out * ~frozen
        return grad_w, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    grad_scale: float | None,
    qn: int,
    qp: int,
    offset: torch.Tensor | None = None,
    frozen_codes: torch.Tensor | None = None,
    l1_group_size: int = 0,
) -> torch.Tensor:
    """Fake-quantize ``x`` on the grid ``step·[qn..qp] (+ offset)``, frozen elements held at their code; α's
    gradient scaled by ``grad_scale`` or, when ``l1_group_size > 0`` (``grad_scale`` None), by `l1_grad_scale`.
    See `_FakeQuantize`."""
    if (grad_scale is None) == (l1_group_size <= 0):
        raise ValueError(
            f"Pass exactly one of `grad_scale` (got {grad_scale!r}) and a positive `l1_group_size` "
            f"(got {l1_group_size!r})."
        )
    return _FakeQuantize.apply(x, step, offset, grad_scale, qn, qp, frozen_codes, l1_group_size)


def signed_binarize(x: torch.Tensor, step: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``α·sign(x)`` with BiT's elastic gradients; see `_FakeQuantize`."""
    return _FakeQuantize.apply(x, step, None, grad_scale, -1, 1, None, 0, True)


def fake_quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    step: torch.Tensor,
    offset: torch.Tensor | None,
    grad_scale: float,
    qn: int,
    qp: int,
    binary: bool = False,
) -> torch.Tensor:
    """``F.linear(q(x), weight, bias)`` for ``q`` = `lsq_fake_quantize` (or `signed_binarize` when ``binary``)
    with the same values and gradients, but only ``x`` kept for the backward; see `_FakeQuantizedInputLinear`."""
    return _FakeQuantizedInputLinear.apply(x, weight, bias, step, offset, grad_scale, qn, qp, binary)


def binary_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    center: torch.Tensor,
    frozen_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale·sign(w − center)`` with an identity straight-through gradient; frozen elements held at
    ``frozen_code·scale`` without gradient."""
    return _BinaryWeight.apply(w, scale, center, frozen_codes)


def integer_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The integer codes ``round(clip(x/α, Qn, Qp))`` (no gradient), used by OBR and tracking."""
    with torch.no_grad():
        return torch.clamp(torch.round(x / step), qn, qp)
