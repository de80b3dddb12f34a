"""Weight-oscillation tracking and freezing (Nagel et al. 2022; method.md §5.1–5.2).

After every optimizer step, per quantized weight with integer code ``x_int``:

* ``Δ = x_int − x_int_prev``, ``dir = sign(Δ)``; an **oscillation event** is ``dir·dir_prev_switch == −1``
  (a move opposite to the last move), and ``dir_prev_switch`` is updated only where ``Δ ≠ 0``;
* ``f ← m·event + (1 − m)·f``; the reported oscillation % is the share of weights with ``f > threshold``;
* with freezing, a weight whose ``f`` passes ``freeze_threshold`` is frozen at ``round(EMA(x_int))`` (same
  momentum): its quantizer's ``frozen_codes`` hold it there in the forward and block its latent-weight
  gradient. ``requires_grad`` is never touched, so DDP buckets stay valid.

Frozen elements keep their integer code, not their value: the value is ``code·α`` and follows the learnt α.
Tracking uses the code the forward actually uses (the frozen code once frozen), so frozen weights stop
oscillating and their ``f`` decays. The reference's momentum 0.001 suits its 190k-step runs; the default here,
0.01, reacts within ~100 steps, which fits fine-tuning runs of a few thousand steps.

Everything is elementwise tensor work per layer (no Python loop over weights); on GPUs one step of all layers
is one compiled graph (`advance`) that never syncs with the host, replayed from a CUDA graph (`GraphedStep`),
so a step costs one launch. The state (incl. frozen codes) round-trips through a safetensors file so Trainer
checkpoints resume exactly.
"""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .compile_utils import cuda_compiled
from .cuda_graphs import GraphedStep
from .nn.qlinear import QuantizedLayerMixin, latent_tensor_reader
from .quantizers.fake_quantizer import BinaryWeightQuantizer
from .quantizers.functional import freeze_codes, hold_frozen, is_frozen

logger = logging.getLogger(__name__)

STATE_FILE = "qvar_oscillation.safetensors"
_FIELDS = ("prev_codes", "last_direction", "frequency", "ema_codes", "frozen_codes")


def quantized_weight_layers(model: nn.Module) -> dict[str, QuantizedLayerMixin]:
    """Name -> every quantized layer that has a weight quantizer."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, QuantizedLayerMixin) and m.weight_quantizer is not None
    }


def _frozen_value_codes(quantizer: nn.Module, ema: torch.Tensor) -> torch.Tensor:
    """``round(EMA(x_int))`` inside the quantizer's code set (±1 for BWN, where 0 is not a code)."""
    if isinstance(quantizer, BinaryWeightQuantizer):
        return torch.where(ema >= 0, 1.0, -1.0)
    return torch.clamp(torch.round(ema), quantizer.qn, quantizer.qp)


def effective_codes(layer: QuantizedLayerMixin) -> torch.Tensor:
    """The integer codes the forward uses (frozen codes where frozen), as floats."""
    quantizer = layer.weight_quantizer
    codes = quantizer.codes(layer.weight)
    if quantizer.frozen_codes is not None:
        codes = hold_frozen(codes, quantizer.frozen_codes, quantizer.qn)
    return codes.float()


def tracking_step(codes: torch.Tensor, prev_codes: torch.Tensor, last_direction: torch.Tensor, frequency: torch.Tensor,
                  ema_codes: torch.Tensor, momentum: float) -> None:
    """Advance one layer's tracking state in place from its current ``codes``."""
    delta = codes - prev_codes.float()
    direction = torch.sign(delta).to(torch.int8)
    event = (direction * last_direction) == -1
    last_direction.copy_(torch.where(delta != 0, direction, last_direction))
    frequency.mul_(1 - momentum).add_(event.float(), alpha=momentum)
    ema_codes.mul_(1 - momentum).add_(codes, alpha=momentum)
    prev_codes.copy_(codes.to(torch.int8))


