"""Quantized layers, quantization sites and the module swap."""

from .qlinear import QConv2d, QLinear, QuantizedLayerMixin

__all__ = ["QConv2d", "QLinear", "QuantizedLayerMixin"]
