"""The analysis report: ``report.md`` with PNG plots (matplotlib, Agg backend) and every number in
``report.json``, all in one output folder."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .sites import KIND_ORDER

REPORT_MD, REPORT_JSON = "report.md", "report.json"
SENSITIVITY_PNG, KURTOSIS_PNG, OSCILLATION_PNG = "sensitivity.png", "kurtosis_heatmap.png", "oscillation.png"


_AXIS_LABELS = {
    "accuracy_drop": "accuracy drop vs full precision (percentage points)",
    "kl_to_fp": "KL(p_fp ‖ p) to the full-precision output (nats)",
    "disagreement_with_fp": "top-1 disagreement with full precision (% of sentences)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(sensitivity: dict, path: str) -> None:
    """Horizontal bars of the accuracy drop per group, most damaging on top, KL annotated."""
    plt = _pyplot()
    rows = sensitivity["groups"]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    y = np.arange(len(rows))
    key = sensitivity["rank_by"]
    ax.barh(y, [r[key] for r in rows], color="tab:red")
    ax.set_yticks(y, [r["group"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    for yi, r in zip(y, rows):
        ax.annotate(f"KL {r['kl_to_fp']:.2g}", (0, yi), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(_AXIS_LABELS[key])
    ax.set_ylabel("group quantized alone")
    ax.set_title(f"Module sensitivity, ranked by {key} (KL to full precision in nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kurtosis_grid(outliers: list[dict], source: str) -> tuple[list[int], list[str], np.ndarray]:
    """Layers × kinds matrix of the ``source`` (``weight``/``input``) kurtosis; NaN where no module."""
    layers = sorted({r["layer"] for r in outliers if r["layer"] is not None})
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k and r["layer"] is not None for r in outliers)]
    grid = np.full((len(layers), len(kinds)), np.nan)
    for r in outliers:
        if r["layer"] is not None and r["kind"] in kinds:
            grid[layers.index(r["layer"]), kinds.index(r["kind"])] = r[source]["kurtosis"]
    return layers, kinds, grid


def plot_kurtosis(outliers: list[dict], path: str) -> None:
    """Two heat-maps (weights, input activations) of log10 kurtosis, layer × module kind, values printed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, source in zip(axes, ("weight", "input")):
        layers, kinds, grid = kurtosis_grid(outliers, source)
        image = ax.imshow(np.log10(grid), aspect="auto", cmap="magma")
        ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="tab:cyan")
        ax.set_xlabel("module kind")
        ax.set_ylabel("layer (block index)")
        ax.set_title(f"{source} kurtosis (Pearson; Gaussian = 3)")
        fig.colorbar(image, ax=ax, label="log10 kurtosis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_oscillation(oscillation: dict, path: str) -> None:
    """Overall and frozen % over steps (left) and per-layer oscillation % when logged (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("overall", "oscillating"), ("frozen", "frozen")):
        if oscillation[key]["step"]:
            left.plot(oscillation[key]["step"], oscillation[key]["value"], marker=".", label=label)
    left.set_title("Weight oscillation, whole model")
    per_layer = oscillation["per_layer"]
    for layer, curve in per_layer.items():
        right.plot(curve["step"], curve["value"], linewidth=1, label=layer)
    right.set_title("Oscillation per layer" if per_layer else "Oscillation per layer (not logged)")
    if 0 < len(per_layer) <= 12:
        right.legend(fontsize=6)
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.set_ylabel("% of quantized weights")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(value):
    """NaN (e.g. the kurtosis of a constant tensor) -> null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def _markdown(result: dict) -> str:
    sens = result["sensitivity"]
    fp, full = sens["full_precision"], sens["fully_quantized"]
    lines = [
        f"# Quantization variation report: {result.get('model', 'model')}",
        "",
        f"Quantization: {result['quantization']}; {result['num_samples']} eval sentences, "
        f"analysis time {result['seconds']:.1f} s. All numbers: `{REPORT_JSON}`.",
        "",
        "## Module sensitivity",
        "",
        f"Full precision accuracy {fp['accuracy']:.2f} %; fully quantized {full['accuracy']:.2f} % "
        f"(agreement with FP {full['agreement_with_fp']:.1f} %, KL {_fmt(full['kl_to_fp'])} nats). "
        f"Each group below is quantized alone, everything else full precision; ranked by `{sens['rank_by']}`, "
        "ties by KL(p_fp ‖ p). A freshly initialised task head makes accuracy chance-level: rank by "
        "`kl_to_fp` then (`--rank_by kl_to_fp`).",
        "",
        f"![sensitivity]({SENSITIVITY_PNG})",
        "",
        "| rank | group | accuracy (%) | drop (pp) | KL to FP (nats) | agreement with FP (%) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['rank']} | {r['group']} | {r['accuracy']:.2f} | {r['accuracy_drop']:.2f} | {_fmt(r['kl_to_fp'])} "
              f"| {r['agreement_with_fp']:.1f} |" for r in sens["groups"]]
    lines += ["", "## Outliers", "", "Pearson kurtosis (3 = Gaussian) and max|x|/std of each module's weight and of "
              "its input activations over the eval set (padding tokens excluded), full precision.", "",
              f"![kurtosis]({KURTOSIS_PNG})", "",
              "| module | kind | weight kurtosis | weight max/std | input kurtosis | input max/std |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['module']} | {r['kind']} | {_fmt(r['weight']['kurtosis'])} | {_fmt(r['weight']['max_over_std'])} "
              f"| {_fmt(r['input']['kurtosis'])} | {_fmt(r['input']['max_over_std'])} |" for r in result["outliers"]]
    lines += ["", "## Oscillation", ""]
    osc = result.get("oscillation")
    if osc is None:
        lines.append("No training run given (`--training_run`).")
    elif not osc["overall"]["step"]:
        lines.append(f"`{osc['source']}` logs no `oscillation_pct` (train with QVarTrainer oscillation tracking).")
    else:
        last = {k: osc[k]["value"][-1] for k in ("overall", "frozen") if osc[k]["value"]}
        lines += [f"From `{osc['source']}`: final oscillation {_fmt(last.get('overall'))} %, frozen "
                  f"{_fmt(last.get('frozen'))} % of quantized weights; {len(osc['per_layer'])} layers logged "
                  "individually.", "", f"![oscillation]({OSCILLATION_PNG})"]
    return "\n".join(lines) + "\n"


def write_report(result: dict, output_dir: str) -> str:
    """Write ``report.md``, ``report.json`` and the PNGs to ``output_dir``; returns the Markdown path."""
    os.makedirs(output_dir, exist_ok=True)
    plot_sensitivity(result["sensitivity"], os.path.join(output_dir, SENSITIVITY_PNG))
    plot_kurtosis(result["outliers"], os.path.join(output_dir, KURTOSIS_PNG))
    plots = [SENSITIVITY_PNG, KURTOSIS_PNG]
    osc = result.get("oscillation")
    if osc is not None and osc["overall"]["step"]:
        plot_oscillation(osc, os.path.join(output_dir, OSCILLATION_PNG))
        plots.append(OSCILLATION_PNG)
    with open(os.path.join(output_dir, REPORT_JSON), "w") as handle:
        json.dump(_json_safe({**result, "plots": plots}), handle, indent=1, allow_nan=False)
    path = os.path.join(output_dir, REPORT_MD)
    with open(path, "w") as handle:
        handle.write(_markdown(result))
    return path
