"""CUDA graphs: `GraphedStep` replays a per-step tensor computation (OBR, tracking); `graph_training_step` a whole
training step of a custom loop.

OBR's gradient and the oscillation tracker launch the same few hundred kernels on the same tensors after every
training step. Launched from Python that is host time (≈ 15 ms and 3 ms per BERT-base step on the H100 host,
more than the GPU needs for the work); captured once into a CUDA graph, a step is a single launch.

A graph reads and writes its tensors at the addresses they had at capture time. Every call therefore checks
the addresses (and ``requires_grad``) of the tensors the computation touches and captures anew when one
changed (a checkpoint load, ``model.to``); the captured tensors' storages are kept alive, so no other tensor
can take over an address unnoticed. Anywhere a graph cannot be used (CPU, ``torch.compile`` tracing, an outer
capture, tensors on several devices, ``HF_QVAR_CUDA_GRAPHS=0``) the function simply runs.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
_requires_grad = operator.attrgetter("requires_grad")

#: Set to ``0`` to launch the kernels from Python every step (debugging, profiling).
ENV_SWITCH = "HF_QVAR_CUDA_GRAPHS"
#: Direct calls before the capture: they compile the function and initialise lazy CUDA state.
WARMUP_CALLS = 2


def graphs_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class GraphedStep(Generic[T]):
    """Calls ``fn()`` directly `WARMUP_CALLS` times, then captures it and replays the graph on later calls.

    ``fn`` must be a fixed computation on the tensors that ``tensors()`` lists (every tensor it reads or writes
    that outlives a call), without host synchronisation. Outputs are the graph's own tensors, overwritten by the
    next replay: clone what you keep.
    """

    def __init__(self, fn: Callable[[], T], tensors: Callable[[], list[torch.Tensor]]):
        self.fn, self.tensors = fn, tensors
        self._key: tuple | None = None  # data pointers and requires_grad flags of the touched tensors
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: T | None = None
        self._storages: list[torch.UntypedStorage] = []
        self._direct_calls = 0
        self._device: int | None = None

    def __call__(self) -> T:
        tensors = self.tensors()
        key = (*map(torch.Tensor.data_ptr, tensors), *map(_requires_grad, tensors))  # C-level loops: µs, not ms
        if key != self._key:  # new tensors (or a change of what autograd differentiates): capture again
            self.reset()
            self._key, self._device = key, self._capture_device(tensors)
        if not self._may_capture():
            return self.fn()
        if self._graph is None:
            if self._direct_calls < WARMUP_CALLS:
                self._direct_calls += 1
                return self.fn()
            self._capture(tensors)
        self._graph.replay()
        return self._outputs

    def reset(self) -> None:
        """Forget the graph: the next calls warm up and capture again (for owners that replace tensors which
        ``tensors()`` leaves out)."""
        self._key, self._graph, self._outputs, self._storages, self._direct_calls = None, None, None, [], 0
        self._device = None

    @staticmethod
    def _capture_device(tensors: list[torch.Tensor]) -> int | None:
        """The GPU index of ``tensors`` if they all live on one GPU (checked once per set of tensors), else None."""
        if not (tensors and all(t.is_cuda for t in tensors)):
            return None
        device = tensors[0].device
        return device.index if all(t.device == device for t in tensors) else None

    def _may_capture(self) -> bool:
        """Per call: one GPU, the current one, outside ``torch.compile`` tracing and outer captures, not switched off."""
        if self._device is None or not graphs_enabled() or torch.compiler.is_compiling():
            return False
        return torch.cuda.current_device() == self._device and not torch.cuda.is_current_stream_capturing()

    def _capture(self, tensors: list[torch.Tensor]) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread_local: data-loader threads may pin memory while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._outputs = self.fn()  # recorded, not run: the replay below runs it
        self._graph, self._storages = graph, [t.untyped_storage() for t in tensors]


def graph_training_step(step: Callable[[], T], warmup: int = 3) -> Callable[[], T]:
    """PyTorch's whole-network capture for custom training loops: run ``step`` ``warmup`` times (on a side stream),
    capture one more call into a CUDA graph and return its replay, which takes one step per call. Without a GPU,
    or with ``HF_QVAR_CUDA_GRAPHS=0``, ``step`` runs its ``warmup`` calls and is returned itself: either way
    ``warmup`` steps have been taken when this returns.

    Why: a quantized training step is bound by host work (Python, autograd, kernel launches, Dynamo's guards);
    replayed from one graph it costs the GPU's time only (BERT-base W4A4 on the H100: 1.01× the FP step compiled,
    1.20× eager; see the README's Performance section). ``step`` must be a fixed computation on tensors that keep
    their addresses: copy each batch into the same input tensors, use a capturable optimizer
    (``AdamW(..., capturable=True)``), autocast with ``cache_enabled=False``, calibrate activation steps before,
    and do nothing that synchronises with the host (``.item()``, data-dependent shapes or Python branches on tensor
    values, e.g. Hugging Face attention-mask checks). Its outputs are the graph's tensors, overwritten by each
    replay.
    """
    if not (torch.cuda.is_available() and graphs_enabled()):
        for _ in range(warmup):
            step()
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> T:
        graph.replay()
        return outputs

    return replay