def freezing_step(quantizer: nn.Module, frequency: torch.Tensor, ema_codes: torch.Tensor, frozen_codes: torch.Tensor,
                  threshold: float) -> None:
    """Freeze, in place, every weight not yet frozen whose frequency passed ``threshold`` at ``round(EMA)``."""
    newly = (frequency > threshold) & ~is_frozen(frozen_codes, quantizer.qn)
    frozen_codes.copy_(freeze_codes(frozen_codes, newly, _frozen_value_codes(quantizer, ema_codes)))


@cuda_compiled
@torch.no_grad()
def advance(layers: list[QuantizedLayerMixin], states: list[dict[str, torch.Tensor]], momentum: float,
            freeze_threshold: float | None) -> None:
    """One tracking (and freezing) step of every layer; on GPUs one compiled graph, with no host sync."""
    for layer, s in zip(layers, states):
        tracking_step(effective_codes(layer), s["prev_codes"], s["last_direction"], s["frequency"], s["ema_codes"],
                      momentum)
        if freeze_threshold is not None:
            freezing_step(layer.weight_quantizer, s["frequency"], s["ema_codes"], s["frozen_codes"], freeze_threshold)


class OscillationTracker:
    """EMA oscillation frequency per quantized weight, with optional freezing.

    With freezing on, every weight quantizer holds its layer's ``frozen_codes`` state tensor from the start
    (all unfrozen): freezing updates them in place, so a step never syncs with the host and a
    compiled model never sees its quantizers change.

    Args:
        model (`nn.Module`): the (unwrapped) model holding `QuantizedLayerMixin` layers.
        momentum (`float`, *optional*, defaults to 0.01): EMA momentum ``m`` of the frequency and of ``x_int``.
        threshold (`float`, *optional*, defaults to 0.005): ``f`` above which a weight counts as oscillating.
        freeze_threshold (`float`, *optional*): freeze weights whose ``f`` exceeds it; `None` = track only.
    """

    def __init__(
        self, model: nn.Module, momentum: float = 0.01, threshold: float = 0.005, freeze_threshold: float | None = None
    ):
        if not 0 < momentum <= 1:
            raise ValueError(f"`momentum` must be in (0, 1], got {momentum!r}.")
        self.layers = quantized_weight_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no quantized layer to track.")
        self.momentum, self.threshold, self.freeze_threshold = momentum, threshold, freeze_threshold
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        # The state tensors (frozen codes included) change only in `initialize` and `load`, which
        # reset the graph; what may move under it are the weights and step sizes.
        self._step = GraphedStep(self._advance, latent_tensor_reader(list(self.layers.values())))

    @property
    def initialized(self) -> bool:
        return bool(self.state)

    @torch.no_grad()
    def initialize(self) -> None:
        """Record the current codes as the starting point (called before the first optimizer step)."""
        for name, layer in self.layers.items():
            codes = effective_codes(layer)
            quantizer = layer.weight_quantizer
            frozen = quantizer.frozen_codes
            self.state[name] = {
                "prev_codes": codes.to(torch.int8),
                "last_direction": torch.zeros_like(codes, dtype=torch.int8),
                "frequency": torch.zeros_like(codes),
                "ema_codes": codes.clone(),
                "frozen_codes": frozen.clone() if frozen is not None else quantizer.unfrozen_codes(layer.weight),
            }
            self._attach_frozen(layer, self.state[name])
        self._step.reset()

    @torch.no_grad()
    def update(self) -> None:
        """One tracking (and freezing) step; call right after each optimizer step."""
        if not self.initialized:
            self.initialize()
            return
        self._step()

    def _advance(self) -> None:
        advance(list(self.layers.values()), list(self.state.values()), self.momentum, self.freeze_threshold)

    def _attach_frozen(self, layer: QuantizedLayerMixin, s: dict[str, torch.Tensor]) -> None:
        """Point the quantizer at the state's frozen codes (kept in sync in place from now on)."""
        quantizer = layer.weight_quantizer
        frozen = self.freeze_threshold is not None or bool(is_frozen(s["frozen_codes"], quantizer.qn).any())
        quantizer.frozen_codes = s["frozen_codes"] if frozen else None

    @torch.no_grad()
    def stats(self, per_layer: bool = False) -> dict[str, float]:
        """``oscillation_pct`` and ``frozen_pct`` over all tracked weights (and per layer with ``per_layer``)."""
        if not self.initialized:
            return {}
        counts = torch.stack([
            torch.stack([(s["frequency"] > self.threshold).sum(),
                         is_frozen(s["frozen_codes"], layer.weight_quantizer.qn).sum()])
            for layer, s in zip(self.layers.values(), self.state.values())
        ]).tolist()  # one host sync for every layer
        out: dict[str, float] = {}
        total = oscillating = frozen = 0
        for (name, s), (n_osc, n_frozen) in zip(self.state.items(), counts):
            numel = s["frequency"].numel()
            total, oscillating, frozen = total + numel, oscillating + n_osc, frozen + n_frozen
            if per_layer:
                out[f"oscillation_pct/{name}"] = 100.0 * n_osc / numel
                if self.freeze_threshold is not None:
                    out[f"frozen_pct/{name}"] = 100.0 * n_frozen / numel
        out["oscillation_pct"] = 100.0 * oscillating / total
        if self.freeze_threshold is not None:
            out["frozen_pct"] = 100.0 * frozen / total
        return out

    def save(self, path: str) -> None:
        """Write the tracker state (incl. frozen codes) to a safetensors file."""
        tensors = {f"{name}.{field}": t.contiguous().cpu() for name, s in self.state.items() for field, t in s.items()}
        metadata = {
            "format": "hf_qvar.oscillation", "version": "2",
            "config": json.dumps({"momentum": self.momentum, "threshold": self.threshold,
                                  "freeze_threshold": self.freeze_threshold}),
        }
        save_file(tensors, path, metadata=metadata)

    def load(self, path: str) -> None:
        """Restore a state written by `save` and re-apply its frozen codes to the quantizers (a version-1 state,
        with separate frozen masks, is converted)."""
        tensors = load_file(path)
        for name, layer in self.layers.items():  # version 1: a frozen mask beside codes that were 0 where unfrozen
            mask, codes = tensors.pop(f"{name}.frozen_mask", None), tensors.get(f"{name}.frozen_codes")
            if mask is not None and codes is not None:
                unfrozen = layer.weight_quantizer.unfrozen_codes(codes)
                tensors[f"{name}.frozen_codes"] = freeze_codes(unfrozen, mask, codes)
        missing = [f"{n}.{f}" for n in self.layers for f in _FIELDS if f"{n}.{f}" not in tensors]
        unexpected = sorted({k.rsplit(".", 1)[0] for k in tensors} - set(self.layers))
        if missing or unexpected:
            raise ValueError(
                f"Oscillation state {path} does not match the model: missing {missing[:4]}, unexpected layers "
                f"{unexpected[:4]}."
            )
        self.state = {}
        for name, layer in self.layers.items():
            device = layer.weight.device
            self.state[name] = {f: tensors[f"{name}.{f}"].to(device) for f in _FIELDS}
            self._attach_frozen(layer, self.state[name])
        self._step.reset()


