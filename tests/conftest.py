"""Shared fixtures: tiny random-config checkpoints of every architecture hf_qvar covers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton kernels' tests run in its interpreter (read when kernels are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_qvar  # noqa: E402,F401

TINY = {
    "bert": (
        BertForSequenceClassification,
        lambda: BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64),
    ),
    "vit": (
        ViTForImageClassification,
        lambda: ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, num_labels=10),
    ),
    "deit": (
        DeiTForImageClassificationWithTeacher,
        lambda: DeiTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, num_labels=10),
    ),
    "swin": (
        SwinForImageClassification,
        lambda: SwinConfig(image_size=32, patch_size=2, num_channels=1, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                           window_size=4, num_labels=10),
    ),
}


def save_tiny(arch: str, directory: str, seed: int = 0) -> str:
    """Save a randomly initialised tiny model of ``arch`` to ``directory``."""
    cls, make_config = TINY[arch]
    torch.manual_seed(seed)
    cls(make_config()).save_pretrained(directory)
    return directory


def example_inputs(arch: str, batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic inputs for ``arch`` (a padded batch for BERT)."""
    g = torch.Generator().manual_seed(seed)
    if arch == "bert":
        ids = torch.randint(1, 100, (batch, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    size = 32 if arch == "swin" else 28
    return {"pixel_values": torch.randn(batch, 1, size, size, generator=g)}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, str(root / arch)) for arch in TINY}


def auto_class(arch: str):
    return TINY[arch][0]
