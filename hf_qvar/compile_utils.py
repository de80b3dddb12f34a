"""`cuda_compiled`: run a tensor function through ``torch.compile`` on CUDA, eagerly elsewhere.

OBR and oscillation tracking do a dozen elementwise passes per quantized layer every step. Eagerly, or
compiled one layer at a time, that is several kernel launches and a Python round trip per layer (hundreds per
step on BERT-base): the step became host-bound and the features cost as much as the training step itself.
Compiled over the list of all layers at once (tracking) or over layers stacked by shape (OBR), a step
launches a few fused kernels per layer or per stack. The function is the same Python code on every path
(CPU tests run it eagerly; CPU tests also check the compiled version against it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable)

#: Set to ``0`` to run OBR and oscillation tracking eagerly on GPUs too (debugging, profiling).
ENV_SWITCH = "HF_QVAR_COMPILE"
#: Distinct input shapes (hence graphs) one `cuda_compiled` function may compile in a process.
RECOMPILE_LIMIT = 64


def _is_cuda(obj: Any) -> bool:
    """Whether a tensor, a module (its first parameter) or the first item of a list lives on a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, nn.Module):
        first = next(obj.parameters(), None)
        return first is not None and first.is_cuda
    if isinstance(obj, (list, tuple)) and obj:
        return _is_cuda(obj[0])
    return False


def cuda_compiled(fn: F) -> F:
    """``fn`` compiled when its first argument (a tensor, a module or a list of them) is on a GPU, plain ``fn``
    otherwise, under an outer ``torch.compile``, or when ``HF_QVAR_COMPILE=0``.

    Shapes are static (``dynamic=True`` made Inductor leave the big reductions of OBR unsplit: 6× slower on
    BERT-base). A model's layers keep their shapes for a whole run, so each distinct shape compiles once per
    process; up to `RECOMPILE_LIMIT` of them (Swin has a dozen stack shapes) before falling back to eager.
    Call it with the same modules every step (their attributes are guarded)."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if os.environ.get(ENV_SWITCH, "1") != "0" and not torch.compiler.is_compiling() and _is_cuda(args[0]):
            if compiled is None:
                compiled = torch.compile(fn, dynamic=False)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.compiled = lambda: torch.compile(fn, dynamic=False)  # for tests: the compiled path on any device
    return wrapper  # type: ignore[return-value]
