"""`functional.fake_quantized_linear`, the eager training path of `QLinear`, against the composed ops it
replaces (activation quantizer, then ``F.linear``): the same values and gradients, and the quantized input no
longer kept for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnF

from hf_qvar.nn.qlinear import QLinear
from hf_qvar.nn.sites import SiteSpec
from hf_qvar.quantizers.fake_quantizer import BinaryActivationQuantizer, LSQActivationQuantizer

QUANTIZERS = {
    "lsq_signed": lambda: LSQActivationQuantizer(4, signed=True),
    "lsq_unsigned_offset": lambda: LSQActivationQuantizer(2, signed=False, offset=True),
    "lsq_per_head": lambda: LSQActivationQuantizer(3, granularity="per_head", channels=8, num_heads=2),
    "binary": lambda: BinaryActivationQuantizer(1),
}


def _run(quantizer, fused: bool, x, weight, bias, grad, autocast: bool):
    """Output and gradients (x, weight, bias, then the quantizer's parameters) of one forward and backward."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if fused:
            out = quantizer.linear(*leaves)
        else:
            out = nnF.linear(quantizer(leaves[0]), leaves[1], leaves[2])
    out.backward(grad.to(out.dtype))
    grads = [leaf.grad for leaf in leaves] + [p.grad.clone() for p in quantizer.parameters()]
    quantizer.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_fused_linear_matches_quantizer_then_linear(name, autocast):
    torch.manual_seed(0)
    quantizer = QUANTIZERS[name]()
    x, weight, bias = torch.randn(3, 5, 8), torch.randn(6, 8) * 0.3, torch.randn(6)
    quantizer(x)  # calibrates the step
    grad = torch.randn(3, 5, 6)
    out, grads = _run(quantizer, True, x, weight, bias, grad, autocast)
    want_out, want_grads = _run(quantizer, False, x, weight, bias, grad, autocast)
    assert out.dtype == want_out.dtype and torch.equal(out, want_out)
    assert len(grads) == len(want_grads) >= 4
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("trained", ["weight_only", "all_but_weight"])
@pytest.mark.parametrize("name", ["lsq_unsigned_offset", "binary"])
def test_fused_linear_with_some_inputs_frozen_matches_quantizer_then_linear(name, trained):
    """The backward's branches: only the weight trained (the quantized input recomputed on its own), or everything
    but the weight (a frozen base weight, as under LoRA: the quantized input not needed)."""
    torch.manual_seed(0)
    quantizer = QUANTIZERS[name]()
    x, weight, bias = torch.randn(3, 5, 8), torch.randn(6, 8) * 0.3, torch.randn(6)
    quantizer(x)  # calibrates the step
    weight_only = trained == "weight_only"
    quantizer.requires_grad_(not weight_only)
    grad = torch.randn(3, 5, 6)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_(trains) for t, trains in
                  ((x, not weight_only), (weight, weight_only), (bias, not weight_only))]
        out = quantizer.linear(*leaves) if fused else nnF.linear(quantizer(leaves[0]), leaves[1], leaves[2])
        out.backward(grad)
        results.append([out.detach()] + [leaf.grad for leaf in leaves] + [p.grad for p in quantizer.parameters()])
        quantizer.zero_grad()
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)
    assert (results[0][2] is not None) == weight_only


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()``."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_qlinear_training_forward_keeps_its_input_but_not_the_quantized_copy(autocast):
    spec = SiteSpec(role="query", weight_bits=4, weight_granularity="per_tensor", input_bits=4, input_signed=True,
                    input_offset=False, output_bits=4, output_granularity="per_tensor", num_heads=2,
                    gradient_scale="l1")
    torch.manual_seed(0)
    layer = QLinear(16, 8, spec=spec)
    layer.attach_quantizers(spec)
    layer.weight_quantizer.initialize(layer.weight)
    x = torch.randn(4, 10, 16, requires_grad=True)
    composed = lambda: layer._quantized_forward(x, lambda inp, w: nnF.linear(inp, w, layer.bias))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        composed()  # calibrates the activation steps
        quantized_input_bytes = layer.input_quantizer(x).nbytes
        assert torch.equal(layer(x), composed())
        assert _saved_bytes(lambda: layer(x)) == _saved_bytes(composed) - quantized_input_bytes
        with torch.no_grad():  # inference keeps nothing and takes the composed ops
            assert torch.equal(layer(x), composed())
