"""Distillation losses against direct formulas; the soft-label file format round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_qvar.distill import (
    attention_mse,
    hidden_state_mse,
    layer_map,
    logit_distillation,
    read_soft_labels,
    recover_soft_labels,
    soft_cross_entropy,
    topk_soft_labels,
    write_soft_labels,
)


def test_soft_cross_entropy_and_temperature():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    for t in (1.0, 2.0):
        p = F.softmax(teacher / t, dim=-1)
        expected = -(p * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * t * t
        torch.testing.assert_close(logit_distillation(student, teacher, t), expected)
        torch.testing.assert_close(soft_cross_entropy(student, p, t), expected)
    # Minimised (up to the teacher's entropy) at equal logits: gradient zero there.
    s = teacher.clone().requires_grad_()
    logit_distillation(s, teacher, 2.0).backward()
    assert s.grad.abs().max() < 1e-6
    # Token-level logits (B, L, C): mean over every position.
    seq = torch.randn(2, 3, 7)
    torch.testing.assert_close(logit_distillation(seq, seq * 0), logit_distillation(seq.reshape(6, 7), seq.reshape(6, 7) * 0))


def test_regression_logits_use_mse():
    s, t = torch.randn(4, 1), torch.randn(4, 1)
    torch.testing.assert_close(logit_distillation(s, t), F.mse_loss(s, t))
    with pytest.raises(ValueError, match="differ in shape"):
        logit_distillation(torch.randn(4, 3), torch.randn(4, 2))


def test_layer_map_even_spread():
    assert layer_map(3, 3) == [0, 1, 2]
    assert layer_map(3, 5) == [0, 2, 4]           # 2-layer student, 4-layer teacher: embeddings, 2, 4
    assert layer_map(5, 13) == [0, 3, 6, 9, 12]   # 4-layer student of a 12-layer teacher
    assert layer_map(5, 3) == [0, 1, 1, 2, 2]


def test_hidden_and_attention_mse_sum_matched_layers():
    torch.manual_seed(0)
    student = tuple(torch.randn(2, 4, 8) for _ in range(3))
    teacher = tuple(torch.randn(2, 4, 8) for _ in range(5))
    expected = sum(F.mse_loss(student[i], teacher[j]) for i, j in enumerate([0, 2, 4]))
    torch.testing.assert_close(hidden_state_mse(student, teacher), expected)
    probs = tuple(torch.rand(2, 2, 4, 4) for _ in range(2))
    torch.testing.assert_close(attention_mse(probs, probs), torch.tensor(0.0))
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_mse(student, tuple(torch.randn(2, 4, 6) for _ in range(3)))
    with pytest.raises(ValueError, match="returned none"):
        hidden_state_mse(student, ())


def test_soft_label_shard_round_trip(tmp_path):
    torch.manual_seed(0)
    n, crops, k, classes = 3, 4, 5, 10
    logits = torch.randn(n, crops, classes)
    ids, probs = topk_soft_labels(logits, k=k)
    coords = torch.rand(n, crops, 4)
    flip = torch.rand(n, crops) > 0.5
    index = torch.tensor([7, 3, 11])
    path = str(tmp_path / "shard.safetensors")
    write_soft_labels(path, index, coords, flip, ids, probs.half(), classes, metadata={"teacher": "effnet-l2"})
    shard = read_soft_labels(path)
    assert shard.num_classes == classes and shard.metadata == {"teacher": "effnet-l2"}
    assert torch.equal(shard.index, index) and torch.equal(shard.coords, coords) and torch.equal(shard.flip, flip)
    assert torch.equal(shard.class_ids, ids) and shard.probs.dtype == torch.float16
    box, flipped, label = shard.crop(1, 2)
    assert torch.equal(box, coords[1, 2]) and flipped == bool(flip[1, 2])
    assert label.shape == (classes,) and label.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(label.argmax(), ids[1, 2, 0])
    # FKD label recovery: the top-k keep their mass, the rest is spread evenly.
    full = recover_soft_labels(ids, probs, classes)
    torch.testing.assert_close(full.sum(-1), torch.ones(n, crops))
    torch.testing.assert_close(full.gather(-1, ids), probs)
    rest = (1 - probs.sum(-1)) / (classes - k)
    others = full.masked_fill(F.one_hot(ids, classes).sum(-2).bool(), -1)
    torch.testing.assert_close(others.max(-1).values, rest)


def test_soft_label_writer_validates(tmp_path):
    ids, probs = torch.zeros(2, 3, 5, dtype=torch.long), torch.full((2, 3, 5), 0.2)
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="shapes disagree"):
        write_soft_labels(path, torch.arange(2), torch.rand(2, 3, 3), torch.zeros(2, 3), ids, probs, 10)
    with pytest.raises(ValueError, match="class_ids"):
        write_soft_labels(path, torch.arange(2), torch.rand(2, 3, 4), torch.zeros(2, 3), ids + 10, probs, 10)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an hf_qvar soft-label file"):
        read_soft_labels(path)
