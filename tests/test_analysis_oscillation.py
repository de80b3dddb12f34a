"""hf_qvar.analysis oscillation section: OBR curves, trainer_state lookup, OBR plot, oscillation-only report and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from hf_qvar.analysis import obr_curves, oscillation_curves, oscillation_summary, read_oscillation
from hf_qvar.analysis.report import (
    OBR_PNG, OSCILLATION_PNG, REPORT_JSON, REPORT_MD, _short_names, plot_obr, write_oscillation_report,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q, V = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"


def _history(obr: bool = True, tracking: bool = True) -> list[dict]:
    """Three training logs (λ ramps 0 -> 0.004 -> 0.01; the OBR terms only once λ > 0), an eval log in between
    and the Trainer's closing summary, as QVarTrainer leaves them in trainer_state.json."""
    logs = [
        {"step": 10, "loss": 1.0, "obr_lambda": 0.0},
        {"step": 20, "loss": 0.9, "obr_lambda": 0.004, "obr_bin_variance": 0.8, "obr_dampening": 0.02,
         "loss_obr": 0.82},
        {"step": 30, "loss": 0.8, "obr_lambda": 0.01, "obr_bin_variance": 0.7, "obr_dampening": 0.019,
         "loss_obr": 0.719},
    ]
    tracked = [(2.0, 0.0, 3.0, 1.0, 0.0, 0.0), (4.0, 1.0, 6.0, 1.5, 2.0, 0.5), (1.0, 2.5, 1.5, 0.5, 4.0, 1.0)]
    history = []
    for log, (osc, frozen, q_osc, v_osc, q_frozen, v_frozen) in zip(logs, tracked):
        if not obr:
            log = {k: v for k, v in log.items() if "obr" not in k}
        if tracking:
            log = {**log, "oscillation_pct": osc, "frozen_pct": frozen, f"oscillation_pct/{Q}": q_osc,
                   f"oscillation_pct/{V}": v_osc, f"frozen_pct/{Q}": q_frozen, f"frozen_pct/{V}": v_frozen}
        history.append(log)
    history.insert(2, {"step": 20, "eval_loss": 0.5, "eval_accuracy": 0.7})
    history.append({"step": 30, "train_loss": 0.9, "train_runtime": 1.0})
    return history


def _write_state(path: str, history: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"global_step": 30, "log_history": history}, handle)
    return path


def test_obr_curves_extracted_exactly():
    history = _history()
    expected = {"lambda": {"step": [10, 20, 30], "value": [0.0, 0.004, 0.01]},
                "bin_variance": {"step": [20, 30], "value": [0.8, 0.7]},
                "dampening": {"step": [20, 30], "value": [0.02, 0.019]}}
    assert obr_curves(history) == expected
    curves = oscillation_curves(history)
    assert curves["obr"] == expected
    assert curves["overall"] == {"step": [10, 20, 30], "value": [2.0, 4.0, 1.0]}
    assert curves["frozen_per_layer"][V] == {"step": [10, 20, 30], "value": [0.0, 0.5, 1.0]}


def test_no_obr_keys_means_obr_off():
    history = _history(obr=False)
    assert obr_curves(history) is None
    assert oscillation_curves(history)["obr"] is None
    assert oscillation_curves(history)["overall"]["value"] == [2.0, 4.0, 1.0]


def test_summary_numbers():
    summary = oscillation_summary({"source": "x", **oscillation_curves(_history())})
    assert summary["final_oscillation_pct"] == 1.0 and summary["final_frozen_pct"] == 2.5
    assert (summary["peak_oscillation_pct"], summary["peak_oscillation_step"]) == (4.0, 20)
    assert [r["layer"] for r in summary["per_layer_final"]] == [Q, V]  # most oscillating (1.5 > 0.5) first
    assert summary["per_layer_final"][1] == {"layer": V, "oscillation_pct": 0.5, "frozen_pct": 1.0}
    assert summary["obr"] == {"lambda_max_logged": 0.01, "lambda_final": 0.01, "first_step_with_lambda_above_0": 20,
                              "bin_variance_first": 0.8, "bin_variance_last": 0.7, "dampening_first": 0.02,
                              "dampening_last": 0.019}


