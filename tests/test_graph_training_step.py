"""`graph_training_step`: a whole quantized training step replayed from one CUDA graph equals the step run
eagerly; without a GPU (or with ``HF_QVAR_CUDA_GRAPHS=0``) the step itself is returned, untouched."""

from __future__ import annotations

import pytest
import torch

from hf_qvar import QVarConfig, graph_training_step, quantize_model
from hf_qvar import cuda_graphs
from tests.conftest import TINY, example_inputs


def test_without_a_gpu_the_step_itself_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []

    def step() -> int:
        calls.append(1)
        return len(calls)

    run = graph_training_step(step, warmup=3)
    assert run is step and len(calls) == 3, "the warm-up steps are taken on every device"


def test_switched_off_the_step_itself_runs(monkeypatch):
    monkeypatch.setenv(cuda_graphs.ENV_SWITCH, "0")
    calls = []
    step = lambda: calls.append(1)  # noqa: E731
    assert graph_training_step(step, warmup=2) is step and len(calls) == 2


def _training(bits: int, captured: bool, steps: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Losses of the steps after the warm-up, and the final parameters, of a tiny W{bits}A{bits} BERT trained with
    capturable AdamW under bf16 autocast (no dropout, so eager and replayed steps can be compared)."""
    cls, make_config = TINY["bert"]
    config = make_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = quantize_model(cls(config), QVarConfig(bits=bits, quantize_attention_probs=False)).cuda().train()
    # No attention mask: transformers' mask preparation inspects it on the host, which a capture forbids.
    inputs = {"input_ids": example_inputs("bert")["input_ids"].cuda(), "labels": torch.tensor([0, 1, 0]).cuda()}
    with torch.no_grad():
        model(**inputs)  # calibrate the activation steps before any capture
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    warmup = 2
    if captured:
        run = graph_training_step(step, warmup=warmup)  # takes the warm-up steps, records one more
    else:
        run = step
        for _ in range(warmup):
            step()
    losses = [run().clone() for _ in range(steps)]
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 1])
def test_replayed_step_matches_eager_steps(bits):
    eager_losses, eager_params = _training(bits, captured=False)
    replay_losses, replay_params = _training(bits, captured=True)
    assert len({loss.item() for loss in replay_losses}) > 1, "replays must train, not repeat one step"
    torch.testing.assert_close(replay_losses, eager_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replay_params, eager_params, rtol=1e-5, atol=1e-6)
