"""OBR (method.md §5.3): both terms and their gradients against a naive per-bin loop; the λ ramp."""

from __future__ import annotations

import math

import pytest
import torch

from hf_qvar import QVarConfig
from hf_qvar.obr import binned_variance_sum, obr_lambda, obr_layer_terms, obr_loss
from hf_qvar.nn.qlinear import QLinear, QuantizedLayerMixin
from hf_qvar.quantizers.fake_quantizer import BinaryWeightQuantizer, LSQWeightQuantizer
from tests.conftest import auto_class


class _Layer(QuantizedLayerMixin, torch.nn.Module):
    """A stand-in quantized layer: a weight and a weight quantizer, nothing else."""

    def __init__(self, quantizer, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.weight_quantizer = quantizer


def _lsq_layer(bits: int, granularity: str, seed: int = 0, cols: int = 40) -> _Layer:
    torch.manual_seed(seed)
    weight = torch.randn(6, cols, dtype=torch.double) * 0.1
    quantizer = LSQWeightQuantizer(bits, granularity=granularity, channels=6).double()
    quantizer.initialize(weight)
    with torch.no_grad():  # shrink the step a bit so both ends of the grid clip
        quantizer.step_size.mul_(0.8)
    return _Layer(quantizer, weight)


def reference_terms(weight, step_size, qn, qp, per_channel, reduction="mean"):
    """Loop over channels and bins; ``torch.var`` per bin; step gradient scaled by 1/sqrt(‖W‖₁·Qp) per group."""
    rows = weight if per_channel else weight.reshape(1, -1)
    steps = step_size if per_channel else step_size.expand(1)
    term1, term2 = 0.0, 0.0
    sq = []
    for row, alpha in zip(rows, steps):
        g = 1.0 / math.sqrt(row.detach().abs().sum().item() * qp)
        s = (alpha - alpha.detach()) * g + alpha.detach()
        w_clip = torch.clamp(row / s, qn, qp) * s
        codes = torch.clamp(torch.round(row.detach() / alpha.detach()), qn, qp)
        sq.append((codes * alpha.detach() - w_clip) ** 2)
        for k in range(qn, qp + 1):
            sel = codes == k
            if sel.sum() > 1:
                term2 = term2 + torch.var(w_clip[sel])
    sq = torch.cat(sq)
    term1 = sq.mean() if reduction == "mean" else sq.sum()
    return term1, term2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cols", [40, 8192])  # 8192: rows longer than SUB_ROW, reduced in sub-rows
def test_obr_terms_and_gradients_match_naive_loop(bits, granularity, reduction, cols):
    layer = _lsq_layer(bits, granularity, seed=bits, cols=cols)
    q = layer.weight_quantizer
    term1, term2 = obr_layer_terms(layer, reduction)
    (term1 + 3 * term2).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    step = q.step_size.detach().clone().requires_grad_()
    ref1, ref2 = reference_terms(weight, step, q.qn, q.qp, granularity == "per_channel", reduction)
    (ref1 + 3 * ref2).backward()

    torch.testing.assert_close(term1, ref1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(term2, ref2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-8, atol=1e-12)
    # The quantizer computes its gradient scale in float32: relative error ~1e-8.
    torch.testing.assert_close(q.step_size.grad, step.grad, rtol=1e-6, atol=1e-12)
    assert q.step_size.grad.abs().sum() > 0, "clipped weights must give the step size a gradient"
    clipped = (layer.weight / q.step(layer.weight) < q.qn) | (layer.weight / q.step(layer.weight) > q.qp)
    assert clipped.any() and (layer.weight.grad[clipped] == 0).all(), "no W gradient outside the clip range"


def test_binned_variance_skips_single_element_bins():
    values = torch.tensor([1.0, 3.0, 5.0, 10.0, 2.0, 2.0])
    bins = torch.tensor([0, 0, 0, 1, 3, 3])
    # bin 0: var(1,3,5) = 4; bin 1 has one element; bin 2 empty; bin 3: var(2,2) = 0.
    assert binned_variance_sum(values, bins, 4).item() == pytest.approx(4.0)


@pytest.mark.parametrize("num_bins", [2, 4, 256])
def test_one_hot_and_scatter_bin_moments_agree(num_bins):
    """GPUs take the one-hot path, other devices ``index_add``: same per-bin moments and gradients, and the
    left-out slot (id ``num_bins``) counts in neither."""
    from hf_qvar.obr import _one_hot_moments, _scatter_moments

    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 500, generator=g, dtype=torch.double)
    bins = torch.randint(0, num_bins + 1, (3, 500), generator=g)
    results = []
    for moments in (_one_hot_moments, _scatter_moments):
        v = values.clone().requires_grad_()
        counts, sums, squares = (torch.cat(parts, dim=1) for parts in zip(*moments(v, bins, num_bins)))
        (sums * torch.arange(num_bins) + squares).sum().backward()
        results.append((counts, sums, squares, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][0].sum() == (bins < num_bins).sum()


@pytest.mark.parametrize("cols", [40, 8192])
def test_frozen_elements_are_left_out(cols):
    layer = _lsq_layer(2, "per_tensor", cols=cols)
    q = layer.weight_quantizer
    full = obr_layer_terms(layer)
    mask = torch.zeros_like(layer.weight, dtype=torch.bool)
    mask[:3] = True
    q.freeze(layer.weight, mask, q.codes(layer.weight))
    term1, term2 = obr_layer_terms(layer)
    (term1 + term2).backward()
    assert (layer.weight.grad[mask] == 0).all() and layer.weight.grad[~mask].abs().sum() > 0
    half = _Layer(LSQWeightQuantizer(2).double(), layer.weight.detach()[3:].clone())
    with torch.no_grad():
        half.weight_quantizer.step_size.copy_(q.step_size)
    ref1, ref2 = obr_layer_terms(half)
    torch.testing.assert_close(term1, ref1)
    torch.testing.assert_close(term2, ref2)
    assert not torch.equal(full[0], term1)


def test_binary_layer_uses_latent_weights_and_two_bins():
    torch.manual_seed(0)
    layer = _Layer(BinaryWeightQuantizer(1).double(), torch.randn(8, 16, dtype=torch.double))
    term1, term2 = obr_layer_terms(layer)
    w = layer.weight.detach()
    scale, codes = w.abs().mean(), torch.where(w >= w.mean(), 1.0, -1.0).double()
    torch.testing.assert_close(term1, ((codes * scale - w) ** 2).mean())
    torch.testing.assert_close(term2, torch.var(w[codes > 0]) + torch.var(w[codes < 0]))


@pytest.mark.parametrize("epoch,expected", [(0, 0.0), (37, 0.0), (40, 1.2e-5), (60, 9.6e-4), (80, 3.1e-3),
                                            (100, 5.9e-3), (120, 8.3e-3), (144, 9.93e-3), (148, 9.99e-3), (150, 0.01)])
def test_lambda_cosine_ramp_matches_reference_table(epoch, expected):
    got = obr_lambda(epoch / 150, lambda_max=0.01, start=0.25)
    assert got == pytest.approx(expected, rel=0.03, abs=1e-12)
    if 37.5 < epoch:
        exact = 0.01 - 0.005 * (1 + math.cos(math.pi * (epoch - 37.5) / 112.5))
        assert got == pytest.approx(exact, rel=1e-12)


def test_obr_loss_sums_every_quantized_layer_of_a_model(tiny_checkpoints):
    model = auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=QVarConfig(bits=2))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayerMixin)]
    assert layers and all(isinstance(m, QLinear) for m in layers)
    loss = obr_loss(model)
    expected = sum(sum(obr_layer_terms(m)) for m in layers)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)
    with pytest.raises(ValueError, match="no quantized layer"):
        obr_loss(model, max_bits=1)
    with pytest.raises(ValueError, match="reduction"):
        obr_loss(model, reduction="max")


