"""Oscillation curves (method.md §5.1) read back from a QVarTrainer run: the ``oscillation_pct``,
``frozen_pct`` and per-layer ``oscillation_pct/<layer>`` entries its logs leave in trainer_state.json, and the
OBR terms (method.md §5.3: ``obr_lambda``, ``obr_bin_variance``, ``obr_dampening``) when OBR was on."""

from __future__ import annotations

import glob
import json
import os
import re

TRAINER_STATE = "trainer_state.json"
_METRICS = ("oscillation_pct", "frozen_pct")
#: trainer_state.json key -> `obr_curves` key. ``obr_lambda`` is logged whenever ``obr_lambda_max > 0``; the two
#: terms only from the first logging window with λ > 0 (they are not even computed while λ = 0).
OBR_KEYS = {"obr_lambda": "lambda", "obr_bin_variance": "bin_variance", "obr_dampening": "dampening"}


def find_trainer_state(path: str) -> str:
    """The trainer_state.json of ``path``: the file itself, ``path/trainer_state.json`` (a run or checkpoint
    folder), else the one of its latest ``checkpoint-<step>`` folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} does not exist: expected a {TRAINER_STATE} file, a QVarTrainer output "
                                "folder or a checkpoint-<step> folder.")
    direct = os.path.join(path, TRAINER_STATE)
    if os.path.isfile(direct):
        return direct
    checkpoints = glob.glob(os.path.join(path, "checkpoint-*", TRAINER_STATE))
    if not checkpoints:
        raise FileNotFoundError(f"No {TRAINER_STATE} found: looked for {direct!r} and "
                                f"{os.path.join(path, 'checkpoint-*', TRAINER_STATE)!r}.")
    return max(checkpoints, key=lambda p: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(p))) or 0))


def obr_curves(log_history: list[dict]) -> dict | None:
    """``{"lambda", "bin_variance", "dampening"}`` curves (``{"step": [...], "value": [...]}``, each with its own
    steps) of a run that trained with OBR; ``None`` when the run logged no OBR key (OBR off)."""
    curves = {name: _empty() for name in OBR_KEYS.values()}
    for entry in log_history:
        for key, name in OBR_KEYS.items():
            value = entry.get(key)
            if isinstance(value, (int, float)):
                curves[name]["step"].append(entry.get("step"))
                curves[name]["value"].append(float(value))
    return curves if any(curve["step"] for curve in curves.values()) else None


def oscillation_curves(log_history: list[dict]) -> dict:
    """Curves over steps: ``overall`` and ``frozen`` (percent of quantized weights) and ``per_layer`` /
    ``frozen_per_layer`` where the run logged them; each curve is ``{"step": [...], "value": [...]}``.
    ``obr`` holds `obr_curves` (``None`` when OBR was off)."""
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
    curves["obr"] = obr_curves(log_history)
    return curves


def read_oscillation(path: str) -> dict:
    """`oscillation_curves` of a run: ``path`` is a trainer_state.json file, a QVarTrainer output folder or a
    checkpoint folder (`find_trainer_state`); the trainer_state.json path read is kept as ``source``."""
    state_path = find_trainer_state(path)
    with open(state_path) as handle:
        state = json.load(handle)
    if not isinstance(state, dict) or "log_history" not in state:
        raise ValueError(f"{state_path!r} is not a Trainer state file: it has no 'log_history'.")
    return {"source": state_path, **oscillation_curves(state["log_history"])}


def has_curves(oscillation: dict | None) -> bool:
    """Whether a `read_oscillation` result holds anything to plot (oscillation tracking or OBR)."""
    return oscillation is not None and bool(oscillation["overall"]["step"] or oscillation.get("obr"))


def _empty() -> dict[str, list]:
    return {"step": [], "value": []}


def _final(curve: dict) -> float | None:
    return curve["value"][-1] if curve["value"] else None


def oscillation_summary(oscillation: dict) -> dict:
    """Headline numbers of a `read_oscillation` result: final and peak oscillation %, final frozen %, final
    per-layer values (most oscillating first) and, with OBR, λ's start/max and the terms' first/last values."""
    overall = oscillation["overall"]
    peak = max(range(len(overall["value"])), key=overall["value"].__getitem__) if overall["value"] else None
    layers = sorted(set(oscillation["per_layer"]) | set(oscillation["frozen_per_layer"]))
    per_layer = [{"layer": name,
                  "oscillation_pct": _final(oscillation["per_layer"].get(name, _empty())),
                  "frozen_pct": _final(oscillation["frozen_per_layer"].get(name, _empty()))} for name in layers]
    per_layer.sort(key=lambda r: -(r["oscillation_pct"] or 0.0))
    summary = {
        "source": oscillation.get("source"),
        "final_step": overall["step"][-1] if overall["step"] else None,
        "final_oscillation_pct": _final(overall),
        "peak_oscillation_pct": None if peak is None else overall["value"][peak],
        "peak_oscillation_step": None if peak is None else overall["step"][peak],
        "final_frozen_pct": _final(oscillation["frozen"]),
        "per_layer_final": per_layer,
        "obr": None,
    }
    obr = oscillation.get("obr")
    if obr:
        lam = obr["lambda"]
        active = [s for s, v in zip(lam["step"], lam["value"]) if v > 0]
        summary["obr"] = {
            "lambda_max_logged": max(lam["value"]) if lam["value"] else None,
            "lambda_final": _final(lam),
            "first_step_with_lambda_above_0": active[0] if active else None,
            **{f"{name}_{which}": (obr[name]["value"][i] if obr[name]["value"] else None)
               for name in ("bin_variance", "dampening") for which, i in (("first", 0), ("last", -1))},
        }
    return summary
