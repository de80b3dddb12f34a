"""Image preprocessing in plain torch: random-resized-crop + flip for training, resize/centre-crop or pad for
evaluation, multi-crop batches for crop-level distillation.

torchvision is not required (and does not import in every environment this project runs in); the crop
follows torchvision's ``RandomResizedCrop`` sampling so recipes carry over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: Any, num_channels: int) -> torch.Tensor:
    """A PIL image, an ``HxW``/``HxWxC`` array or nested list -> float ``CxHxW`` tensor in [0, 1].

    Integer values are 0-255 pixels (datasets hands uint8 arrays over as Python ints); floats are kept as is.
    """
    if hasattr(image, "convert"):  # PIL
        image = image.convert("L" if num_channels == 1 else "RGB")
    array = np.array(image)  # a writable copy (PIL's array view is read-only)
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0).expand(num_channels, -1, -1) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] != num_channels:
        raise ValueError(f"Image has {tensor.shape[0]} channels but the model expects {num_channels}.")
    return tensor.float() / 255.0 if np.issubdtype(array.dtype, np.integer) else tensor.float()


def pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a ``CxHxW`` image (centred) up to ``size x size``; e.g. Fashion-MNIST 28 -> 32 for Swin."""
    height, width = image.shape[-2:]
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(image, (left, size - width - left, top, size - height - top))


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def fit(image: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Evaluation view: pad images no larger than `size`; otherwise resize the short side to
    ``size / crop_pct`` (224 -> 256) and centre-crop ``size``."""
    height, width = image.shape[-2:]
    if height <= size and width <= size:
        return pad_to(image, size)
    short = int(size / crop_pct)
    scale = short / min(height, width)
    image = _resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


def random_resized_crop(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A random area fraction in `scale` and aspect ratio in `ratio`, resized to ``size x size``.

    Same sampling as torchvision's ``RandomResizedCrop`` (ten tries, then a centre crop of clamped ratio).
    """
    height, width = image.shape[-2:]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return _resize(image[..., top : top + h, left : left + w], size, size)


class ImageTransform:
    """``Dataset.set_transform`` callable: image column -> normalised ``pixel_values``.

    Training: pad small images up to `size`, then `num_crops` independent random-resized crops with a random
    horizontal flip each (``num_crops > 1`` gives every example a ``num_crops x C x H x W`` stack, flattened
    by `collate_fn`). Evaluation: `fit`.

    Args:
        size (`int`): Model input resolution.
        mean, std (`Sequence[float]`): Per-channel normalisation.
        num_channels (`int`): Model input channels (1 for Fashion-MNIST).
        train (`bool`): Random crops and flips (training) or the deterministic evaluation view.
        num_crops (`int`, *optional*, defaults to 1): Crops per image per step when training.
        scale (`tuple[float, float]`, *optional*): Area range of the random crops.
        image_column (`str`, *optional*, defaults to ``"image"``): Dataset column holding the images.
        crop_pct (`float`, *optional*, defaults to 0.875): Evaluation centre-crop fraction for large images.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_channels: int,
        train: bool,
        num_crops: int = 1,
        scale: tuple[float, float] = (0.08, 1.0),
        image_column: str = "image",
        crop_pct: float = 0.875,
    ):
        if num_crops < 1:
            raise ValueError(f"`num_crops` must be >= 1, got {num_crops}.")
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"`mean`/`std` need {num_channels} values, got {list(mean)} / {list(std)}.")
        self.size, self.num_channels, self.train = size, num_channels, train
        self.num_crops, self.scale, self.image_column, self.crop_pct = num_crops, scale, image_column, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def _train_view(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2] <= self.size and image.shape[-1] <= self.size:
            image = pad_to(image, self.size)
        crop = random_resized_crop(image, self.size, self.scale)
        return crop.flip(-1) if torch.rand(()) < 0.5 else crop

    def _views(self, image: Any) -> torch.Tensor:
        image = to_tensor(image, self.num_channels)
        if not self.train:
            return (fit(image, self.size, self.crop_pct) - self.mean) / self.std
        crops = torch.stack([self._train_view(image) for _ in range(self.num_crops)])
        crops = (crops - self.mean) / self.std
        return crops if self.num_crops > 1 else crops[0]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch["pixel_values"] = [self._views(image) for image in batch[self.image_column]]
        return batch


def collate_fn(examples: list[dict[str, Any]], label_column: str = "label") -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels``; multi-crop stacks are flattened (crops of one image adjacent)
    with the label repeated per crop."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example[label_column] for example in examples], dtype=torch.long)
    if pixel_values.ndim == 5:
        labels = labels.repeat_interleave(pixel_values.shape[1])
        pixel_values = pixel_values.flatten(0, 1)
    return {"pixel_values": pixel_values, "labels": labels}
