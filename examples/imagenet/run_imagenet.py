#!/usr/bin/env python
"""Pre-train, fine-tune or quantize (QAT) a ViT / DeiT / Swin image classifier with hf_qvar.

Follows transformers' ``examples/pytorch/image-classification/run_image_classification.py``: a Hub
dataset (``--dataset_name``) or image folders (``--train_dir``/``--validation_dir``), plus
``QuantizationArguments`` mapped to `hf_qvar.QVarConfig` with the paper's 8-bit patch embedding and head,
the paper's optimiser defaults (AdamW, lr 5e-4, weight decay 1e-4, cosine, no warm-up) and multi-crop
distillation (``--num_crops`` crops per image, soft labels from ``--teacher_model_name_or_path``). With no
data arguments it runs offline on Fashion-MNIST; ``--from_scratch --model_type deit|vit|swin`` builds a
small model for it. Preprocessing is plain torch (`hf_qvar.vision`). Commands: README.md here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field

import datasets
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTForImageClassification,
    PreTrainedModel,
    SwinForImageClassification,
    ViTForImageClassification,
    ViTImageProcessor,
    set_seed,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hf_qvar import assets
from hf_qvar.metrics import make_compute_metrics
from hf_qvar.script_utils import (
    IMAGE_BOUNDARY_OVERRIDES,
    BaseModelArguments,
    QuantizationArguments,
    evaluate_and_save,
    finish,
    parse_args,
    publish,
    setup_logging,
    train_and_save,
    truncate,
)
from hf_qvar.trainer import QVarTrainer
from hf_qvar.training_args import QVarTrainingArguments
from hf_qvar.vision import ImageTransform, MultiCropCollator

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion_mnist"
#: From-scratch models sized for Fashion-MNIST (28x28x1): DeiT-Ti/ViT-Ti width on 4x4 patches; a 3-stage
#: Swin-T on images padded to 32 with 2x2 patches and 4x4 windows (28 with window 7 fails in stage 2, and a
#: 4th stage would be 2x2, below the window). ``--config_overrides`` (JSON) adapts them.
SCRATCH_MODELS: dict[str, tuple[type[PreTrainedModel], dict]] = {
    "deit": (DeiTForImageClassification, dict(image_size=28, patch_size=4, num_channels=1, hidden_size=192,
                                              num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)),
    "vit": (ViTForImageClassification, dict(image_size=28, patch_size=4, num_channels=1, hidden_size=192,
                                            num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)),
    "swin": (SwinForImageClassification, dict(image_size=32, patch_size=2, num_channels=1, embed_dim=96,
                                              depths=[2, 2, 6], num_heads=[3, 6, 12], window_size=4,
                                              drop_path_rate=0.1)),
}


@dataclass
class DataTrainingArguments:
    """Which images to train and evaluate on; none given = offline Fashion-MNIST (`hf_qvar.assets`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"aliases": ["--dataset"],
                  "help": f"Hub dataset, or {FASHION_MNIST!r} (default) for the offline Debian-packaged copy."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    fashion_mnist_root: str = field(default=assets.FASHION_MNIST_ROOT, metadata={"help": "Fashion-MNIST IDX folder."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, same layout."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction without a validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the (ClassLabel) labels."})
    num_crops: int = field(
        default=1,
        metadata={"help": "Random crops per image per step (paper: 4); the batch size counts images, so a step "
                          "sees batch x num_crops crops, each distilled from the teacher's prediction on that crop."},
    )
    crop_scale_min: float = field(default=0.08, metadata={"help": "Smallest random-crop area fraction."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "Largest random-crop area fraction."})

    @property
    def uses_image_folders(self) -> bool:
        return self.train_dir is not None or self.validation_dir is not None

    @property
    def uses_fashion_mnist(self) -> bool:
        return not self.uses_image_folders and self.dataset_name in (None, FASHION_MNIST)


@dataclass
class ModelArguments(BaseModelArguments):
    """Checkpoint to fine-tune / quantize, or a model type to build from scratch."""

    model_type: str | None = field(default=None, metadata={"help": "With --from_scratch: " + ", ".join(SCRATCH_MODELS)})
    from_scratch: bool = field(default=False, metadata={"help": "Build a randomly initialised model (full precision)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": 'From-scratch config changes as JSON, e.g. \'{"depths": [2, 2]}\'.'}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})

    def __post_init__(self):
        super().__post_init__()
        if self.from_scratch and self.model_type not in SCRATCH_MODELS:
            raise ValueError(
                f"`--from_scratch` needs `--model_type` in {sorted(SCRATCH_MODELS)}, got {self.model_type!r}."
            )
        if not self.from_scratch and self.model_name_or_path is None:
            raise ValueError("Pass `--model_name_or_path`, or `--from_scratch --model_type deit|vit|swin`.")


