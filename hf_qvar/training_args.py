"""`QVarTrainingArguments`: the QAT knobs of `QVarTrainer` as a `transformers.TrainingArguments` subclass, so
``HfArgumentParser`` exposes them as ``--flags`` and ``accelerate launch`` works unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

OBR_REDUCTIONS = ("mean", "sum")


@dataclass
class QVarTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus distillation, OBR, oscillation and step-size settings (all off by default
    except the step-size parameter group).

    Distillation is active when `QVarTrainer` gets a teacher (``teacher_model=`` or
    `teacher_model_name_or_path`) or a batch carries ``soft_labels``; the loss is then
    ``ground_truth_weight·L_labels + distillation_logits_weight·L_soft + distillation_hidden_weight·L_hidden
    + distillation_attention_weight·L_attn``, plus ``λ(t)·L_OBR`` when `obr_lambda_max` > 0.
    """

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Full-precision teacher checkpoint (path or Hub id) for distillation."}
    )
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of logit KD (loss × T²)."})
    distillation_logits_weight: float = field(default=1.0, metadata={"help": "Weight of the soft cross-entropy on logits."})
    distillation_hidden_weight: float = field(
        default=1.0, metadata={"help": "Weight of the hidden-state MSE (embedding output + every layer; BiT recipe)."}
    )
    distillation_attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of the attention-probability MSE (off in BiT)."}
    )
    ground_truth_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the model's own label loss while distilling (0 = soft targets only, as the paper "
                          "and BiT). Without a teacher or soft labels the label loss is used as is."},
    )
    obr_lambda_max: float = field(
        default=0.0, metadata={"help": "Final OBR weight λ_max (reference 0.01); 0 disables OBR."}
    )
    obr_start: float = field(
        default=0.25, metadata={"help": "Fraction of training after which λ ramps up (cosine) from 0 to λ_max."}
    )
    obr_reduction: str = field(
        default="mean", metadata={"help": "OBR term 1 reduction: 'mean' (reference code) or 'sum' (paper)."}
    )
    obr_max_bits: int = field(
        default=8, metadata={"help": "Apply OBR to layers with at most this many weight bits (8 = all, as the reference)."}
    )
    track_oscillations: bool = field(
        default=False, metadata={"help": "Track weight oscillations after every optimizer step and log oscillation %%."}
    )
    oscillation_momentum: float = field(
        default=0.01, metadata={"help": "EMA momentum of the oscillation frequency (reference 0.001 for 190k-step runs)."}
    )
    oscillation_threshold: float = field(
        default=0.005, metadata={"help": "Frequency above which a weight counts as oscillating in the logged %%."}
    )
    oscillation_freeze_threshold: float | None = field(
        default=None, metadata={"help": "Freeze weights whose oscillation frequency exceeds this (Nagel et al. use "
                                        "0.1-ish); implies --track_oscillations."}
    )
    oscillation_log_per_layer: bool = field(
        default=False, metadata={"help": "Also log oscillation %% and frozen %% of every quantized layer."}
    )
    step_size_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of quantizer step sizes and offsets (default: learning_rate)."}
    )
    step_size_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of quantizer step sizes and offsets."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distillation_temperature <= 0:
            raise ValueError(f"`distillation_temperature` must be > 0, got {self.distillation_temperature}.")
        for name in ("distillation_logits_weight", "distillation_hidden_weight", "distillation_attention_weight",
                     "ground_truth_weight", "obr_lambda_max", "step_size_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be ≥ 0, got {getattr(self, name)}.")
        if not 0 <= self.obr_start < 1:
            raise ValueError(f"`obr_start` must be in [0, 1), got {self.obr_start}.")
        if self.obr_reduction not in OBR_REDUCTIONS:
            raise ValueError(f"`obr_reduction` must be one of {OBR_REDUCTIONS}, got {self.obr_reduction!r}.")
        if not 0 < self.oscillation_momentum <= 1:
            raise ValueError(f"`oscillation_momentum` must be in (0, 1], got {self.oscillation_momentum}.")
        if self.oscillation_freeze_threshold is not None:
            if not 0 < self.oscillation_freeze_threshold < 1:
                raise ValueError(
                    f"`oscillation_freeze_threshold` must be in (0, 1), got {self.oscillation_freeze_threshold}."
                )
            self.track_oscillations = True
        if self.step_size_learning_rate is not None and self.step_size_learning_rate < 0:
            raise ValueError(f"`step_size_learning_rate` must be ≥ 0, got {self.step_size_learning_rate}.")
