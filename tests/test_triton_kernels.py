"""The fused Triton kernels against `functional`'s reference: forward values bit-exact, gradients to float
tolerance (only the summation order differs). Without a GPU they run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest before the kernels are defined); GPU runs use the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from hf_qvar.quantizers import functional as F
from hf_qvar.quantizers import triton_kernels as kernels

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton (CPU: its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


#: Weight cases whose step gradient takes the L1 scale of `functional.l1_grad_scale` (value: its group size).
L1_GROUP_SIZES = {"weight_tensor_l1": 1, "weight_head_l1": 6, "weight_frozen": 1, "conv_weight": 1}


def _case(name: str, dtype=torch.float32):
    """(x, step, offset, qn, qp, binary, frozen) for a quantization site layout; x includes exact .5 ties and
    values far outside the grid."""
    g = torch.Generator().manual_seed(0)
    # Single steps span several kernel programs (tiles of up to 16 × 128): their partial sums are added up.
    shapes = {"weight_tensor": ((24, 40), (1, 1)), "weight_channel": ((24, 40), (24, 1)),
              "act_tensor": ((3, 20, 130), (1, 1, 1)), "act_channel": ((3, 5, 40), (1, 1, 40)),
              "act_offset": ((3, 20, 130), (1, 1, 1)), "binary_tensor": ((3, 20, 130), (1, 1, 1)),
              "binary_channel": ((6, 40), (1, 40)), "weight_frozen": ((24, 40), (24, 1)),
              "weight_tensor_l1": ((40, 130), (1, 1)), "weight_head_l1": ((24, 40), (24, 1)),
              "conv_weight": ((8, 3, 4, 4), (8, 1, 1, 1))}
    x_shape, step_shape = shapes[name]
    step = torch.rand(step_shape, generator=g) * 0.2 + 0.05
    x = torch.randn(x_shape, generator=g) * 0.4
    ties = (torch.randint(-9, 9, x_shape, generator=g) + 0.5) * step  # exact half steps: round half to even
    x = torch.where(torch.rand(x_shape, generator=g) < 0.2, ties, x).to(dtype)
    offset = torch.tensor([-0.17]) if name == "act_offset" else None
    qn, qp = (0, 15) if name == "act_offset" else (-2, 1) if name.startswith("weight") else (-8, 7)
    frozen = None
    if name == "weight_frozen":
        mask = torch.rand(x_shape, generator=g) < 0.3
        codes = torch.randint(qn, qp + 1, x_shape, generator=g)
        frozen = torch.where(mask, codes, F.unfrozen_code(qn)).to(F.frozen_codes_dtype(qn))
    return x, step, offset, qn, qp, name.startswith("binary"), frozen


def _scales(name: str) -> tuple[float | None, int]:
    """(grad_scale, l1_group_size) of a case: a fixed scale of 0.5, or the L1 scale."""
    return (None, L1_GROUP_SIZES[name]) if name in L1_GROUP_SIZES else (0.5, 0)


def _through_autograd(x, step, offset, qn, qp, binary, frozen, grad_out, name, autocast: bool = False):
    """Forward value and gradients of `functional`'s autograd functions (the reference for CPU tensors); with
    ``autocast``, the forward runs under bf16 autocast."""
    x, step = x.clone().requires_grad_(), step.clone().requires_grad_()
    offset = offset.clone().requires_grad_() if offset is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = _forward(x, step, offset, qn, qp, binary, frozen, name)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, step.grad, offset.grad if offset is not None else None


def _forward(x, step, offset, qn, qp, binary, frozen, name):
    if binary:
        return F.signed_binarize(x, step, 0.5)
    grad_scale, l1_group_size = _scales(name)
    return F.lsq_fake_quantize(x, step, grad_scale, qn, qp, offset, frozen, l1_group_size=l1_group_size)


CASES = ["weight_tensor", "weight_channel", "act_tensor", "act_channel", "act_offset", "binary_tensor",
         "binary_channel", "weight_frozen", "conv_weight", "weight_tensor_l1", "weight_head_l1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_kernels_match_reference(name, dtype):
    x, step, offset, qn, qp, binary, frozen = _case(name, dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = _through_autograd(x, step, offset, qn, qp, binary, frozen, grad_out, name)

    on = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    out = kernels.fake_quantize_forward(on(x), on(step), on(offset), qn, qp, on(frozen), binary=binary)
    grad_scale, l1_group_size = _scales(name)
    grad_x, grad_step, grad_offset, values = kernels.fake_quantize_backward(
        on(grad_out), on(x), on(step), on(offset), qn, qp, on(frozen), binary=binary, grad_scale=grad_scale,
        l1_group_size=l1_group_size, values_dtype=torch.float32)
    again = kernels.fake_quantize_backward(on(grad_out), on(x), on(step), on(offset), qn, qp, on(frozen),
                                           binary=binary, grad_scale=grad_scale, l1_group_size=l1_group_size)
    assert again[3] is None
    assert torch.equal(again[1], grad_step), "a second backward gave another step gradient (not deterministic)"

    assert out.dtype == x.dtype
    if DEVICE == "cpu" and dtype != torch.float32:  # the interpreter truncates fp32 -> bf16 casts (GPUs round)
        torch.testing.assert_close(out, expected[0], rtol=2**-7, atol=0)
    else:
        assert torch.equal(out.cpu(), expected[0]), "forward values differ from the reference"
    assert torch.equal(grad_x.cpu(), expected[1]), "x-gradient differs from the reference"
    reference_values = F.fake_quantize_values(x, step, offset, qn, qp, frozen, binary, dtype=torch.float32)
    assert torch.equal(values.cpu(), reference_values), "the backward's forward values differ from the reference"
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_step.cpu(), expected[2], **tolerance)
    if offset is not None:
        torch.testing.assert_close(grad_offset.cpu(), expected[3], **tolerance)


def test_step_layouts_the_kernels_take_and_refuse():
    w = torch.zeros(6, 4)
    assert kernels.step_axis(w, torch.ones(1)) == kernels.ONE_STEP
    assert kernels.step_axis(w, torch.ones(6, 1)) == kernels.STEP_PER_ROW
    assert kernels.step_axis(w, torch.ones(1, 4)) == kernels.STEP_PER_COL
    assert kernels.step_axis(w, torch.ones(6, 4)) is None  # a step per element: the reference handles it
    assert kernels.step_axis(torch.zeros(5), torch.ones(1)) is None
    assert kernels.fused_layout(w, torch.ones(1)) is None  # CPU tensors always take the reference path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_inputs", "fp32_inputs_under_autocast"])
@pytest.mark.parametrize("name", CASES)
def test_autograd_functions_use_the_kernels_on_gpu(name, autocast, monkeypatch):
    """Through `functional` on the GPU: kernels on vs ``HF_QVAR_TRITON=0`` (the reference on the GPU); bf16
    inputs, or fp32 inputs under bf16 autocast (outputs come out in bf16)."""
    x, step, offset, qn, qp, binary, frozen = _case(name, torch.float32 if autocast else torch.bfloat16)
    x, step = x.cuda(), step.cuda()
    offset = offset.cuda() if offset is not None else None
    frozen = frozen.cuda() if frozen is not None else None
    assert kernels.fused_layout(x, step, offset) is not None
    grad_out = torch.randn_like(x)
    fused = _through_autograd(x, step, offset, qn, qp, binary, frozen, grad_out, name, autocast)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    plain = _through_autograd(x, step, offset, qn, qp, binary, frozen, grad_out, name, autocast)
    assert fused[0].dtype == torch.bfloat16
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    for got, want in zip(fused[2:], plain[2:]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["act_tensor", "act_channel", "act_offset", "binary_tensor", "binary_channel"])
def test_fused_linear_with_kernels_matches_the_reference_ops(name, monkeypatch):
    """`functional.fake_quantized_linear` on the kernels (the CPU interpreter, or the GPU) against the same
    function on the reference ops (``HF_QVAR_TRITON=0``), including the backward's recomputed quantized input."""
    x, step, offset, qn, qp, binary, _ = _case(name)
    on = lambda t: t.to(DEVICE).requires_grad_() if t is not None else None  # noqa: E731
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(7, x.shape[-1], generator=g), torch.randn(7, generator=g)
    grad_out = torch.randn(*x.shape[:-1], 7, generator=g).to(DEVICE)

    def run():
        leaves = [on(t) for t in (x, weight, bias, step, offset)]
        out = F.fake_quantized_linear(*leaves, 0.5, qn, qp, binary=binary)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves if t is not None]

    if DEVICE == "cpu":  # take the kernels for CPU tensors too: they run in the interpreter
        monkeypatch.setattr(kernels, "fused_layout", lambda x, step, offset=None: kernels.step_axis(x, step))
    assert kernels.fused_layout(x.to(DEVICE), step.to(DEVICE), offset) is not None
    fused = run()
    monkeypatch.undo()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.fused_layout(x.to(DEVICE), step.to(DEVICE), offset) is None
    plain = run()
    for got, want, what in zip(fused, plain, ("output", "x", "weight", "bias", "step", "offset")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)
    assert torch.equal(fused[1], plain[1]), "the x-gradient's straight-through mask differs"
