"""Image classifiers (ViT/DeiT/Swin via ``AutoModelForImageClassification``) for `analyze_batches`: the model,
its preprocessing statistics and Fashion-MNIST test batches built with `hf_qvar.vision.ImageTransform`."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, PretrainedConfig

from .sensitivity import Batch

logger = logging.getLogger(__name__)


def is_image_config(config: PretrainedConfig) -> bool:
    """An image model's config: it has ``num_channels`` and ``image_size`` and no text vocabulary."""
    has_image_shape = all(hasattr(config, a) for a in ("num_channels", "image_size"))
    return has_image_shape and getattr(config, "vocab_size", None) is None


def load_image_model(model_name_or_path: str, num_labels: int = 10) -> nn.Module:
    """Full-precision image classifier (a missing head is freshly initialised, seed 0)."""
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_pretrained(model_name_or_path, num_labels=num_labels)


def image_statistics(model_name_or_path: str, num_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the model's image processor; without one, the Fashion-MNIST training-set
    statistics (one per channel)."""
    from ..assets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError):
        logger.warning("No image processor under %r: normalising with the Fashion-MNIST statistics.",
                       model_name_or_path)
        return list(FASHION_MNIST_MEAN) * num_channels, list(FASHION_MNIST_STD) * num_channels


def fashion_mnist_batches(
    model: nn.Module, mean: list[float], std: list[float], num_samples: int = 512, batch_size: int = 64,
    root: str | None = None,
) -> tuple[list[Batch], torch.Tensor]:
    """``pixel_values`` batches of the first ``num_samples`` Fashion-MNIST test images, in the evaluation view
    of training (`ImageTransform(train=False)` at ``model.config.image_size``/``num_channels``), and their labels.

    Raises:
        FileNotFoundError: the Fashion-MNIST files are missing (`hf_qvar.assets.fashion_mnist`).
        ValueError: the model's classifier does not have Fashion-MNIST's 10 classes.
    """
    from ..assets import FASHION_MNIST_LABELS, FASHION_MNIST_ROOT, fashion_mnist
    from ..vision import ImageTransform

    config = model.config
    if config.num_labels != len(FASHION_MNIST_LABELS):
        raise ValueError(f"Fashion-MNIST has {len(FASHION_MNIST_LABELS)} classes; the model has {config.num_labels}.")
    test = fashion_mnist(root or FASHION_MNIST_ROOT)["test"]
    test = test.select(range(min(num_samples, len(test)))).with_format("numpy")
    transform = ImageTransform(config.image_size, mean, std, config.num_channels, train=False)
    pixels = torch.stack(transform({"image": list(test["image"])})["pixel_values"])
    batches = [{"pixel_values": pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)]
    return batches, torch.as_tensor(test["label"], dtype=torch.long)
