"""Host time per call of the pieces of an eager quantized training step, against one plain PyTorch op.

An eager quantized step is bound by host Python (see the README's Performance section): this script says which
pieces cost how much, so that work on the eager path targets the right one. Each row is the mean host µs per call
over ``--calls`` calls launched back to back (one sync at the end), on BERT-base-sized tensors:

    python benchmarks/bench_host_overhead.py --out benchmarks/results/host_overhead_h100.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_train_step import provenance
from hf_qvar.quantizers import triton_kernels as kernels
from hf_qvar.quantizers.fake_quantizer import make_activation_quantizer, make_weight_quantizer


def host_us(fn, calls: int, device: str) -> float:
    """Mean host µs of ``fn()`` over ``calls`` calls after a warm-up (on a GPU, the GPU runs behind)."""
    for _ in range(5):
        fn()
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device != "cpu":
        torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test, without the Triton rows")
    args = parser.parse_args()
    device = args.device
    x = torch.randn(32 * 128, 768, device=device, requires_grad=True)
    w = torch.randn(768, 768, device=device, requires_grad=True)
    grad = torch.randn(32 * 128, 768, device=device)
    grad_out = grad.to(torch.bfloat16)
    grad_weight = torch.ones(768, 768, device=device, dtype=torch.bfloat16)
    weight_q = make_weight_quantizer(4, channels=768).to(device)
    weight_q.initialize(w)
    act_q = make_activation_quantizer(4).to(device)
    with torch.no_grad():
        act_q(x)  # calibrate
    step = act_q.step_size.detach()

    def autocast(fn):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn()
        return run

    pieces = {
        "torch op (x * 2)": lambda: x.detach() * 2,
        "empty_like": lambda: torch.empty_like(x),
        "triton forward launch": lambda: kernels.fake_quantize_forward(x.detach(), step, None, -8, 7),
        "triton backward (2 launches)": lambda: kernels.fake_quantize_backward(grad, x.detach(), step, None, -8, 7,
                                                                                grad_scale=0.1),
        "weight quantizer forward": autocast(lambda: weight_q(w)),
        "weight quantizer forward + backward": autocast(lambda: weight_q(w).backward(grad_weight)),
        "activation quantizer forward": autocast(lambda: act_q(x)),
        "activation quantizer + linear forward": autocast(lambda: act_q.linear(x, w, None)),
        "activation quantizer + linear forward + backward": autocast(
            lambda: act_q.linear(x, w, None).backward(grad_out)),
        "F.linear forward + backward": autocast(
            lambda: torch.nn.functional.linear(x, w).backward(grad_out)),
    }
    if device == "cpu":
        pieces = {name: fn for name, fn in pieces.items() if "triton" not in name}
    rows = []
    for name, fn in pieces.items():
        rows.append(dict(piece=name, host_us=round(host_us(fn, args.calls, device), 1)))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(provenance(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
