"""hf_qvar.analysis: outliers, sensitivity ranking, oscillation curves, report folder and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from hf_qvar import QVarConfig, quantize_model
from hf_qvar.analysis import Moments, analyze, oscillation_curves, read_oscillation
from hf_qvar.analysis.report import (
    KURTOSIS_PNG, OBR_PNG, OSCILLATION_PNG, REPORT_JSON, REPORT_MD, SENSITIVITY_PNG, write_report,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(60)]


def _tiny(directory, save: bool = False) -> tuple[BertForSequenceClassification, BertTokenizerFast]:
    """Tiny random 2-layer BERT with a word-level tokenizer whose vocab lives in ``directory`` (both saved
    there with ``save``)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))
    os.makedirs(directory, exist_ok=True)
    vocab = os.path.join(directory, "vocab.txt")
    with open(vocab, "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=vocab)
    if save:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return model, tokenizer


def _sentences(n: int = 32, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(0, 60, (int(torch.randint(4, 12, (1,), generator=g)),),
                                                     generator=g)) for _ in range(n)]


def _labels_from_model(model, tokenizer, sentences: list[str]) -> list[int]:
    """The FP model's own predictions: full-precision accuracy is 100 %, any flip is a quantization drop."""
    with torch.no_grad():
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        return model.eval()(**batch).logits.argmax(-1).tolist()


def _write_trainer_state(directory: str, obr: bool = False) -> list[dict]:
    history = [
        {"step": 10, "loss": 1.0, "oscillation_pct": 2.0, "frozen_pct": 0.0,
         "oscillation_pct/bert.encoder.layer.0.attention.self.query": 3.0},
        {"step": 20, "eval_loss": 0.9},
        {"step": 30, "loss": 0.8, "oscillation_pct": 1.0, "frozen_pct": 0.5,
         "oscillation_pct/bert.encoder.layer.0.attention.self.query": 1.5},
    ]
    if obr:  # λ logged at every training log, the OBR terms once λ > 0
        history[0]["obr_lambda"] = 0.0
        history[2].update(obr_lambda=0.01, obr_bin_variance=0.5, obr_dampening=0.05)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "trainer_state.json"), "w") as handle:
        json.dump({"log_history": history}, handle)
    return history


