#!/usr/bin/env python
"""Fine-tune or quantize (QAT) a transformer for GLUE-style sequence classification with hf_qvar.

Follows transformers' ``examples/pytorch/text-classification/run_glue.py``: GLUE tasks (``--task_name``),
Hub datasets, or local csv/json files, plus ``QuantizationArguments`` (``--bits`` ...) mapped to
`hf_qvar.QVarConfig` and knowledge distillation from ``--teacher_model_name_or_path``. With no data
arguments it runs offline on Rotten Tomatoes with MiniLM-L6 (`hf_qvar.assets`). Commands: README.md here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_qvar import assets
from hf_qvar.metrics import make_compute_metrics
from hf_qvar.script_utils import (
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

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on; none given = offline Rotten Tomatoes (`hf_qvar.assets`)."""

    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(task_to_keys)})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset with a `label` column."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per input after truncation."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-run tokenisation instead of the cache."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad to max_seq_length; default pads each batch dynamically."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set(s)."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the prediction set(s)."})
    train_file: str | None = field(default=None, metadata={"help": "csv/json training data with a `label` column."})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json validation data."})
    test_file: str | None = field(default=None, metadata={"help": "csv/json test data (for --do_predict)."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys:
                raise ValueError(f"Unknown `--task_name` {self.task_name!r}; pick one of {sorted(task_to_keys)}.")
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f is not None]
        extensions = {os.path.splitext(f)[1] for f in files}
        if not extensions <= {".csv", ".json"} or len(extensions) > 1:
            raise ValueError(f"Data files must all be .csv or all be .json, got {files}.")


@dataclass
class ModelArguments(BaseModelArguments):
    """Model/tokenizer to fine-tune; defaults to the offline MiniLM-L6 checkpoint."""

    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """GLUE task, Hub dataset, local files, or (none given) the offline Rotten Tomatoes split."""
    if data_args.task_name is not None:
        return load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=model_args.cache_dir, token=model_args.token)
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                            cache_dir=model_args.cache_dir, token=model_args.token)
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    if files:
        builder = "csv" if next(iter(files.values())).endswith(".csv") else "json"
        return load_dataset(builder, data_files=files, cache_dir=model_args.cache_dir)
    logger.info("No --task_name, --dataset_name or data files: using the offline Rotten Tomatoes split.")
    return assets.rotten_tomatoes()


def label_info(raw: datasets.DatasetDict, task_name: str | None) -> tuple[bool, list[Any], dict[Any, int] | None]:
    """(is_regression, label list, raw label -> id map). Labels are a ClassLabel's names (already ids, no
    map), else the sorted distinct labels of local files (strings or arbitrary ints, mapped to 0..n-1)."""
    feature = (raw["train"] if "train" in raw else next(iter(raw.values()))).features["label"]
    if task_name == "stsb" or (task_name is None and getattr(feature, "dtype", None) in ("float32", "float64")):
        return True, [], None
    if isinstance(feature, datasets.ClassLabel):
        return False, list(feature.names), None
    labels = sorted({label for part in raw.values() if "label" in part.column_names
                     for label in part.unique("label") if label != -1})
    return False, labels, {label: i for i, label in enumerate(labels)}


def sentence_keys(raw: datasets.DatasetDict, task_name: str | None) -> tuple[str, str | None]:
    """Input columns: the GLUE task's, else ``sentence1``/``sentence2``, else the first one or two non-label columns."""
    if task_name is not None:
        return task_to_keys[task_name]
    columns = [c for c in next(iter(raw.values())).column_names if c not in ("label", "idx")]
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    return (columns[0], columns[1]) if len(columns) >= 2 else (columns[0], None)


