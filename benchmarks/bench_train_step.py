"""Training-step time and peak memory of quantized vs full-precision models, side by side in one run.

BERT-base-sized (12×768, seq 128, batch 32) and DeiT-S-sized (12×384, 224², patch 16, batch 64) models with
random weights, bf16 autocast, AdamW; full precision vs W4A4 / W1A1 (Linear layers incl. Q/K/V outputs), eager
and ``torch.compile``; attention-probability quantization measured separately (it replaces fused attention).
Mode ``eager-reference`` is eager with hf_qvar's fused Triton quantizer kernels switched off (``HF_QVAR_TRITON=0``),
to time the kernels against the reference ops in the same run.

    python benchmarks/bench_train_step.py --out benchmarks/results/train_step_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, DeiTConfig, DeiTForImageClassification

import hf_qvar
from hf_qvar import QVarConfig, quantize_model
from hf_qvar.cuda_graphs import graph_training_step, graphs_enabled
from hf_qvar.quantizers.triton_kernels import ENV_SWITCH as TRITON_SWITCH

MODELS = {
    "bert-base": (lambda: BertForSequenceClassification(BertConfig(num_labels=2)), 32),
    "deit-s": (
        lambda: DeiTForImageClassification(
            DeiTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       num_labels=1000)
        ),
        64,
    ),
}
VARIANTS = {
    "fp": None,
    "w4a4": dict(bits=4, quantize_attention_probs=False),
    "w2a2": dict(bits=2, quantize_attention_probs=False),
    "w1a1": dict(bits=1, quantize_attention_probs=False),
    "w4a4+probs": dict(bits=4, quantize_attention_probs=True),
    "w1a1+probs": dict(bits=1, quantize_attention_probs=True),
}


def provenance(command_prefix: str = "") -> dict:
    """What every benchmark record names: the command, date (UTC), GPU (or CPU) and library versions."""
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    return dict(command=command_prefix + "python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, hf_qvar=hf_qvar.__version__)


def make_batch(name: str, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name.startswith("bert"):
        ids = torch.randint(1000, 20000, (batch, 128), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g).to(device),
            "labels": torch.randint(0, 1000, (batch,), generator=g).to(device)}


def build(name: str, variant: str, device: str):
    torch.manual_seed(0)
    make, batch = MODELS[name]
    model = make().to(device)
    if VARIANTS[variant] is not None:
        quantize_model(model, QVarConfig(**VARIANTS[variant]))
    return model.train(), batch


def calibrate(model, batch: dict) -> None:
    """Initialise activation steps eagerly, so compiled graphs and timings see a calibrated model."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch)


def training_step(forward, optimizer, batch: dict, extra_loss=None, after_backward=None, after_step=None,
                  autocast_cache: bool = True):
    """One bf16-autocast training step as a closure: forward, optional extra loss, backward, optional gradient
    work (``after_backward``), AdamW, optional bookkeeping (``after_step``). ``autocast_cache=False`` for a step
    that is captured into a CUDA graph (autocast's cast cache must not outlive the capture)."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=autocast_cache):
            loss = forward(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    return step


def back_to_back(step, iters: int) -> tuple[float, float]:
    """Mean wall time and mean host CPU time (this thread, up to the final sync) in ms of ``iters`` steps run back
    to back (one host sync, at the end), as a training loop runs them: the host prepares the next step while the GPU
    still runs this one. Host time is what an eager, host-bound step costs, and unlike wall time it does not count
    the time this process waits for a busy host's CPUs."""
    torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.thread_time()
    for _ in range(iters):
        step()
    cpu = time.thread_time() - start_cpu
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iters, 1000 * cpu / iters


