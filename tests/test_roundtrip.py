"""save_pretrained -> from_pretrained restores the same quantized model, bit for bit."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_qvar import QVarConfig
from hf_qvar.nn.qlinear import QuantizedLayerMixin
from tests.conftest import auto_class, example_inputs

REPO = Path(__file__).resolve().parents[1]


def _quantize_and_train(arch, checkpoint, config, steps=2):
    """Quantize, then take a few optimizer steps so every step size moves off its init."""
    model = auto_class(arch).from_pretrained(checkpoint, quantization_config=config)
    inputs = example_inputs(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), inputs


@pytest.mark.parametrize("arch", ["bert", "vit", "deit", "swin"])
@pytest.mark.parametrize("bits,granularity", [(1, "per_tensor"), (2, "per_head"), (4, "per_channel")])
def test_reload_gives_bit_identical_logits(arch, bits, granularity, tiny_checkpoints, tmp_path):
    config = QVarConfig(bits=bits, granularity=granularity)
    model, inputs = _quantize_and_train(arch, tiny_checkpoints[arch], config)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = auto_class(arch).from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.to_dict() == config.to_dict()
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.equal(got, expected)
    saved = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert sum(isinstance(m, QuantizedLayerMixin) for m in reloaded.modules()) == sum(
        isinstance(m, QuantizedLayerMixin) for m in model.modules()
    )


def test_reload_by_repo_id_from_an_offline_hub_cache(tiny_checkpoints, tmp_path, monkeypatch):
    model, inputs = _quantize_and_train("bert", tiny_checkpoints["bert"], QVarConfig(bits=2))
    with torch.no_grad():
        expected = model(**inputs).logits
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-bert-qvar" / "snapshots" / revision
    model.save_pretrained(snapshot)
    (cache / "models--someone--tiny-bert-qvar" / "refs").mkdir()
    (cache / "models--someone--tiny-bert-qvar" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = auto_class("bert").from_pretrained("someone/tiny-bert-qvar", cache_dir=str(cache)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def _saved(tiny_checkpoints, tmp_path) -> Path:
    model, _ = _quantize_and_train("bert", tiny_checkpoints["bert"], QVarConfig(bits=2), steps=1)
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def _edit_checkpoint(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_quantizer_tensor_is_refused(tiny_checkpoints, tmp_path):
    path = _saved(tiny_checkpoints, tmp_path)
    _edit_checkpoint(path, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.input_quantizer.step_size"))
    with pytest.raises(ValueError, match=r"lacks 1 quantizer tensor\(s\): .*layer.1.attention.self.key.input_quantizer.step_size"):
        auto_class("bert").from_pretrained(path.parent)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_step_size_in_checkpoint_is_refused(bad, tiny_checkpoints, tmp_path):
    path = _saved(tiny_checkpoints, tmp_path)
    key = "bert.encoder.layer.0.output.dense.weight_quantizer.step_size"
    _edit_checkpoint(path, lambda t: t[key].fill_(bad))
    with pytest.raises(ValueError, match=r"step size '.*output.dense.weight_quantizer.step_size' .* must be finite and positive"):
        auto_class("bert").from_pretrained(path.parent)


def test_checkpoint_config_wins_over_a_different_passed_config(tiny_checkpoints, tmp_path):
    path = _saved(tiny_checkpoints, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = auto_class("bert").from_pretrained(path.parent, quantization_config=QVarConfig(bits=4))
    assert any("from the model will be used" in str(w.message) for w in caught)
    assert model.config.quantization_config.weight_bits == 2
    assert model.bert.encoder.layer[0].attention.self.query.weight_quantizer.bits == 2


def _run_without_import(directory: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(directory)!r})\n"
        "print(type(m.bert.encoder.layer[0].attention.self.query).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"} | env_extra
    # Run from a neutral folder so only the installed package (and its .pth hook) is visible.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=directory, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("_hf_qvar_autoload") is None,
                    reason="hf_qvar is not pip-installed (its autoload hook ships with the wheel)")
def test_reload_without_import_uses_the_autoload_hook(tiny_checkpoints, tmp_path):
    path = _saved(tiny_checkpoints, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "__pycache__", ignore_errors=True)
    result = _run_without_import(path.parent, {})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "QLinear"
    disabled = _run_without_import(path.parent, {"HF_QVAR_NO_AUTOLOAD": "1"})
    assert disabled.stdout.strip().splitlines()[-1] == "Linear"
    assert "Unknown quantization type, got qvar" in disabled.stderr  # loud, not silent


def test_dequantize_gives_plain_layers_with_the_quantized_weights(tiny_checkpoints):
    model, _ = _quantize_and_train("vit", tiny_checkpoints["vit"], QVarConfig(bits=2))
    query = model.vit.layers[0].attention.q_proj if hasattr(model.vit, "layers") else None
    if query is None:
        pytest.skip("layout of this transformers version")
    with torch.no_grad():
        expected = query.quantized_weight().clone()
    model.dequantize()
    plain = model.vit.layers[0].attention.q_proj
    assert type(plain) is torch.nn.Linear and torch.equal(plain.weight, expected)
    assert not any(isinstance(m, QuantizedLayerMixin) for m in model.modules())


def test_quantize_model_matches_from_pretrained_and_reloads(tiny_checkpoints, tmp_path):
    from hf_qvar import quantize_model

    config = QVarConfig(bits=2)
    loaded = auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=config).eval()
    in_memory = quantize_model(auto_class("bert").from_pretrained(tiny_checkpoints["bert"]), config).eval()
    inputs = example_inputs("bert")
    with torch.no_grad():
        expected = loaded(**inputs).logits
        assert torch.equal(in_memory(**inputs).logits, expected)
    in_memory.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(auto_class("bert").from_pretrained(tmp_path).eval()(**inputs).logits, expected)


def test_offloading_device_map_is_refused_for_fresh_quantization(tiny_checkpoints):
    device_map = {"bert": "cpu", "classifier": "disk"}
    with pytest.raises(ValueError, match=r"cannot be offloaded: the `device_map` sends modules to \['cpu', 'disk'\]"):
        auto_class("bert").from_pretrained(tiny_checkpoints["bert"], quantization_config=QVarConfig(bits=2),
                                           device_map=device_map)
