"""The analysis report: ``report.md`` with PNG plots (matplotlib, Agg backend) and every number in
``report.json``, all in one output folder."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np

from .oscillation import has_curves, oscillation_summary, read_oscillation
from .sites import KIND_ORDER

REPORT_MD, REPORT_JSON = "report.md", "report.json"
SENSITIVITY_PNG, KURTOSIS_PNG, OSCILLATION_PNG = "sensitivity.png", "kurtosis_heatmap.png", "oscillation.png"
OBR_PNG = "obr.png"
#: per-layer rows listed in report.md (all of them are in report.json)
MAX_LAYER_ROWS = 40


_AXIS_LABELS = {
    "accuracy_drop": "accuracy drop vs full precision (percentage points)",
    "kl_to_fp": "KL(p_fp ‖ p) to the full-precision output (nats)",
    "disagreement_with_fp": "top-1 disagreement with full precision (% of eval samples)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int = 100) -> None:
    """PNG with a 256-colour palette (a third of the RGBA size; the reports get committed), then close ``fig``."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    _pyplot().close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


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


def _short_names(names: list[str]) -> dict[str, str]:
    """Layer names without the dotted prefix they all share (``bert.encoder.layer.0.…`` -> ``layer.0.…``; an
    index keeps the segment it indexes)."""
    parts = [name.split(".") for name in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    while common and parts[0][common].isdigit():  # keep the name of an index: "layer.0", not "0"
        common -= 1
    return {name: ".".join(p[common:]) for name, p in zip(names, parts)}


def _per_layer_panel(ax, table: dict, what: str, highlight: int = 5) -> None:
    """One thin grey line per layer; the ``highlight`` layers with the highest peak value in colour, labelled."""
    if not table:
        ax.set_title(f"{what} per layer (not logged)")
        return
    short = _short_names(list(table))
    ranked = sorted(table, key=lambda name: -max(table[name]["value"], default=0.0))
    top = ranked if len(ranked) <= 8 else ranked[:highlight]
    for name in ranked:  # legend in rank order; the highlighted lines drawn above the grey ones
        curve = table[name]
        if name in top:
            ax.plot(curve["step"], curve["value"], linewidth=1.6, label=short[name], zorder=3)
        else:
            ax.plot(curve["step"], curve["value"], linewidth=0.7, color="0.75", zorder=2)
    rest = ("" if len(top) == len(ranked)
            else f"\n({len(top)} of {len(ranked)} layers, those with the highest peak, in colour)")
    ax.set_title(f"{what} per layer{rest}", fontsize=10)
    low, high = ax.get_ylim()
    ax.set_ylim(low, low + (high - low) * (1.15 + 0.07 * len(top)))  # headroom: the legend sits above the lines
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)