@torch.no_grad()
def bake_frozen_weights(model: nn.Module) -> int:
    """Write ``W := frozen_code·step`` into every frozen latent weight; returns the number of baked weights.

    Afterwards a plain ``save_pretrained`` → ``from_pretrained`` (which knows nothing about frozen codes)
    reproduces the frozen forward bit-identically for LSQ layers: ``round(code·α/α) = code``. BWN layers
    get the same treatment, but their per-matrix scale and center are recomputed from the baked weights, so
    their values (not their frozen signs) may shift slightly; a warning says so.
    """
    baked, binary = 0, []
    for name, layer in quantized_weight_layers(model).items():
        quantizer = layer.weight_quantizer
        frozen = quantizer.frozen_mask()
        if frozen is None:
            continue
        value = quantizer.frozen_codes.to(layer.weight.dtype) * quantizer.step(layer.weight)
        layer.weight.copy_(torch.where(frozen, value, layer.weight))
        baked += int(frozen.sum())
        if isinstance(quantizer, BinaryWeightQuantizer):
            binary.append(name)
    if binary:
        logger.warning(
            "Baked frozen weights of %d BWN layers (%s, ...): a reload recomputes their scales from the baked "
            "weights, so their values are not bit-identical to the frozen forward.", len(binary), binary[0],
        )
    return baked
