"""`QVarTrainer`: a `transformers.Trainer` that composes the paper's training losses and bookkeeping.

What it adds, each switched by `QVarTrainingArguments`:

* distillation from a full-precision teacher (logits, hidden states, attention maps) or from precomputed
  multi-crop ``soft_labels`` in the batch (`hf_qvar.distill`);
* OBR with its cosine-ramped λ (`hf_qvar.obr`), its two terms logged apart (``obr_dampening``,
  ``obr_bin_variance``: the summed per-bin variance of the latent weights); its gradient is added to the
  accumulated gradient once per optimizer step (`OBRGradient`, one CUDA-graph replay on GPUs), or, under fp16
  loss scaling, FSDP or DeepSpeed, ``λ·L_OBR`` joins every micro-batch's loss;
* oscillation tracking and freezing after every optimizer step (`hf_qvar.oscillation`), saved in and
  restored from Trainer checkpoints (``qvar_oscillation.safetensors``);
* a step-size parameter group (own learning rate, no weight decay);
* at the end of training, a check that the quantizer state is identical on all ranks (`RankConsistencyCallback`).

Every loss component, λ, oscillation % and frozen % goes through the Trainer's own `log`.

Gradient accumulation: all losses are per-micro-batch means and ``model_accepts_loss_kwargs`` is forced to
`False`, so the Trainer divides each micro-batch loss by the accumulation steps (hf-integration.md P12). For
fixed-size batches (encoders, ViTs) the accumulated gradient equals the full-batch gradient; for token-level
causal-LM losses it is a mean of per-micro-batch means rather than a token-weighted mean. The activation
step-size gradient scale ``1/sqrt(numel)`` depends on the micro-batch size (method.md §10 #2), so step-size
gradients match only runs with the same per-device micro-batch (e.g. 2 DDP ranks × B vs 1 process × B × GA 2).

Vision multi-crop KD: offline, put each crop's teacher distribution in the batch as ``soft_labels`` (B, C);
online, pass a teacher and set ``distillation_hidden_weight=0`` (teacher architectures usually differ): the
teacher then labels the exact crop the student sees.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .distill import attention_mse, hidden_state_mse, logit_distillation, soft_cross_entropy
from .obr import OBRGradient, obr_lambda, obr_terms
from .oscillation import STATE_FILE, OscillationTracker, bake_frozen_weights
from .training_args import QVarTrainingArguments

logger = logging.getLogger(__name__)

STEP_SIZE_SUFFIXES = ("step_size", "offset")
SOFT_LABELS = "soft_labels"
_EAGER_ATTENTION = ("eager", "qvar")


def is_step_size_parameter(name: str) -> bool:
    """Quantizer step sizes and LSQ+ offsets: the parameters of the step-size group."""
    return name.endswith(STEP_SIZE_SUFFIXES)


def load_teacher(teacher: str | nn.Module, student: nn.Module, output_attentions: bool) -> nn.Module:
    """The teacher as a frozen eval-mode module; a path loads its own architecture (student's class if none).

    Attention distillation needs attention probabilities, which SDPA does not return: the teacher is then
    loaded with (or switched to) eager attention.
    """
    if isinstance(teacher, str):
        architectures = AutoConfig.from_pretrained(teacher).architectures or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        kwargs = {"attn_implementation": "eager"} if output_attentions else {}
        teacher = (cls or type(student)).from_pretrained(teacher, **kwargs)
    elif output_attentions and getattr(getattr(teacher, "config", None), "_attn_implementation", "eager") not in _EAGER_ATTENTION:
        teacher.set_attn_implementation("eager")
    return teacher.eval().requires_grad_(False)


def quantizer_state_digest(model: nn.Module) -> str:
    """A short SHA-256 of every step size, offset and frozen code of ``model``: equal on all ranks of a
    correct data-parallel run (what a rank-by-rank comparison of the quantizer state checks)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if is_step_size_parameter(name):
            digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    for name, module in model.named_modules():
        value = getattr(module, "frozen_codes", None)
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}.frozen_codes".encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class RankConsistencyCallback(TrainerCallback):
    """At the end of training, gathers `quantizer_state_digest` from every rank into ``digests`` and warns if
    they differ (quantizer initialisation and frozen codes must be identical on all ranks)."""

    def __init__(self):
        self.digests: list[str] = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = quantizer_state_digest(model)
        self.digests = [digest]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.digests = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(self.digests, digest)
        if len(set(self.digests)) > 1:
            logger.warning("Quantizer states differ between ranks (digest per rank: %s).", self.digests)
        else:
            logger.info("Quantizer state identical on %d rank(s): digest %s.", len(self.digests), digest)


class OscillationCallback(TrainerCallback):
    """Runs the tracker right after every optimizer step (and records the start codes before the first)."""

    def __init__(self, tracker: OscillationTracker):
        self.tracker = tracker

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.tracker.initialized:
            self.tracker.initialize()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.update()


