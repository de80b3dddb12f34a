"""Fake-quantizer modules: state (step sizes, offsets, calibration, frozen codes) around the
primitives of `functional`.

Four strategies share one interface so layers never branch on the method:

* `LSQWeightQuantizer` — learnable step, MSE fixed-point init, L1-norm or LSQ gradient scale;
* `BinaryWeightQuantizer` — BWN ``mean|W|·sign(W − mean W)``;
* `LSQActivationQuantizer` — learnable step (and LSQ+ offset), signed or unsigned, lazy
  first-batch init (all ranks agree);
* `BinaryActivationQuantizer` — BiT elastic ``α·sign(x)``.

Weight quantizers expose `step(w)` and `codes(w)` (the integer grid position of every
weight), which OBR and oscillation tracking build on.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import functional as F
from .init import activation_step, mse_weight_step

GRANULARITIES = ("per_tensor", "per_channel", "per_head")
GRADIENT_SCALES = ("l1", "lsq")
#: Smallest step size an optimizer step may leave behind (the reference clamps to 1e-4 in the forward).
MIN_STEP = 1e-6


def positive_step_parameter(num_groups: int) -> nn.Parameter:
    """A step-size Parameter that `clamp_step_sizes` keeps ≥ `MIN_STEP` after every optimizer step."""
    param = nn.Parameter(torch.ones(num_groups))
    param._qvar_positive = True
    return param


@torch.no_grad()
def clamp_step_sizes(optimizer: torch.optim.Optimizer, *args, **kwargs) -> None:
    """Global optimizer post-step hook: project every step size back to ``≥ MIN_STEP``.

    Doing the reference's clamp after the update instead of inside the forward keeps the
    forward free of in-place parameter writes (``torch.compile``-friendly) and guarantees that
    saved checkpoints hold positive steps whichever training loop is used. One multi-tensor launch
    per device and dtype (a launch per step size was ~150 launches per BERT-base step).
    """
    steps = [p for group in optimizer.param_groups for p in group["params"] if getattr(p, "_qvar_positive", False)]
    if steps:
        torch._foreach_clamp_min_(steps, MIN_STEP)


def mark_step_parameters(model: nn.Module) -> None:
    """Re-tag step sizes after a loader replaced the Parameter objects."""
    for name, param in model.named_parameters():
        if name.endswith("step_size"):
            param._qvar_positive = True


register_optimizer_step_post_hook(clamp_step_sizes)


class FakeQuantizer(nn.Module):
    """Shared bookkeeping: bit-width, integer range and how step sizes map onto channels.

    Args:
        bits (`int`): bit-width (1 = binary).
        signed (`bool`): signed grid ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        granularity (`str`): ``per_tensor``, ``per_channel`` or ``per_head``.
        channels (`int`): size of the channel axis (out-features for weights, last dim for activations).
        num_heads (`int`): number of heads, for ``per_head``.
        gradient_scale (`str`): ``l1`` (the paper's module-dependent scale) or ``lsq``.
    """

    channel_axis = 0

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        granularity: str = "per_tensor",
        channels: int = 1,
        num_heads: int = 1,
        gradient_scale: str = "l1",
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
        if gradient_scale not in GRADIENT_SCALES:
            raise ValueError(f"`gradient_scale` must be one of {GRADIENT_SCALES}, got {gradient_scale!r}.")
        if granularity == "per_head" and (num_heads < 1 or channels % num_heads):
            raise ValueError(
                f"`granularity='per_head'` needs a channel count divisible by the head count, "
                f"got {channels} channels and {num_heads} heads."
            )
        self.bits, self.signed = bits, signed
        self.granularity, self.gradient_scale = granularity, gradient_scale
        self.channels, self.num_heads = channels, num_heads
        if bits == 1:
            self.qn, self.qp = (-1, 1) if signed else (0, 1)
        else:
            self.qn, self.qp = F.signed_range(bits) if signed else F.unsigned_range(bits)
        # Derived once, as plain attributes: every attribute, property and method a compiled forward reads is a
        # guard that `torch.compile` checks on each call, for each of a model's ~180 quantizers.
        self.num_groups = {"per_tensor": 1, "per_channel": channels, "per_head": num_heads}[granularity]
        #: Consecutive channels that share one step (a head's channels; 1 otherwise).
        self.group_size = channels // num_heads if granularity == "per_head" else 1

    def expand(self, per_group: torch.Tensor, ndim: int) -> torch.Tensor:
        """Broadcast a ``(*lead, num_groups)`` tensor onto a tensor of rank ``ndim`` whose trailing dims are the
        quantized tensor's (``lead`` = stacked layers, see `hf_qvar.obr`) along `channel_axis`."""
        lead = per_group.shape[:-1]
        shape = [1] * (ndim - len(lead))
        if self.num_groups > 1:
            if self.group_size > 1:
                per_group = per_group.repeat_interleave(self.group_size, dim=-1)
            shape[self.channel_axis] = per_group.shape[-1]
        return per_group.reshape(*lead, *shape)

    def grouped(self, t: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """View ``t`` as ``(*lead, num_groups, n)`` rows, one row per step size (``lead`` stacked layers first)."""
        if self.num_groups > 1:  # one group: the order of elements does not matter
            t = t.movedim(self.channel_axis + lead if self.channel_axis >= 0 else self.channel_axis, lead)
        return t.reshape(*t.shape[:lead], self.num_groups, -1)

    def extra_repr(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {sign}, granularity={self.granularity}"


class WeightFreezing:
    """Oscillation freezing's state on a weight quantizer: ``frozen_codes`` (None: nothing frozen) holds each frozen
    weight's integer code and `functional.unfrozen_code` elsewhere; the forward holds frozen weights there."""

    qn: int
    frozen_codes: torch.Tensor | None  # set by `freeze` or the oscillation tracker

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_codes = None  # an instance attribute: one guard under torch.compile, not a class lookup

    def unfrozen_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """A ``frozen_codes`` tensor for ``weight`` with nothing frozen yet."""
        return torch.full_like(weight, F.unfrozen_code(self.qn), dtype=F.frozen_codes_dtype(self.qn),
                               memory_format=torch.contiguous_format)

    def freeze(self, weight: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> None:
        """Hold the weights under ``mask`` at the integer ``codes`` from now on (on top of those already frozen)."""
        current = self.frozen_codes if self.frozen_codes is not None else self.unfrozen_codes(weight)
        self.frozen_codes = F.freeze_codes(current, mask, codes)

    def frozen_mask(self) -> torch.Tensor | None:
        """Which weights are frozen (None: none)."""
        return None if self.frozen_codes is None else F.is_frozen(self.frozen_codes, self.qn)


class LSQWeightQuantizer(WeightFreezing, FakeQuantizer):
    """Learnable-step weight quantizer (method.md §3.2).

    The step-size gradient is scaled by ``1/sqrt(‖W‖₁·Qp)`` (``l1``, the paper's form) or
    ``1/sqrt(N·Qp)`` (``lsq``). Weights frozen by oscillation freezing are held at their
    frozen integer code and get no gradient.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_size = positive_step_parameter(self.num_groups)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """MSE-optimal step from the loaded weight (fixed point, per group)."""
        step = mse_weight_step(self.grouped(weight.detach().float()), self.qn, self.qp)
        self.step_size.copy_(step.to(self.step_size.dtype))

    def step(self, weight: torch.Tensor) -> torch.Tensor:
        """The step, broadcastable onto ``weight``; a single step as it is (no `expand`: fewer guards under
        torch.compile)."""
        return self.step_size if self.num_groups == 1 else self.expand(self.step_size, weight.ndim)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return F.integer_codes(weight, self.step(weight), self.qn, self.qp)

    def lsq_grad_scale(self, weight: torch.Tensor, lead: int = 0) -> float:
        """Classic LSQ's ``1/sqrt(N·Qp)``, ``N`` the weights per group: a number, fixed by the shape."""
        return 1.0 / math.sqrt(math.prod(weight.shape[lead:]) / self.num_groups * self.qp)

    def grad_scale(self, weight: torch.Tensor, lead: int = 0) -> torch.Tensor | float:
        """The step-size gradient scale per group, broadcast onto ``weight`` (``lead`` stacked layers first)."""
        if self.gradient_scale == "lsq":
            return self.lsq_grad_scale(weight, lead)
        shape = self.expand(self.step_size.expand(*weight.shape[:lead], -1), weight.ndim).shape
        # The expanded step has one entry per channel: a head's channels share one norm.
        return F.l1_grad_scale(weight, shape, self.group_size, self.qp)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        step = self.step(weight)
        if self.gradient_scale == "l1":  # computed in the backward: one fewer pass over the weight here
            return F.lsq_fake_quantize(weight, step, None, self.qn, self.qp, frozen_codes=self.frozen_codes,
                                       l1_group_size=self.group_size)
        return F.lsq_fake_quantize(weight, step, self.lsq_grad_scale(weight), self.qn, self.qp,
                                   frozen_codes=self.frozen_codes)


class BinaryWeightQuantizer(WeightFreezing, FakeQuantizer):
    """BWN binary weights: ``mean|W|·sign(W − mean W)`` per group, identity STE (BiT)."""

    def initialize(self, weight: torch.Tensor) -> None:
        """Nothing to learn: the scale follows the weights."""

    def _stats(self, weight: torch.Tensor, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean |W|, mean W) per group, broadcast onto ``weight`` (``lead`` stacked layers first)."""
        with torch.no_grad():
            grouped = self.grouped(weight, lead)
            scale = self.expand(grouped.abs().mean(dim=-1), weight.ndim)
            center = self.expand(grouped.mean(dim=-1), weight.ndim)
        return scale, center

    def step(self, weight: torch.Tensor) -> torch.Tensor:
        return self._stats(weight)[0]

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        center = self._stats(weight)[1]
        with torch.no_grad():
            return torch.where(weight >= center, 1.0, -1.0).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, center = self._stats(weight)
        return F.binary_weight(weight, scale, center, self.frozen_codes)


class _ActivationQuantizer(FakeQuantizer):
    """Learnable activation step with lazy first-batch initialisation.

    ``calibrated`` is a persistent buffer, so a saved model remembers whether its steps were
    initialised; `_calibrated` mirrors it as a Python flag to keep the forward free of
    device syncs (and of graph breaks under ``torch.compile`` once calibrated).
    """

    channel_axis = -1
    binary: bool  # α·sign(x) (`functional.signed_binarize`) rather than LSQ

    def __init__(self, *args, offset: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_size = positive_step_parameter(self.num_groups)
        self.offset = nn.Parameter(torch.zeros(1)) if offset else None
        self.register_buffer("calibrated", torch.tensor(False))
        self._calibrated = False
        # ``grad_scale_factor / sqrt(numel)`` is the step-gradient scale: ``1/(sqrt(n)·Qp)`` (``l1``) or
        # ``1/sqrt(n·Qp)`` (``lsq``) for the ``n = numel / num_groups`` elements of a group.
        groups, qp = self.num_groups, self.qp
        self.grad_scale_factor = math.sqrt(groups) / qp if self.gradient_scale == "l1" else math.sqrt(groups / qp)

    def sync_calibration_state(self) -> None:
        """Refresh the Python mirror after weights were loaded from a checkpoint."""
        self._calibrated = bool(self.calibrated.item())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_calibration_state()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the step from this batch (identical on every rank)."""
        step = activation_step(x, self.qp, binary=self.bits == 1, unsigned=not self.signed)
        self.step_size.copy_(step.expand_as(self.step_size).to(self.step_size.dtype))
        self.calibrated.fill_(True)
        self._calibrated = True

    def grad_scale(self, x: torch.Tensor) -> float:
        """A Python float: it depends only on shapes, so no device tensor (and no host-device copy) per call."""
        return self.grad_scale_factor / math.sqrt(x.numel())

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """The step, broadcastable onto ``x``: steps run along the last dim, where a ``(num_groups,)`` tensor
        broadcasts as it is (no reshape: fewer guards under torch.compile)."""
        if not self._calibrated:
            self.calibrate(x)
        return self.step_size if self.group_size == 1 else self.step_size.repeat_interleave(self.group_size)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(self(x), weight, bias)``, keeping ``x`` but not its quantized copy for the backward
        (`functional.fake_quantized_linear`)."""
        return F.fake_quantized_linear(x, weight, bias, self._step(x), self.offset, self.grad_scale(x), self.qn,
                                       self.qp, binary=self.binary)


class LSQActivationQuantizer(_ActivationQuantizer):
    """LSQ activation quantizer; with ``offset=True`` the LSQ+ learnable offset β (post-GELU sites)."""

    binary = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.lsq_fake_quantize(x, self._step(x), self.grad_scale(x), self.qn, self.qp, self.offset)


class BinaryActivationQuantizer(_ActivationQuantizer):
    """Signed elastic binary activation ``α·sign(x)`` with a learnable α (BiT)."""

    binary = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.signed_binarize(x, self._step(x), self.grad_scale(x))


def make_weight_quantizer(bits: int, **kwargs) -> FakeQuantizer:
    """BWN at 1 bit, signed LSQ otherwise."""
    cls = BinaryWeightQuantizer if bits == 1 else LSQWeightQuantizer
    return cls(bits, signed=True, **kwargs)


def make_activation_quantizer(bits: int, signed: bool = True, offset: bool = False, **kwargs) -> FakeQuantizer:
    """Elastic binary for signed 1-bit sites; LSQ (unsigned 1-bit = ``{0, α}``) otherwise."""
    if bits == 1 and signed:
        return BinaryActivationQuantizer(bits, signed=True, **kwargs)
    return LSQActivationQuantizer(bits, signed=signed, offset=offset, **kwargs)