def timed(step, warmup: int, iters: int) -> tuple[float, float, float, float]:
    """Median and inter-quartile range of ``step`` in ms (CUDA events, a host sync after every step), peak memory in
    GiB, and the mean ms per step of ``iters`` more steps run back to back (`back_to_back`)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q1, _, q3 = statistics.quantiles(times, n=4)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return statistics.median(times), q3 - q1, peak, back_to_back(step, iters)[0]


def compile_model(model, compile_mode: str | None = None, guard_filter: str | None = None, **kwargs):
    """``torch.compile(model, mode=compile_mode)``; with ``guard_filter``, the name of one of `torch.compiler`'s guard
    filters (e.g. ``skip_guard_on_all_nn_modules_unsafe``), passed as ``options`` with the mode's own options
    (``torch.compile`` takes a mode or options, not both). Such a filter also drops the guards that tell one model
    of a class from another (a W4A4 BERT would run the graph compiled for the FP one), so Dynamo's caches are
    cleared first."""
    if guard_filter is None:
        return torch.compile(model, mode=compile_mode, **kwargs)
    from torch._inductor import list_mode_options

    torch._dynamo.reset()
    options = dict(list_mode_options(compile_mode or "default"))
    options["guard_filter_fn"] = getattr(torch.compiler, guard_filter)
    return torch.compile(model, options=options, **kwargs)


def time_steps(model, batch: dict, compiled: bool, warmup: int, iters: int, compile_mode: str | None = None,
               step_graph: bool = False, guard_filter: str | None = None) -> tuple[float, float, float, float]:
    """`timed` of forward+backward+AdamW: synced step time (median, IQR; ms), peak memory (GiB), back-to-back ms per
    step; with ``step_graph``, of the replay of one CUDA graph holding the whole step (capturable AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available(),
                                  capturable=step_graph)
    calibrate(model, batch)
    forward = compile_model(model, compile_mode, guard_filter) if compiled else model
    if step_graph:  # an all-ones mask adds nothing, and eager mask code reads it on the host (not capturable)
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    step = training_step(forward, optimizer, batch, autocast_cache=not step_graph)
    if not step_graph:
        return timed(step, warmup, iters)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # replays allocate nothing: the peak is that of the warm-up and capture
    replay = graph_training_step(step, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms, iqr, _, per_step = timed(replay, warmup, iters)
    return ms, iqr, peak, per_step


def mode_label(mode: str, compile_mode: str | None) -> str:
    """How a row names its mode: ``eager``/``eager-reference``, or ``compiled:<torch.compile mode>``."""
    return mode if mode.startswith("eager") else f"compiled:{compile_mode or 'default'}"


def add_fp_ratios(rows: list[dict]) -> None:
    """``time_vs_fp``, ``memory_vs_fp`` (and ``back_to_back_vs_fp`` where rows have ``back_to_back_ms``) of every
    row against the full-precision row of its model and mode; None where the run did not time full precision in
    that mode."""
    for row in rows:
        fp = next((r for r in rows if r["model"] == row["model"] and r["mode"] == row["mode"] and r["variant"] == "fp"),
                  None)
        row["time_vs_fp"] = round(row["step_ms"] / fp["step_ms"], 3) if fp else None
        row["memory_vs_fp"] = round(row["peak_gib"] / fp["peak_gib"], 3) if fp else None
        if "back_to_back_ms" in row:
            row["back_to_back_vs_fp"] = round(row["back_to_back_ms"] / fp["back_to_back_ms"], 3) if fp else None


def apply_config_settings(settings: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """Apply ``KEY=VALUE`` pairs (VALUE a Python literal) to ``torch._inductor.config`` (``flag`` ``inductor``) or
    ``torch._dynamo.config`` (``dynamo``); returns them."""
    import ast
    import importlib

    config = importlib.import_module(f"torch._{flag}.config")
    applied = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep or not hasattr(config, key.split(".")[0]):
            parser.error(f"--{flag}: expected KEY=VALUE with KEY a torch._{flag}.config setting, got {setting!r}.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parser.error(f"--{flag}: the value of {key} must be a Python literal (True, 1, 'x'), got {raw!r}.")
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
        applied[key] = value
    return applied


GUARD_FILTERS = ("skip_guard_on_all_nn_modules_unsafe", "skip_guard_on_inbuilt_nn_modules_unsafe")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--inductor`` and ``--dynamo`` KEY=VALUE settings (see `apply_config_settings`) and ``--guard_filter``."""
    parser.add_argument("--guard_filter", choices=GUARD_FILTERS,
                        help="compile with this torch.compiler guard filter (recorded in each row's mode); unsafe "
                             "where module attributes change after compiling, e.g. train() / eval()")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for the compiled modes, e.g. cpp_wrapper=True "
                             "combo_kernels=True (recorded in each row's mode)")
    parser.add_argument("--dynamo", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._dynamo.config settings, e.g. use_recursive_dict_tags_for_guards=True "
                             "(recorded in each row's mode)")


def apply_config_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, object]:
    """Apply the ``--inductor`` and ``--dynamo`` settings of `add_config_arguments`; returns them and the guard
    filter, for the record."""
    return dict(inductor=apply_config_settings(args.inductor, "inductor", parser),
                dynamo=apply_config_settings(args.dynamo, "dynamo", parser), guard_filter=args.guard_filter)


def config_label(args: argparse.Namespace) -> str:
    """The ``+KEY=VALUE`` suffix that names a run's ``--inductor``, ``--dynamo`` and ``--guard_filter`` settings."""
    guard_filter = [f"guard_filter={args.guard_filter}"] if args.guard_filter else []
    return "".join("+" + setting for setting in args.inductor + args.dynamo + guard_filter)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "eager-reference", "compiled"])
    parser.add_argument("--batch", type=int,
                        help="batch size instead of each model's default (BERT-base 32, DeiT-S 64)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--step_graph", action="store_true",
                        help="capture each whole training step (forward, backward, AdamW) into one CUDA graph and "
                             "time its replays (recorded as '+step-graph' in each row's mode)")
    add_config_arguments(parser)
    parser.add_argument("--rows", help="also append each row to this JSON-lines file as soon as it is measured")
    args = parser.parse_args(argv)
    settings = apply_config_arguments(args, parser)
    if args.step_graph and not graphs_enabled():
        parser.error("--step_graph: CUDA graphs are switched off (HF_QVAR_CUDA_GRAPHS=0).")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in args.models:
        for mode in args.modes:
            for variant in args.variants:
                model, batch_size = build(name, variant, "cuda")
                batch_size = args.batch or batch_size
                batch = make_batch(name, batch_size, "cuda")
                t0 = time.time()
                os.environ[TRITON_SWITCH] = "0" if mode == "eager-reference" else "1"
                ms, iqr, peak, per_step = time_steps(model, batch, mode == "compiled", args.warmup, args.iters,
                                                     args.compile_mode, args.step_graph, args.guard_filter)
                label = mode_label(mode, args.compile_mode)
                if mode == "compiled":
                    label += config_label(args)
                if args.step_graph:
                    label += "+step-graph"
                rows.append(dict(model=name, mode=label, variant=variant, batch=batch_size, step_ms=round(ms, 3),
                                 step_ms_iqr=round(iqr, 3), peak_gib=round(peak, 3), back_to_back_ms=round(per_step, 3),
                                 wall_s=round(time.time() - t0, 1)))
                print(json.dumps(rows[-1]), flush=True)
                if args.rows:
                    with open(args.rows, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
                del model
                torch.cuda.empty_cache()
    add_fp_ratios(rows)
    result = dict(provenance(), **settings, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'model':10} {'mode':24} {'variant':11} {'ms':>8} {'x FP':>6} {'b2b ms':>8} {'x FP':>6} {'GiB':>6} "
          f"{'mem x':>6}")
    for r in rows:
        ratios = [f"{v:6.2f}" if v is not None else f"{'-':>6}"
                  for v in (r["time_vs_fp"], r["back_to_back_vs_fp"], r["memory_vs_fp"])]
        print(f"{r['model']:10} {r['mode']:24} {r['variant']:11} {r['step_ms']:8.2f} {ratios[0]} "
              f"{r['back_to_back_ms']:8.2f} {ratios[1]} {r['peak_gib']:6.2f} {ratios[2]}")


if __name__ == "__main__":
    main()
