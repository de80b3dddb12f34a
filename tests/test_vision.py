"""Torch-only image preprocessing: tensor conversion, evaluation view, random crops, multi-crop batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_qvar.vision import ImageTransform, collate_fn, fit, pad_to, random_resized_crop, to_tensor


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


def test_random_resized_crop_output_size_and_full_crop():
    torch.manual_seed(0)
    image = torch.rand(1, 28, 28)
    assert random_resized_crop(image, 28, scale=(0.2, 0.5)).shape == (1, 28, 28)
    torch.testing.assert_close(random_resized_crop(image, 28, scale=(1.0, 1.0), ratio=(1.0, 1.0)), image)


def test_image_transform_normalises_and_makes_crops():
    batch = {"image": [np.full((28, 28), 255, np.uint8).tolist(), np.zeros((28, 28), np.uint8).tolist()], "label": [3, 5]}
    evaluate = ImageTransform(28, mean=[0.5], std=[0.25], num_channels=1, train=False)(dict(batch))
    assert evaluate["pixel_values"][0].shape == (1, 28, 28)
    assert torch.allclose(evaluate["pixel_values"][0], torch.tensor(2.0))  # (1 − 0.5) / 0.25
    train = ImageTransform(32, mean=[0.5], std=[0.25], num_channels=1, train=True, num_crops=3)(dict(batch))
    assert train["pixel_values"][1].shape == (3, 1, 32, 32)
    out = collate_fn([{"pixel_values": v, "label": y} for v, y in zip(train["pixel_values"], batch["label"])])
    assert out["pixel_values"].shape == (6, 1, 32, 32)
    assert out["labels"].tolist() == [3, 3, 3, 5, 5, 5]  # crops of one image stay adjacent
    with pytest.raises(ValueError, match="num_crops"):
        ImageTransform(28, [0.5], [0.25], 1, train=True, num_crops=0)