def _mixed_layers(frozen: bool, cols: int = 40) -> list[_Layer]:
    """Two alike per-tensor 2-bit layers (one stack), a per-channel 3-bit layer and a BWN layer."""
    layers = [_lsq_layer(2, "per_tensor", seed=5, cols=cols), _lsq_layer(2, "per_tensor", seed=6, cols=cols),
              _lsq_layer(3, "per_channel", seed=7, cols=cols)]
    torch.manual_seed(8)
    layers.append(_Layer(BinaryWeightQuantizer(1, channels=6), torch.randn(6, cols, dtype=torch.double)))
    g = torch.Generator().manual_seed(0)
    for layer in layers if frozen else []:
        q = layer.weight_quantizer
        q.freeze(layer.weight, torch.rand(layer.weight.shape, generator=g) < 0.2, q.codes(layer.weight))
    return layers


def _terms_and_grads(layers: list[_Layer], terms) -> list[torch.Tensor]:
    term1, term2 = terms
    (term1 + 3 * term2).backward()
    return [term1.detach(), term2.detach(), *(p.grad for layer in layers for p in layer.parameters())]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("cols", [40, 8192])
def test_stacked_layers_give_the_sum_of_per_layer_terms(frozen, cols):
    """`layers_obr_terms` stacks alike layers into one pass: same terms and gradients as layer by layer."""
    from hf_qvar.obr import layers_obr_terms

    layers = _mixed_layers(frozen, cols)
    stacked = _terms_and_grads(layers, layers_obr_terms(layers, "mean"))
    layers = _mixed_layers(frozen, cols)
    per_layer = [obr_layer_terms(layer) for layer in layers]
    looped = _terms_and_grads(layers, (sum(t[0] for t in per_layer), sum(t[1] for t in per_layer)))
    for a, b in zip(stacked, looped):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compiled_obr_matches_eager(monkeypatch):
    """GPUs run OBR's stacked passes through torch.compile (`cuda_compiled`); the compiled graphs must give the
    eager values and gradients. Checked with the CPU backend, with frozen elements in play."""
    from hf_qvar import obr

    eager = _terms_and_grads(layers := _mixed_layers(True), obr.layers_obr_terms(layers, "mean"))
    monkeypatch.setattr(obr, "lsq_obr_terms", obr.lsq_obr_terms.compiled())
    monkeypatch.setattr(obr, "binary_obr_terms", obr.binary_obr_terms.compiled())
    compiled = _terms_and_grads(layers := _mixed_layers(True), obr.layers_obr_terms(layers, "mean"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_obr_gradient_adds_lambda_times_the_loss_gradient():
    """`OBRGradient.accumulate(λ)` adds λ·∇L_OBR to gradients already there (and creates missing ones); its terms
    are `layers_obr_terms`'."""
    from hf_qvar.obr import OBRGradient, layers_obr_terms

    model, reference = torch.nn.ModuleList(_mixed_layers(frozen=True)), torch.nn.ModuleList(_mixed_layers(frozen=True))
    term1, term2 = layers_obr_terms(list(reference), "mean")
    (0.5 * (term1 + term2)).backward()
    previous = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p, g in zip(model.parameters(), previous):
        p.grad = g.clone()
    model[0].weight.grad = None
    got = OBRGradient(model).accumulate(0.5)
    torch.testing.assert_close(got, (term1.detach(), term2.detach()))
    for i, (p, ref) in enumerate(zip(model.parameters(), reference.parameters())):
        torch.testing.assert_close(p.grad, ref.grad + (0 if i == 0 else previous[i]), msg=str(i))
    with pytest.raises(ValueError, match="reduction"):
        OBRGradient(model, reduction="max")
    with pytest.raises(ValueError, match="no quantized layer"):
        OBRGradient(torch.nn.Linear(2, 2))