def test_read_oscillation_accepts_file_run_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    old = _write_state(str(run / "checkpoint-9" / "trainer_state.json"), _history(obr=False))
    latest = _write_state(str(run / "checkpoint-30" / "trainer_state.json"), _history())
    from_run = read_oscillation(str(run))  # latest checkpoint by step number, not by name (9 > 30 as text)
    assert from_run["source"] == latest and from_run["obr"] is not None
    assert read_oscillation(str(run / "checkpoint-9"))["source"] == old
    from_file = read_oscillation(old)
    assert from_file["source"] == old and from_file["obr"] is None
    top = _write_state(str(run / "trainer_state.json"), _history(tracking=False))
    assert read_oscillation(str(run))["source"] == top  # the run's own file wins over its checkpoints


def test_read_oscillation_errors_name_what_was_looked_for(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        read_oscillation(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"trainer_state\.json.*checkpoint-\*"):
        read_oscillation(str(tmp_path / "empty"))
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 1}))
    with pytest.raises(ValueError, match="log_history"):
        read_oscillation(str(tmp_path / "other.json"))


def test_plot_obr_writes_a_png(tmp_path):
    path = tmp_path / OBR_PNG
    plot_obr(obr_curves(_history()), str(path))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 560)  # 8 × 5.6 in at 100 dpi
    lambda_only = {"lambda": {"step": [10], "value": [0.0]}, "bin_variance": {"step": [], "value": []},
                   "dampening": {"step": [], "value": []}}
    plot_obr(lambda_only, str(tmp_path / "flat.png"))  # OBR on but λ never left 0: still a figure
    assert os.path.getsize(tmp_path / "flat.png") > 1000


def test_short_layer_names():
    assert _short_names([Q, V]) == {Q: "layer.0.attention.self.query", V: "layer.1.attention.self.value"}
    assert _short_names(["a.b", "a.c"]) == {"a.b": "b", "a.c": "c"}


def test_oscillation_report_with_obr(tmp_path):
    state = _write_state(str(tmp_path / "run" / "trainer_state.json"), _history())
    path = write_oscillation_report(state, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / REPORT_MD)
    assert set(os.listdir(tmp_path / "out")) == {REPORT_MD, REPORT_JSON, OSCILLATION_PNG, OBR_PNG}
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert f"]({OBR_PNG})" in markdown and f"]({OSCILLATION_PNG})" in markdown
    assert "## Module sensitivity" not in markdown and "## Oscillation" in markdown
    assert "| 20 | 0.004 | 0.8 | 0.02 | 4 | 1 |" in markdown  # the merged per-step OBR table
    assert markdown.index(f"| {Q} |") < markdown.index(f"| {V} |")
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["plots"] == [OSCILLATION_PNG, OBR_PNG]
    assert data["oscillation"]["obr"]["bin_variance"] == {"step": [20, 30], "value": [0.8, 0.7]}
    assert data["oscillation"]["summary"]["obr"]["first_step_with_lambda_above_0"] == 20
    assert data["oscillation"]["source"] == state


def test_oscillation_report_without_obr_has_no_obr_figure(tmp_path):
    _write_state(str(tmp_path / "run" / "trainer_state.json"), _history(obr=False))
    write_oscillation_report(str(tmp_path / "run"), str(tmp_path / "out"))
    assert OBR_PNG not in os.listdir(tmp_path / "out")
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert OBR_PNG not in markdown and "OBR" not in markdown and f"]({OSCILLATION_PNG})" in markdown
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["plots"] == [OSCILLATION_PNG] and data["oscillation"]["obr"] is None


def test_oscillation_report_obr_without_tracking(tmp_path):
    _write_state(str(tmp_path / "run" / "trainer_state.json"), _history(tracking=False))
    write_oscillation_report(str(tmp_path / "run"), str(tmp_path / "out"))
    assert set(os.listdir(tmp_path / "out")) == {REPORT_MD, REPORT_JSON, OBR_PNG}
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert "oscillation tracking was off" in markdown and f"]({OBR_PNG})" in markdown
    assert OSCILLATION_PNG not in markdown


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "hf_qvar.cli", "analyze", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_training_run_alone_writes_the_oscillation_section(tmp_path):
    state = _write_state(str(tmp_path / "run" / "checkpoint-30" / "trainer_state.json"), _history())
    proc = _cli("--training_run", str(tmp_path / "run"), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Oscillation report" in proc.stdout
    assert set(os.listdir(tmp_path / "out")) == {REPORT_MD, REPORT_JSON, OSCILLATION_PNG, OBR_PNG}
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert "sensitivity" not in data and data["oscillation"]["source"] == state


def test_cli_needs_model_or_training_run(tmp_path):
    proc = _cli("--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "--model" in proc.stderr and "--training_run" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _cli("--training_run", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
