"""Quantized layers: `QLinear` (an ``nn.Linear``, so PEFT's LoRA wraps it) and `QConv2d`
(patch embeddings). They own their weight and hold the quantizer modules; no math here."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.fake_quantizer import FakeQuantizer, make_activation_quantizer, make_weight_quantizer
from .sites import SiteSpec


class QuantizedLayerMixin:
    """Weight quantizer, optional input quantizer and optional output quantizer around a layer.

    The quantizers are child modules named ``weight_quantizer``, ``input_quantizer`` and
    ``output_quantizer``; their learnable step sizes are parameters named ``step_size``.
    """

    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None
    output_quantizer: FakeQuantizer | None

    def _init_quantizer_slots(self, spec: SiteSpec | None) -> None:
        self.spec = spec
        self.weight_quantizer = None
        self.input_quantizer = None
        self.output_quantizer = None

    def attach_quantizers(self, spec: SiteSpec, device: torch.device | str | None = None) -> None:
        """Create the quantizer modules described by ``spec`` (on ``device``, meta-safe)."""
        self.spec = spec
        out_channels = self.weight.shape[0]
        granularity = spec.weight_granularity
        self.weight_quantizer = make_weight_quantizer(
            spec.weight_bits, granularity=granularity, channels=out_channels, num_heads=spec.num_heads,
            gradient_scale=spec.gradient_scale,
        )
        if spec.input_bits is not None:
            self.input_quantizer = make_activation_quantizer(
                spec.input_bits, signed=spec.input_signed, offset=spec.input_offset, gradient_scale=spec.gradient_scale
            )
        if spec.output_bits is not None:
            self.output_quantizer = make_activation_quantizer(
                spec.output_bits, signed=True, granularity=spec.output_granularity, channels=out_channels,
                num_heads=spec.num_heads, gradient_scale=spec.gradient_scale,
            )
        for quantizer in self.quantizers():
            quantizer.to(device=device if device is not None else self.weight.device, dtype=self.weight.dtype)

    def quantizers(self) -> list[FakeQuantizer]:
        return [q for q in (self.weight_quantizer, self.input_quantizer, self.output_quantizer) if q is not None]

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _quantized_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = op(x, self.quantized_weight())
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out


class QLinear(QuantizedLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight, input and (for Q/K/V) output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 spec: SiteSpec | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizer_slots(spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: SiteSpec | None = None) -> "QLinear":
        """Wrap ``linear``'s own Parameters (no copy; meta tensors stay meta)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", spec=spec)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Without autograd nothing is kept; under torch.compile Inductor picks what to keep and recompute.
            return self._quantized_forward(x, lambda inp, w: F.linear(inp, w, self.bias))
        # Eager training: one function for input quantizer and matmul keeps x but not its quantized copy.
        out = self.input_quantizer.linear(x, self.quantized_weight(), self.bias)
        return out if self.output_quantizer is None else self.output_quantizer(out)


class QConv2d(QuantizedLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input (the ViT/Swin patch embedding)."""

    def __init__(self, *args, spec: SiteSpec | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizer_slots(spec)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: SiteSpec | None = None) -> "QConv2d":
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", spec=spec,
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_forward(x, lambda inp, w: self._conv_forward(inp, w, self.bias))


def latent_tensor_reader(layers: list[QuantizedLayerMixin], frozen_codes: bool = False
                         ) -> Callable[[], list[torch.Tensor]]:
    """A function listing the layers' current weights and step sizes (and frozen codes): what OBR's and the
    tracker's CUDA graphs touch, checked before every replay. It reads parameter dicts directly, because
    ``nn.Module`` attribute access costs ~0.6 µs per tensor, ~0.5 ms per BERT-base step. Weight quantizer modules
    are taken as they are now; the weight and step-size Parameters are looked up on every call."""
    sources = [(layer._parameters, layer.weight_quantizer) for layer in layers]

    def read() -> list[torch.Tensor]:
        tensors = [params["weight"] for params, _ in sources]
        tensors += [q._parameters["step_size"] for _, q in sources if "step_size" in q._parameters]
        if frozen_codes:
            tensors += [q.frozen_codes for _, q in sources if q.frozen_codes is not None]
        return tensors

    return read


QUANTIZABLE = ((nn.Linear, QLinear, QLinear.from_linear), (nn.Conv2d, QConv2d, QConv2d.from_conv))


def to_float_module(layer: QuantizedLayerMixin, fake_quantized: bool = True) -> nn.Module:
    """Back to a plain ``nn.Linear``/``nn.Conv2d`` holding the fake-quantized (or latent) weight."""
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    plain = base.__new__(base)
    nn.Module.__init__(plain)
    for attr in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
        if hasattr(layer, attr):
            setattr(plain, attr, getattr(layer, attr))
    with torch.no_grad():
        weight = layer.quantized_weight() if fake_quantized else layer.weight
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    plain.bias = layer.bias
    return plain