def plot_oscillation(oscillation: dict, path: str) -> None:
    """Overall oscillation and frozen % over steps (left), then oscillation % and frozen % per layer when logged."""
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    for key, label in (("overall", "oscillating"), ("frozen", "frozen")):
        if oscillation[key]["step"]:
            left.plot(oscillation[key]["step"], oscillation[key]["value"], marker=".", label=label)
    left.set_title("Oscillating and frozen weights, whole model", fontsize=10)
    left.legend(fontsize=8)
    _per_layer_panel(middle, oscillation["per_layer"], "Oscillating weights")
    _per_layer_panel(right, oscillation["frozen_per_layer"], "Frozen weights")
    for ax in (left, middle, right):
        ax.set_xlabel("training step (optimizer steps)")
        ax.set_ylabel("% of the layer's quantized weights" if ax is not left else "% of all quantized weights")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_obr(obr: dict, path: str) -> None:
    """OBR bin-variance term (top) and dampening term (bottom) over steps, each on its own linear axis, with the
    λ ramp on a twin axis; a dotted line marks the first logged step with λ > 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
    lam = obr["lambda"]
    start = next((s for s, v in zip(lam["step"], lam["value"]) if v > 0), None)
    panels = (("bin_variance", "tab:blue", "Bin-variance term: Σ per-bin variance of the latent weights"),
              ("dampening", "tab:green", "Dampening term: (ŵ − w_clip)², the pull to the grid point"))
    for ax, (name, colour, title) in zip(axes, panels):
        curve = obr[name]
        if curve["step"]:
            ax.plot(curve["step"], curve["value"], marker="o", markersize=3, color=colour, label=name)
        else:
            ax.text(0.5, 0.5, "not logged (λ stayed 0)", transform=ax.transAxes, ha="center", va="center")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel("weight units², Σ layers", color=colour)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(lam["step"], lam["value"], color="0.4", linestyle="--", linewidth=1.2)
        twin.set_ylabel("λ (OBR weight, dashed)", color="0.3")
        if start is not None:
            ax.axvline(start, color="0.5", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("training step (optimizer steps)")
    fig.suptitle("Oscillation-aware bin regularization (OBR)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


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


def _model_sections(result: dict) -> list[str]:
    sens = result["sensitivity"]
    fp, full = sens["full_precision"], sens["fully_quantized"]
    lines = [
        f"Quantization: {result['quantization']}; {result['num_samples']} eval "
        f"{result.get('inputs', 'sentences')}, "
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
    return lines + [""]


def _obr_lines(osc: dict, summary: dict) -> list[str]:
    obr, head = osc["obr"], summary["obr"]
    start = head["first_step_with_lambda_above_0"]
    lines = ["### Oscillation-aware bin regularization (OBR)", "",
             f"OBR was on: λ (cosine ramp) logged at {len(obr['lambda']['step'])} steps, above 0 from step "
             f"{start if start is not None else 'never'}, at most {_fmt(head['lambda_max_logged'])}. "
             f"Bin-variance term {_fmt(head['bin_variance_first'])} → {_fmt(head['bin_variance_last'])}, dampening "
             f"term {_fmt(head['dampening_first'])} → {_fmt(head['dampening_last'])} (weight units², summed over "
             "quantized layers; each logged value is the mean over that logging window's steps with λ > 0, the terms "
             "are not computed while λ = 0).", "", f"![OBR]({OBR_PNG})", "",
             "| step | λ | bin variance | dampening | oscillation (%) | frozen (%) |",
             "|---:|---:|---:|---:|---:|---:|"]
    by_step: dict = {}
    for column, curve in (("lambda", obr["lambda"]), ("bin_variance", obr["bin_variance"]),
                          ("dampening", obr["dampening"]), ("overall", osc["overall"]), ("frozen", osc["frozen"])):
        for step, value in zip(curve["step"], curve["value"]):
            by_step.setdefault(step, {})[column] = value
    for step in sorted(s for s in by_step if s is not None):
        row = by_step[step]
        lines.append(f"| {step} | {_fmt(row.get('lambda'))} | {_fmt(row.get('bin_variance'))} | "
                     f"{_fmt(row.get('dampening'))} | {_fmt(row.get('overall'))} | {_fmt(row.get('frozen'))} |")
    return lines + [""]


def _oscillation_lines(osc: dict | None) -> list[str]:
    lines = ["## Oscillation", ""]
    if osc is None:
        return lines + ["No training run given (`--training_run`)."]
    if not has_curves(osc):
        return lines + [f"`{osc['source']}` logs neither `oscillation_pct` nor OBR terms (train with QVarTrainer "
                        "oscillation tracking or OBR)."]
    summary = oscillation_summary(osc)
    if osc["overall"]["step"]:
        lines += [f"From `{osc['source']}`: final oscillation {_fmt(summary['final_oscillation_pct'])} % (peak "
                  f"{_fmt(summary['peak_oscillation_pct'])} % at step {summary['peak_oscillation_step']}), frozen "
                  f"{_fmt(summary['final_frozen_pct'])} % of quantized weights at step {summary['final_step']}; "
                  f"{len(osc['per_layer'])} layers logged individually.", "", f"![oscillation]({OSCILLATION_PNG})", ""]
        rows = summary["per_layer_final"]
        if rows:
            shown = rows[:MAX_LAYER_ROWS]
            more = f" (the {len(shown)} most oscillating of {len(rows)}; all in `{REPORT_JSON}`)" if len(shown) < len(
                rows) else ""
            lines += [f"Per layer at the last logged step{more}:", "",
                      "| layer | oscillation (%) | frozen (%) |", "|---|---:|---:|"]
            lines += [f"| {r['layer']} | {_fmt(r['oscillation_pct'])} | {_fmt(r['frozen_pct'])} |" for r in shown]
            lines.append("")
    else:
        lines += [f"`{osc['source']}` logs no `oscillation_pct` (oscillation tracking was off).", ""]
    if osc.get("obr"):
        lines += _obr_lines(osc, summary)
    return lines


def _markdown(result: dict) -> str:
    if "sensitivity" in result:
        lines = [f"# Quantization variation report: {result.get('model', 'model')}", ""] + _model_sections(result)
    else:
        lines = [f"# Oscillation report: {result.get('training_run', 'training run')}", "",
                 f"Training logs only (no model evaluated; `--model` adds sensitivity and outliers). All numbers: "
                 f"`{REPORT_JSON}`.", ""]
    return "\n".join(lines + _oscillation_lines(result.get("oscillation"))).rstrip("\n") + "\n"


def write_report(result: dict, output_dir: str) -> str:
    """Write ``report.md``, ``report.json`` and the PNGs to ``output_dir``; returns the Markdown path. A result
    without ``sensitivity`` (`write_oscillation_report`) gets the oscillation section alone."""
    os.makedirs(output_dir, exist_ok=True)
    plots = []
    if "sensitivity" in result:
        plot_sensitivity(result["sensitivity"], os.path.join(output_dir, SENSITIVITY_PNG))
        plot_kurtosis(result["outliers"], os.path.join(output_dir, KURTOSIS_PNG))
        plots += [SENSITIVITY_PNG, KURTOSIS_PNG]
    osc = result.get("oscillation")
    data = dict(result)
    if has_curves(osc):
        if osc["overall"]["step"]:
            plot_oscillation(osc, os.path.join(output_dir, OSCILLATION_PNG))
            plots.append(OSCILLATION_PNG)
        if osc.get("obr"):
            plot_obr(osc["obr"], os.path.join(output_dir, OBR_PNG))
            plots.append(OBR_PNG)
        data["oscillation"] = {**osc, "summary": oscillation_summary(osc)}
    with open(os.path.join(output_dir, REPORT_JSON), "w") as handle:
        json.dump(_json_safe({**data, "plots": plots}), handle, indent=1, allow_nan=False)
    path = os.path.join(output_dir, REPORT_MD)
    with open(path, "w") as handle:
        handle.write(_markdown(result))
    return path


def write_oscillation_report(training_run: str, output_dir: str) -> str:
    """The oscillation section alone, from a training run's logs (no model, no evaluation): ``training_run`` is a
    trainer_state.json file, a QVarTrainer output folder or a checkpoint folder. Returns the report.md path."""
    result = {"training_run": training_run, "oscillation": read_oscillation(training_run)}
    return write_report(result, output_dir)
