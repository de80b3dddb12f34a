"""Quantizer math against straightforward detach-trick references (method.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_qvar.quantizers import functional as F
from hf_qvar.quantizers.fake_quantizer import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
)
from hf_qvar.quantizers.init import activation_step, mse_weight_step


def _scaled(t: torch.Tensor, g) -> torch.Tensor:
    """Gradient-scale trick: value of ``t``, gradient times ``g``."""
    return (t - t.detach()) * g + t.detach()


def reference_lsq(x, step, g, qn, qp, offset=None):
    s = _scaled(step, g)
    shifted = x - offset if offset is not None else x
    v = torch.clamp(shifted / s, qn, qp)
    q = (v.round() - v).detach() + v
    out = q * s
    return out + offset if offset is not None else out


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, False), (8, True), (2, False)])
@pytest.mark.parametrize("with_offset", [False, True])
def test_lsq_matches_reference(bits, signed, with_offset):
    torch.manual_seed(bits)
    qn, qp = F.signed_range(bits) if signed else F.unsigned_range(bits)
    x = (torch.randn(6, 10) * 2).double()
    step = torch.tensor([0.3], dtype=torch.double)
    offset = torch.tensor([-0.2], dtype=torch.double) if with_offset else None
    g = torch.tensor(0.37, dtype=torch.double)
    grad_out = torch.randn(6, 10, dtype=torch.double)

    leaves = [t.clone().requires_grad_() for t in (x, step)] + ([offset.clone().requires_grad_()] if with_offset else [])
    out = F.lsq_fake_quantize(leaves[0], leaves[1], g, qn, qp, leaves[2] if with_offset else None)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, step)] + ([offset.clone().requires_grad_()] if with_offset else [])
    ref = reference_lsq(ref_leaves[0], ref_leaves[1], g, qn, qp, ref_leaves[2] if with_offset else None)
    ref.backward(grad_out)

    assert torch.equal(out, ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)
    codes = ((out - (offset if with_offset else 0)) / step).detach()
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    assert codes.round().min() >= qn and codes.round().max() <= qp


def test_lsq_per_channel_step_gradient_sums_per_channel():
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.double, requires_grad=True)
    step = torch.tensor([[0.1], [0.2], [0.3], [0.4]], dtype=torch.double, requires_grad=True)
    F.lsq_fake_quantize(x, step, torch.tensor(1.0, dtype=torch.double), -2, 1).sum().backward()
    ref_step = step.detach().clone().requires_grad_()
    reference_lsq(x.detach(), ref_step, 1.0, -2, 1).sum().backward()
    torch.testing.assert_close(step.grad, ref_step.grad)
    assert step.grad.shape == (4, 1)


def test_signed_binarize_matches_bit_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.double, requires_grad=True)
    step = torch.tensor([0.8], dtype=torch.double, requires_grad=True)
    g = torch.tensor(1 / math.sqrt(35), dtype=torch.double)
    grad_out = torch.randn(5, 7, dtype=torch.double)
    F.signed_binarize(x, step, g).backward(grad_out)
    sign = torch.where(x.detach() >= 0, 1.0, -1.0).double()
    assert torch.equal(F.signed_binarize(x.detach(), step.detach(), g), sign * 0.8)
    torch.testing.assert_close(x.grad, grad_out * ((x.detach() / 0.8).abs() <= 1))
    torch.testing.assert_close(step.grad, (grad_out * sign).sum().reshape(1) * g)


def test_bwn_weight_is_mean_abs_times_centered_sign_with_identity_ste():
    torch.manual_seed(0)
    w = torch.randn(6, 9, requires_grad=True)
    quantizer = BinaryWeightQuantizer(1, channels=6)
    out = quantizer(w)
    expected = w.detach().abs().mean() * torch.where(w.detach() >= w.detach().mean(), 1.0, -1.0)
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(w)
    out.backward(grad_out)
    assert torch.equal(w.grad, grad_out)
    assert set(quantizer.codes(w).unique().tolist()) == {-1.0, 1.0}


def test_bwn_per_channel_scales_rows_separately():
    w = torch.tensor([[1.0, -3.0], [0.5, -0.5]])
    out = BinaryWeightQuantizer(1, granularity="per_channel", channels=2)(w)
    assert torch.equal(out, torch.tensor([[2.0, -2.0], [0.5, -0.5]]))


def naive_mse_step(w: list[float], qn: int, qp: int) -> float:
    step = max(abs(v) for v in w) / qp
    for _ in range(100):
        q = [min(max(round(v / step), qn), qp) for v in w]
        new = sum(a * b for a, b in zip(w, q)) / sum(b * b for b in q)
        done = abs(new - step) / step < 1e-5
        step = new
        if done:
            break
    return step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_init_matches_scalar_fixed_point(bits):
    torch.manual_seed(bits)
    w = torch.randn(3, 50, dtype=torch.double)
    qn, qp = F.signed_range(bits)
    got = mse_weight_step(w, qn, qp)
    for row, step in zip(w, got):
        assert step.item() == pytest.approx(naive_mse_step(row.tolist(), qn, qp), rel=1e-4)
    # The fixed point beats the max-based step in reconstruction error.
    for row, step in zip(w, got):
        def err(s):
            return ((torch.clamp(torch.round(row / s), qn, qp) * s - row) ** 2).sum()
        assert err(step) <= err(row.abs().max() / qp)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_head"])
@pytest.mark.parametrize("mode", ["l1", "lsq"])
def test_weight_step_gradient_carries_the_l1_or_lsq_scale_of_its_group(mode, granularity):
    """The step gradient that reaches each group (the L1 scale is computed in the backward) against a loop over
    the groups: ``Σ grad·dŵ/dα`` over the group's weights, times ``1/sqrt(‖W_g‖₁·Qp)`` or ``1/sqrt(N_g·Qp)``."""
    torch.manual_seed(0)
    w, grad = torch.randn(8, 16) * 0.05, torch.randn(8, 16)
    quantizer = LSQWeightQuantizer(2, gradient_scale=mode, granularity=granularity, channels=8, num_heads=2)
    quantizer.initialize(w)
    quantizer(w).backward(grad)
    rows_per_group = 8 // quantizer.num_groups
    for g, alpha in enumerate(quantizer.step_size.detach()):
        rows, sub = w[g * rows_per_group:(g + 1) * rows_per_group], grad[g * rows_per_group:(g + 1) * rows_per_group]
        v = rows / alpha
        q = torch.clamp(torch.round(v), quantizer.qn, quantizer.qp)
        d_step = torch.where((v >= quantizer.qn) & (v <= quantizer.qp), q - v, q)
        size = rows.abs().sum() if mode == "l1" else rows.numel()
        expected = (sub * d_step).sum() / math.sqrt(size * quantizer.qp)
        torch.testing.assert_close(quantizer.step_size.grad[g], expected)
        scale = torch.as_tensor(quantizer.grad_scale(w)).expand(8, 1)  # what OBR scales its step gradient by
        torch.testing.assert_close(scale[g * rows_per_group, 0].float(), 1 / torch.sqrt(torch.tensor(float(size * quantizer.qp))))


