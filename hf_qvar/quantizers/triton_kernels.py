"""Fused Triton kernels for `functional`'s LSQ fake quantizer and elastic binarizer: one kernel forward, two
backward (the element-wise pass with partial sums, then one small launch for the step and offset gradients,
their gradient scale included: for weights the L1 norm of the weight, summed in the same pass).

Why: in eager mode the reference runs ~24 small ops per quantizer per training step, and BERT-base has ~180
quantizers, so an eager quantized step was bound by kernel launches (3.7× the full-precision step). These
kernels compute what the reference computes, operation for operation in fp32 (IEEE division, round half to
even); tests compare them with it on GPUs and, through Triton's interpreter, on CPUs. They are an acceleration
only: `functional` uses them for contiguous CUDA tensors outside ``torch.compile`` (where Inductor fuses the
reference itself) and falls back to the reference everywhere else. ``HF_QVAR_TRITON=0`` switches them off.

A quantized tensor is viewed as ``rows × cols`` (``cols`` = its last dim, or everything after dim 0 for a
per-output-channel weight step) and its step is one value, one per row or one per column.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_SWITCH = "HF_QVAR_TRITON"
HAS_TRITON = importlib.util.find_spec("triton") is not None

#: Where the step of an element comes from.
ONE_STEP, STEP_PER_ROW, STEP_PER_COL = 0, 1, 2
#: Entries of the partial sums one `_finalize_kernel` program reduces at a time.
_FINALIZE_BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_half_even(v):
        """``torch.round`` (ties to even) from exact fp32 operations (the interpreter has no ``rint``)."""
        low = tl.floor(v)
        frac = v - low
        odd = (low - 2.0 * tl.floor(low * 0.5)) == 1.0
        return low + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)

    @triton.jit
    def _tile(pid_r, pid_c, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        return r, c, r.to(tl.int64) * cols + c, (r < rows) & (c < cols)

    @triton.jit
    def _codes(x_ptr, step_ptr, offset_ptr, codes_ptr, r, c, idx, inb, rows, cols, qn, qp,
               STEP_AXIS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_FROZEN: tl.constexpr, BINARY: tl.constexpr):
        """Per element: the code q, α, β, whether the x-gradient passes (v = (x − β)/α inside the grid, for the
        binarizer |x/α| ≤ 1, never for frozen elements) and d x̂/dα: the quantities of `functional`'s backward."""
        if STEP_AXIS == 0:
            step = tl.load(step_ptr).to(tl.float32)
        elif STEP_AXIS == 1:
            step = tl.load(step_ptr + r, mask=r < rows, other=1.0).to(tl.float32)
        else:
            step = tl.load(step_ptr + c, mask=c < cols, other=1.0).to(tl.float32)
        x = tl.load(x_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        beta = 0.0
        if HAS_OFFSET:
            beta = tl.load(offset_ptr).to(tl.float32)
        v = tl.math.div_rn(x - beta, step)
        if BINARY:
            q = tl.where(x >= 0, 1.0, -1.0)
            inside = tl.abs(v) <= 1.0
            d_step = q
        else:
            q = _round_half_even(tl.minimum(tl.maximum(v, qn), qp))
            inside = (v >= qn) & (v <= qp)
            d_step = tl.where(inside, q - v, q)
        if HAS_FROZEN:
            frozen_code = tl.load(codes_ptr + idx, mask=inb, other=0).to(tl.float32)
            frozen = frozen_code >= qn  # `functional.is_frozen`
            q = tl.where(frozen, frozen_code, q)
            d_step = tl.where(frozen, frozen_code, d_step)
            inside = inside & ~frozen
        return q, step, beta, inside, d_step

    @triton.jit
    def _store_values(out_ptr, idx, inb, q, step, beta, HAS_OFFSET: tl.constexpr):
        """The forward value ``q·α (+ β)``, rounded once per operation as the reference's ops round."""
        out = q * step
        if HAS_OFFSET:
            out = out + beta
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _forward_kernel(out_ptr, x_ptr, step_ptr, offset_ptr, codes_ptr, rows, cols, qn, qp,
                        STEP_AXIS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_FROZEN: tl.constexpr,
                        BINARY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r, c, idx, inb = _tile(tl.program_id(0), tl.program_id(1), rows, cols, BLOCK_R, BLOCK_C)
        q, step, beta, _, _ = _codes(x_ptr, step_ptr, offset_ptr, codes_ptr, r, c, idx, inb, rows, cols,
                                     qn, qp, STEP_AXIS, HAS_OFFSET, HAS_FROZEN, BINARY)
        _store_values(out_ptr, idx, inb, q, step, beta, HAS_OFFSET)

    @triton.jit
    def _backward_kernel(grad_ptr, grad_x_ptr, step_sums_ptr, abs_sums_ptr, offset_sums_ptr, values_ptr, x_ptr,
                         step_ptr, offset_ptr, codes_ptr, rows, cols, qn, qp, STEP_AXIS: tl.constexpr,
                         HAS_OFFSET: tl.constexpr, HAS_FROZEN: tl.constexpr, BINARY: tl.constexpr,
                         L1_SCALE: tl.constexpr, WRITE_VALUES: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        """x's gradient and the partial sums of α's (and β's); with ``WRITE_VALUES`` also the forward values, for a
        backward that needs them again (the matmul's weight gradient) without a second pass over x."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        r, c, idx, inb = _tile(pid_r, pid_c, rows, cols, BLOCK_R, BLOCK_C)
        q, step, beta, inside, d_step = _codes(x_ptr, step_ptr, offset_ptr, codes_ptr, r, c, idx, inb, rows,
                                               cols, qn, qp, STEP_AXIS, HAS_OFFSET, HAS_FROZEN, BINARY)
        if WRITE_VALUES:
            _store_values(values_ptr, idx, inb, q, step, beta, HAS_OFFSET)
        grad = tl.load(grad_ptr + idx, mask=inb, other=0.0)
        tl.store(grad_x_ptr + idx, tl.where(inside, grad, 0.0).to(grad_x_ptr.dtype.element_ty), mask=inb)
        grad = grad.to(tl.float32)
        # Partial sums, deterministic (no atomics), as a (tiles × entries) matrix for `_finalize_kernel`: α-terms
        # (and |x| for the L1 scale) per column tile and row, per row tile and column, or one per tile.
        step_terms = tl.where(inb, grad * d_step, 0.0)
        if L1_SCALE:
            abs_terms = tl.abs(tl.load(x_ptr + idx, mask=inb, other=0.0).to(tl.float32))
        if STEP_AXIS == 2:
            cols_1d = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
            tl.store(step_sums_ptr + pid_r * cols + cols_1d, tl.sum(step_terms, axis=0), mask=cols_1d < cols)
            if L1_SCALE:
                tl.store(abs_sums_ptr + pid_r * cols + cols_1d, tl.sum(abs_terms, axis=0), mask=cols_1d < cols)
        elif STEP_AXIS == 1:
            rows_1d = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
            tl.store(step_sums_ptr + pid_c * rows + rows_1d, tl.sum(step_terms, axis=1), mask=rows_1d < rows)
            if L1_SCALE:
                tl.store(abs_sums_ptr + pid_c * rows + rows_1d, tl.sum(abs_terms, axis=1), mask=rows_1d < rows)
        else:
            tile = pid_r * tl.num_programs(1) + pid_c
            tl.store(step_sums_ptr + tile, tl.sum(tl.sum(step_terms, axis=1), axis=0))
            if L1_SCALE:
                tl.store(abs_sums_ptr + tile, tl.sum(tl.sum(abs_terms, axis=1), axis=0))
        if HAS_OFFSET:
            offset_terms = tl.where(inb & ~inside, grad, 0.0)
            tl.store(offset_sums_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(tl.sum(offset_terms, axis=1), axis=0))

    @triton.jit
    def _finalize_kernel(grad_step_ptr, grad_offset_ptr, step_sums_ptr, abs_sums_ptr, offset_sums_ptr, tiles, n,
                         group_size, offset_tiles, grad_scale, qp, PER_ENTRY: tl.constexpr, L1_SCALE: tl.constexpr,
                         HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
        """α's (and β's) gradient from `_backward_kernel`'s partial sums, in one launch instead of a reduction
        and a scaling per quantizer. Program ``g`` owns the entries ``[g·group_size, (g+1)·group_size)`` of the
        ``tiles × n`` partials: with the L1 scale, one norm group (`functional.l1_grad_scale`); it writes one
        gradient per entry (``PER_ENTRY``) or their sum (a single step)."""
        g = tl.program_id(0)
        lanes = tl.arange(0, BLOCK)
        scale = grad_scale
        if L1_SCALE:
            l1 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, group_size, BLOCK):
                idx = g * group_size + start + lanes
                ok = (start + lanes < group_size) & (idx < n)
                for t in range(tiles):
                    l1 += tl.load(abs_sums_ptr + t * n + idx, mask=ok, other=0.0)
            scale = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(l1, axis=0), 1e-12) * qp)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, group_size, BLOCK):
            idx = g * group_size + start + lanes
            ok = (start + lanes < group_size) & (idx < n)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for t in range(tiles):
                acc += tl.load(step_sums_ptr + t * n + idx, mask=ok, other=0.0)
            if PER_ENTRY:
                tl.store(grad_step_ptr + idx, acc * scale, mask=ok)
            else:
                total += acc
        if not PER_ENTRY:
            tl.store(grad_step_ptr + g, tl.sum(total, axis=0) * scale)
        if HAS_OFFSET:
            offsets = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, offset_tiles, BLOCK):
                offsets += tl.load(offset_sums_ptr + start + lanes, mask=start + lanes < offset_tiles, other=0.0)
            tl.store(grad_offset_ptr, tl.sum(offsets, axis=0), mask=g == 0)


def step_axis(x: torch.Tensor, step: torch.Tensor) -> int | None:
    """How ``step`` (broadcast against ``x``) maps onto ``x``'s ``rows × cols`` view; None if no kernel fits."""
    if x.ndim < 2 or step.ndim > x.ndim:
        return None
    if step.numel() == 1:
        return ONE_STEP
    if step.ndim == x.ndim and step.shape[0] == x.shape[0] == step.numel():
        return STEP_PER_ROW
    if step.shape[-1] == x.shape[-1] == step.numel():
        return STEP_PER_COL
    return None


def fused_layout(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None = None) -> int | None:
    """The `step_axis` of ``x`` when the fused kernels apply (contiguous CUDA tensors on the current device, a
    scalar offset, Triton installed, not switched off, not under ``torch.compile``); None otherwise. Callers keep
    it for the backward, so a step decides once."""
    applies = (
        not torch.compiler.is_compiling()
        and HAS_TRITON
        and x.is_cuda
        and x.is_contiguous()
        and os.environ.get(ENV_SWITCH, "1") != "0"
        and x.device.index == torch.cuda.current_device()
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and step.dtype == torch.float32  # the reference then computes in fp32, as the kernels do
        and (offset is None or (offset.numel() == 1 and offset.dtype == torch.float32))
    )
    return step_axis(x, step) if applies else None


def _geometry(x: torch.Tensor, axis: int) -> tuple[int, int, int, int, tuple[int, int]]:
    """``rows, cols`` of ``x``'s view for ``axis``, the tile size and the launch grid."""
    cols = x[0].numel() if axis == STEP_PER_ROW else x.shape[-1]
    rows = x.numel() // cols
    block_c = min(128, triton.next_power_of_2(cols))
    block_r = max(1, min(triton.next_power_of_2(rows), 2048 // block_c))
    return rows, cols, block_r, block_c, (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))


def _run(kernel, outputs: tuple, geometry: tuple, x, step, offset, qn: float, qp: float, frozen_codes, axis: int,
        binary: bool, **constants) -> None:
    """Launch ``kernel`` with its ``outputs`` first, then the inputs both kernels share (``frozen_codes``, laid out
    like ``x``, as the oscillation tracker makes them)."""
    rows, cols, block_r, block_c, grid = geometry
    kernel[grid](*outputs, x, step.contiguous(), x if offset is None else offset,
                 x if frozen_codes is None else frozen_codes, rows, cols, float(qn),
                 float(qp), STEP_AXIS=axis, HAS_OFFSET=offset is not None, HAS_FROZEN=frozen_codes is not None,
                 BINARY=binary, BLOCK_R=block_r, BLOCK_C=block_c, **constants,
                 # No fused multiply-add: ``q·α + β`` must round twice, as the reference's two ops do.
                 enable_fp_fusion=False)


def fake_quantize_forward(x, step, offset, qn: float, qp: float, frozen_codes=None,
                          binary: bool = False, axis: int | None = None, dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """``functional``'s forward value: LSQ (``binary=False``) or ``α·sign(x)`` (``binary=True``), in ``dtype``
    (default ``x.dtype``); ``axis`` as `fused_layout` returned it (computed when left out)."""
    axis = step_axis(x, step) if axis is None else axis
    out = torch.empty_like(x, dtype=dtype)
    _run(_forward_kernel, (out,), _geometry(x, axis), x, step, offset, qn, qp, frozen_codes, axis, binary)
    return out


def fake_quantize_backward(grad_out, x, step, offset, qn: float, qp: float, frozen_codes=None,
                           binary: bool = False, grad_scale: float | None = 1.0, l1_group_size: int = 0,
                           axis: int | None = None, values_dtype: torch.dtype | None = None):
    """``(grad_x, α-gradient shaped like step, β-gradient shaped like offset or None, forward values or None)``:
    α's gradient scaled by ``grad_scale``, or by `functional.l1_grad_scale` of ``x`` when ``l1_group_size > 0``;
    the values (`fake_quantize_forward`'s, in ``values_dtype``) only when ``values_dtype`` is given. Two launches.
    Step and offset are fp32 (as `fused_layout` requires), and so are their gradients."""
    axis = step_axis(x, step) if axis is None else axis
    geometry = _geometry(x, axis)
    rows, cols, _, _, grid = geometry
    grad_out = grad_out.contiguous()
    grad_x = torch.empty_like(grad_out)
    l1 = l1_group_size > 0
    # The partials' (tiles × entries) layout: see `_backward_kernel`.
    tiles, n = (grid[1], rows) if axis == STEP_PER_ROW else (grid[0], cols) if axis == STEP_PER_COL else (1, grid[0] * grid[1])
    partials = torch.empty((2 if l1 else 1, tiles, n), device=x.device, dtype=torch.float32)
    offset_sums = torch.empty(grid, device=x.device, dtype=torch.float32) if offset is not None else partials
    values = torch.empty_like(x, dtype=values_dtype) if values_dtype is not None else None
    outputs = (grad_out, grad_x, partials[0], partials[-1], offset_sums, grad_x if values is None else values)
    _run(_backward_kernel, outputs, geometry, x, step, offset, qn, qp, frozen_codes, axis, binary, L1_SCALE=l1,
         WRITE_VALUES=values is not None)
    grad_step = torch.empty(step.shape, device=x.device, dtype=torch.float32)
    grad_offset = torch.empty(offset.shape, device=x.device, dtype=torch.float32) if offset is not None else grad_step
    per_entry = axis != ONE_STEP
    group_size = l1_group_size if l1 and per_entry else n if not per_entry else _FINALIZE_BLOCK
    block = min(_FINALIZE_BLOCK, max(16, triton.next_power_of_2(group_size)))
    _finalize_kernel[(triton.cdiv(n, group_size),)](
        grad_step, grad_offset, partials[0], partials[-1], offset_sums, tiles, n, group_size, offset_sums.numel(),
        1.0 if l1 else float(grad_scale), float(qp), PER_ENTRY=per_entry, L1_SCALE=l1, HAS_OFFSET=offset is not None,
        BLOCK=block)
    return grad_x, grad_step, grad_offset if offset is not None else None, values
