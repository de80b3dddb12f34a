"""Outlier statistics (method.md §1 (ii), §9.3): Pearson kurtosis (3 for a Gaussian) and max|x|/std of each
quantized module's weight and of its input activations over the eval batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .sites import Site


@dataclass
class Moments:
    """Running raw moments (float64) of a stream of tensors; enough for mean, std, kurtosis and max|x|."""

    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    max_abs: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        x2 = x * x
        self.count += x.numel()
        for i, power in enumerate((x, x2, x2 * x, x2 * x2)):
            self.sums[i] += float(power.sum(dtype=torch.float64))
        self.max_abs = max(self.max_abs, float(x.abs().max()))

    def summary(self) -> dict[str, float]:
        """``kurtosis`` (Pearson, E[(x-μ)⁴]/σ⁴), ``std``, ``max_abs`` and ``max_over_std`` (max|x| / σ)."""
        n = max(self.count, 1)
        m1, r2, r3, r4 = (s / n for s in self.sums)
        var = max(r2 - m1 * m1, 0.0)
        m4 = r4 - 4 * m1 * r3 + 6 * m1 * m1 * r2 - 3 * m1 ** 4
        std = var ** 0.5
        return {
            "kurtosis": m4 / (var * var) if var > 0 else float("nan"),
            "std": std,
            "max_abs": self.max_abs,
            "max_over_std": self.max_abs / std if std > 0 else float("nan"),
        }


def weight_stats(weight: torch.Tensor) -> dict[str, float]:
    """Outlier statistics of one weight tensor."""
    moments = Moments()
    moments.update(weight)
    return moments.summary()


class ActivationRecorder:
    """Forward pre-hooks accumulating the input moments of each site's module.

    Padding positions are skipped: set `mask` to the batch's attention mask before each forward and token
    tensors of shape ``(batch, seq, ...)`` keep only the unmasked tokens.
    """

    def __init__(self, sites: list[Site]):
        self.sites = sites
        self.moments = {s.name: Moments() for s in sites}
        self.mask: torch.Tensor | None = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = self.mask
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            self.moments[name].update(x)
        return hook

    @contextmanager
    def recording(self) -> Iterator["ActivationRecorder"]:
        """Hooks live only inside the ``with`` block."""
        handles = [s.module.register_forward_pre_hook(self._hook(s.name)) for s in self.sites]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def outlier_table(sites: list[Site], recorder: ActivationRecorder) -> list[dict]:
    """One row per module: name, layer, kind, weight statistics and input statistics side by side."""
    rows = []
    for site in sites:
        weight = getattr(site.module, "weight", None)
        if weight is None:
            continue
        rows.append({
            "module": site.name, "layer": site.layer, "kind": site.kind,
            "weight": weight_stats(weight), "input": recorder.moments[site.name].summary(),
        })
    return rows
