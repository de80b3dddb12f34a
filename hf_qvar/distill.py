"""Knowledge-distillation losses and the on-disk soft-label format.

Losses (all per-batch means, so gradient accumulation only has to average micro-batches):

* `soft_cross_entropy`: ``−Σ p_teacher·log softmax(z/T)``, ×T² (Hinton) so gradients keep their size when
  T > 1; with precomputed multi-crop soft labels (FKD, method.md §6) it is the only target;
* `hidden_state_mse`: BiT's Σ over matched layers of MSE(hidden), embedding output + every layer, evenly
  mapped when student and teacher depths differ (method.md §8);
* `attention_mse`: the same over attention probabilities (BiT has it, off by default).

Soft-label file format (FKD "marginal smoothing top-k", method.md §6). One safetensors file holds any number
of images (a shard); the data pipeline writes it once with a strong teacher and reads it per epoch:

| tensor | shape | dtype | meaning |
|---|---|---|---|
| ``index`` | (N,) | int64 | dataset index of each image |
| ``coords`` | (N, K, 4) | float32 | RandomResizedCrop box ``(i/H, j/W, h/H, w/W)`` of each of the K crops |
| ``flip`` | (N, K) | bool | horizontal flip applied after cropping |
| ``class_ids`` | (N, K, k) | int64 | top-k teacher classes of each crop |
| ``probs`` | (N, K, k) | float16/32 | their teacher probabilities (softmax at the recorded temperature) |

Metadata (strings): ``format="hf_qvar.soft_labels"``, ``version="1"``, ``num_classes``, plus free-form keys
(teacher name, temperature, ...). `recover_soft_labels` turns top-k back into a full distribution, spreading the
missing mass ``1 − Σ top-k`` evenly over the other classes (FKD's label recovery).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

SOFT_LABEL_FORMAT = "hf_qvar.soft_labels"
SOFT_LABEL_VERSION = "1"


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over all leading positions of ``−Σ_c p(c)·log softmax(z/T)(c)``, times ``T²``."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(target_probs.float() * log_probs).sum(dim=-1).mean() * temperature**2


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft CE against ``softmax(teacher/T)``; MSE for a single regression output (e.g. STS-B, as BiT)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}."
        )
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return soft_cross_entropy(student_logits, F.softmax(teacher_logits.float() / temperature, dim=-1), temperature)


def layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher index for each of ``num_student`` entries, spread evenly, first and last matched.

    Entries include the embedding output at 0, so ``layer_map(L_s + 1, L_t + 1)`` maps student layer ``i``
    to teacher layer ``round(i·L_t/L_s)`` (halves round up).
    """
    if num_student == 1:
        return [num_teacher - 1]
    return [math.floor(i * (num_teacher - 1) / (num_student - 1) + 0.5) for i in range(num_student)]


def _matched_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], what: str) -> torch.Tensor:
    if not student or not teacher:
        raise ValueError(f"Distillation needs {what} from both models; one of them returned none.")
    total = None
    for s, t_idx in zip(student, layer_map(len(student), len(teacher))):
        t = teacher[t_idx]
        if s.shape != t.shape:
            raise ValueError(f"Student and teacher {what} differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}.")
        loss = F.mse_loss(s.float(), t.float())
        total = loss if total is None else total + loss
    return total


def hidden_state_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Σ over matched layers of MSE(hidden states); tuples as ``output_hidden_states=True`` returns them."""
    return _matched_mse(student, teacher, "hidden states")


def attention_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Σ over matched layers of MSE(attention probabilities); tuples from ``output_attentions=True``."""
    return _matched_mse(student, teacher, "attentions")


@dataclass
class SoftLabels:
    """A shard of precomputed multi-crop soft labels (see the module docstring for the layout)."""

    index: torch.Tensor
    coords: torch.Tensor
    flip: torch.Tensor
    class_ids: torch.Tensor
    probs: torch.Tensor
    num_classes: int
    metadata: dict[str, str] = field(default_factory=dict)

    def crop(self, row: int, crop: int) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """(box, flip, full soft label) of one crop of the image at ``row`` of this shard."""
        label = recover_soft_labels(self.class_ids[row, crop], self.probs[row, crop], self.num_classes)
        return self.coords[row, crop], bool(self.flip[row, crop]), label


def topk_soft_labels(teacher_logits: torch.Tensor, k: int = 5, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(class ids, probabilities) of the top-``k`` classes of ``softmax(teacher_logits/T)``, to write to disk."""
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    top = probs.topk(k, dim=-1)
    return top.indices, top.values


def recover_soft_labels(class_ids: torch.Tensor, probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full ``(..., num_classes)`` distributions from top-k: the rest of the mass spread over the other classes."""
    probs = probs.float()
    k = class_ids.shape[-1]
    rest = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min(0) / max(num_classes - k, 1)
    full = rest.expand(*probs.shape[:-1], num_classes).clone()
    return full.scatter_(-1, class_ids.long(), probs)


def write_soft_labels(
    path: str,
    index: torch.Tensor,
    coords: torch.Tensor,
    flip: torch.Tensor,
    class_ids: torch.Tensor,
    probs: torch.Tensor,
    num_classes: int,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one soft-label shard (shapes and dtypes in the module docstring; checked here)."""
    n, k_crops = coords.shape[:2]
    if index.shape != (n,) or coords.shape != (n, k_crops, 4) or flip.shape != (n, k_crops):
        raise ValueError(
            f"Soft-label shapes disagree: index {tuple(index.shape)}, coords {tuple(coords.shape)} (want (N, K, 4)), "
            f"flip {tuple(flip.shape)} (want (N, K))."
        )
    if class_ids.shape != probs.shape or class_ids.shape[:2] != (n, k_crops):
        raise ValueError(
            f"`class_ids` {tuple(class_ids.shape)} and `probs` {tuple(probs.shape)} must both be (N, K, top_k) with "
            f"N={n}, K={k_crops}."
        )
    if int(class_ids.max()) >= num_classes or int(class_ids.min()) < 0:
        raise ValueError(f"`class_ids` must lie in [0, {num_classes}), got [{int(class_ids.min())}, {int(class_ids.max())}].")
    meta = {**(metadata or {}), "format": SOFT_LABEL_FORMAT, "version": SOFT_LABEL_VERSION, "num_classes": str(num_classes)}
    tensors = {
        "index": index.long(), "coords": coords.float(), "flip": flip.bool(),
        "class_ids": class_ids.long(), "probs": probs if probs.dtype in (torch.float16, torch.float32) else probs.float(),
    }
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata=meta)


def read_soft_labels(path: str) -> SoftLabels:
    """Read a shard written by `write_soft_labels`."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != SOFT_LABEL_FORMAT:
            raise ValueError(f"{path} is not an hf_qvar soft-label file (metadata format={meta.get('format')!r}).")
        if meta.get("version") != SOFT_LABEL_VERSION:
            raise ValueError(f"{path} has soft-label format version {meta.get('version')!r}; this hf_qvar reads {SOFT_LABEL_VERSION}.")
        tensors = {k: f.get_tensor(k) for k in ("index", "coords", "flip", "class_ids", "probs")}
    num_classes = int(meta.pop("num_classes"))
    extra = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return SoftLabels(**tensors, num_classes=num_classes, metadata=extra)
