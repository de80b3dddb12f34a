"""`QVarConfig`: what to quantize and how, as a transformers quantization config (``quant_method="qvar"``)."""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quantizers.fake_quantizer import GRADIENT_SCALES, GRANULARITIES

SUPPORTED_BITS = (1, 2, 3, 4, 8)
MASTER_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_QUANTIZERS = (None, "lsq", "bwn")
OVERRIDE_KEYS = ("weight_bits", "act_bits", "quantize_input")
FORMAT_VERSION = 1

#: The paper's boundary layers (method.md §3.4, §4): 8-bit patch embedding with an 8-bit
#: input, and Swin's PatchMerging reduction at 8 bits with a full-precision input.
PAPER_BOUNDARY_OVERRIDES: dict[str, dict[str, Any]] = {
    "patch_embeddings.projection": {"weight_bits": 8, "act_bits": 8},
    "downsample.reduction": {"weight_bits": 8, "quantize_input": False},
}


class QVarConfig(QuantizationConfigMixin):
    """Configuration of variation-aware low-bit quantization-aware training (Huang et al., TMLR 2024).

    Pass it to ``from_pretrained(..., quantization_config=QVarConfig(bits=2))``: every Linear of the
    backbone becomes a trainable fake-quantized `QLinear`; the task head stays full precision.

    Args:
        bits (`int`, *optional*, defaults to 4):
            Shorthand for `weight_bits` and `act_bits`. One of 1, 2, 3, 4, 8. ``1`` = binary (BWN weights,
            elastic binary activations).
        weight_bits (`int`, *optional*): Weight bit-width; defaults to `bits`.
        act_bits (`int`, *optional*): Activation bit-width; defaults to `bits`.
        quantize_activations (`bool`, *optional*, defaults to `True`):
            `False` quantizes weights only (all activation sites stay full precision).
        quantize_qkv_outputs (`bool`, *optional*, defaults to `True`):
            Quantize the outputs of the query/key/value projections (the inputs of ``q·kᵀ`` and ``p·v``).
        quantize_attention_probs (`bool`, *optional*, defaults to `True`):
            Quantize the softmax output (unsigned). Runs attention through hf_qvar's eager attention function,
            which disables fused (SDPA/flash) attention.
        granularity (`str`, *optional*, defaults to ``"per_tensor"``):
            Step sizes of weights and of Q/K/V outputs: ``per_tensor``, ``per_channel`` (weights only: one
            step per output channel) or ``per_head`` (Q/K/V weights and outputs: one step per head; other
            modules per tensor).
        gradient_scale (`str`, *optional*, defaults to ``"l1"``):
            Step-size gradient scale: ``l1`` = the paper's ``1/sqrt(‖W‖₁·Qp)`` for weights (and the reference
            code's ``1/(sqrt(N)·Qp)`` for activations); ``lsq`` = classic LSQ ``1/sqrt(N·Qp)``.
        weight_quantizer (`str`, *optional*):
            ``"bwn"`` (binary, needs `weight_bits=1`) or ``"lsq"`` (multi-bit); by default chosen from `weight_bits`.
        mlp_output_offset (`bool`, *optional*, defaults to `True`):
            LSQ+ learnable offset on the unsigned post-GELU input of the MLP output projection.
        module_overrides (`dict[str, dict]`, *optional*):
            Per-module settings by name pattern: ``{"pattern": {"weight_bits": 8, "act_bits": 8,
            "quantize_input": True}}``. Defaults to the paper's 8-bit boundary layers
            (`PAPER_BOUNDARY_OVERRIDES`); pass ``{}`` to quantize those like every other layer. A pattern
            naming a default-skipped task head (e.g. ``"classifier"``) quantizes that head too.
        modules_to_not_convert (`list[str]`, *optional*):
            Name patterns kept in full precision. Defaults to the task head(s): every Linear outside the
            backbone (``model.base_model``) and the output embeddings.
        master_dtype (`str`, *optional*, defaults to ``"float32"``):
            dtype of the latent (master) weights; keep float32 and train with bf16 autocast.

    Name patterns match a module's full dotted name exactly, a dotted suffix of it (``"classifier"`` matches
    ``"cls.classifier"`` but not ``"xclassifier"``), or as a full regular expression.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> from hf_qvar import QVarConfig
    >>> model = AutoModelForSequenceClassification.from_pretrained(
    ...     "bert-base-uncased", quantization_config=QVarConfig(bits=1))
    ```
    """

    def __init__(
        self,
        bits: int = 4,
        weight_bits: int | None = None,
        act_bits: int | None = None,
        quantize_activations: bool = True,
        quantize_qkv_outputs: bool = True,
        quantize_attention_probs: bool = True,
        granularity: str = "per_tensor",
        gradient_scale: str = "l1",
        weight_quantizer: str | None = None,
        mlp_output_offset: bool = True,
        module_overrides: dict[str, dict[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        master_dtype: str = "float32",
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = "qvar"
        self.bits = bits
        self.weight_bits = bits if weight_bits is None else weight_bits
        self.act_bits = bits if act_bits is None else act_bits
        self.quantize_activations = quantize_activations
        self.quantize_qkv_outputs = quantize_qkv_outputs
        self.quantize_attention_probs = quantize_attention_probs
        self.granularity = granularity
        self.gradient_scale = gradient_scale
        self.weight_quantizer = weight_quantizer
        self.mlp_output_offset = mlp_output_offset
        self.module_overrides = copy.deepcopy(
            PAPER_BOUNDARY_OVERRIDES if module_overrides is None else module_overrides
        )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.master_dtype = master_dtype
        self.format_version = format_version
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"QVarConfig got unknown argument(s) {sorted(unknown)}.")
        self.post_init()

    def post_init(self) -> None:
        """Reject every invalid value, naming the field, the value and what is accepted."""
        for field in ("bits", "weight_bits", "act_bits"):
            _check_bits(field, getattr(self, field))
        for field in ("quantize_activations", "quantize_qkv_outputs", "quantize_attention_probs", "mlp_output_offset"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"`{field}` must be a bool, got {getattr(self, field)!r}.")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("gradient_scale", self.gradient_scale, GRADIENT_SCALES)
        _check_choice("master_dtype", self.master_dtype, MASTER_DTYPES)
        _check_choice("weight_quantizer", self.weight_quantizer, WEIGHT_QUANTIZERS)
        if self.weight_bits == 1 and self.weight_quantizer == "lsq":
            raise ValueError(
                "`weight_bits=1` is incompatible with `weight_quantizer='lsq'`: a 1-bit signed LSQ grid is {-1, 0}, "
                "not a binary weight. Use `weight_quantizer='bwn'` (or leave it unset) for binary weights."
            )
        if self.weight_bits != 1 and self.weight_quantizer == "bwn":
            raise ValueError(
                f"`weight_quantizer='bwn'` binarizes weights and needs `weight_bits=1`, "
                f"got `weight_bits={self.weight_bits}`."
            )
        if not isinstance(self.module_overrides, dict):
            raise ValueError(
                f"`module_overrides` must be a dict of pattern -> settings, got {self.module_overrides!r}."
            )
        for pattern, override in self.module_overrides.items():
            _check_override(pattern, override)
        if self.modules_to_not_convert is not None and not all(isinstance(p, str) for p in self.modules_to_not_convert):
            raise ValueError(f"`modules_to_not_convert` must be a list of strings, got {self.modules_to_not_convert!r}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"`format_version` {self.format_version!r} is not supported by this hf_qvar (expects {FORMAT_VERSION}); "
                "upgrade hf_qvar to load this checkpoint."
            )

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__} {self.to_json_string()}"


def _check_bits(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in SUPPORTED_BITS:
        raise ValueError(f"`{field}` must be one of {SUPPORTED_BITS}, got {value!r}.")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{field}` must be one of {choices}, got {value!r}.")


def _check_override(pattern: Any, override: Any) -> None:
    if not isinstance(pattern, str) or not isinstance(override, dict):
        raise ValueError(f"`module_overrides` entries must map a name pattern to a dict, got {pattern!r}: {override!r}.")
    unknown = set(override) - set(OVERRIDE_KEYS)
    if unknown:
        raise ValueError(
            f"`module_overrides[{pattern!r}]` has unknown key(s) {sorted(unknown)}; allowed: {OVERRIDE_KEYS}."
        )
    for key in ("weight_bits", "act_bits"):
        if key in override:
            _check_bits(f"module_overrides[{pattern!r}][{key!r}]", override[key])
    if "quantize_input" in override and not isinstance(override["quantize_input"], bool):
        raise ValueError(f"`module_overrides[{pattern!r}]['quantize_input']` must be a bool.")