@dataclass
class ImageTrainingArguments(QVarTrainingArguments):
    """Training arguments with the paper's ImageNet defaults (method.md §7); every one can be overridden."""

    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate (paper: 5e-4)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (paper: 1e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine to 0, no warm-up."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image column: it is turned into pixel_values on the fly."}
    )
    distillation_hidden_weight: float = field(
        default=0.0, metadata={"help": "Hidden-state MSE weight; the paper distils logits only (soft CE per crop)."}
    )


def load_image_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits from Fashion-MNIST, a Hub dataset or image folders."""
    if data_args.uses_image_folders:
        files = {split: os.path.join(folder, "**") for split, folder in
                 (("train", data_args.train_dir), ("validation", data_args.validation_dir)) if folder is not None}
        raw = load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
    elif data_args.uses_fashion_mnist:
        raw = assets.fashion_mnist(data_args.fashion_mnist_root)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                           cache_dir=model_args.cache_dir, token=model_args.token)
    if "validation" not in raw and "test" in raw:
        logger.info("No validation split: evaluating on the test split.")
        raw["validation"] = raw.pop("test")
    if "validation" not in raw:
        parts = raw["train"].train_test_split(data_args.train_val_split, seed=0)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    return raw


def build_model(model_args: ModelArguments, quant_args: QuantizationArguments, labels: list[str],
                fashion: bool) -> tuple[PreTrainedModel, ViTImageProcessor]:
    """A from-scratch full-precision model with a matching image processor, or a checkpoint loaded with the
    `QVarConfig` of ``--bits`` (8-bit patch embedding and head by default)."""
    label_kwargs = {"num_labels": len(labels), "label2id": {label: i for i, label in enumerate(labels)},
                    "id2label": dict(enumerate(labels))}
    if model_args.from_scratch:
        if quant_args.bits is not None:
            raise ValueError("QAT starts from a trained full-precision checkpoint: pre-train with `--from_scratch` "
                             "(no `--bits`), then pass its output as `--model_name_or_path` with `--bits`.")
        model_class, defaults = SCRATCH_MODELS[model_args.model_type]
        overrides = json.loads(model_args.config_overrides or "{}")
        config = AutoConfig.for_model(model_args.model_type, **{**defaults, **overrides}, **label_kwargs)
        channels = config.num_channels
        mean, std = (assets.FASHION_MNIST_MEAN, assets.FASHION_MNIST_STD) if fashion and channels == 1 else \
            (IMAGENET_DEFAULT_MEAN[:channels], IMAGENET_DEFAULT_STD[:channels])
        processor = ViTImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                      image_mean=list(mean), image_std=list(std))
        return model_class(config), processor
    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(model_args.config_name or path, finetuning_task="image-classification",
                                        **label_kwargs, **model_args.hub_kwargs())
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **quant_args.from_pretrained_kwargs(config, IMAGE_BOUNDARY_OVERRIDES), **model_args.model_kwargs(),
    )
    processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name or path, **model_args.hub_kwargs())
    return model, processor


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the script on `args` (default: the command line); returns the final evaluation metrics."""
    model_args, data_args, quant_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, QuantizationArguments, ImageTrainingArguments), args
    )
    setup_logging(training_args, logger)
    set_seed(training_args.seed)

    raw = load_image_datasets(data_args, model_args)
    labels = list(raw["train"].features[data_args.label_column_name].names)
    model, processor = build_model(model_args, quant_args, labels, data_args.uses_fashion_mnist)

    size, channels = model.config.image_size, model.config.num_channels
    transform = functools.partial(ImageTransform, size=size, mean=processor.image_mean, std=processor.image_std,
                                  num_channels=channels, image_column=data_args.image_column_name)
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = raw["train"]
        if data_args.max_train_samples is not None:  # a random subset, not the first classes of a sorted folder
            train_dataset = truncate(train_dataset.shuffle(seed=training_args.seed), data_args.max_train_samples)
        train_dataset.set_transform(transform(train=True))
    if training_args.do_eval:
        eval_dataset = truncate(raw["validation"], data_args.max_eval_samples)
        eval_dataset.set_transform(transform(train=False))

    # Trainer has one collator: it crops training items (random crops + flips per batch) and stacks evaluation ones.
    collator = MultiCropCollator(size, mean=processor.image_mean, std=processor.image_std,
                                 num_crops=data_args.num_crops,
                                 scale=(data_args.crop_scale_min, data_args.crop_scale_max),
                                 label_column=data_args.label_column_name)
    trainer = QVarTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=collator,
        compute_metrics=make_compute_metrics(),
    )
    if training_args.do_train:
        train_and_save(trainer, training_args, len(train_dataset))
    metrics = evaluate_and_save(trainer, {"": eval_dataset}) if eval_dataset is not None else {}
    dataset = "imagefolder" if data_args.uses_image_folders else data_args.dataset_name or FASHION_MNIST
    publish(trainer, training_args, finetuned_from=None if model_args.from_scratch else model_args.model_name_or_path,
            tasks="image-classification", dataset=dataset, tags=["image-classification", "hf_qvar"])
    finish(trainer)
    return metrics


if __name__ == "__main__":
    main()
