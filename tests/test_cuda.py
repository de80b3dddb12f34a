"""GPU paths against the eager reference: OBR and oscillation tracking run as compiled whole-model graphs on CUDA
(`hf_qvar.compile_utils.cuda_compiled`; ``HF_QVAR_COMPILE=0`` runs the same code eagerly), replayed from CUDA
graphs (`hf_qvar.cuda_graphs.GraphedStep`; ``HF_QVAR_CUDA_GRAPHS=0`` launches them directly). Skipped without
a GPU."""

from __future__ import annotations

import pytest
import torch

from hf_qvar import QVarConfig, quantize_model
from hf_qvar import cuda_graphs
from hf_qvar.compile_utils import ENV_SWITCH
from hf_qvar.obr import OBRGradient, obr_terms
from hf_qvar.oscillation import OscillationTracker
from tests.conftest import TINY, example_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(bits: int, steps: int = 6) -> tuple[OscillationTracker, list[torch.Tensor], list[torch.Tensor]]:
    """A few SGD steps of a tiny BERT with OBR, tracking and freezing; returns the tracker, OBR terms, weights."""
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
    return tracker, terms, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("bits", [1, 2])
def test_compiled_obr_and_tracking_match_eager_on_gpu(bits, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    eager = _train(bits)
    monkeypatch.setenv(ENV_SWITCH, "1")
    compiled = _train(bits)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-4, atol=1e-5)
    for name, state in eager[0].state.items():
        for field, value in state.items():
            torch.testing.assert_close(compiled[0].state[name][field], value, atol=1e-5, rtol=1e-4, msg=f"{name}.{field}")
    assert eager[0].stats()["frozen_pct"] > 0, "the run never froze a weight"


def _train_by_gradient(path: str, steps: int = 10) -> tuple[OBRGradient, OscillationTracker, list[torch.Tensor],
                                                             list[torch.Tensor]]:
    """SGD steps of a tiny 2-bit BERT with OBR's gradient added after backward, tracking and freezing; the tracker
    state makes a round trip through ``path`` half way (new state tensors: a graph must be captured anew)."""
    cls, make_config = TINY["bert"]
    torch.manual_seed(0)
    model = quantize_model(cls(make_config()), QVarConfig(bits=2)).cuda().train()
    inputs = {k: v.cuda() for k, v in example_inputs("bert").items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    tracker = OscillationTracker(model, momentum=0.3, freeze_threshold=0.2)
    tracker.initialize()
    obr = OBRGradient(model)
    terms = []
    for step in range(steps):
        model(**inputs).logits.square().mean().backward()
        terms += obr.accumulate(0.5)
        optimizer.step()
        optimizer.zero_grad()
        tracker.update()
        if step == steps // 2:
            tracker.save(path)
            tracker.load(path)
    return obr, tracker, terms, [p.detach().clone() for p in model.parameters()]


def test_cuda_graph_replays_match_direct_launches(monkeypatch, tmp_path):
    """After `WARMUP_CALLS` direct calls, OBR's gradient and the tracker replay captured graphs: same results."""
    monkeypatch.setenv(cuda_graphs.ENV_SWITCH, "0")
    direct = _train_by_gradient(str(tmp_path / "direct.safetensors"))
    monkeypatch.setenv(cuda_graphs.ENV_SWITCH, "1")
    replayed = _train_by_gradient(str(tmp_path / "replayed.safetensors"))
    assert direct[0]._step._graph is None and direct[1]._step._graph is None
    assert replayed[0]._step._graph is not None and replayed[1]._step._graph is not None
    torch.testing.assert_close(replayed[2], direct[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(replayed[3], direct[3], rtol=1e-5, atol=1e-6)
    for name, state in direct[1].state.items():
        for field, value in state.items():
            torch.testing.assert_close(replayed[1].state[name][field], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{field}")
    assert direct[1].stats()["frozen_pct"] > 0, "the run never froze a weight"


def test_graphed_step_captures_again_when_a_tensor_moves():
    box = {"x": torch.ones(4, device="cuda")}
    calls = []

    def double() -> torch.Tensor:
        calls.append(1)
        return box["x"].mul_(2).sum()

    step = cuda_graphs.GraphedStep(double, lambda: [box["x"]])
    sums = [step().item() for _ in range(4)]  # 2 direct calls, a capture, then replays
    assert sums == [8.0, 16.0, 32.0, 64.0] and len(calls) == cuda_graphs.WARMUP_CALLS + 1
    box["x"] = torch.ones(4, device="cuda")  # a new tensor: the old graph would write to the old one
    sums = [step().item() for _ in range(4)]
    assert sums == [8.0, 16.0, 32.0, 64.0] and len(calls) == 2 * (cuda_graphs.WARMUP_CALLS + 1)
    assert torch.equal(box["x"], torch.full((4,), 16.0, device="cuda"))


def _trainer_on_gpu(tmp_path, graphs: str, monkeypatch):
    """QVarTrainer on CUDA with OBR (by gradient), tracking and freezing, pinned-memory data loading."""
    from transformers import BertForSequenceClassification

    from hf_qvar import QVarTrainer, QVarTrainingArguments
    from tests.accelerate_train_tiny import calibration_batch, text_dataset, tiny_bert

    monkeypatch.setenv(cuda_graphs.ENV_SWITCH, graphs)
    path = tiny_bert(str(tmp_path / f"student{graphs}"), seed=0)
    model = BertForSequenceClassification.from_pretrained(path, quantization_config=QVarConfig(bits=2)).cuda()
    with torch.no_grad():
        model(**{k: v.cuda() for k, v in calibration_batch().items()})
    args = QVarTrainingArguments(
        output_dir=str(tmp_path / f"out{graphs}"), report_to="none", save_strategy="no", logging_steps=1, seed=0,
        disable_tqdm=True, learning_rate=5e-3, per_device_train_batch_size=4, max_steps=12, dataloader_pin_memory=True,
        obr_lambda_max=0.01, obr_start=0.0, oscillation_freeze_threshold=0.3, oscillation_momentum=0.5)
    trainer = QVarTrainer(model=model, args=args, train_dataset=text_dataset(32))
    trainer.train()
    return trainer


def test_trainer_replays_graphs_and_matches_direct_launches(tmp_path, monkeypatch):
    direct = _trainer_on_gpu(tmp_path, "0", monkeypatch)
    replayed = _trainer_on_gpu(tmp_path, "1", monkeypatch)
    assert replayed._obr_gradient._step._graph is not None and replayed.tracker._step._graph is not None
    for (name, a), b in zip(direct.model.state_dict().items(), replayed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    logged = [h["loss_obr"] for h in replayed.state.log_history if "loss_obr" in h]
    assert logged == pytest.approx([h["loss_obr"] for h in direct.state.log_history if "loss_obr" in h], rel=1e-4)
    assert replayed.tracker.stats()["frozen_pct"] > 0


def test_per_step_training_features_never_sync_with_the_host(tmp_path, monkeypatch):
    """After the capture, what QVarTrainer adds to a step (λ's log entry, OBR's gradient, tracking and freezing)
    queues GPU work only: a host sync would stall the host-bound eager step until the GPU drains."""
    trainer = _trainer_on_gpu(tmp_path, "1", monkeypatch)
    for param in trainer.model.parameters():
        param.grad = torch.zeros_like(param)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lam = trainer._record_obr_lambda()
        trainer._obr_gradient.accumulate(lam)
        trainer.tracker.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lam > 0 and trainer._obr_gradient._step._graph is not None and trainer.tracker._step._graph is not None
