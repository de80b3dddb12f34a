"""hf_qvar: variation-aware low-bit quantization-aware training for Hugging Face transformers.

Importing the package registers ``quant_method="qvar"`` with transformers, so
``from_pretrained(path)`` restores saved qvar models.
"""

from .config import PAPER_BOUNDARY_OVERRIDES, QVarConfig
from .nn import QConv2d, QLinear
from .quantizer import QVarHfQuantizer
from .registration import register

register()

__version__ = "0.1.0"

__all__ = ["PAPER_BOUNDARY_OVERRIDES", "QConv2d", "QLinear", "QVarConfig", "QVarHfQuantizer", "__version__", "register"]
