"""Oscillation tracking on hand-computed code sequences, freezing, state round trip, baking before save."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hf_qvar import QVarConfig
from hf_qvar.nn.qlinear import QuantizedLayerMixin
from hf_qvar.oscillation import OscillationTracker, bake_frozen_weights
from hf_qvar.quantizers.fake_quantizer import LSQWeightQuantizer
from hf_qvar.quantizers.functional import is_frozen
from tests.conftest import auto_class, example_inputs


class _Layer(QuantizedLayerMixin, torch.nn.Module):
    """One quantized weight with step 1, so its codes are ``round(W)``."""

    def __init__(self, values: list[float]):
        torch.nn.Module.__init__(self)
        self._init_quantizer_slots(None)
        self.weight = torch.nn.Parameter(torch.tensor([values]))
        self.weight_quantizer = LSQWeightQuantizer(4)


class _Model(torch.nn.Module):
    def __init__(self, values: list[float]):
        super().__init__()
        self.layer = _Layer(values)

    def set_codes(self, codes: list[float]) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([codes]))


def _run(sequences: list[list[int]], momentum: float, **kwargs) -> tuple[_Model, OscillationTracker]:
    """Feed per-weight code sequences (columns = weights) through a tracker."""
    steps = list(zip(*sequences))
    model = _Model(list(map(float, steps[0])))
    tracker = OscillationTracker(model, momentum=momentum, **kwargs)
    tracker.initialize()
    for codes in steps[1:]:
        model.set_codes(list(map(float, codes)))
        tracker.update()
    return model, tracker


def test_frequency_of_hand_computed_sequences():
    m = 0.1
    alternating = [0, 1] * 5           # events at steps 2..9
    monotone = list(range(10))         # never reverses
    pause_then_back = [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # one event at step 4 (last move was +1)
    staircase_up_down = [0, 1, 2, 2, 1, 1, 2, 2, 2, 2]  # events at steps 4 and 6
    _, tracker = _run([alternating, monotone, pause_then_back, staircase_up_down], momentum=m)
    freq = tracker.state["layer"]["frequency"][0]

    def from_events(events: list[int], n: int = 9) -> float:
        f = 0.0
        for t in range(1, n + 1):
            f = m * (t in events) + (1 - m) * f
        return f

    expected = [1 - (1 - m) ** 8, 0.0, from_events([4]), from_events([4, 6])]
    torch.testing.assert_close(freq, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert tracker.state["layer"]["last_direction"][0].tolist() == [1, 1, -1, 1]
    stats = tracker.stats(per_layer=True)
    oscillating = sum(f > 0.005 for f in expected)
    assert stats["oscillation_pct"] == pytest.approx(100 * oscillating / 4)
    assert stats["oscillation_pct/layer"] == stats["oscillation_pct"]
    assert "frozen_pct" not in stats


def test_freezing_at_rounded_ema_holds_code_and_blocks_gradient():
    m = 0.5
    # weight 0 oscillates 0,1,0 → f = 0.5 at step 2, EMA = 0.25 → frozen at 0; weight 1 rises monotonically.
    model, tracker = _run([[0, 1, 0], [2, 3, 4]], momentum=m, freeze_threshold=0.4)
    q = model.layer.weight_quantizer
    assert q.frozen_mask().tolist() == [[True, False]]
    assert q.frozen_codes.tolist() == [[0, q.qn - 1]]  # the frozen code, and the unfrozen marker below the grid
    assert tracker.stats()["frozen_pct"] == 50.0
    model.set_codes([3.0, 5.0])  # the latent weight moves, the frozen code does not
    out = model.layer.quantized_weight()
    assert out.tolist() == [[0.0, 5.0]]
    out.sum().backward()
    assert model.layer.weight.grad.tolist() == [[0.0, 1.0]]
    tracker.update()  # tracking sees the frozen code: no new event, frequency decays
    assert tracker.state["layer"]["frequency"][0, 0].item() == pytest.approx(0.25)


def test_state_round_trip_restores_frozen_codes(tmp_path):
    model, tracker = _run([[0, 1, 0, 1], [1, 2, 3, 4]], momentum=0.5, freeze_threshold=0.4)
    path = str(tmp_path / "osc.safetensors")
    tracker.save(path)
    fresh = _Model([1.0, 4.0])
    restored = OscillationTracker(fresh, momentum=0.5, freeze_threshold=0.4)
    restored.load(path)
    for field, value in tracker.state["layer"].items():
        assert torch.equal(restored.state["layer"][field], value), field
    assert torch.equal(fresh.layer.weight_quantizer.frozen_codes, model.layer.weight_quantizer.frozen_codes)
    with pytest.raises(ValueError, match="does not match"):
        OscillationTracker(torch.nn.ModuleDict({"other": _Layer([0.0, 1.0])})).load(path)


def test_version_1_state_with_separate_frozen_masks_loads_as_frozen_codes(tmp_path):
    """Version 1 kept a boolean mask beside codes that were 0 where nothing was frozen: 0 must not load as
    'frozen at code 0'."""
    model, tracker = _run([[0, 1, 0, 1], [1, 2, 3, 4]], momentum=0.5, freeze_threshold=0.4)
    state = {k: v.clone() for k, v in tracker.state["layer"].items()}
    frozen = model.layer.weight_quantizer.frozen_mask()
    assert frozen.tolist() == [[True, False]]
    v1 = {f"layer.{k}": v for k, v in state.items() if k != "frozen_codes"}
    v1["layer.frozen_mask"] = frozen
    v1["layer.frozen_codes"] = torch.where(frozen, state["frozen_codes"], 0).to(torch.int8)
    path = str(tmp_path / "osc_v1.safetensors")
    save_file(v1, path)
    fresh = _Model([1.0, 4.0])
    OscillationTracker(fresh, momentum=0.5, freeze_threshold=0.4).load(path)
    assert torch.equal(fresh.layer.weight_quantizer.frozen_codes, state["frozen_codes"])


def test_bake_then_reload_reproduces_the_frozen_forward_bit_identically(tiny_checkpoints, tmp_path):
    cls = auto_class("bert")
    model = cls.from_pretrained(tiny_checkpoints["bert"], quantization_config=QVarConfig(bits=2)).eval()
    inputs = example_inputs("bert")
    g = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, QuantizedLayerMixin):
            q = layer.weight_quantizer
            mask = torch.rand(layer.weight.shape, generator=g) < 0.3
            q.freeze(layer.weight, mask, torch.randint(q.qn, q.qp + 1, layer.weight.shape, generator=g))
    with torch.no_grad():
        frozen_logits = model(**inputs).logits
        assert bake_frozen_weights(model) > 0
        assert torch.equal(model(**inputs).logits, frozen_logits)
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert not any(m.weight_quantizer.frozen_codes is not None
                   for m in reloaded.modules() if isinstance(m, QuantizedLayerMixin))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, frozen_logits)


@pytest.mark.slow
def test_compiled_tracking_matches_eager():
    """GPUs run tracking and freezing of all layers as one compiled graph (`advance`, in-place state updates);
    it must leave the same states and frozen codes as the eager run. Checked with the CPU backend."""
    from hf_qvar.oscillation import advance

    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(-2, 2, (6, 1, 8), generator=g).float() for _ in range(2)]
    final = []
    for fn in (advance, advance.compiled()):
        models = [_Model(seq[0, 0].tolist()) for seq in sequences]
        tracker = OscillationTracker(torch.nn.ModuleList(models), momentum=0.3, freeze_threshold=0.4)
        tracker.initialize()
        for t in range(1, 6):
            for model, seq in zip(models, sequences):
                model.set_codes(seq[t, 0].tolist())
            fn(list(tracker.layers.values()), list(tracker.state.values()), 0.3, 0.4)
        final.append(tracker.state)
    for name, state in final[0].items():
        for field, value in state.items():
            torch.testing.assert_close(final[1][name][field], value, msg=f"{name}.{field}")
    assert any(is_frozen(s["frozen_codes"], LSQWeightQuantizer(4).qn).any() for s in final[0].values())


def test_latent_tensor_reader_sees_replaced_parameters_and_new_frozen_codes():
    """What the CUDA graphs of tracking and OBR are keyed on: the current weight, step size and frozen codes
    objects, looked up on every call (a checkpoint loader may swap Parameters)."""
    from hf_qvar.nn.qlinear import latent_tensor_reader

    layer = _Model([0.0, 1.0]).layer
    read = latent_tensor_reader([layer], frozen_codes=True)
    assert [t is s for t, s in zip(read(), (layer.weight, layer.weight_quantizer.step_size))] == [True, True]
    assert len(read()) == 2  # no frozen codes yet
    layer.weight = torch.nn.Parameter(torch.ones(1, 2))
    layer.weight_quantizer.step_size = torch.nn.Parameter(torch.full((1,), 0.5))
    layer.weight_quantizer.frozen_codes = layer.weight_quantizer.unfrozen_codes(layer.weight)
    weight, step, frozen = read()
    assert weight is layer.weight and step is layer.weight_quantizer.step_size
    assert frozen is layer.weight_quantizer.frozen_codes
    assert len(latent_tensor_reader([layer])()) == 2  # frozen codes only when asked for
