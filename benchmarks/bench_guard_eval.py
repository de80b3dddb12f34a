"""Host time of `torch.compile`'s guard evaluation per forward call, full precision vs quantized (CPU is enough).

Every call of a compiled model first checks its guards (attributes, types and tensor properties that the graph
assumed) on the host. A quantized model has about twice FP's guards (each quantizer's step-size parameter and the
attributes its forward reads), and in a GPU-bound step (CUDA graphs) that host time is not hidden. Dynamo with
``backend="aot_eager"`` installs the same guards as Inductor, so no code generation or GPU is needed:

    python benchmarks/bench_guard_eval.py --out benchmarks/results/guard_eval_cpu.json

Each row also counts the guards of the model's compiled graph (``guards``, one number per graph: the leaf guards of
the guard tree Dynamo installed), which, unlike the time, does not depend on how busy the host is.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import (MODELS, VARIANTS, add_config_arguments, apply_config_arguments, build, compile_model,
                              config_label, provenance)

GUARD_EVENT = "TorchDynamo Cache Lookup"


def lookup_us(model, batch: dict, calls: int, skip_guards: bool) -> float:
    """Mean host µs of Dynamo's cache lookup (guard evaluation) per call of the compiled ``model``."""
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(**batch)
    event = next(e for e in prof.key_averages() if e.key == GUARD_EVENT)
    return event.cpu_time_total / event.count


def _cache_entries(model: torch.nn.Module) -> list:
    """Dynamo's cache entries (one per compiled graph) of ``model``'s class: its compiled models share its
    ``forward``'s cache."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return _debug_get_cache_entry_list(type(model).forward.__code__)


def guard_managers(model: torch.nn.Module) -> set[int]:
    """Ids of the guard managers of the graphs compiled so far for ``model``'s class (see `installed_guards`)."""
    return {id(e.guard_manager) for e in _cache_entries(model)}


def installed_guards(model: torch.nn.Module, known: set[int]) -> list[int]:
    """Leaf guards in the guard tree of each graph compiled for ``model``'s class since ``known`` (`guard_managers`
    before compiling), counted in the tree Dynamo installed. (A guard filter sees many more entries: it is shown a
    guard once for every source that reaches it.)"""

    def count(node) -> int:  # dict managers hold their entries' managers apart from their children
        children = list(node.get_child_managers())
        if hasattr(node, "get_key_value_managers"):
            children += [m for pair in node.get_key_value_managers().values() for m in pair if m is not None]
        return len(node.get_leaf_guards()) + sum(count(child) for child in children)

    return [count(e.guard_manager.root) for e in _cache_entries(model) if id(e.guard_manager) not in known]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="bert-base", choices=[m for m in MODELS if m.startswith("bert")])
    parser.add_argument("--variants", nargs="+", default=["fp", "w4a4", "w1a1"], choices=list(VARIANTS))
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of --calls calls per variant, variants interleaved; rows give the median round")
    add_config_arguments(parser)
    args = parser.parse_args()
    settings = apply_config_arguments(args, parser)
    if args.guard_filter and len(args.variants) > 1:  # see `compile_model`: the variants' graphs cannot coexist
        parser.error("--guard_filter: time one variant per run (a filtered graph would also serve the others).")
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # tiny: only the host-side lookup matters
    compiled = {}
    for variant in args.variants:
        model, _ = build(args.model, variant, "cpu")
        with torch.no_grad():
            model(**batch)  # calibrate activation steps before compiling, as training does
        known = guard_managers(model)
        compiled_model = compile_model(model, guard_filter=args.guard_filter, backend="aot_eager")
        for _ in range(2):
            compiled_model(**batch).logits.sum().backward()
        compiled[variant] = compiled_model, installed_guards(model, known)
    rounds = {variant: ([], []) for variant in args.variants}
    for _ in range(args.repeats):  # interleaved, so drifts of the host's speed hit every variant alike
        for variant, (model, _) in compiled.items():
            rounds[variant][0].append(lookup_us(model, batch, args.calls, False))
            rounds[variant][1].append(lookup_us(model, batch, args.calls, True))
    rows = []
    for variant, (with_guards, without) in rounds.items():
        rows.append(dict(model=args.model, variant=variant, config=config_label(args) or "default",
                         guards=compiled[variant][1], calls=args.calls, repeats=args.repeats,
                         guard_eval_us=round(statistics.median(with_guards), 1),
                         guard_eval_us_rounds=[round(v, 1) for v in with_guards],
                         lookup_without_guards_us=round(statistics.median(without), 1)))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(provenance(), **settings, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