class QVarTrainer(Trainer):
    """`Trainer` for quantization-aware training with hf_qvar models (Huang et al., TMLR 2024).

    Args:
        model, args, ...: as `transformers.Trainer`; ``args`` must be `QVarTrainingArguments`.
        teacher_model (`str` or `nn.Module`, *optional*):
            Full-precision teacher, or a path to load one; defaults to ``args.teacher_model_name_or_path``. It is
            kept out of the optimizer and of DDP, in eval mode without gradients, on the student's device, and
            runs under the same autocast as the student.

    Example:

    ```python
    >>> trainer = QVarTrainer(model=qmodel, args=QVarTrainingArguments("out", obr_lambda_max=0.01,
    ...                       oscillation_freeze_threshold=0.1), train_dataset=ds, teacher_model="bert-base-fp")
    >>> trainer.train()
    >>> trainer.save_model()  # bakes frozen weights first, so from_pretrained reproduces them
    ```
    """

    def __init__(self, model: PreTrainedModel | nn.Module | None = None, args: QVarTrainingArguments | None = None,
                 *pargs, teacher_model: str | nn.Module | None = None, **kwargs):
        if args is None:
            args = QVarTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, QVarTrainingArguments):
            raise TypeError(f"QVarTrainer needs `QVarTrainingArguments`, got {type(args).__name__}.")
        super().__init__(model, args, *pargs, **kwargs)
        # Our losses are per-micro-batch means: let the Trainer divide by the accumulation steps (P12).
        self.model_accepts_loss_kwargs = False
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        self.teacher: nn.Module | None = None
        if teacher_model is not None:
            self.teacher = load_teacher(teacher_model, self.model, args.distillation_attention_weight > 0)
            self.teacher.to(self.args.device)
        self.tracker: OscillationTracker | None = None
        if args.track_oscillations:
            self.tracker = OscillationTracker(
                self.model, args.oscillation_momentum, args.oscillation_threshold, args.oscillation_freeze_threshold
            )
            self.add_callback(OscillationCallback(self.tracker))
        self._qvar_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._obr_gradient: OBRGradient | None = None
        self.rank_consistency = RankConsistencyCallback()
        self.add_callback(self.rank_consistency)

    # ---- losses -------------------------------------------------------------------------------------------
    def current_obr_lambda(self) -> float:
        """λ at the current optimizer step (0 when OBR is off or before ``obr_start``)."""
        max_steps = max(self.state.max_steps, 1)
        return obr_lambda(self.state.global_step / max_steps, self.args.obr_lambda_max, self.args.obr_start)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        soft_labels = inputs.pop(SOFT_LABELS, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.teacher is not None or soft_labels is not None:
            loss, outputs = self._distillation_loss(model, inputs, soft_labels)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if self.args.obr_lambda_max > 0:  # otherwise it is just the Trainer's own "loss"
                self._record("loss_task", loss)
        if self.args.obr_lambda_max > 0 and not self._obr_by_gradient():
            lam = self._record_obr_lambda()
            if lam > 0:  # λ = 0 costs nothing: the regulariser is not even built.
                dampening, bin_variance = obr_terms(self.accelerator.unwrap_model(model), self.args.obr_reduction,
                                                    self.args.obr_max_bits)
                loss = loss + lam * self._record_obr(dampening, bin_variance)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's step; after the last micro-batch's backward, OBR adds ``λ·∇L_OBR`` to the gradients
        (`OBRGradient`; the returned loss includes ``λ·L_OBR`` as if it had been part of the loss)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.obr_lambda_max > 0 and self._obr_by_gradient() and self.accelerator.sync_gradients:
            lam = self._record_obr_lambda()
            if lam > 0:
                unwrapped = self.accelerator.unwrap_model(model)
                if self._obr_gradient is None or self._obr_gradient.model is not unwrapped:  # e.g. `model_init`
                    self._obr_gradient = OBRGradient(unwrapped, self.args.obr_reduction, self.args.obr_max_bits)
                loss = loss + lam * self._record_obr(*self._obr_gradient.accumulate(lam))
        return loss

    def _obr_by_gradient(self) -> bool:
        """Whether OBR's gradient can be added to plain, unscaled gradients after the backward (`OBRGradient`);
        otherwise (fp16 loss scaling, FSDP, DeepSpeed) ``λ·L_OBR`` joins every micro-batch's loss."""
        return self.accelerator.scaler is None and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _record_obr_lambda(self) -> float:
        lam = self.current_obr_lambda()
        # A host tensor: a device tensor made from a Python float is a blocking copy, a host sync every step.
        self._record("obr_lambda", torch.tensor(lam))
        return lam

    def _record_obr(self, dampening: torch.Tensor, bin_variance: torch.Tensor) -> torch.Tensor:
        """Log both OBR terms and their sum; returns ``L_OBR``."""
        reg = dampening + bin_variance
        self._record("loss_obr", reg)
        self._record("obr_dampening", dampening)
        self._record("obr_bin_variance", bin_variance)
        return reg

    def _distillation_loss(self, model: nn.Module, inputs: dict[str, Any], soft_labels: torch.Tensor | None):
        args = self.args
        has_teacher = self.teacher is not None
        want_hidden = has_teacher and args.distillation_hidden_weight > 0
        want_attn = has_teacher and args.distillation_attention_weight > 0
        if want_hidden:
            inputs["output_hidden_states"] = True
        if want_attn:
            inputs["output_attentions"] = True
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if args.ground_truth_weight > 0 and "labels" in inputs:
            gt, outputs = super().compute_loss(model, inputs, return_outputs=True)
            terms["loss_task"] = (args.ground_truth_weight, gt)
        else:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        need_teacher_logits = soft_labels is None and args.distillation_logits_weight > 0
        teacher_out = None
        if has_teacher and (need_teacher_logits or want_hidden or want_attn):
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out = self.teacher(**teacher_inputs)
            if need_teacher_logits and getattr(teacher_out, "logits", None) is None:
                raise ValueError(
                    f"The teacher ({type(self.teacher).__name__}) returns no logits to distil: use a fine-tuned task "
                    "model as teacher (e.g. a ...ForSequenceClassification checkpoint), or set "
                    "`distillation_logits_weight=0` to distil hidden states only."
                )
        if args.distillation_logits_weight > 0:  # precomputed soft labels win over the teacher's logits (FKD, T=1)
            terms["loss_kd_logits"] = (args.distillation_logits_weight, soft_cross_entropy(outputs.logits, soft_labels)
                                       if soft_labels is not None else
                                       logit_distillation(outputs.logits, teacher_out.logits, args.distillation_temperature))
        if want_hidden:
            terms["loss_kd_hidden"] = (args.distillation_hidden_weight,
                                       hidden_state_mse(outputs.hidden_states, teacher_out.hidden_states))
        if want_attn:
            if not outputs.attentions or outputs.attentions[0] is None:
                raise ValueError(
                    "Attention distillation needs the student's attention probabilities: quantize them "
                    "(QVarConfig(quantize_attention_probs=True), the default) or load the student with "
                    "attn_implementation='eager'."
                )
            terms["loss_kd_attention"] = (args.distillation_attention_weight,
                                          attention_mse(outputs.attentions, teacher_out.attentions))
        if not terms:
            raise ValueError("Distillation is on but every loss weight is 0: set `distillation_logits_weight` or another weight.")
        total = None
        for name, (weight, value) in terms.items():
            self._record(name, value)
            total = weight * value if total is None else total + weight * value
        return total, outputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != SOFT_LABELS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SOFT_LABELS not in self._signature_columns:
            self._signature_columns.append(SOFT_LABELS)  # keep the column for `remove_unused_columns`

    # ---- logging ------------------------------------------------------------------------------------------
    def _record(self, name: str, value: torch.Tensor) -> None:
        self._qvar_metrics[name].append(value.detach().float())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add what happened since the last one
            for name, values in self._qvar_metrics.items():
                mean = torch.stack(values).mean().to(self.args.device)  # NCCL reduces device tensors only
                logs[name] = self.accelerator.reduce(mean, reduction="mean").item()
            self._qvar_metrics.clear()
            if self.tracker is not None:
                logs.update(self.tracker.stats(per_layer=self.args.oscillation_log_per_layer))
        super().log(logs, *args, **kwargs)

    # ---- optimizer ----------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with step sizes and offsets moved to their own group (own LR, own decay)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if fresh:
            self._split_step_size_group(self.model if model is None else model)
        return optimizer

    def _split_step_size_group(self, model: nn.Module) -> None:
        step_ids = {id(p) for n, p in model.named_parameters() if is_step_size_parameter(n) and p.requires_grad}
        if not step_ids:
            return
        step_params = []
        for group in self.optimizer.param_groups:
            step_params += [p for p in group["params"] if id(p) in step_ids]
            group["params"] = [p for p in group["params"] if id(p) not in step_ids]
        self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g["params"]]
        lr = self.args.step_size_learning_rate
        self.optimizer.add_param_group({
            "params": step_params,
            "lr": self.args.learning_rate if lr is None else lr,
            "weight_decay": self.args.step_size_weight_decay,
        })

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.tracker is not None and self.tracker.initialized and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.tracker.save(os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_tracker(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()  # the best weights need the frozen codes they were trained with
        self._load_tracker(self.state.best_model_checkpoint)

    def _load_tracker(self, checkpoint: str) -> None:
        if self.tracker is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.isfile(path):
            self.tracker.load(path)
        else:
            logger.warning("No %s in %s: oscillation tracking restarts from scratch.", STATE_FILE, checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save; a user-facing save first bakes frozen weights (`bake_frozen_weights`) so reloads match."""
        if not _internal_call and self.tracker is not None and self.tracker.freeze_threshold is not None:
            baked = bake_frozen_weights(self.model)
            if baked:
                logger.info("Baked %d frozen weights into the latent weights before saving.", baked)
        super().save_model(output_dir, _internal_call)