def test_lsq_fake_quantize_takes_one_gradient_scale():
    x, step = torch.randn(4, 4), torch.ones(1, 1)
    for grad_scale, l1_group_size in ((None, 0), (0.5, 1)):
        with pytest.raises(ValueError, match="exactly one of `grad_scale`"):
            F.lsq_fake_quantize(x, step, grad_scale, -2, 1, l1_group_size=l1_group_size)


@pytest.mark.parametrize("make", [
    lambda: LSQWeightQuantizer(2, channels=6), lambda: BinaryWeightQuantizer(1, channels=6),
    lambda: LSQActivationQuantizer(4, signed=False, offset=True), lambda: BinaryActivationQuantizer(1),
], ids=["lsq_weight", "bwn_weight", "lsq_offset_activation", "binary_activation"])
def test_under_autocast_fp32_sites_come_out_in_the_autocast_dtype_with_the_same_values_and_gradients(make):
    """What the consumer's cast would give, without the cast: the fp32 result rounded to bf16, and the same
    gradients (the incoming gradient is bf16 either way)."""
    torch.manual_seed(0)
    quantizer, x = make(), torch.randn(6, 8)
    quantizer(x)  # calibrates activation steps
    grad = torch.randn(6, 8).bfloat16().float()
    results = []
    for autocast in (False, True):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = quantizer(leaf)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out = out if autocast else out.bfloat16()  # the cast autocast's matmul would apply
        (out.float() * grad).sum().backward()
        params = [p.grad.clone() for p in quantizer.parameters() if p.grad is not None]
        quantizer.zero_grad()
        results.append((out, leaf.grad, params))
    (out, grad_x, params), (out_ac, grad_x_ac, params_ac) = results
    assert torch.equal(out, out_ac) and torch.equal(grad_x, grad_x_ac)
    for got, want in zip(params_ac, params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_weight_quantizer_per_head_groups_rows_by_head():
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    w[4:] *= 10  # second head has a ten times larger range
    quantizer = LSQWeightQuantizer(4, granularity="per_head", channels=8, num_heads=2)
    quantizer.initialize(w)
    steps = quantizer.step_size.detach()
    assert steps.shape == (2,) and steps[1] > 5 * steps[0]
    expanded = quantizer.step(w)
    assert torch.equal(expanded[:4, 0], steps[0].expand(4)) and torch.equal(expanded[4:, 0], steps[1].expand(4))


def test_per_head_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible by the head count"):
        LSQWeightQuantizer(2, granularity="per_head", channels=10, num_heads=4)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_activation_init_from_first_batch(bits, signed):
    x = torch.randn(4, 10, 16)
    quantizer = LSQActivationQuantizer(bits, signed=signed)
    quantizer(x)
    qp = quantizer.qp
    assert quantizer.step_size.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp), rel=1e-6)
    assert bool(quantizer.calibrated) and quantizer._calibrated
    before = quantizer.step_size.detach().clone()
    quantizer(x * 10)  # only the first batch initialises
    assert torch.equal(quantizer.step_size.detach(), before)


