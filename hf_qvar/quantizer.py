"""`QVarHfQuantizer`: the transformers lifecycle hooks, delegating all work to `hf_qvar.nn`."""

from __future__ import annotations

import torch
from transformers.quantizers.base import HfQuantizer

from .config import QVarConfig
from .nn.attention import set_attention_implementation
from .nn.checkpoint import validate_loaded_quantizers
from .nn.qlinear import QuantizedLayerMixin, to_float_module
from .nn.swap import attach_missing_quantizers, replace_with_qvar_layers


class QVarHfQuantizer(HfQuantizer):
    """Fake-quantized, trainable low-bit layers with learnable step sizes.

    Fresh quantization (``from_pretrained(fp_model, quantization_config=QVarConfig(...))``): layers are
    swapped on the meta device, full-precision weights load as usual, then quantizers are created and
    their weight steps MSE-initialised from the loaded weights. Reloading a saved qvar model: quantizers
    are created before loading so the saved step sizes load into them, then checked.
    """

    requires_calibration = False

    def __init__(self, quantization_config: QVarConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.converted: list[str] = []

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and not self.pre_quantized:
            offloaded = sorted({str(d) for d in device_map.values()} & {"cpu", "disk"})
            if offloaded and len(set(map(str, device_map.values()))) > 1:
                raise ValueError(
                    f"QVarConfig quantization initialises step sizes from the loaded weights, which cannot be offloaded: "
                    f"the `device_map` sends modules to {offloaded}. Load the model on one device instead."
                )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return getattr(torch, self.quantization_config.master_dtype)

    update_torch_dtype = update_dtype  # transformers 4.50–4.55 name

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    check_quantized_param = param_needs_quantization  # transformers 4.x name

    def _process_model_before_weight_loading(self, model, **kwargs):
        self.converted = replace_with_qvar_layers(model, self.quantization_config, create_quantizers=self.pre_quantized)
        self.modules_to_not_convert = [
            n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(m, QuantizedLayerMixin) and n
        ]
        self._set_attention(model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            validate_loaded_quantizers(model)
        else:
            attach_missing_quantizers(model, self.quantization_config)
        self._set_attention(model)
        return model

    def _set_attention(self, model) -> None:
        config = self.quantization_config
        if config.quantize_activations and config.quantize_attention_probs:
            set_attention_implementation(model)

    def _dequantize(self, model, dtype=None):
        """Replace every quantized layer with a plain one holding its fake-quantized weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLayerMixin):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, to_float_module(module))
        for module in model.modules():
            if hasattr(module, "attn_probs_quantizer"):
                del module.attn_probs_quantizer
        set_attention_implementation(model, "sdpa")
        return model

    def is_serializable(self, safe_serialization=None, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def quantize_model(model, config: QVarConfig):
    """Quantize an already-built model in place, exactly as ``from_pretrained(..., quantization_config=config)`` would.

    Useful for models built from a config (random weights) or modified in memory; the result saves with
    ``save_pretrained`` and reloads with ``from_pretrained`` like any qvar model.
    """
    quantizer = QVarHfQuantizer(config, pre_quantized=False)
    quantizer.preprocess_model(model)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model
