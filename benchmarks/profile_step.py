"""Top CUDA kernels of one training step (torch.profiler), to see where quantization time goes.

    python benchmarks/profile_step.py --model bert-base --variant w4a4 --compiled
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import MODELS, VARIANTS, build, calibrate, make_batch, training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base", choices=list(MODELS))
    parser.add_argument("--variant", default="w4a4", choices=list(VARIANTS))
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model, batch_size = build(args.model, args.variant, "cuda")
    batch = make_batch(args.model, batch_size, "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    calibrate(model, batch)
    step = training_step(torch.compile(model) if args.compiled else model, optimizer, batch)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
