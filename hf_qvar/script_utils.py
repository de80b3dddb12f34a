"""Plumbing shared by ``examples/glue/run_glue.py`` and ``examples/imagenet/run_imagenet.py``.

Both follow transformers' example scripts (argument dataclasses, logging, train -> save -> evaluate ->
model card); what they share lives here so the two scripts only hold their data and model specifics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser

from .config import PAPER_BOUNDARY_OVERRIDES, QVarConfig

logger = logging.getLogger(__name__)

#: Paper's image-model boundary layers: 8-bit patch embedding, Swin's PatchMerging and the classifier head.
IMAGE_BOUNDARY_OVERRIDES: dict[str, dict[str, Any]] = {
    **PAPER_BOUNDARY_OVERRIDES,
    "classifier": {"weight_bits": 8, "act_bits": 8},
}


@dataclass
class QuantizationArguments:
    """Command-line view of `QVarConfig`; ``--bits`` unset means full precision (teacher / FP pre-training)."""

    bits: int | None = field(
        default=None,
        metadata={"help": "Weight and activation bits (1, 2, 3, 4, 8). Unset: full-precision training, no QVarConfig."},
    )
    weight_bits: int | None = field(default=None, metadata={"help": "Weight bits; overrides --bits."})
    act_bits: int | None = field(default=None, metadata={"help": "Activation bits; overrides --bits."})
    quantize_activations: bool = field(default=True, metadata={"help": "False: quantize weights only."})
    quantize_qkv_outputs: bool = field(default=True, metadata={"help": "Quantize the Q/K/V projection outputs."})
    quantize_attention_probs: bool = field(
        default=True, metadata={"help": "Quantize softmax outputs (uses hf_qvar's eager attention)."}
    )
    granularity: str = field(default="per_tensor", metadata={"help": "per_tensor, per_channel or per_head."})
    gradient_scale: str = field(default="l1", metadata={"help": "Step-size gradient scale: l1 (paper) or lsq."})
    weight_quantizer: str | None = field(default=None, metadata={"help": "bwn or lsq; default from weight bits."})
    mlp_output_offset: bool = field(default=True, metadata={"help": "LSQ+ offset on the MLP output input."})
    module_overrides: str | None = field(
        default=None,
        metadata={"help": 'JSON {"pattern": {"weight_bits": 8, "act_bits": 8}}; default: the script\'s boundary '
                          "layers."},
    )
    modules_to_not_convert: list[str] | None = field(
        default=None, metadata={"help": "Module name patterns kept in full precision (default: the task head)."}
    )
    master_dtype: str = field(default="float32", metadata={"help": "dtype of the latent weights."})

    def __post_init__(self):
        if self.bits is None and (self.weight_bits is not None or self.act_bits is not None):
            raise ValueError(
                "`--weight_bits`/`--act_bits` refine `--bits`: pass `--bits` too (e.g. `--bits 2 --weight_bits 1`)."
            )

    def to_config(self, default_overrides: Mapping[str, dict[str, Any]] | None = None) -> QVarConfig | None:
        """The `QVarConfig` to load the model with, or ``None`` for full precision.

        Args:
            default_overrides: `module_overrides` when ``--module_overrides`` is not given (default: QVarConfig's).
        """
        if self.bits is None:
            return None
        overrides = json.loads(self.module_overrides) if self.module_overrides is not None else default_overrides
        return QVarConfig(
            bits=self.bits,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            quantize_activations=self.quantize_activations,
            quantize_qkv_outputs=self.quantize_qkv_outputs,
            quantize_attention_probs=self.quantize_attention_probs,
            granularity=self.granularity,
            gradient_scale=self.gradient_scale,
            weight_quantizer=self.weight_quantizer,
            mlp_output_offset=self.mlp_output_offset,
            module_overrides=None if overrides is None else dict(overrides),
            modules_to_not_convert=self.modules_to_not_convert,
            master_dtype=self.master_dtype,
        )

    def from_pretrained_kwargs(
        self, config: transformers.PretrainedConfig, default_overrides: Mapping[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """``{"quantization_config": ...}`` for ``from_pretrained`` of a checkpoint with `config`; empty for full
        precision or to continue training an already quantized checkpoint.

        Raises:
            ValueError: ``--bits`` given for an already quantized checkpoint, whose own settings transformers
                would silently keep.
        """
        quantization_config = self.to_config(default_overrides)
        saved = getattr(config, "quantization_config", None)
        if quantization_config is not None and saved is not None:
            raise ValueError(
                f"The checkpoint is already quantized ({saved}); transformers would ignore `--bits`. Omit the "
                "quantization flags to keep training it, or start from a full-precision checkpoint."
            )
        return {} if quantization_config is None else {"quantization_config": quantization_config}


DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class BaseModelArguments:
    """Model arguments common to both scripts (transformers' example names)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint directory or Hub id to fine-tune / quantize."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private checkpoints."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Re-initialise a head of another size."})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the model's weights are loaded in: float32 (trainable master weights; transformers "
                          "5 would otherwise keep a half-precision checkpoint's dtype and train in it), bfloat16, "
                          "float16 or auto (the checkpoint's). Quantized layers always use QVarConfig.master_dtype."},
    )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"`--dtype` must be one of {DTYPES}, got {self.dtype!r}.")

    def hub_kwargs(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token,
                "trust_remote_code": self.trust_remote_code}

    def model_kwargs(self) -> dict[str, Any]:
        """`hub_kwargs` plus the load dtype, for the model's ``from_pretrained``."""
        return dict(self.hub_kwargs(), dtype=self.dtype if self.dtype == "auto" else getattr(torch, self.dtype))