def test_moments_kurtosis_of_gaussian_is_three():
    moments = Moments()
    for chunk in torch.randn(4, 250_000, generator=torch.Generator().manual_seed(0)):
        moments.update(chunk * 2 + 5)
    stats = moments.summary()
    assert stats["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert stats["std"] == pytest.approx(2.0, rel=0.01)


def test_heavy_tailed_weight_has_the_larger_kurtosis(tmp_path):
    model, tokenizer = _tiny(tmp_path)
    target = "bert.encoder.layer.0.intermediate.dense"
    with torch.no_grad():
        weight = model.get_submodule(target).weight
        weight.copy_(torch.distributions.StudentT(2.0).sample(weight.shape) * 0.02)
    sentences = _sentences(16)
    result = analyze(model, tokenizer, sentences, [0] * 16, bits=4)
    kurtosis = {r["module"]: r["weight"]["kurtosis"] for r in result["outliers"]}
    assert max(kurtosis, key=kurtosis.get) == target
    assert all(r["input"]["kurtosis"] > 0 for r in result["outliers"])


def test_fragile_module_ranks_first(tmp_path):
    model, tokenizer = _tiny(tmp_path)
    target = "bert.encoder.layer.1.attention.output.dense"
    with torch.no_grad():  # a large layer with a few outlier input columns: a 2-bit grid cannot hold both
        weight = model.get_submodule(target).weight
        weight.mul_(50.0)
        weight[:, :4] *= 30.0
        model.classifier.weight.mul_(50.0)  # readable logits from a random tiny model
    sentences = _sentences(32)
    labels = _labels_from_model(model, tokenizer, sentences)
    result = analyze(model, tokenizer, sentences, labels, bits=2, per_module=True)
    groups = result["sensitivity"]["groups"]
    holding = [g for g in groups if target in g["sites"]]
    assert {g["group"] for g in holding} == {"1/attention_output", "layer:1", "kind:attention_output"}
    assert groups[: len(holding)] == holding  # every group holding the fragile module outranks every other
    assert holding[0]["accuracy_drop"] > 50
    others = groups[len(holding):]
    assert min(g["kl_to_fp"] for g in holding) > 2 * max(g["kl_to_fp"] for g in others)


def test_already_quantized_model_is_probed_as_is(tmp_path):
    model, tokenizer = _tiny(tmp_path)
    quantize_model(model, QVarConfig(bits=4))
    steps = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight_quantizer.step_size")}
    result = analyze(model, tokenizer, _sentences(8), [0, 1] * 4, bits=2)
    assert result["quantization"] == "from the checkpoint"
    assert all(torch.equal(p, steps[n]) for n, p in model.named_parameters() if n in steps)
    assert result["sensitivity"]["fully_quantized"]["kl_to_fp"] > 0


def test_oscillation_curves_from_log_history(tmp_path):
    history = _write_trainer_state(str(tmp_path / "run" / "checkpoint-30"))
    curves = oscillation_curves(history)
    assert curves["overall"] == {"step": [10, 30], "value": [2.0, 1.0]}
    assert curves["frozen"] == {"step": [10, 30], "value": [0.0, 0.5]}
    assert curves["per_layer"] == {"bert.encoder.layer.0.attention.self.query": {"step": [10, 30], "value": [3.0, 1.5]}}
    read = read_oscillation(str(tmp_path / "run"))  # falls back to the latest checkpoint folder
    assert read["overall"] == curves["overall"] and read["source"].endswith("checkpoint-30/trainer_state.json")


def test_report_folder_has_markdown_plots_and_json(tmp_path):
    model, tokenizer = _tiny(tmp_path / "model")
    _write_trainer_state(str(tmp_path / "run"))
    result = analyze(model, tokenizer, _sentences(16), [0, 1] * 8, bits=2, training_run=str(tmp_path / "run"))
    path = write_report(result, str(tmp_path / "report"))
    assert os.path.basename(path) == REPORT_MD
    files = set(os.listdir(tmp_path / "report"))
    assert {REPORT_MD, REPORT_JSON, SENSITIVITY_PNG, KURTOSIS_PNG, OSCILLATION_PNG} <= files
    assert OBR_PNG not in files  # the run had no OBR
    data = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    kinds = {g["group"] for g in data["sensitivity"]["groups"]}
    assert {"kind:query", "kind:key", "kind:value", "kind:attention_output", "kind:mlp_input", "kind:mlp_output",
            "kind:attention_probs", "layer:0", "layer:1"} <= kinds
    markdown = (tmp_path / "report" / REPORT_MD).read_text()
    assert all(f"]({png})" in markdown for png in (SENSITIVITY_PNG, KURTOSIS_PNG, OSCILLATION_PNG))
    assert OBR_PNG not in markdown


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "hf_qvar.cli", "analyze", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("saved_quantized", [False, True], ids=["full_precision", "qvar_checkpoint"])
def test_cli_on_tiny_saved_model_and_csv(tmp_path, saved_quantized):
    model, _ = _tiny(tmp_path / "model", save=True)
    if saved_quantized:
        quantize_model(model, QVarConfig(bits=4))
        model.save_pretrained(tmp_path / "model")
    pd.DataFrame({"sentence": _sentences(24), "label": [0, 1] * 12}).to_csv(tmp_path / "eval.csv", index=False)
    _write_trainer_state(str(tmp_path / "run"), obr=True)
    proc = _run_cli("--model", str(tmp_path / "model"), "--eval_file", str(tmp_path / "eval.csv"),
                    "--num_samples", "20", "--rank_by", "kl_to_fp", "--training_run", str(tmp_path / "run"),
                    "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {REPORT_MD, REPORT_JSON, SENSITIVITY_PNG, KURTOSIS_PNG, OSCILLATION_PNG, OBR_PNG} <= set(
        os.listdir(tmp_path / "out"))
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert "## Module sensitivity" in markdown and f"]({OBR_PNG})" in markdown
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["oscillation"]["obr"]["bin_variance"] == {"step": [30], "value": [0.5]}
    assert data["num_samples"] == 20 and data["sensitivity"]["rank_by"] == "kl_to_fp"
    if saved_quantized:
        assert data["quantization"] == "from the checkpoint" and data["bits"] is None
    else:
        assert data["bits"] == 2
    kls = [g["kl_to_fp"] for g in data["sensitivity"]["groups"]]
    assert kls == sorted(kls, reverse=True)


@pytest.mark.slow
def test_cli_offline_default_minilm_rotten_tomatoes(tmp_path):
    proc = _run_cli("--model", "offline-minilm", "--num_samples", "64", "--rank_by", "kl_to_fp",
                    "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert data["num_samples"] == 64 and len(data["outliers"]) == 6 * 6 + 1  # 6 blocks × 6 linears + pooler
