"""`cuda_compiled`: run a pure tensor function through ``torch.compile`` on CUDA tensors, eagerly elsewhere.

OBR and oscillation tracking do a dozen elementwise passes per quantized layer every step; eagerly that is a
kernel launch per pass and per layer (thousands per step on BERT-base), which made them cost several times the
training step itself. Compiled, each layer's work is one or two fused kernels. The function is the same Python
code on every path (CPU tests run it eagerly; a CPU test also checks the compiled version against it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

#: Set to ``0`` to run OBR and oscillation tracking eagerly on GPUs too (debugging, profiling).
ENV_SWITCH = "HF_QVAR_COMPILE"


def cuda_compiled(fn: F) -> F:
    """``fn`` compiled (``dynamic=True``: one graph serves layers of every shape) when its first argument is a
    CUDA tensor, plain ``fn`` otherwise or when ``HF_QVAR_COMPILE=0``. Arguments must be tensors, numbers or
    None (never modules: dynamo would guard on each module and recompile per layer)."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if args[0].is_cuda and os.environ.get(ENV_SWITCH, "1") != "0" and not torch.compiler.is_compiling():
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.compiled = lambda: torch.compile(fn, dynamic=True)  # for tests: the compiled path on any device
    return wrapper  # type: ignore[return-value]
