"""Cost of OBR + oscillation tracking + freezing on a BERT-base training step, measured side by side.

Same model, batch and optimizer; the step with the features adds OBR's gradient ``λ·∇L_OBR`` after the backward
as `QVarTrainer` does (`OBRGradient`, λ > 0, so OBR is really computed; ``obr-loss`` instead adds ``λ·L_OBR`` to
the loss, the trainer's path under fp16 loss scaling, FSDP and DeepSpeed), runs the oscillation tracker after
every optimizer step, and has 10 % of every weight matrix frozen (so the frozen forward path runs).
``--mode compiled`` compiles the model (OBR and tracking run through `hf_qvar.compile_utils` in both modes);
``warmup_s`` is the wall time of the warm-up steps, compilation included.

All variants are built first, then timed in many short interleaved rounds: each round runs ``--iters`` steps of
every variant back to back, as the Trainer does (no host sync between steps, so GPU work can overlap the next
step's launches), and the overhead is the median over rounds of variant / plain time. Short rounds keep the
host's drift (eager steps are host-bound, and this host's speed wanders by ±30 % within seconds) out of the ratio,
and ``overhead_ci95`` is a distribution-free 95 % confidence interval of that median (many rounds narrow it);
``host_overhead`` is the same ratio of this thread's CPU time, which waiting for a busy host's CPUs leaves out.

    python bench_training_features.py --bits 2 --out results/training_features_eager_h100.json
    python bench_training_features.py --bits 2 --mode compiled --variants obr+tracking+freezing \
        --out results/training_features_compiled_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench_train_step import back_to_back, build, calibrate, make_batch, mode_label, provenance, training_step
from hf_qvar.obr import OBRGradient, obr_loss
from hf_qvar.oscillation import OscillationTracker, quantized_weight_layers


def freeze_a_tenth(model) -> None:
    """Freeze a random 10 % of every quantized weight at its current code, as oscillation freezing would."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in quantized_weight_layers(model).values():
        mask = torch.rand(layer.weight.shape, generator=g, device="cuda") < 0.1
        with torch.no_grad():
            layer.weight_quantizer.freeze(layer.weight, mask, layer.weight_quantizer.codes(layer.weight))


FEATURES = ("obr", "tracking", "freezing")
OPTIONAL_FEATURES = ("obr-loss",)


def make_step(features: tuple[str, ...], bits: int, mode: str, warmup: int, compile_mode: str | None = None):
    """A training-step closure with the given subset of `FEATURES` switched on (``()`` = the plain QAT step),
    already warmed up, and the wall time (s) of that warm-up."""
    model, batch_size = build("bert-base", f"w{bits}a{bits}", "cuda")
    batch = make_batch("bert-base", batch_size, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    calibrate(model, batch)
    if "freezing" in features:
        freeze_a_tenth(model)
    tracker = None
    if "tracking" in features:
        tracker = OscillationTracker(model, momentum=0.01, threshold=0.005,
                                     freeze_threshold=0.1 if "freezing" in features else None)
        tracker.initialize()
    extra_loss = (lambda: 0.01 * obr_loss(model)) if "obr-loss" in features else None
    obr = OBRGradient(model) if "obr" in features else None
    forward = torch.compile(model, mode=compile_mode) if mode == "compiled" else model
    step = training_step(forward, optimizer, batch, extra_loss=extra_loss,
                         after_backward=(lambda: obr.accumulate(0.01)) if obr is not None else None,
                         after_step=tracker.update if tracker is not None else None)
    start = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return step, time.time() - start


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95 % confidence interval of the median: the order statistics of ranks ``j`` and
    ``n + 1 − j`` (1-based), ``j = ⌊n/2 − z·√n/2⌋``, which hold the median with binomial probability ≥ 95 %."""
    ordered, n = sorted(values), len(values)
    j = max(1, math.floor(n / 2 - z * math.sqrt(n) / 2))
    return ordered[j - 1], ordered[n - j]


def overhead_stats(name: str, times: list[float], base: list[float]) -> dict:
    """``name``: the median over rounds of ``times / base − 1``, with its 95 % CI and every round's value."""
    ratios = [t / b for t, b in zip(times, base)]
    return {name: round(statistics.median(ratios) - 1, 4),
            f"{name}_ci95": [round(r - 1, 4) for r in median_ci(ratios)],
            f"{name}_per_round": [round(r - 1, 4) for r in ratios]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="feature sets such as obr or obr+tracking+freezing (default: each alone, then all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=4, help="back-to-back steps per variant and round")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rows = []
    variants = [(f,) for f in FEATURES] + [FEATURES]
    if args.variants:
        variants = [tuple(v.split("+")) for v in args.variants]
        unknown = {f for v in variants for f in v} - set(FEATURES + OPTIONAL_FEATURES)
        if unknown:
            parser.error(f"--variants: unknown features {sorted(unknown)}; expected some of "
                         f"{FEATURES + OPTIONAL_FEATURES} joined by '+'.")
    for bits in args.bits:
        steps = {(): make_step((), bits, args.mode, args.warmup, args.compile_mode)}
        for features in variants:
            steps[features] = make_step(features, bits, args.mode, args.warmup, args.compile_mode)
        times = {features: [] for features in steps}
        host = {features: [] for features in steps}
        for round_ in range(args.rounds):
            order = list(steps.items())
            for features, (step, _) in order[::-1] if round_ % 2 else order:  # alternate who goes first
                wall, cpu = back_to_back(step, args.iters)
                times[features].append(wall)
                host[features].append(cpu)
            print(json.dumps(dict(bits=bits, round=round_, wall_ms={"+".join(f) or "plain": round(t[-1], 3)
                                                                    for f, t in times.items()})), flush=True)
        for features in variants:
            rows.append(dict(model="bert-base", batch=32, seq=128, bits=bits,
                             mode=mode_label(args.mode, args.compile_mode),
                             features="+".join(features), base_ms=round(statistics.median(times[()]), 3),
                             ms=round(statistics.median(times[features]), 3),
                             **overhead_stats("overhead", times[features], times[()]),
                             base_host_ms=round(statistics.median(host[()]), 3),
                             host_ms=round(statistics.median(host[features]), 3),
                             **overhead_stats("host_overhead", host[features], host[()]),
                             base_warmup_s=round(steps[()][1], 1), warmup_s=round(steps[features][1], 1)))
            print(json.dumps(rows[-1]), flush=True)
        del steps
        torch.cuda.empty_cache()
    result = dict(provenance(), rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
