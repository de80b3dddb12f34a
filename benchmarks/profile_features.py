"""Per-call wall time and CUDA kernel count of OBR (forward + backward) and of one oscillation-tracking step on
BERT-base, first (compiling) call apart: where the cost of issue 3's features comes from.

    python benchmarks/profile_features.py --bits 2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import build, calibrate, make_batch
from hf_qvar.obr import obr_terms
from hf_qvar.oscillation import OscillationTracker


def kernel_count(fn) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    model, batch_size = build("bert-base", f"w{args.bits}a{args.bits}", "cuda")
    calibrate(model, make_batch("bert-base", batch_size, "cuda"))
    tracker = OscillationTracker(model, freeze_threshold=0.1)
    tracker.initialize()  # freezing on: every quantizer holds a frozen mask, as in training
    features = {"tracking": tracker.update, "obr": lambda: sum(obr_terms(model)).backward()}
    for name, fn in features.items():
        start = time.time()
        fn()
        torch.cuda.synchronize()
        first = time.time() - start
        start = time.time()
        for _ in range(args.iters):
            fn()
        torch.cuda.synchronize()
        per_call = (time.time() - start) / args.iters
        print(f"{name}: first call {first:.1f} s, then {1000 * per_call:.2f} ms/call, "
              f"{kernel_count(fn)} CUDA kernels/call", flush=True)


if __name__ == "__main__":
    main()
