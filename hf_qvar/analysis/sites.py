"""Quantization sites of an already-quantized model, grouped by layer and kind, with a switch that
turns every site outside a group into a pass-through (so one model serves every sensitivity probe)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from ..nn.attention import PROBS_QUANTIZER
from ..nn.qlinear import QuantizedLayerMixin

ATTENTION_PROBS = "attention_probs"
#: Kinds in display order (``module_role`` names plus the softmax site).
KIND_ORDER = ("query", "key", "value", ATTENTION_PROBS, "attention_output", "mlp_input", "mlp_output",
              "patch_embedding", "patch_merging", "other")
_LAYER_QUANTIZERS = ("weight_quantizer", "input_quantizer", "output_quantizer")
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index of the transformer block holding module ``name`` (first numeric path component), if any."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Site:
    """One quantized module: the quantizer attributes it owns, its block index and its kind."""

    name: str
    layer: int | None
    kind: str
    module: nn.Module
    attrs: tuple[str, ...]


def find_sites(model: nn.Module) -> list[Site]:
    """Every quantized layer and every attention block holding a probability quantizer."""
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayerMixin):
            attrs = tuple(a for a in _LAYER_QUANTIZERS if getattr(module, a) is not None)
            sites.append(Site(name, layer_index(name), module.spec.role, module, attrs))
        if getattr(module, PROBS_QUANTIZER, None) is not None:
            sites.append(Site(name, layer_index(name), ATTENTION_PROBS, module, (PROBS_QUANTIZER,)))
    return sites


def site_groups(sites: list[Site], per_module: bool = False) -> dict[str, list[Site]]:
    """Groups probed one at a time: ``kind:<kind>`` (all blocks), ``layer:<i>`` (all kinds), and with
    ``per_module`` one group per (layer, kind) cell, named ``<i>/<kind>``."""
    kinds = sorted({s.kind for s in sites}, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    groups = {f"kind:{k}": [s for s in sites if s.kind == k] for k in kinds}
    layers = sorted({s.layer for s in sites if s.layer is not None})
    groups.update({f"layer:{i}": [s for s in sites if s.layer == i] for i in layers})
    if per_module:
        for i in layers:
            for k in kinds:
                cell = [s for s in sites if s.layer == i and s.kind == k]
                if cell:
                    groups[f"{i}/{k}"] = cell
    return groups


@contextmanager
def only_quantized(sites: list[Site], enabled: list[Site] | None) -> Iterator[None]:
    """Temporarily detach the quantizers of every site not in ``enabled`` (``None`` = none enabled,
    i.e. the full-precision model); a detached quantizer slot is a pass-through in the forward."""
    keep = {id(s) for s in enabled or []}
    saved = []
    try:
        for site in sites:
            if id(site) in keep:
                continue
            for attr in site.attrs:
                saved.append((site.module, attr, getattr(site.module, attr)))
                setattr(site.module, attr, None)
        yield
    finally:
        for module, attr, quantizer in saved:
            setattr(module, attr, quantizer)
