"""Idempotent registration of ``quant_method="qvar"`` and ``attn_implementation="qvar"`` with transformers."""

from __future__ import annotations

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

QUANT_METHOD = "qvar"


def register() -> None:
    """Register config, quantizer and attention function; safe to call any number of times."""
    from .config import QVarConfig
    from .nn.attention import register_attention
    from .quantizer import QVarHfQuantizer

    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, QVarConfig), (AUTO_QUANTIZER_MAPPING, QVarHfQuantizer)):
        registered = mapping.get(QUANT_METHOD)
        if registered is not None and registered.__qualname__ != cls.__qualname__:
            raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered by {registered.__module__}.")
        mapping[QUANT_METHOD] = cls
    register_attention()
