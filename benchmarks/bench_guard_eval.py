"""Host time of `torch.compile`'s guard evaluation per forward call, full precision vs quantized (CPU is enough).

Every call of a compiled model first checks its guards (attributes, types and tensor properties that the graph
assumed) on the host. A quantized model has about twice FP's guards (each quantizer's step-size parameter and the
attributes its forward reads), and in a GPU-bound step (CUDA graphs) that host time is not hidden. Dynamo with
``backend="aot_eager"`` installs the same guards as Inductor, so no code generation or GPU is needed:

    python benchmarks/bench_guard_eval.py --out benchmarks/results/guard_eval_cpu.json
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import MODELS, VARIANTS, build, provenance

GUARD_EVENT = "TorchDynamo Cache Lookup"


def lookup_us(model, batch: dict, calls: int, skip_guards: bool) -> float:
    """Mean host µs of Dynamo's cache lookup (guard evaluation) per call of the compiled ``model``."""
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(**batch)
    event = next(e for e in prof.key_averages() if e.key == GUARD_EVENT)
    return event.cpu_time_total / event.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="bert-base", choices=[m for m in MODELS if m.startswith("bert")])
    parser.add_argument("--variants", nargs="+", default=["fp", "w4a4", "w1a1"], choices=list(VARIANTS))
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # tiny: only the host-side lookup matters
    rows = []
    for variant in args.variants:
        model, _ = build(args.model, variant, "cpu")
        with torch.no_grad():
            model(**batch)  # calibrate activation steps before compiling, as training does
        compiled = torch.compile(model, backend="aot_eager")
        for _ in range(2):
            compiled(**batch).logits.sum().backward()
        rows.append(dict(model=args.model, variant=variant, calls=args.calls,
                         guard_eval_us=round(lookup_us(compiled, batch, args.calls, False), 1),
                         lookup_without_guards_us=round(lookup_us(compiled, batch, args.calls, True), 1)))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(provenance(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
