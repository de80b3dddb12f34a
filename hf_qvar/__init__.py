"""hf_qvar: variation-aware low-bit quantization-aware training for Hugging Face transformers.

Importing the package registers ``quant_method="qvar"`` with transformers, so
``from_pretrained(path)`` restores saved qvar models.
"""

import importlib

from .config import PAPER_BOUNDARY_OVERRIDES, QVarConfig
from .cuda_graphs import graph_training_step
from .distill import (
    SoftLabels,
    attention_mse,
    hidden_state_mse,
    logit_distillation,
    read_soft_labels,
    recover_soft_labels,
    soft_cross_entropy,
    topk_soft_labels,
    write_soft_labels,
)
from .nn import QConv2d, QLinear
from .obr import obr_lambda, obr_loss
from .oscillation import OscillationTracker, bake_frozen_weights
from .quantizer import QVarHfQuantizer, quantize_model
from .registration import register

register()

__version__ = "0.1.0"

# The Trainer classes load lazily: the autoload hook imports hf_qvar while transformers.modeling_utils is still
# being imported, and importing transformers.Trainer at that point is circular.
_LAZY_EXPORTS = {"OscillationCallback": "trainer", "QVarTrainer": "trainer", "QVarTrainingArguments": "training_args"}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PAPER_BOUNDARY_OVERRIDES", "OscillationCallback", "OscillationTracker", "QConv2d", "QLinear", "QVarConfig",
    "QVarHfQuantizer", "QVarTrainer", "QVarTrainingArguments", "SoftLabels", "__version__", "attention_mse",
    "bake_frozen_weights", "graph_training_step", "hidden_state_mse", "logit_distillation", "obr_lambda", "obr_loss",
    "quantize_model", "read_soft_labels", "recover_soft_labels", "register", "soft_cross_entropy", "topk_soft_labels",
    "write_soft_labels",
]
