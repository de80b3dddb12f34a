"""`analyze_batches`: sensitivity, outliers and oscillation of one model on a small eval set, in one call;
`analyze` runs it on sentences (text helpers here, image helpers in `images`).

The model is quantized once (`quantize_model`); each probe then detaches the quantizers outside its
group, so no probe reloads or re-quantizes anything.
"""

from __future__ import annotations

import logging
import time

import datasets
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from ..config import QVarConfig
from ..nn.qlinear import QuantizedLayerMixin
from ..quantizer import quantize_model
from .oscillation import read_oscillation
from .outliers import ActivationRecorder, outlier_table
from .sensitivity import Batch, calibrate, evaluate, module_sensitivity
from .sites import find_sites, only_quantized, site_groups

logger = logging.getLogger(__name__)


def load_eval_set(eval_file: str | None = None, num_samples: int = 512) -> tuple[list[str], list[int]]:
    """The first ``num_samples`` rows of a csv with ``sentence,label`` columns, or by default of the offline
    Rotten Tomatoes dev split (`hf_qvar.assets.rotten_tomatoes`)."""
    if eval_file is None:
        from ..assets import rotten_tomatoes

        data = rotten_tomatoes()["validation"]
    else:
        data = datasets.load_dataset("csv", data_files=eval_file, split="train")
        missing = {"sentence", "label"} - set(data.column_names)
        if missing:
            raise ValueError(f"{eval_file!r} needs columns sentence,label; missing {sorted(missing)}.")
    data = data.select(range(min(num_samples, len(data))))
    return list(data["sentence"]), [int(label) for label in data["label"]]


def load_model(model_name_or_path: str, num_labels: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Full-precision sequence classifier and its tokenizer (a missing head is freshly initialised, seed 0)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(model_name_or_path)


def make_batches(
    tokenizer: PreTrainedTokenizerBase, sentences: list[str], labels: list[int], batch_size: int = 64,
    max_length: int = 64,
) -> tuple[list[Batch], torch.Tensor]:
    """Length-sorted, dynamically padded batches (less padding = faster probes) and the matching labels."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start:start + batch_size]]
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(dict(encoded))
    return batches, torch.tensor([labels[i] for i in order])


def analyze_batches(
    model: nn.Module,
    batches: list[Batch],
    labels: torch.Tensor,
    bits: int = 2,
    training_run: str | None = None,
    per_module: bool = False,
    rank_by: str = "accuracy_drop",
    calibration_batch: Batch | None = None,
    inputs: str = "samples",
) -> dict:
    """Sensitivity (per kind, per layer, optionally per layer×kind cell), outliers and oscillation of ``model``
    on prepared input batches (any modality: ``make_batches`` for text, `images.fashion_mnist_batches` for images).

    A full-precision ``model`` is quantized in place with ``QVarConfig(bits=bits)`` (weights and activations;
    no 8-bit boundary overrides, so every site is probed at ``bits``); an already quantized one (a saved qvar
    model) is probed with its own quantizers and ``bits`` is ignored. Returns plain JSON-able results.

    Args:
        model: a full-precision or qvar-quantized model returning ``.logits``.
        batches: keyword inputs of ``model``, one dict of tensors per forward.
        labels: class index of every sample, in batch order.
        training_run: a QVarTrainer output folder; adds its oscillation curves.
        per_module: also probe every (layer, kind) cell alone (one eval pass each).
        rank_by: sensitivity ranking key (`sensitivity.RANK_KEYS`); ``kl_to_fp`` suits untrained heads.
        calibration_batch: batch that initialises the activation quantizers (default: ``batches[0]``).
        inputs: what one sample is (``"sentences"``, ``"images"``), for the report's wording.
    """
    start = time.perf_counter()
    sites = find_sites(model)
    already_quantized = bool(sites)  # e.g. a saved QVarTrainer model: probe its learnt steps as they are
    if not already_quantized:
        quantize_model(model, QVarConfig(bits=bits, module_overrides={}))
        sites = find_sites(model)
    layer_sites = [s for s in sites if isinstance(s.module, QuantizedLayerMixin)]
    calibrate(model, sites, batches[0] if calibration_batch is None else calibration_batch)
    recorder = ActivationRecorder(layer_sites)
    with only_quantized(sites, None), recorder.recording():
        fp_logits = evaluate(model, batches, recorder)
    groups = site_groups(sites, per_module=per_module)
    logger.info("Probing %d groups on %d %s.", len(groups), len(labels), inputs)
    result = {
        "bits": None if already_quantized else bits,
        "quantization": ("from the checkpoint" if already_quantized
                         else f"W{bits}A{bits}, QVarConfig(bits={bits}, module_overrides={{}})"),
        "num_samples": len(labels),
        "inputs": inputs,
        "sensitivity": module_sensitivity(model, batches, labels, sites, groups, fp_logits, rank_by),
        "outliers": outlier_table(layer_sites, recorder),
        "oscillation": read_oscillation(training_run) if training_run else None,
    }
    result["seconds"] = time.perf_counter() - start
    return result


def analyze(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    labels: list[int],
    bits: int = 2,
    training_run: str | None = None,
    per_module: bool = False,
    rank_by: str = "accuracy_drop",
    batch_size: int = 64,
    max_length: int = 64,
) -> dict:
    """`analyze_batches` of a text classifier on ``sentences``: length-sorted batches (`make_batches`),
    calibrated on the first ``batch_size`` sentences in their given order."""
    batches, label_tensor = make_batches(tokenizer, sentences, labels, batch_size, max_length)
    first = dict(tokenizer(sentences[:batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
    return analyze_batches(model, batches, label_tensor, bits=bits, training_run=training_run,
                           per_module=per_module, rank_by=rank_by, calibration_batch=first, inputs="sentences")
