"""Train a tiny quantized BERT with QVarTrainer (KD + OBR + oscillation freezing) and save its final parameters.

Used by tests/test_trainer.py to check that two DDP processes on CPU (gloo; per-device batch B) end with the same
parameters as one process with gradient accumulation 2 (same global batch 2B, same per-micro-batch size, so the
batch-size-dependent activation gradient scale agrees too):

    python tests/accelerate_train_tiny.py OUT --per_device_train_batch_size 4 --gradient_accumulation_steps 2
    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_train_tiny.py OUT --per_device_train_batch_size 4

Activation step sizes are initialised before training from one fixed batch, identical on every rank: lazy
first-batch init would see micro-batch 0 alone in one process but the mean over both ranks' batches under DDP.
``--ddp_find_unused_parameters False`` checks that frozen weights and all step sizes still get gradients.

Note: in accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts ONE process (its simple launcher
needs mpirun for multi-CPU); ``--multi_gpu`` goes through torchrun and, with ``use_cpu``, runs gloo DDP on CPU.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

import hf_qvar
from hf_qvar import QVarTrainer, QVarTrainingArguments
from hf_qvar.script_utils import finish


def tiny_bert(directory: str, seed: int, dropout: float = 0.0) -> str:
    """A tiny BERT, dropout-free by default (dropout draws would differ between one and two processes)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def text_dataset(n: int, length: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    labels = (ids[:, 0] > 50).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()})


def calibration_batch(n: int = 8) -> dict[str, torch.Tensor]:
    rows = text_dataset(n, seed=123)
    return {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"])}


def main() -> None:
    out_dir = sys.argv[1]
    (args,) = HfArgumentParser(QVarTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", out_dir, "--report_to", "none", "--use_cpu", "--max_steps", "4", "--learning_rate", "5e-3",
         "--save_strategy", "no", "--logging_steps", "1", "--seed", "0", "--obr_lambda_max", "0.01",
         "--obr_start", "0", "--oscillation_freeze_threshold", "0.3", "--oscillation_momentum", "0.5",
         "--dataloader_drop_last", "--ddp_find_unused_parameters", "False", *sys.argv[2:]]
    )
    root = os.path.join(out_dir, "models")
    if args.process_index == 0:  # reading process_index sets up torch.distributed under accelerate launch
        tiny_bert(os.path.join(root, "student"), seed=0)
        tiny_bert(os.path.join(root, "teacher"), seed=1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    model = BertForSequenceClassification.from_pretrained(
        os.path.join(root, "student"), quantization_config=hf_qvar.QVarConfig(bits=2))
    with torch.no_grad():
        model(**calibration_batch())  # identical activation init on every rank
    trainer = QVarTrainer(model=model, args=args, train_dataset=text_dataset(64),
                          teacher_model=os.path.join(root, "teacher"))
    trainer.train()
    if args.process_index == 0:
        state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(state, os.path.join(out_dir, "final.safetensors"))
        frozen = trainer.tracker.stats()["frozen_pct"]
        with open(os.path.join(out_dir, "frozen_pct.txt"), "w") as f:
            f.write(str(frozen))
        with open(os.path.join(out_dir, "rank_digests.txt"), "w") as f:
            f.write(" ".join(trainer.rank_consistency.digests))
    finish(trainer)
    # Everything is written; skip interpreter teardown. Gloo ranks sometimes abort ("terminate called without an
    # active exception", pytorch/pytorch#190489) or hang there (3 of 30 runs even after `finish`), which is not what
    # this script tests.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
