"""Run the example scripts' result suites (issue 4's tables) and record each run as a JSON file.

A suite is a list of stages; the runs of a stage go in parallel (small models leave a GPU mostly idle, so
several share it), a stage starts when the previous one has finished. Each run's JSON holds the exact command,
device, versions, date, the final evaluation metrics, the best epoch's metrics and the wall time.

    python benchmarks/run_suite.py text --seeds 1 2 --out benchmarks/results/text --runs_dir runs
    python benchmarks/run_suite.py text --only w2a2 --seeds 1 --dry_run   # print the commands

``--set KEY=VALUE`` replaces (or adds) ``--KEY VALUE`` in every command of the suite: used to shrink runs for
tests (``--set max_steps=4``) and to point at carried copies of the offline assets.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "examples", "glue", "run_glue.py")
IMAGENET = os.path.join(ROOT, "examples", "imagenet", "run_imagenet.py")


@dataclass
class Run:
    """One script invocation; ``{runs_dir}`` and ``{seed}`` in the arguments are filled in at launch."""

    name: str
    script: str
    args: dict[str, str | None]  # flag -> value (None = bare boolean flag)
    tags: dict[str, str] = field(default_factory=dict)


#: The remedies added on top of distillation, shared by both suites.
OBR = dict(obr_lambda_max="0.01")
FREEZE = dict(track_oscillations=None, oscillation_freeze_threshold="0.02", oscillation_log_per_layer=None)


def _ablation(bits: int, base: dict, teacher: str, kd: dict) -> list[tuple[str, dict]]:
    """Issue 4's ladder: plain (classic LSQ gradient scale, hard labels) -> + module-dependent scales (L1 gradient
    scale) -> + distillation -> + OBR -> + oscillation freezing (= the full recipe)."""
    plain = dict(base, bits=str(bits), gradient_scale="lsq")
    mdq = dict(plain, gradient_scale="l1")
    distill = dict(mdq, teacher_model_name_or_path=teacher, **kd)
    with_obr = dict(distill, **OBR)
    full = dict(with_obr, **FREEZE)
    return [("plain", plain), ("mdq", mdq), ("kd", distill), ("obr", with_obr), ("full", full)]


def _qat_runs(prefix: str, script: str, model: str, base: dict, teacher: str, kd: dict, ladder_bits: tuple[int, ...],
              full_only_bits: tuple[int, ...], hard_label_args: dict | None = None) -> list[Run]:
    """The whole ladder at `ladder_bits`, the full recipe alone at `full_only_bits`; `hard_label_args` replace
    arguments of the rungs without distillation."""
    runs = []
    for bits in sorted(ladder_bits + full_only_bits):
        ladder = _ablation(bits, base, teacher, kd)
        for rung, args in ladder if bits in ladder_bits else ladder[-1:]:
            if rung in ("plain", "mdq") and hard_label_args:
                args = dict(args, **hard_label_args)
            name = f"{prefix}-w{bits}a{bits}-{rung}-s{{seed}}"
            runs.append(Run(name, script, dict(args, output_dir=f"{{runs_dir}}/{name}"),
                            tags=dict(model=model, bits=f"W{bits}A{bits}", rung=rung)))
    return runs


def text_suite(model: str) -> list[list[Run]]:
    """MiniLM-L6 on Rotten Tomatoes: FP teacher, then W4A4 (full recipe) and the W2A2 / W1A1 ladders."""
    common = dict(do_train=None, do_eval=None, max_seq_length="64", per_device_train_batch_size="32",
                  per_device_eval_batch_size="256",
                  weight_decay="0.01", warmup_steps="0.1", eval_strategy="epoch", save_strategy="no",
                  logging_steps="50", report_to="none", seed="{seed}", dataloader_num_workers="0")
    teacher = "{runs_dir}/text-fp-s1"
    fp = Run("text-fp-s{seed}", GLUE, dict(common, model_name_or_path=model, learning_rate="5e-5",
                                              num_train_epochs="4", output_dir="{runs_dir}/text-fp-s{seed}"),
             tags=dict(model="MiniLM-L6", bits="fp", rung="fp"))
    qat = dict(common, model_name_or_path=teacher, learning_rate="1e-4", num_train_epochs="6")
    kd = dict(distillation_logits_weight="1.0", distillation_hidden_weight="1.0", ground_truth_weight="0.0")
    return [[fp], _qat_runs("text", GLUE, "MiniLM-L6", qat, teacher, kd, ladder_bits=(1, 2), full_only_bits=(4,))]


def vision_suite(teacher: str) -> list[list[Run]]:
    """Fashion-MNIST DeiT: W4A4 / W3A3 (full recipe) and the W2A2 ladder, from and distilled by `teacher`."""
    common = dict(do_train=None, do_eval=None, model_name_or_path=teacher, per_device_train_batch_size="128",
                  per_device_eval_batch_size="1000",
                  num_train_epochs="6", num_crops="4", crop_scale_min="0.6", eval_strategy="epoch",
                  save_strategy="no", logging_steps="50", report_to="none", seed="{seed}",
                  dataloader_num_workers="2")
    kd = dict(distillation_logits_weight="1.0", distillation_hidden_weight="0.0", ground_truth_weight="0.0")
    # Hard labels: one crop per image per step, as without multi-crop KD.
    hard_labels = dict(num_crops="1", per_device_train_batch_size="512")
    return [_qat_runs("vision", IMAGENET, "DeiT (12x192, patch 4)", common, teacher, kd, ladder_bits=(2,),
                      full_only_bits=(3, 4), hard_label_args=hard_labels)]


def deit_pretrain_suite() -> list[list[Run]]:
    """The full-precision DeiT pre-trained from scratch on Fashion-MNIST (QAT start point and teacher)."""
    args = dict(do_train=None, do_eval=None, from_scratch=None, model_type="deit",
                output_dir="{runs_dir}/deit-fmnist-fp-s{seed}",
                num_train_epochs="40", per_device_train_batch_size="512", per_device_eval_batch_size="1000",
                learning_rate="1.5e-3", weight_decay="0.05", warmup_steps="0.05", crop_scale_min="0.8",
                torch_compile=None, save_strategy="epoch", save_total_limit="1",
                eval_strategy="epoch", logging_steps="100", report_to="none",
                dataloader_num_workers="6", bf16=None, seed="{seed}")
    patch2 = dict(args, output_dir="{runs_dir}/deit-p2-fmnist-fp-s{seed}", config_overrides='{"patch_size": 2}')
    return [[Run("deit-fmnist-fp-s{seed}", IMAGENET, args, tags=dict(model="DeiT (12x192, patch 4)", bits="fp")),
             Run("deit-p2-fmnist-fp-s{seed}", IMAGENET, patch2, tags=dict(model="DeiT (12x192, patch 2)", bits="fp"))]]


def command(run: Run, seed: int, runs_dir: str, overrides: dict[str, str | None]) -> list[str]:
    args = dict(run.args, **overrides)
    argv = [sys.executable, run.script]
    for flag, value in args.items():
        argv.append(f"--{flag}")
        if value is not None:
            argv.append(value.replace("{seed}", str(seed)).replace("{runs_dir}", runs_dir))
    return argv


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _logged_dicts(log_file: str) -> list[dict]:
    """The log dicts the Trainer printed (``{'eval_loss': ..., ...}`` lines): what is left of a killed run."""
    found = []
    for line in open(log_file, errors="replace").read().replace("\r", "\n").splitlines():
        start, end = line.find("{"), line.rfind("}")
        if 0 <= start < end:
            try:
                logged = ast.literal_eval(line[start : end + 1])
            except (ValueError, SyntaxError):
                continue
            if isinstance(logged, dict):  # the console prints values as strings
                found.append({k: _number(v) for k, v in logged.items()})
    return found


def _metrics(output_dir: str, finished: bool) -> dict:
    """Final evaluation metrics (if the run finished), the per-epoch evaluations and the best accuracy."""
    results = os.path.join(output_dir, "eval_results.json")
    final = json.load(open(results)) if finished and os.path.isfile(results) else None
    state_file = os.path.join(output_dir, "trainer_state.json")
    history = (json.load(open(state_file))["log_history"] if os.path.isfile(state_file)
               else _logged_dicts(os.path.join(output_dir, "log.txt")))
    evals = [{k: v for k, v in h.items() if k in ("epoch", "step", "eval_accuracy", "eval_loss")}
             for h in history if "eval_accuracy" in h]
    train = {k: v for h in history if "train_runtime" in h for k, v in h.items()}
    accuracies = [e["eval_accuracy"] for e in evals] + ([final["eval_accuracy"]] if final else [])
    return dict(final=final, best_eval_accuracy=max(accuracies, default=None), epochs=evals, train=train)


PROVENANCE = ("command", "date", "device", "python", "torch", "transformers")


def _keep_trainer_state(output_dir: str, record: dict, path: str) -> None:
    """Copy the run's trainer_state.json (per-step logs: oscillation, OBR terms) beside its record, with the
    record's provenance, for `hf-qvar analyze --training_run`; runs stopped before the end have none."""
    state_file = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(state_file):
        return
    state = json.load(open(state_file))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**{k: record[k] for k in PROVENANCE}, "run_record": f"{record['name']}.json", **state}, handle,
                  indent=2)


