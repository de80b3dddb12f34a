"""Oscillation curves (method.md §5.1) read back from a QVarTrainer run: the ``oscillation_pct``,
``frozen_pct`` and per-layer ``oscillation_pct/<layer>`` entries its logs leave in trainer_state.json."""

from __future__ import annotations

import glob
import json
import os
import re

TRAINER_STATE = "trainer_state.json"
_METRICS = ("oscillation_pct", "frozen_pct")


def find_trainer_state(run_dir: str) -> str:
    """``run_dir/trainer_state.json``, else the one of its latest ``checkpoint-<step>`` folder."""
    path = os.path.join(run_dir, TRAINER_STATE)
    if os.path.isfile(path):
        return path
    checkpoints = glob.glob(os.path.join(run_dir, "checkpoint-*", TRAINER_STATE))
    if not checkpoints:
        raise FileNotFoundError(f"No {TRAINER_STATE} in {run_dir!r} or its checkpoint-* folders.")
    return max(checkpoints, key=lambda p: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(p))) or 0))


def oscillation_curves(log_history: list[dict]) -> dict:
    """Curves over steps: ``overall`` and ``frozen`` (percent of quantized weights) and ``per_layer`` /
    ``frozen_per_layer`` where the run logged them; each curve is ``{"step": [...], "value": [...]}``."""
    curves: dict = {"overall": _empty(), "frozen": _empty(), "per_layer": {}, "frozen_per_layer": {}}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            metric, _, layer = key.partition("/")
            if metric not in _METRICS or not isinstance(value, (int, float)):
                continue
            if layer:
                table = curves["per_layer" if metric == "oscillation_pct" else "frozen_per_layer"]
                curve = table.setdefault(layer, _empty())
            else:
                curve = curves["overall" if metric == "oscillation_pct" else "frozen"]
            curve["step"].append(step)
            curve["value"].append(float(value))
    return curves


def read_oscillation(run_dir: str) -> dict:
    """`oscillation_curves` of the run in ``run_dir`` (the trainer_state.json path is kept as ``source``)."""
    path = find_trainer_state(run_dir)
    with open(path) as handle:
        history = json.load(handle).get("log_history", [])
    return {"source": path, **oscillation_curves(history)}


def _empty() -> dict[str, list]:
    return {"step": [], "value": []}
