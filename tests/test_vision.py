"""Torch-only image preprocessing: tensor conversion, evaluation view, batched random crops, multi-crop batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_qvar.vision import (
    UNCROPPED_IMAGE,
    ImageTransform,
    MultiCropCollator,
    collate_fn,
    crop_grids,
    fit,
    pad_to,
    render_crops,
    sample_crop_boxes,
    to_tensor,
)


def _render_one(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    return render_crops(image[None], torch.tensor([[box]]), torch.tensor([[flip]]), size)[0]


def test_to_tensor_scales_integer_pixels_from_lists_arrays_and_pil():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    expected = torch.from_numpy(array).float()[None] / 255
    for image in (array, array.tolist(), Image.fromarray(array)):  # datasets hands Array2D over as lists of ints
        torch.testing.assert_close(to_tensor(image, 1), expected)
    rgb = to_tensor(Image.fromarray(array).convert("RGB"), 3)
    assert rgb.shape == (3, 3, 4)
    assert to_tensor(array, 3).shape == (3, 3, 4)  # grey expanded to the model's channels
    with pytest.raises(ValueError, match="channels"):
        to_tensor(np.zeros((4, 4, 3), np.uint8), 1)


def test_pad_and_fit():
    image = torch.ones(1, 28, 28)
    padded = pad_to(image, 32)
    assert padded.shape == (1, 32, 32) and padded.sum() == 28 * 28 and padded[0, 2, 2] == 1 and padded[0, 1, 1] == 0
    assert torch.equal(fit(image, 28), image)
    assert fit(torch.rand(3, 300, 400), 224).shape == (3, 224, 224)


def test_whole_image_box_reproduces_the_image_and_its_mirror():
    image = torch.rand(3, 16, 16)
    torch.testing.assert_close(_render_one(image, (0, 0, 16, 16), 16), image, atol=1e-5, rtol=0)
    torch.testing.assert_close(_render_one(image, (0, 0, 16, 16), 16, flip=True), image.flip(-1), atol=1e-5, rtol=0)


def test_crop_grids_equal_affine_grid_of_the_box_transform():
    torch.manual_seed(0)
    height, width, size = 24, 40, 16
    boxes = sample_crop_boxes(6, height, width).view(2, 3, 4)
    flips = torch.tensor([[True, False, True], [False, False, True]])
    top, left, box_height, box_width = boxes.view(-1, 4).float().unbind(-1)
    x_scale = torch.where(flips.view(-1), -box_width, box_width) / width
    zeros = torch.zeros(6)
    theta = torch.stack([x_scale, zeros, (2 * left + box_width) / width - 1,
                         zeros, box_height / height, (2 * top + box_height) / height - 1], dim=-1).view(6, 2, 3)
    expected = F.affine_grid(theta, [6, 1, size, size], align_corners=False).view(2, 3 * size, size, 2)
    torch.testing.assert_close(crop_grids(boxes, flips, height, width, size), expected, atol=1e-6, rtol=0)


def test_box_matches_bilinear_resize_of_the_cut_out_region():
    image = torch.rand(2, 32, 32)

    def resized(region: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(region[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]

    # Shrinking the top-left quadrant 2x only averages pixels inside it: equal everywhere.
    quadrant = _render_one(image, (0, 0, 16, 16), 8)
    torch.testing.assert_close(quadrant, resized(image[:, :16, :16], 8), atol=1e-5, rtol=0)
    # Enlarging the left half: equal except the last column, whose samples lie past the half's last pixel centre
    # (grid_sample blends in column 16, resizing the cut-out copies column 15).
    half = _render_one(image, (0, 0, 32, 16), 32)
    expected = resized(image[:, :, :16], 32)
    torch.testing.assert_close(half[..., :-1], expected[..., :-1], atol=1e-5, rtol=0)
    assert (half[..., -1] - expected[..., -1]).abs().max() <= 0.25 + 1e-5  # at most a quarter-pixel blend
    torch.testing.assert_close(_render_one(image, (0, 0, 32, 16), 32, flip=True), half.flip(-1), atol=1e-5, rtol=0)


def test_sampled_boxes_lie_inside_the_image_with_area_and_ratio_in_range():
    torch.manual_seed(0)
    height, width, scale, ratio = 224, 224, (0.2, 0.6), (0.5, 2.0)
    top, left, box_height, box_width = sample_crop_boxes(20_000, height, width, scale, ratio).unbind(-1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_height <= height).all() and (left + box_width <= width).all()
    assert (top == 0).any() and (top + box_height == height).any()  # offsets span the whole free range
    assert (left == 0).any() and (left + box_width == width).any()
    area_fraction = (box_height * box_width).double() / (height * width)
    aspect = box_width.double() / box_height
    rounding = 0.02  # sides are rounded to whole pixels (>= 70 px here)
    assert scale[0] * (1 - rounding) <= area_fraction.min() < scale[0] * 1.05
    assert scale[1] * 0.95 < area_fraction.max() <= scale[1] * (1 + rounding)
    assert ratio[0] * (1 - rounding) <= aspect.min() < ratio[0] * 1.05
    assert ratio[1] * 0.95 < aspect.max() <= ratio[1] * (1 + rounding)
    assert abs(aspect.log().mean()) < 0.02  # log-uniform, symmetric range, square image


def test_centre_crop_fallback_when_no_try_fits():
    # Square image, ratio >= 5 and area >= half: no box fits -> full width, height = width / 5, centred.
    boxes = sample_crop_boxes(64, 32, 32, scale=(0.5, 1.0), ratio=(5.0, 6.0))
    assert boxes.tolist() == [[13, 0, 6, 32]] * 64
    # Wide image, ratio <= 1 and area >= 90%: no box fits -> full height, width = height * 1, centred.
    boxes = sample_crop_boxes(64, 10, 40, scale=(0.9, 1.0), ratio=(0.5, 1.0))
    assert boxes.tolist() == [[0, 15, 10, 10]] * 64


def test_collator_makes_adjacent_normalised_crops_with_repeated_labels():
    torch.manual_seed(0)
    collator = MultiCropCollator(32, mean=[0.5], std=[0.25], num_crops=4, scale=(0.35, 1.0))
    examples = [{UNCROPPED_IMAGE: torch.rand(1, 32, 32), "label": label} for label in (3, 5, 7)]
    out = collator(examples)
    assert out["pixel_values"].shape == (12, 1, 32, 32)
    assert out["labels"].tolist() == [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7]  # crops of one image stay adjacent
    crops = out["pixel_values"].view(3, 4, 1, 32, 32)
    for image_crops in crops:
        assert all(not torch.allclose(image_crops[i], image_crops[j]) for i in range(4) for j in range(i + 1, 4))
    constant = collator([{UNCROPPED_IMAGE: torch.ones(1, 32, 32), "label": 0}])["pixel_values"]
    torch.testing.assert_close(constant, torch.full((4, 1, 32, 32), 2.0))  # (1 - 0.5) / 0.25


def test_collator_handles_mixed_image_sizes_in_batch_order():
    collator = MultiCropCollator(16, mean=[0.0], std=[1.0], num_crops=2)
    shapes = [(20, 24), (16, 16), (20, 24), (30, 18)]
    examples = [{UNCROPPED_IMAGE: torch.full((1, *shape), float(i)), "label": i} for i, shape in enumerate(shapes)]
    out = collator(examples)
    assert out["pixel_values"].shape == (8, 1, 16, 16)
    assert out["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(out["pixel_values"].amax(dim=(1, 2, 3)), out["labels"].float())


def test_image_transform_and_collator_for_training_and_evaluation():
    images = [np.full((28, 28), 255, np.uint8).tolist(), np.zeros((28, 28), np.uint8).tolist()]
    batch = {"image": images, "label": [3, 5]}
    evaluate = ImageTransform(28, mean=[0.5], std=[0.25], num_channels=1, train=False)(dict(batch))
    assert evaluate["pixel_values"][0].shape == (1, 28, 28) and UNCROPPED_IMAGE not in evaluate
    assert torch.allclose(evaluate["pixel_values"][0], torch.tensor(2.0))  # (1 − 0.5) / 0.25
    train = ImageTransform(32, mean=[0.5], std=[0.25], num_channels=1, train=True)(dict(batch))
    uncropped = train[UNCROPPED_IMAGE][0]
    assert uncropped.shape == (1, 32, 32) and "pixel_values" not in train
    assert uncropped.sum() == 28 * 28 and uncropped.max() == 1  # padded, not normalised: the collator normalises
    collator = MultiCropCollator(28, mean=[0.5], std=[0.25], num_crops=2)
    items = [{"pixel_values": v, "label": y} for v, y in zip(evaluate["pixel_values"], batch["label"])]
    stacked = collator(items)  # evaluation items are stacked as they are
    assert torch.equal(stacked["pixel_values"], collate_fn(items)["pixel_values"])
    assert stacked["labels"].tolist() == [3, 5]
    with pytest.raises(ValueError, match="mean"):
        ImageTransform(28, [0.5, 0.5], [0.25], 1, train=True)


def test_collator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_crops"):
        MultiCropCollator(28, [0.5], [0.25], num_crops=0)
    with pytest.raises(ValueError, match="scale"):
        MultiCropCollator(28, [0.5], [0.25], scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="ratio"):
        MultiCropCollator(28, [0.5], [0.25], ratio=(0.0, math.inf))