def _child_env(parallel: int) -> dict[str, str]:
    """Share the CPU cores among parallel runs: each torch process otherwise starts one thread per core, and
    several of them thrash (MiniLM runs on the H100 took half the wall time with ``OMP_NUM_THREADS=2``)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, parallel))))
    return env


def launch(run: Run, seed: int, args: argparse.Namespace, overrides: dict) -> dict:
    name = run.name.replace("{seed}", str(seed))
    argv = command(run, seed, args.runs_dir, overrides)
    output_dir = argv[argv.index("--output_dir") + 1]
    record = dict(name=name, seed=seed, tags=run.tags, command=shlex.join(["python"] + argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **_versions())
    if args.dry_run:
        sys.stdout.write(record["command"] + "\n")  # one write: runs of a stage print from several threads
        return record
    os.makedirs(output_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(output_dir, "log.txt"), "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_child_env(args.parallel))
        try:
            returncode = process.wait(timeout=None if args.deadline is None else max(args.deadline - time.time(), 1))
        except subprocess.TimeoutExpired:  # out of time: keep what the run logged so far
            process.kill()
            process.wait()
            returncode = "killed at --time_limit"
    record.update(returncode=returncode, wall_s=round(time.time() - start, 1), **_metrics(output_dir, returncode == 0))
    if returncode != 0:
        record["log_tail"] = open(os.path.join(output_dir, "log.txt"), errors="replace").read()[-3000:]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    _keep_trainer_state(output_dir, record, os.path.join(args.out, "trainer_states", f"{name}.json"))
    sys.stdout.write(f"{name}: rc={returncode} wall={record['wall_s']}s best={record['best_eval_accuracy']} "
                     f"final={(record['final'] or {}).get('eval_accuracy')}\n")
    sys.stdout.flush()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=("text", "vision", "deit_pretrain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--out", required=True, help="Folder of the per-run JSON records.")
    parser.add_argument("--runs_dir", default="runs", help="Folder of the runs' output directories.")
    parser.add_argument("--model", default=None, help="text: the FP start checkpoint (default: offline MiniLM-L6).")
    parser.add_argument("--teacher", default=None, help="vision: the pre-trained FP DeiT.")
    parser.add_argument("--only", nargs="*", default=None, help="Keep runs whose name contains one of these.")
    parser.add_argument("--skip_stages", type=int, default=0, help="Skip the first N stages (e.g. the teacher).")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE (or KEY) added to every command.")
    parser.add_argument("--time_limit", type=float, default=None,
                        help="Seconds from now after which unfinished runs are stopped (their logged evaluations kept).")
    parser.add_argument("--dry_run", action="store_true")
    args = parser.parse_args(argv)
    args.deadline = None if args.time_limit is None else time.time() + args.time_limit
    if args.suite == "text":
        from hf_qvar import assets

        stages = text_suite(args.model or assets.minilm_path())
    elif args.suite == "vision":
        if args.teacher is None:
            parser.error("the vision suite needs --teacher (a pre-trained FP DeiT; see the deit_pretrain suite)")
        stages = vision_suite(args.teacher)
    else:
        stages = deit_pretrain_suite()
    overrides = dict(item.split("=", 1) if "=" in item else (item, None) for item in args.set)
    for stage in stages[args.skip_stages:]:
        runs = [r for r in stage if args.only is None or any(key in r.name for key in args.only)]
        jobs = [(run, seed) for seed in args.seeds for run in runs]
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            list(pool.map(lambda job: launch(job[0], job[1], args, overrides), jobs))


if __name__ == "__main__":
    main()
