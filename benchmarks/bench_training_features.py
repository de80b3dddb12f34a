"""Cost of OBR + oscillation tracking + freezing on a BERT-base training step, measured side by side.

Same model, batch and optimizer; the step with the features adds ``λ·L_OBR`` to the loss (λ > 0, so OBR is
really computed), runs the oscillation tracker after every optimizer step, and has 10 % of every weight matrix
frozen (so the frozen forward path runs).

    python benchmarks/bench_training_features.py --out benchmarks/results/training_features_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import transformers

import hf_qvar
from bench_train_step import build, calibrate, make_batch, timed, training_step
from hf_qvar.obr import obr_loss
from hf_qvar.oscillation import OscillationTracker, quantized_weight_layers


def freeze_a_tenth(model) -> None:
    """Freeze a random 10 % of every quantized weight at its current code, as oscillation freezing would."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in quantized_weight_layers(model).values():
        quantizer = layer.weight_quantizer
        with torch.no_grad():
            quantizer.frozen_codes = quantizer.codes(layer.weight)
        quantizer.frozen_mask = torch.rand(layer.weight.shape, generator=g, device="cuda") < 0.1


FEATURES = ("obr", "tracking", "freezing")


def time_variant(features: tuple[str, ...], bits: int, warmup: int, iters: int) -> float:
    """Step time with the given subset of `FEATURES` switched on (``()`` = the plain QAT step)."""
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
    extra_loss = (lambda: 0.01 * obr_loss(model)) if "obr" in features else None
    step = training_step(model, optimizer, batch, extra_loss=extra_loss,
                         after_step=tracker.update if tracker is not None else None)
    return timed(step, warmup, iters)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rows = []
    variants = [(f,) for f in FEATURES] + [FEATURES]
    for bits in args.bits:
        base = time_variant((), bits, args.warmup, args.iters)
        for features in variants:
            ms = time_variant(features, bits, args.warmup, args.iters)
            rows.append(dict(model="bert-base", batch=32, seq=128, bits=bits, mode="eager", features="+".join(features),
                             base_ms=round(base, 3), ms=round(ms, 3), overhead=round(ms / base - 1, 4)))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(command="python " + " ".join(sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(), python=platform.python_version(), torch=torch.__version__,
                  transformers=transformers.__version__, hf_qvar=hf_qvar.__version__, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