def needed_splits(raw: datasets.DatasetDict, data_args: DataTrainingArguments,
                  training_args: QVarTrainingArguments) -> datasets.DatasetDict:
    """The splits this run uses (MNLI: matched and mismatched), truncated to ``--max_*_samples``."""
    mnli = data_args.task_name == "mnli"
    wanted = {}
    if training_args.do_train:
        wanted["train"] = data_args.max_train_samples
    if training_args.do_eval:
        wanted.update(dict.fromkeys(["validation_matched", "validation_mismatched"] if mnli else ["validation"],
                                    data_args.max_eval_samples))
    if training_args.do_predict:
        wanted.update(dict.fromkeys(["test_matched", "test_mismatched"] if mnli else ["test"],
                                    data_args.max_predict_samples))
    missing = [name for name in wanted if name not in raw]
    if missing:
        raise ValueError(f"This run needs the split(s) {missing}; the data has {list(raw)}.")
    return datasets.DatasetDict({name: truncate(raw[name], limit) for name, limit in wanted.items()})


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the script on `args` (default: the command line); returns the final evaluation metrics."""
    model_args, data_args, quant_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, QuantizationArguments, QVarTrainingArguments), args
    )
    setup_logging(training_args, logger)
    set_seed(training_args.seed)
    model_path = model_args.model_name_or_path or assets.minilm_path()

    raw = load_raw_datasets(data_args, model_args)
    is_regression, label_list, label_to_id = label_info(raw, data_args.task_name)
    label_kwargs = {} if is_regression else {
        "label2id": {str(label): i for i, label in enumerate(label_list)},
        "id2label": {i: str(label) for i, label in enumerate(label_list)},
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_path, num_labels=1 if is_regression else len(label_list),
        finetuning_task=data_args.task_name, **label_kwargs, **model_args.hub_kwargs(),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, **model_args.hub_kwargs())
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **quant_args.from_pretrained_kwargs(config), **model_args.model_kwargs(),
    )

    key1, key2 = sentence_keys(raw, data_args.task_name)
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        result = tokenizer(*texts, padding="max_length" if data_args.pad_to_max_length else False,
                           max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["labels"] = [label_to_id.get(label, -1) for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        # Mapped ids go to a new `labels` column: written back to `label`, datasets 5 keeps that column's string type.
        tokenized = datasets.DatasetDict({
            name: split.map(preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache,
                            remove_columns=["label"] if label_to_id and "label" in split.column_names else None,
                            desc=f"Running tokenizer on {name}")
            for name, split in needed_splits(raw, data_args, training_args).items()
        })

    mnli = data_args.task_name == "mnli"
    train_dataset = tokenized.get("train")
    eval_sets = {suffix: tokenized[name] for suffix, name in (("", "validation_matched" if mnli else "validation"),
                                                               ("_mm", "validation_mismatched")) if name in tokenized}
    fp = training_args.fp16 or training_args.bf16
    trainer = QVarTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_sets.get(""),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if fp else None),
        compute_metrics=make_compute_metrics(data_args.task_name, is_regression),
    )

    if training_args.do_train:
        train_and_save(trainer, training_args, len(train_dataset))
    metrics = evaluate_and_save(trainer, eval_sets) if eval_sets else {}
    if training_args.do_predict:
        predict_sets = {data_args.task_name or "test": "test_matched" if mnli else "test", "mnli-mm": "test_mismatched"}
        for name, dataset in ((name, tokenized[split]) for name, split in predict_sets.items() if split in tokenized):
            write_predictions(trainer, dataset, name, is_regression, label_list, training_args.output_dir)

    card: dict[str, Any] = {"finetuned_from": model_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        card.update(language="en", dataset_tags="glue", dataset_args=data_args.task_name,
                    dataset=f"GLUE {data_args.task_name.upper()}")
    publish(trainer, training_args, **card)
    finish(trainer)
    return metrics


def write_predictions(trainer, dataset: datasets.Dataset, name: str, is_regression: bool, label_list: list[Any],
                      output_dir: str) -> None:
    """``predict_results_{name}.txt``: index and predicted label (or score) per test example."""
    # Test labels are -1 (GLUE) or absent; the Trainer must not compute a loss on them.
    dataset = dataset.remove_columns([c for c in ("label", "labels") if c in dataset.column_names])
    logits = trainer.predict(dataset, metric_key_prefix="predict").predictions
    predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, f"predict_results_{name}.txt"), "w") as writer:
            writer.write("index\tprediction\n")
            for index, item in enumerate(predictions):
                writer.write(f"{index}\t{item:3.3f}\n" if is_regression else f"{index}\t{label_list[item]}\n")


if __name__ == "__main__":
    main()
