"""Top CUDA kernels of one training step (torch.profiler), to see where quantization time goes.

    python benchmarks/profile_step.py --model bert-base --variant w4a4 --compiled
    HF_QVAR_TRITON=0 python benchmarks/profile_step.py --variant w4a4 --json out.json   # eager, kernels off

``--cprofile FILE`` profiles the host's Python instead (cProfile over ``--steps`` steps, no torch.profiler), for
host-bound steps: which Python functions the host spends the step in, written to FILE sorted by own time.

``--json`` appends the per-step summary (profiled wall time, GPU kernel time, kernel count) with the command,
device, versions and date to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import MODELS, VARIANTS, build, calibrate, make_batch, provenance, training_step


def gpu_span_and_idle(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """From kernels' ``(start, end)`` times: the span from the first start to the last end, and the part of it in
    which no kernel ran (the GPU waiting for the host), in the same unit."""
    intervals = sorted(intervals)
    idle, busy_until = 0.0, intervals[0][0]
    for start, end in intervals:
        idle += max(0.0, start - busy_until)
        busy_until = max(busy_until, end)
    return busy_until - intervals[0][0], idle


def write_cprofile(step, args: argparse.Namespace) -> None:
    """cProfile's table of ``args.steps`` back-to-back steps (own time first) to ``args.cprofile``, with the
    provenance and the host ms per step (profiled, so inflated) on top. Autograd runs the backward on the calling
    thread here (cProfile sees one thread only; by default a CUDA backward runs on a device thread of autograd's)."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    table = io.StringIO()
    pstats.Stats(profiler, stream=table).sort_stats("tottime").print_stats(args.rows)
    header = dict(provenance(), model=args.model, variant=args.variant, compiled=args.compiled,
                  compile_mode=args.compile_mode, steps=args.steps, backward_on_calling_thread=True,
                  wall_ms_per_step_profiled=round(wall_ms, 1))
    with open(args.cprofile, "w") as handle:
        handle.write(json.dumps(header) + "\n" + table.getvalue())
    print(f"{wall_ms:.1f} ms per step (cProfile on) -> {args.cprofile}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base", choices=list(MODELS))
    parser.add_argument("--variant", default="w4a4", choices=list(VARIANTS))
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--json", help="append the per-step summary to this JSON-lines file")
    parser.add_argument("--trace", help="also write the profiler's Chrome trace (gzip if it ends in .gz)")
    parser.add_argument("--sort", default="cuda_time_total", help="e.g. self_cpu_time_total for host-bound steps")
    parser.add_argument("--cprofile", help="write cProfile's Python-function table of --steps steps to this file")
    parser.add_argument("--steps", type=int, default=20, help="steps profiled by --cprofile")
    args = parser.parse_args()
    model, batch_size = build(args.model, args.variant, "cuda")
    batch = make_batch(args.model, batch_size, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    calibrate(model, batch)
    forward = torch.compile(model, mode=args.compile_mode) if args.compiled else model
    step = training_step(forward, optimizer, batch)
    for _ in range(5):  # reduce-overhead records its CUDA graphs in the first two
        step()
    torch.cuda.synchronize()
    if args.cprofile:
        write_cprofile(step, args)
        return
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / 3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / 3
    span_us, idle_us = gpu_span_and_idle([(e.time_range.start, e.time_range.end) for e in kernels])
    print(f"per step: {wall_ms:.1f} ms wall (profiled), {gpu_ms:.1f} ms of GPU kernels, {len(kernels) / 3:.0f} "
          f"kernels, GPU idle {idle_us / 1000 / 3:.1f} of {span_us / 1000 / 3:.1f} ms")
    if args.json:
        record = dict(provenance(f"HF_QVAR_TRITON={os.environ.get('HF_QVAR_TRITON', '1')} "),
                      model=args.model, variant=args.variant,
                      compiled=args.compiled, compile_mode=args.compile_mode, wall_ms_profiled=round(wall_ms, 1),
                      gpu_kernel_ms=round(gpu_ms, 2), gpu_span_ms=round(span_us / 1000 / 3, 2),
                      gpu_idle_ms=round(idle_us / 1000 / 3, 2),
                      kernels_per_step=round(len(kernels) / 3))
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
