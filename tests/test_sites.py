"""Every quantization site of method.md §3.4 is really quantized: count the distinct values of
what reaches each matmul, for BERT, ViT, DeiT and Swin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hf_qvar import QVarConfig
from hf_qvar.nn.qlinear import QuantizedLayerMixin
from hf_qvar.nn.sites import module_role
from tests.conftest import auto_class, example_inputs

MATMULS = {F.linear: "linear", F.conv2d: "conv", torch.matmul: "matmul"}


class RecordMatmuls(TorchFunctionMode):
    """Records (owner module, op, operand distinct-value counts) for every matmul-like call."""

    def __init__(self):
        super().__init__()
        self.owner: list[str] = []
        self.calls: list[tuple[str, str, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            a, b = args[0], args[1]
            self.calls.append((self.owner[-1] if self.owner else "", MATMULS[func], a.unique().numel(), b.unique().numel()))
        return func(*args, **(kwargs or {}))


def _track_owners(model, recorder):
    def push(name):
        return lambda *_: recorder.owner.append(name)

    def pop(*_):
        recorder.owner.pop()

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayerMixin) or hasattr(module, "attn_probs_quantizer") or name.endswith("classifier"):
            handles += [module.register_forward_pre_hook(push(name)), module.register_forward_hook(pop)]
    return handles


@pytest.mark.parametrize("arch", ["bert", "vit", "deit", "swin"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_every_site_reaches_its_matmul_quantized(arch, bits, tiny_checkpoints):
    model = auto_class(arch).from_pretrained(tiny_checkpoints[arch], quantization_config=QVarConfig(bits=bits))
    model.eval()
    inputs = example_inputs(arch)
    model(**inputs)  # calibrates activation steps
    recorder = RecordMatmuls()
    handles = _track_owners(model, recorder)
    with torch.no_grad(), recorder:
        model(**inputs)
    for h in handles:
        h.remove()

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayerMixin)}
    attention = [n for n, m in model.named_modules() if hasattr(m, "attn_probs_quantizer")]
    seen_layers = {owner for owner, op, *_ in recorder.calls if op in ("linear", "conv")}
    assert set(quantized) <= seen_layers, "a quantized layer never ran its matmul"
    assert attention, "no attention block got a probability quantizer"

    for owner, op, n_input, n_weight in recorder.calls:
        if owner in quantized:
            spec = quantized[owner].spec
            assert n_weight <= 2**spec.weight_bits, (owner, n_weight)
            if spec.input_bits is not None:
                assert n_input <= 2**spec.input_bits, (owner, n_input)
            else:
                assert module_role(owner) == "patch_merging" and n_input > 2**8
        elif owner in attention:
            assert op == "matmul"
            assert n_input <= 2**bits and n_weight <= 2**bits, (owner, n_input, n_weight)
    attention_matmuls = [c for c in recorder.calls if c[0] in attention and c[1] == "matmul"]
    assert len(attention_matmuls) == 2 * len(attention)  # q·kᵀ and p·v in every block

    roles = {module_role(n) for n in quantized}
    expected = {"query", "key", "value", "attention_output", "mlp_input", "mlp_output"}
    if arch != "bert":
        expected.add("patch_embedding")
    if arch == "swin":
        expected.add("patch_merging")
    assert expected <= roles
    head_names = [n for n in dict(model.named_modules()) if n.endswith("classifier")]
    assert head_names and not any(n in quantized for n in head_names), "task head must stay full precision"


def test_boundary_layers_follow_the_paper(tiny_checkpoints):
    model = auto_class("swin").from_pretrained(tiny_checkpoints["swin"], quantization_config=QVarConfig(bits=2))
    patch = model.swin.embeddings.patch_embeddings.projection
    merging = model.swin.encoder.layers[0].downsample.reduction
    assert patch.spec.weight_bits == 8 and patch.spec.input_bits == 8
    assert merging.spec.weight_bits == 8 and merging.input_quantizer is None
    mlp_out = model.swin.encoder.layers[0].blocks[0].mlp.fc2 if hasattr(model.swin.encoder.layers[0].blocks[0], "mlp") else None
    if mlp_out is not None:
        assert not mlp_out.input_quantizer.signed and mlp_out.input_quantizer.offset is not None


def test_head_override_quantizes_the_head_at_8_bits(tiny_checkpoints):
    config = QVarConfig(bits=2, module_overrides={"classifier": {"weight_bits": 8, "act_bits": 8}})
    model = auto_class("vit").from_pretrained(tiny_checkpoints["vit"], quantization_config=config)
    assert isinstance(model.classifier, QuantizedLayerMixin) and model.classifier.spec.weight_bits == 8


def test_weight_only_and_fp_boundaries(tiny_checkpoints):
    config = QVarConfig(bits=4, quantize_activations=False, module_overrides={})
    model = auto_class("vit").from_pretrained(tiny_checkpoints["vit"], quantization_config=config)
    for module in model.modules():
        if isinstance(module, QuantizedLayerMixin):
            assert module.input_quantizer is None and module.output_quantizer is None
            assert module.spec.weight_bits == 4
    assert not any(hasattr(m, "attn_probs_quantizer") for m in model.modules())
    assert model.config._attn_implementation != "qvar"
