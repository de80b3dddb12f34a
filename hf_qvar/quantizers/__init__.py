"""Fake quantizers and their autograd primitives."""

from .fake_quantizer import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    FakeQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
)

__all__ = [
    "BinaryActivationQuantizer",
    "BinaryWeightQuantizer",
    "FakeQuantizer",
    "LSQActivationQuantizer",
    "LSQWeightQuantizer",
]