def test_binary_activation_init_and_levels():
    x = torch.randn(4, 10)
    signed = BinaryActivationQuantizer(1)
    assert set(signed(x).unique().tolist()) == {-signed.step_size.item(), signed.step_size.item()}
    assert signed.step_size.item() == pytest.approx(2 * x.abs().mean().item(), rel=1e-6)
    unsigned = LSQActivationQuantizer(1, signed=False)
    probs = torch.rand(4, 10)
    assert len(unsigned(probs).unique()) <= 2
    assert unsigned.step_size.item() == pytest.approx(4 * probs.abs().mean().item(), rel=1e-6)


def test_activation_step_grad_scale_depends_on_batch_numel():
    quantizer = LSQActivationQuantizer(2)
    small, large = torch.randn(2, 8), torch.randn(8, 8)
    assert quantizer.grad_scale(small) == pytest.approx(1 / (math.sqrt(16) * 1))
    assert quantizer.grad_scale(large) == pytest.approx(1 / (math.sqrt(64) * 1))
    lsq = LSQActivationQuantizer(2, gradient_scale="lsq")
    assert lsq.grad_scale(large) == pytest.approx(1 / math.sqrt(64 * 1))
    x = torch.randn(8, 8, requires_grad=True)
    step = torch.tensor([0.5], requires_grad=True)
    F.lsq_fake_quantize(x, step, 0.25, -2, 1).sum().backward()
    float_grad = step.grad.clone()
    step.grad = None
    F.lsq_fake_quantize(x, step, torch.tensor(0.25), -2, 1).sum().backward()
    torch.testing.assert_close(step.grad, float_grad)


def test_activation_step_is_identical_across_ranks(tmp_path):
    """Each rank sees a different first batch; the all-reduced step must agree (gloo, 2 processes)."""
    import torch.multiprocessing as mp

    mp.spawn(_init_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    steps = [torch.load(tmp_path / f"step{r}.pt") for r in range(2)]
    assert torch.equal(steps[0], steps[1])
    batches = [torch.arange(1, 9, dtype=torch.float32) * (r + 1) for r in range(2)]
    expected = activation_step(torch.cat(batches), qp=1, binary=False, unsigned=False)
    torch.testing.assert_close(steps[0], expected)


def _init_rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    quantizer = LSQActivationQuantizer(2)
    quantizer(torch.arange(1, 9, dtype=torch.float32) * (rank + 1))
    torch.save(quantizer.step_size.detach().clone(), f"{out}/step{rank}.pt")
    dist.destroy_process_group()


def test_frozen_weights_keep_code_and_get_no_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    quantizer = LSQWeightQuantizer(2, channels=4)
    quantizer.initialize(w)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0] = True
    quantizer.freeze(w, mask, torch.ones(4, 6))
    out = quantizer(w)
    out.sum().backward()
    assert torch.equal(out[0], quantizer.step_size.detach().expand(6))
    assert torch.equal(w.grad[0], torch.zeros(6)) and w.grad[1:].abs().sum() > 0
    # The step gradient of frozen weights (their code, 1 each) carries the same L1 gradient scale.
    step_grad = quantizer.step_size.grad.clone()
    quantizer.step_size.grad = None
    quantizer.frozen_codes = None
    reference = quantizer(w.detach())
    reference[1:].sum().backward()
    expected = step_grad - 6 * quantizer.grad_scale(w.detach()).flatten()[0]
    torch.testing.assert_close(quantizer.step_size.grad, expected.reshape(1))


def test_optimizer_steps_leave_step_sizes_positive():
    """The global post-step hook clamps every step size to ≥ MIN_STEP (one multi-tensor call) and nothing else."""
    from hf_qvar.quantizers.fake_quantizer import MIN_STEP

    quantizers = [LSQWeightQuantizer(2, granularity="per_channel", channels=3), LSQActivationQuantizer(4)]
    other = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([*quantizers[0].parameters(), *quantizers[1].parameters(), other], lr=1.0)
    for q in quantizers:
        q.step_size.grad = torch.linspace(0.5, 2.0, q.step_size.numel())  # steps 1 - grad: some go negative
    other.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(quantizers[0].step_size, torch.tensor([0.5, MIN_STEP, MIN_STEP]))
    torch.testing.assert_close(quantizers[1].step_size, torch.tensor([0.5]))
    torch.testing.assert_close(other, -torch.ones(3))  # an ordinary parameter may go negative
