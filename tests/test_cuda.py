"""GPU paths against the eager reference: OBR and oscillation tracking run as compiled whole-model graphs on CUDA
(`hf_qvar.compile_utils.cuda_compiled`); ``HF_QVAR_COMPILE=0`` runs the same code eagerly. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from hf_qvar import QVarConfig, quantize_model
from hf_qvar.compile_utils import ENV_SWITCH
from hf_qvar.obr import obr_terms
from hf_qvar.oscillation import OscillationTracker
from tests.conftest import TINY, example_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(bits: int, steps: int = 6) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """A few SGD steps of a tiny BERT with OBR, tracking and freezing; returns tracker state, OBR terms, weights."""
    cls, make_config = TINY["bert"]
    torch.manual_seed(0)
    model = quantize_model(cls(make_config()), QVarConfig(bits=bits)).cuda().train()
    inputs = {k: v.cuda() for k, v in example_inputs("bert").items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    tracker = OscillationTracker(model, momentum=0.3, freeze_threshold=0.2)
    tracker.initialize()
    terms = []
    for _ in range(steps):
        dampening, bin_variance = obr_terms(model)
        loss = model(**inputs).logits.square().mean() + dampening + bin_variance
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tracker.update()
        terms += [dampening.detach(), bin_variance.detach()]
    return tracker.state, terms, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("bits", [1, 2])
def test_compiled_obr_and_tracking_match_eager_on_gpu(bits, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    eager = _train(bits)
    monkeypatch.setenv(ENV_SWITCH, "1")
    compiled = _train(bits)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-4, atol=1e-5)
    for name, state in eager[0].items():
        for field, value in state.items():
            torch.testing.assert_close(compiled[0][name][field], value, atol=1e-5, rtol=1e-4, msg=f"{name}.{field}")
    assert any(s["frozen_mask"].any() for s in eager[0].values()), "the run never froze a weight"
