"""Module sensitivity (method.md §1 (i)): quantize one group of sites at a time on ONE quantized model and
measure how far the task metric and the output distribution move from the full-precision model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .outliers import ActivationRecorder
from .sites import Site, only_quantized

Batch = dict[str, torch.Tensor]
#: Ranking keys: the task metric's drop, or (for untrained heads, where accuracy is chance-level) the
#: output distribution's distance from full precision.
RANK_KEYS = ("accuracy_drop", "kl_to_fp", "disagreement_with_fp")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], recorder: ActivationRecorder | None = None) -> torch.Tensor:
    """Concatenated logits over ``batches`` (eval mode, no grad); feeds ``recorder`` the attention masks."""
    model.eval()
    logits = []
    for batch in batches:
        if recorder is not None:
            recorder.mask = batch.get("attention_mask")
        logits.append(model(**batch).logits.float())
    return torch.cat(logits)


@torch.no_grad()
def calibrate(model: nn.Module, sites: list[Site], batch: Batch) -> None:
    """One forward with every site enabled: activation quantizers initialise their steps on first use."""
    model.eval()
    with only_quantized(sites, sites):
        model(**batch)


def compare(logits: torch.Tensor, labels: torch.Tensor, fp_logits: torch.Tensor) -> dict[str, float]:
    """Accuracy (%), mean KL(p_fp ‖ p) in nats and top-1 agreement with the full-precision model (%)."""
    log_p = F.log_softmax(logits, dim=-1)
    log_fp = F.log_softmax(fp_logits, dim=-1)
    return {
        "accuracy": 100.0 * float((logits.argmax(-1) == labels).float().mean()),
        "kl_to_fp": float(F.kl_div(log_p, log_fp, log_target=True, reduction="batchmean")),
        "agreement_with_fp": 100.0 * float((logits.argmax(-1) == fp_logits.argmax(-1)).float().mean()),
    }


def module_sensitivity(
    model: nn.Module, batches: list[Batch], labels: torch.Tensor, sites: list[Site],
    groups: dict[str, list[Site]], fp_logits: torch.Tensor, rank_by: str = "accuracy_drop",
) -> dict:
    """Metric of the fully quantized model and of each group quantized alone, ranked by damage.

    Groups are ranked by ``rank_by`` (one of `RANK_KEYS`), ties (common on small eval sets) broken by the
    KL divergence to the full-precision output. The model must already be calibrated (`calibrate`).
    """
    if rank_by not in RANK_KEYS:
        raise ValueError(f"`rank_by` must be one of {RANK_KEYS}, got {rank_by!r}.")
    fp = compare(fp_logits, labels, fp_logits)

    def probe(enabled: list[Site]) -> dict[str, float]:
        with only_quantized(sites, enabled):
            result = compare(evaluate(model, batches), labels, fp_logits)
        return {**result, "accuracy_drop": fp["accuracy"] - result["accuracy"],
                "disagreement_with_fp": 100.0 - result["agreement_with_fp"]}

    full = probe(sites)
    rows = [{"group": name, "sites": [s.name for s in group], **probe(group)} for name, group in groups.items()]
    rows.sort(key=lambda r: (r[rank_by], r["kl_to_fp"]), reverse=True)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"rank_by": rank_by, "full_precision": fp, "fully_quantized": full, "groups": rows}
