"""Per-call wall time, CUDA kernel time and kernel count of issue 3's features on BERT-base, first (compiling)
call apart: one oscillation-tracking step, OBR's gradient added after backward (`OBRGradient`, the trainer's
path), and OBR inside the loss (forward + backward of `obr_terms`, the fp16/FSDP/DeepSpeed path). Each with CUDA
graphs off and on (``HF_QVAR_CUDA_GRAPHS``), so launch cost and GPU work show apart; ``host_ms_per_call`` is this
thread's CPU time per call. ``--steps`` adds whole training steps without and with frozen weights.

    python benchmarks/profile_features.py --bits 2 --json results/profile_features_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import build, calibrate, make_batch, provenance
from bench_training_features import back_to_back, make_step
from hf_qvar import cuda_graphs
from hf_qvar.obr import OBRGradient, obr_terms
from hf_qvar.oscillation import OscillationTracker


def cuda_kernels(fn, top: int = 5) -> tuple[int, float, list[tuple[str, float]]]:
    """Kernels launched by one call of ``fn``, their summed GPU time in ms, and the ``top`` costliest."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: -e.self_device_time_total)
    costliest = [(e.key[:90], round(e.self_device_time_total / 1000, 3)) for e in events[:top]]
    return sum(e.count for e in events), sum(e.self_device_time_total for e in events) / 1000, costliest


def profile_call(name: str, fn, iters: int) -> dict:
    start = time.time()
    fn()
    torch.cuda.synchronize()
    first = time.time() - start
    for _ in range(cuda_graphs.WARMUP_CALLS + 1):  # past the warm-up calls and the capture
        fn()
    wall_ms, host_ms = back_to_back(fn, iters)
    kernels, gpu_ms, costliest = cuda_kernels(fn)
    row = dict(feature=name, cuda_graphs=cuda_graphs.graphs_enabled(), first_call_s=round(first, 1),
               ms_per_call=round(wall_ms, 3), host_ms_per_call=round(host_ms, 3),
               gpu_ms_per_call=round(gpu_ms, 3), kernels_per_call=kernels, costliest_kernels_ms=costliest)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--steps", nargs="*", default=[], choices=["eager", "compiled"],
                        help="also profile whole training steps in these modes, without and with 10%% of weights frozen")
    parser.add_argument("--json", help="write the rows, with provenance, to this file")
    args = parser.parse_args()
    rows = []
    for graphs in ("0", "1"):
        os.environ[cuda_graphs.ENV_SWITCH] = graphs
        model, batch_size = build("bert-base", f"w{args.bits}a{args.bits}", "cuda")
        calibrate(model, make_batch("bert-base", batch_size, "cuda"))
        tracker = OscillationTracker(model, freeze_threshold=0.1)
        tracker.initialize()  # freezing on: every quantizer holds frozen codes, as in training
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        obr = OBRGradient(model)
        rows.append(profile_call("tracking", tracker.update, args.iters))
        rows.append(profile_call("obr-gradient", lambda: obr.accumulate(0.01), args.iters))
        if graphs == "0":  # never graphed: part of the autograd graph of the loss
            rows.append(profile_call("obr-loss", lambda: sum(obr_terms(model)).backward(), args.iters))
        del model, tracker, obr
        torch.cuda.empty_cache()
    for mode in args.steps:  # what frozen codes cost the forward and backward (graphs on)
        for features in ((), ("freezing",)):
            step, _ = make_step(features, args.bits, mode, warmup=1)
            rows.append(profile_call(f"{mode} step" + "".join(f" + {f}" for f in features), step, args.iters))
            del step
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(provenance(), bits=args.bits, batch=batch_size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
