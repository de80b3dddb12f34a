"""hf_qvar.analysis on an image classifier: a tiny random DeiT on Fashion-MNIST test images (API and CLI)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, ViTImageProcessor

from hf_qvar import assets
from hf_qvar.analysis import analyze_batches, fashion_mnist_batches, image_statistics, is_image_config
from hf_qvar.analysis.report import KURTOSIS_PNG, REPORT_JSON, REPORT_MD, SENSITIVITY_PNG, write_report

from .test_analysis import _run_cli

KINDS = ("query", "key", "value", "attention_output", "mlp_input", "mlp_output", "attention_probs")
NUM_IMAGES = 48


@pytest.fixture
def fashion_root() -> str:
    if not os.path.isfile(os.path.join(assets.FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST files not under {assets.FASHION_MNIST_ROOT}")
    return assets.FASHION_MNIST_ROOT


def _tiny_deit(directory=None, processor: bool = True) -> DeiTForImageClassification:
    """Tiny random 2-layer DeiT for 28x28 greyscale images, 10 labels (saved to ``directory`` if given)."""
    torch.manual_seed(0)
    model = DeiTForImageClassification(DeiTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10))
    if directory is not None:
        model.save_pretrained(directory)
        if processor:
            ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=list(assets.FASHION_MNIST_MEAN),
                              image_std=list(assets.FASHION_MNIST_STD)).save_pretrained(directory)
    return model


def test_image_config_detection():
    assert is_image_config(_tiny_deit().config)
    from transformers import BertConfig

    assert not is_image_config(BertConfig())


def test_image_statistics_from_the_processor_or_fashion_mnist(tmp_path):
    _tiny_deit(tmp_path / "with", processor=True)
    ViTImageProcessor(image_mean=[0.5], image_std=[0.25]).save_pretrained(tmp_path / "with")
    _tiny_deit(tmp_path / "without", processor=False)
    assert image_statistics(str(tmp_path / "with"), 1) == ([0.5], [0.25])
    assert image_statistics(str(tmp_path / "without"), 3) == (
        list(assets.FASHION_MNIST_MEAN) * 3, list(assets.FASHION_MNIST_STD) * 3)


def test_fashion_mnist_batches_follow_the_model_config(fashion_root):
    model = _tiny_deit()
    batches, labels = fashion_mnist_batches(model, [0.5], [0.25], num_samples=40, batch_size=16)
    assert [b["pixel_values"].shape for b in batches] == [(16, 1, 28, 28), (16, 1, 28, 28), (8, 1, 28, 28)]
    assert labels.tolist() == assets.fashion_mnist(fashion_root)["test"]["label"][:40]
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert pixels.min() == pytest.approx(-2.0)  # black background: (0 - 0.5) / 0.25
    model.config.num_labels = 3
    with pytest.raises(ValueError, match="10 classes"):
        fashion_mnist_batches(model, [0.5], [0.25], num_samples=8)


def test_deit_report_has_every_quantization_group_and_kurtosis(tmp_path, fashion_root):
    model = _tiny_deit()
    batches, labels = fashion_mnist_batches(model, list(assets.FASHION_MNIST_MEAN), list(assets.FASHION_MNIST_STD),
                                            num_samples=NUM_IMAGES, batch_size=16)
    result = analyze_batches(model, batches, labels, bits=2, per_module=True, rank_by="kl_to_fp", inputs="images")
    assert result["num_samples"] == NUM_IMAGES and result["sensitivity"]["full_precision"]["agreement_with_fp"] == 100
    rows = {g["group"]: g for g in result["sensitivity"]["groups"]}
    cells = {f"{i}/{k}" for i in (0, 1) for k in KINDS}
    assert {f"kind:{k}" for k in KINDS} | {"layer:0", "layer:1"} | cells <= set(rows)
    assert all(rows[f"kind:{k}"]["sites"] for k in KINDS)
    assert result["sensitivity"]["fully_quantized"]["kl_to_fp"] > 0
    outliers = {(r["layer"], r["kind"]): r for r in result["outliers"]}
    for layer in (0, 1):
        for kind in ("query", "key", "value", "attention_output", "mlp_input", "mlp_output"):
            row = outliers[(layer, kind)]
            assert row["weight"]["kurtosis"] > 1 and row["input"]["kurtosis"] > 1
    path = write_report(result, str(tmp_path / "report"))
    assert {REPORT_MD, REPORT_JSON, SENSITIVITY_PNG, KURTOSIS_PNG} <= set(os.listdir(tmp_path / "report"))
    assert f"{NUM_IMAGES} eval images" in open(path).read()


def test_cli_detects_the_image_model(tmp_path, fashion_root):
    _tiny_deit(tmp_path / "deit")
    proc = _run_cli("--model", str(tmp_path / "deit"), "--num_samples", "32", "--batch_size", "16",
                    "--rank_by", "kl_to_fp", "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["num_samples"] == 32 and data["inputs"] == "images" and data["eval_set"].startswith("Fashion-MNIST")
    assert {f"kind:{k}" for k in KINDS} <= {g["group"] for g in data["sensitivity"]["groups"]}


def test_cli_rejects_a_text_eval_set_for_an_image_model(tmp_path):
    _tiny_deit(tmp_path / "deit", processor=False)
    proc = _run_cli("--model", str(tmp_path / "deit"), "--dataset", "rotten_tomatoes", "--output_dir",
                    str(tmp_path / "out"))
    assert proc.returncode != 0 and "is an image classifier" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_cli_rejects_fashion_mnist_for_a_text_model(tmp_path):
    from .test_analysis import _tiny

    _tiny(tmp_path / "bert", save=True)
    proc = _run_cli("--model", str(tmp_path / "bert"), "--dataset", "fashion_mnist", "--output_dir",
                    str(tmp_path / "out"))
    assert proc.returncode != 0 and "needs an image classifier" in proc.stderr
