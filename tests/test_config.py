"""QVarConfig: JSON round trip, registration, and a specific error for every invalid value."""

from __future__ import annotations

import json

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

import hf_qvar
from hf_qvar import QVarConfig, QVarHfQuantizer
from tests.conftest import auto_class


def test_json_round_trip_keeps_every_field():
    config = QVarConfig(bits=2, act_bits=4, granularity="per_head", gradient_scale="lsq",
                        module_overrides={"classifier": {"weight_bits": 8}}, modules_to_not_convert=["pooler"])
    data = json.loads(config.to_json_string())
    assert data["quant_method"] == "qvar"
    again = AutoQuantizationConfig.from_dict(data)
    assert isinstance(again, QVarConfig) and again.to_dict() == config.to_dict()


def test_bits_shorthand_and_explicit_fields():
    config = QVarConfig(bits=1)
    assert (config.weight_bits, config.act_bits) == (1, 1)
    config = QVarConfig(bits=4, weight_bits=2)
    assert (config.weight_bits, config.act_bits) == (2, 4)


def test_registration_is_idempotent():
    hf_qvar.register()
    hf_qvar.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qvar"] is QVarConfig
    assert AUTO_QUANTIZER_MAPPING["qvar"] is QVarHfQuantizer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, r"`bits` must be one of \(1, 2, 3, 4, 8\), got 5"),
        ({"bits": 4, "weight_bits": 16}, r"`weight_bits` must be one of .* got 16"),
        ({"act_bits": 0}, r"`act_bits` must be one of .* got 0"),
        ({"bits": True}, r"`bits` must be one of"),
        ({"granularity": "per_row"}, r"`granularity` must be one of \('per_tensor', 'per_channel', 'per_head'\), got 'per_row'"),
        ({"gradient_scale": "l2"}, r"`gradient_scale` must be one of .* got 'l2'"),
        ({"master_dtype": "float64"}, r"`master_dtype` must be one of"),
        ({"bits": 1, "weight_quantizer": "lsq"}, r"`weight_bits=1` is incompatible with `weight_quantizer='lsq'`"),
        ({"bits": 2, "weight_quantizer": "bwn"}, r"`weight_quantizer='bwn'` .* needs `weight_bits=1`"),
        ({"quantize_attention_probs": "yes"}, r"`quantize_attention_probs` must be a bool"),
        ({"module_overrides": {"fc1": {"bits": 8}}}, r"`module_overrides\['fc1'\]` has unknown key\(s\) \['bits'\]"),
        ({"module_overrides": {"fc1": {"weight_bits": 6}}}, r"module_overrides\['fc1'\]\['weight_bits'\]` must be one of"),
        ({"modules_to_not_convert": [3]}, r"`modules_to_not_convert` must be a list of strings"),
        ({"format_version": 99}, r"`format_version` 99 is not supported"),
        ({"bitz": 2}, r"unknown argument\(s\) \['bitz'\]"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QVarConfig(**kwargs)


def test_pattern_matching_nothing_is_an_error(tiny_checkpoints):
    config = QVarConfig(bits=2, module_overrides={"decoder.fc1": {"weight_bits": 8}})
    with pytest.raises(ValueError, match=r"`module_overrides` pattern 'decoder.fc1' matches no Linear/Conv2d module"):
        auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=config)
    config = QVarConfig(bits=2, modules_to_not_convert=["lm_head"])
    with pytest.raises(ValueError, match=r"`modules_to_not_convert` pattern 'lm_head' matches no"):
        auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=config)


def test_per_head_on_indivisible_module_is_an_error():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from hf_qvar.nn.swap import replace_with_qvar_layers

    # 3 heads of 10 channels, but a value projection of 20 output channels cannot be split per head.
    config = BertConfig(vocab_size=50, hidden_size=30, num_hidden_layers=1, num_attention_heads=3, intermediate_size=40)
    model = BertForSequenceClassification(config)
    model.bert.encoder.layer[0].attention.self.value = torch.nn.Linear(30, 20)
    match = r"cannot split module '.*value': its 20 output channels are not divisible by its 3 heads"
    with pytest.raises(ValueError, match=match):
        replace_with_qvar_layers(model, QVarConfig(bits=2, granularity="per_head"), create_quantizers=False)


def test_default_skip_list_keeps_every_task_head(tiny_checkpoints):
    for arch, heads in (("bert", ["classifier"]), ("deit", ["cls_classifier", "distillation_classifier"])):
        model = auto_class(arch).from_pretrained(tiny_checkpoints[arch], quantization_config=QVarConfig(bits=2))
        assert sorted(model.hf_quantizer.modules_to_not_convert) == heads
