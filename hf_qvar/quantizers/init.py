"""Step-size initialisers (method.md §3.2–3.3), pure functions of the data they see."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def mse_weight_step(
    groups: torch.Tensor, qn: int, qp: int, tol: float = 1e-5, max_iter: int = 100
) -> torch.Tensor:
    """MSE-optimal step per row of ``groups`` (shape ``(G, n)``) by fixed-point iteration.

    ``α₀ = max|w|/Qp``; repeat ``q = round(clip(w/α))``, ``α ← ⟨w,q⟩/⟨q,q⟩`` until the largest
    relative change is below ``tol`` (the reference code's rule, vectorised over groups).
    """
    w = groups.double()
    step = w.abs().amax(dim=1).clamp_min(1e-8) / qp
    for _ in range(max_iter):
        q = torch.clamp(torch.round(w / step[:, None]), qn, qp)
        qq = (q * q).sum(dim=1)
        new = torch.where(qq > 0, (w * q).sum(dim=1) / qq.clamp_min(1e-12), step).clamp_min(1e-8)
        converged = ((new - step).abs() / step).max() < tol
        step = new
        if converged:
            break
    return step.to(groups.dtype)


def distributed_mean(value: torch.Tensor) -> torch.Tensor:
    """Average ``value`` over all ranks when torch.distributed is up, so every rank initialises alike."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


@torch.no_grad()
def activation_step(x: torch.Tensor, qp: int, binary: bool, unsigned: bool) -> torch.Tensor:
    """First-batch activation step, averaged over ranks.

    Multi-bit: ``2·mean|x|/sqrt(Qp)`` (LSQ; uses the site's own ``Qp``, unlike the reference
    code which takes the signed ``Qp`` at unsigned sites, method.md §10 #11).
    Binary (BiT): ``2·mean|x|`` signed, ``4·mean|x|`` unsigned.
    """
    mean_abs = distributed_mean(x.detach().float().abs().mean().reshape(1))
    if binary:
        step = (4.0 if unsigned else 2.0) * mean_abs
    else:
        step = 2.0 * mean_abs / (qp**0.5)
    return step.clamp_min(1e-8)