def truncate(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` examples (``--max_*_samples``), or all of them."""
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line (or `args`); a single ``.json``/``.yaml`` argument is read as a config file."""
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def setup_logging(training_args: transformers.TrainingArguments, script_logger: logging.Logger) -> None:
    """transformers' example logging: one format, verbosity from ``--log_level`` (main process) on all libraries."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # --log_level defaults to "passive" (keep the library's level): make that INFO, as transformers' scripts do.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for each in (script_logger, logger):
        each.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    script_logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, bf16: {training_args.bf16}"
    )
    script_logger.info(f"Training/evaluation parameters {training_args}")


def train_and_save(
    trainer: transformers.Trainer, training_args: transformers.TrainingArguments, num_samples: int
) -> None:
    """Train (resuming from ``--resume_from_checkpoint``), save the model and processor, log and save metrics."""
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # also saves the tokenizer / image processor
    metrics = dict(result.metrics, train_samples=num_samples)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


def evaluate_and_save(trainer: transformers.Trainer, eval_datasets: Mapping[str, Any]) -> dict[str, float]:
    """Evaluate each dataset (name suffix -> dataset, ``""`` for the main one; e.g. ``"_mm"`` for MNLI
    mismatched), log them and save all metrics together in ``eval_results.json``."""
    combined: dict[str, float] = {}
    for suffix, dataset in eval_datasets.items():
        metrics = dict(trainer.evaluate(eval_dataset=dataset), eval_samples=len(dataset))
        metrics = {f"{key}{suffix}": value for key, value in metrics.items()}
        trainer.log_metrics("eval", metrics)
        combined.update(metrics)
    trainer.save_metrics("eval", combined)
    return combined


def publish(trainer: transformers.Trainer, training_args: transformers.TrainingArguments, **card_kwargs: Any) -> None:
    """``--push_to_hub``: push with a model card; otherwise write the model card locally."""
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)


def finish(trainer: transformers.Trainer) -> None:
    """End the run on every process together, then destroy the process group (Accelerate's ``end_training``).

    A process that exits with its process group alive can abort at interpreter shutdown ("terminate called without
    an active exception", pytorch/pytorch#190489; 1 in 10 two-process gloo runs of ``tests/accelerate_train_tiny.py``
    here), after its results are written but with a failing exit status."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
