"""Image preprocessing in plain torch: per-image conversion in the dataset transform, random crops per batch.

Training is split in two so the random work is batched: `ImageTransform` (``train=True``) only converts each
image to a ``CxHxW`` tensor in [0, 1] and pads small images up to the model size, under ``uncropped_image``;
`MultiCropCollator` then samples ``num_crops`` random-resized-crop boxes and flips per image, vectorised
(torchvision ``RandomResizedCrop``'s sampling, so recipes carry over), renders all crops with one bilinear
``grid_sample`` and normalises. Cropping image by image (several small torch ops per crop) made data loading the
bottleneck of Fashion-MNIST training. Evaluation stays per image and deterministic (`fit`, normalised
``pixel_values``).

Crops are resampled without antialiasing (``grid_sample`` has none): nothing is lost where crops are enlarged
(Fashion-MNIST), but crops of large images shrunk by more than 2x skip pixels (aliasing), unlike the
antialiased `fit`. Samples within half a pixel of a crop's edge blend with the pixels just outside it rather
than repeating the edge. torchvision is not required (and does not import in every environment this project
runs in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Key of a training item's uncropped, unnormalised image; `MultiCropCollator` crops items carrying it.
UNCROPPED_IMAGE = "uncropped_image"
#: torchvision's ``RandomResizedCrop`` tries this many boxes before falling back to a centre crop.
CROP_TRIES = 10


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


def fit(image: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Evaluation view: pad images no larger than `size`; otherwise resize the short side to
    ``size / crop_pct`` (224 -> 256, antialiased) and centre-crop ``size``."""
    height, width = image.shape[-2:]
    if height <= size and width <= size:
        return pad_to(image, size)
    scale = int(size / crop_pct) / min(height, width)
    resized_shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    image = F.interpolate(image[None], size=resized_shape, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


def sample_crop_boxes(
    num_boxes: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``(num_boxes, 4)`` integer ``(top, left, box_height, box_width)`` boxes inside a ``height x width`` image.

    torchvision ``RandomResizedCrop``'s distribution, vectorised: per box `CROP_TRIES` tries of an area fraction
    uniform in `scale` and a log-uniform aspect ratio (width / height) in `ratio`; the first try that fits wins,
    at a uniform position; with none, a centre crop of the whole image with its ratio clamped to `ratio`.
    """
    area_fraction = torch.empty(num_boxes, CROP_TRIES).uniform_(*scale)
    aspect = torch.empty(num_boxes, CROP_TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    target_area = height * width * area_fraction.double()
    box_width = (target_area * aspect).sqrt().round().long()
    box_height = (target_area / aspect).sqrt().round().long()
    fits = (box_width > 0) & (box_width <= width) & (box_height > 0) & (box_height <= height)
    first_fit = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    box_width, box_height = box_width.gather(1, first_fit)[:, 0], box_height.gather(1, first_fit)[:, 0]

    if width / height < ratio[0]:
        fallback_height, fallback_width = round(width / ratio[0]), width
    elif width / height > ratio[1]:
        fallback_height, fallback_width = height, round(height * ratio[1])
    else:
        fallback_height, fallback_width = height, width
    found = fits.any(dim=1)
    box_height = torch.where(found, box_height, fallback_height)
    box_width = torch.where(found, box_width, fallback_width)

    def uniform_offset(free: torch.Tensor) -> torch.Tensor:  # in [0, free]; the clamp guards float rounding
        return torch.minimum((torch.rand(num_boxes, dtype=torch.float64) * (free + 1)).long(), free)

    top = torch.where(found, uniform_offset(height - box_height), (height - box_height) // 2)
    left = torch.where(found, uniform_offset(width - box_width), (width - box_width) // 2)
    return torch.stack([top, left, box_height, box_width], dim=1)


def crop_grids(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """``grid_sample`` grids for ``(B, K, 4)`` boxes (from `sample_crop_boxes`) in ``height x width`` images,
    mirrored where ``flips`` (``(B, K)`` bool) is set -> ``(B, K*size, size, 2)``: crops stacked along the height.

    Equal to ``F.affine_grid`` of the scale-and-shift ``theta`` with ``align_corners=False`` (so output pixel
    centres land where ``F.interpolate`` of the cut-out box puts them), built by broadcasting because the map
    is separable: ``affine_grid``'s general (N, size*size, 3) x (N, 3, 2) product cost 4x the ``grid_sample``.
    """
    batch, crops = boxes.shape[:2]
    top, left, box_height, box_width = boxes.to(torch.float32).unbind(-1)
    # Box edges in grid_sample's normalised coordinates (-1 and 1 are the image's outer pixel edges).
    x_scale = torch.where(flips, -box_width, box_width) / width
    y_scale = box_height / height
    x_centre = (2 * left + box_width) / width - 1
    y_centre = (2 * top + box_height) / height - 1
    pixel_centres = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    x = torch.addcmul(x_centre[..., None], x_scale[..., None], pixel_centres)  # (B, K, size)
    y = torch.addcmul(y_centre[..., None], y_scale[..., None], pixel_centres)
    shape = (batch, crops, size, size)
    grid = torch.stack([x[:, :, None, :].expand(shape), y[:, :, :, None].expand(shape)], dim=-1)
    return grid.view(batch, crops * size, size, 2)


def render_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``boxes`` (``(B, K, 4)``) of ``images`` (``BxCxHxW``) to ``size x size``, mirrored where ``flips``
    -> ``(B*K)xCxsizexsize``, crops of one image adjacent.

    One bilinear ``grid_sample`` for the whole batch; the K crops of an image are stacked along the grid's
    height, so the images are not repeated in memory.
    """
    batch, crops = boxes.shape[:2]
    channels, height, width = images.shape[1:]
    grid = crop_grids(boxes, flips, height, width, size).to(images.dtype)
    rendered = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rendered.view(batch, channels, crops, size, size).transpose(1, 2).reshape(-1, channels, size, size)


def collate_fn(examples: list[dict[str, Any]], label_column: str = "label") -> dict[str, torch.Tensor]:
    """Evaluation batches: stack the per-image ``pixel_values`` and the labels."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example[label_column] for example in examples], dtype=torch.long),
    }


class MultiCropCollator:
    """Training batches: ``num_crops`` random-resized crops with random horizontal flips per image, normalised.

    Crops of one image are adjacent and the label is repeated per crop (`QVarTrainer`'s multi-crop
    distillation pairs every crop with the teacher's prediction on it). Items without an `UNCROPPED_IMAGE`
    (evaluation, `ImageTransform` with ``train=False``) are stacked as they are, since `Trainer` uses one
    collator for both. Images of one shape share one ``grid_sample`` call (all of them for Fashion-MNIST).

    Args:
        size (`int`): Model input resolution.
        mean, std (`Sequence[float]`): Per-channel normalisation, applied after cropping.
        num_crops (`int`, *optional*, defaults to 1): Crops per image per step.
        scale (`tuple[float, float]`, *optional*): Area fraction range of the crops.
        ratio (`tuple[float, float]`, *optional*): Aspect ratio (width / height) range of the crops.
        label_column (`str`, *optional*, defaults to ``"label"``): Item key holding the label.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_crops: int = 1,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        label_column: str = "label",
    ):
        if num_crops < 1:
            raise ValueError(f"`num_crops` must be >= 1, got {num_crops}.")
        if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"`scale` and `ratio` need 0 < low <= high, got {scale} and {ratio}.")
        self.size, self.num_crops, self.scale, self.ratio = size, num_crops, scale, ratio
        self.label_column = label_column
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """``BxCxHxW`` images in [0, 1] -> ``(B*num_crops)xCxsizexsize`` normalised crops."""
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        boxes = sample_crop_boxes(batch * self.num_crops, height, width, self.scale, self.ratio)
        flips = torch.rand(batch, self.num_crops) < 0.5
        crops = render_crops(images, boxes.view(batch, self.num_crops, 4), flips, self.size)
        return (crops - self.mean) / self.std

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if UNCROPPED_IMAGE not in examples[0]:
            return collate_fn(examples, self.label_column)
        images = [example[UNCROPPED_IMAGE] for example in examples]
        labels = torch.tensor([example[self.label_column] for example in examples], dtype=torch.long)
        by_shape: dict[torch.Size, list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(index)
        if len(by_shape) == 1:
            pixel_values = self.crop(torch.stack(images))
        else:  # image folders of mixed sizes: one render per shape, scattered back in batch order
            pixel_values = torch.empty(len(images), self.num_crops, images[0].shape[0], self.size, self.size)
            for indices in by_shape.values():
                crops = self.crop(torch.stack([images[i] for i in indices]))
                pixel_values[indices] = crops.view(len(indices), self.num_crops, *crops.shape[1:])
            pixel_values = pixel_values.flatten(0, 1)
        return {"pixel_values": pixel_values, "labels": labels.repeat_interleave(self.num_crops)}


class ImageTransform:
    """``Dataset.set_transform`` callable for the per-image, deterministic part of preprocessing.

    Training: ``uncropped_image`` = the image as a ``CxHxW`` tensor in [0, 1], zero-padded (centred) up to
    ``size`` when no side exceeds it; `MultiCropCollator` crops, flips and normalises whole batches.
    Evaluation: ``pixel_values`` = `fit` view, normalised.

    Args:
        size (`int`): Model input resolution.
        mean, std (`Sequence[float]`): Per-channel normalisation (evaluation; training normalises in the collator).
        num_channels (`int`): Model input channels (1 for Fashion-MNIST).
        train (`bool`): Uncropped training images or the evaluation view.
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
        image_column: str = "image",
        crop_pct: float = 0.875,
    ):
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"`mean`/`std` need {num_channels} values, got {list(mean)} / {list(std)}.")
        self.size, self.num_channels, self.train = size, num_channels, train
        self.image_column, self.crop_pct = image_column, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def _uncropped(self, image: Any) -> torch.Tensor:
        image = to_tensor(image, self.num_channels)
        return pad_to(image, self.size) if image.shape[-2] <= self.size and image.shape[-1] <= self.size else image

    def _evaluation_view(self, image: Any) -> torch.Tensor:
        return (fit(to_tensor(image, self.num_channels), self.size, self.crop_pct) - self.mean) / self.std

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.train:
            batch[UNCROPPED_IMAGE] = [self._uncropped(image) for image in batch[self.image_column]]
        else:
            batch["pixel_values"] = [self._evaluation_view(image) for image in batch[self.image_column]]
        return batch
