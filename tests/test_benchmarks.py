"""The result-suite tooling: command construction, salvage of killed runs' logs, the README table."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run_suite, results_table = _load("run_suite"), _load("results_table")


def _record(bits, rung, seed, final=None, epochs=()):
    return dict(tags=dict(bits=bits, rung=rung), seed=seed, final=None if final is None else {"eval_accuracy": final},
                epochs=[dict(epoch=e, eval_accuracy=a) for e, a in epochs],
                best_eval_accuracy=max([a for _, a in epochs] + ([final] if final is not None else [])))


def test_results_table_means_finished_seeds_and_marks_stopped_runs(tmp_path):
    records = {
        "text-w2a2-full-s1": _record("W2A2", "full", 1, 0.78, [(1, 0.75), (2, 0.78)]),
        "text-w2a2-full-s2": _record("W2A2", "full", 2, 0.77, [(1, 0.79), (2, 0.77)]),
        "text-w2a2-plain-s1": _record("W2A2", "plain", 1, None, [(1, 0.70), (2, 0.69)]),
        "text-fp-s1": _record("fp", "fp", 1, 0.83, [(1, 0.83)]),
    }
    for name, record in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    lines = results_table.table(str(tmp_path)).splitlines()
    assert lines[0] == "| run | bits | recipe | seed 1 | seed 2 | mean |"
    assert lines[2] == "| text-fp | fp | fp | 83.00 |  |  |"
    assert lines[3] == "| text-w2a2-plain | W2A2 | plain | 69.00 (best 70.00; stopped at epoch 2) |  |  |"
    assert lines[4] == "| text-w2a2-full | W2A2 | full | 78.00 | 77.00 (79.00) | 77.50 |"


def test_run_suite_commands_fill_seed_runs_dir_and_overrides(capsys):
    run_suite.main(["text", "--only", "w1a1-full", "--seeds", "3", "--out", "unused", "--runs_dir", "/r",
                    "--model", "m", "--skip_stages", "1", "--set", "num_train_epochs=2", "bf16", "--dry_run"])
    (line,) = capsys.readouterr().out.splitlines()
    assert "--seed 3" in line and "--output_dir /r/text-w1a1-full-s3" in line
    assert "--teacher_model_name_or_path /r/text-fp-s1" in line and "--obr_lambda_max 0.01" in line
    assert "--num_train_epochs 2" in line and "--num_train_epochs 6" not in line and line.endswith("--bf16")


def test_killed_run_keeps_its_logged_evaluations(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("noise\r 10%|#| 3/30 [00:01<00:09]\n{'eval_loss': '0.5', 'eval_accuracy': '0.81', 'epoch': '1.0'}\n"
                   "{'loss': '0.4', 'epoch': '1.5'}\nTraceback (most recent call last)\n")
    metrics = run_suite._metrics(str(tmp_path), finished=False)
    assert metrics["final"] is None
    assert metrics["epochs"] == [{"eval_loss": 0.5, "eval_accuracy": 0.81, "epoch": 1.0}]
    assert metrics["best_eval_accuracy"] == pytest.approx(0.81)


def test_trainer_state_is_kept_with_the_run_provenance(tmp_path):
    record = dict(name="text-w1a1-full-s1", command="python run_glue.py --bits 1", date="2026-11-24T00:00:00+00:00",
                  device="cpu", python="3.11", torch="2.13", transformers="5.24")
    out = tmp_path / "out" / "trainer_states" / "text-w1a1-full-s1.json"
    run_suite._keep_trainer_state(str(tmp_path), record, str(out))
    assert not out.exists()  # a run stopped before the end has no trainer_state.json
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "oscillation_pct": 1.5}]}))
    run_suite._keep_trainer_state(str(tmp_path), record, str(out))
    kept = json.loads(out.read_text())
    assert {k: kept[k] for k in run_suite.PROVENANCE} == {k: record[k] for k in run_suite.PROVENANCE}
    assert kept["run_record"] == "text-w1a1-full-s1.json"
    assert kept["log_history"] == [{"step": 5, "oscillation_pct": 1.5}]


def test_median_confidence_interval_covers_the_median_with_95_percent_probability():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the script imports its sibling bench_train_step
    median_ci = _load("bench_training_features").median_ci
    for n in (20, 31, 100, 150):
        values = [float(v) for v in range(n)]
        low, high = median_ci(values[::-1])
        j = int(low) + 1  # rank (1-based) of the lower bound; the upper one is symmetric
        assert high == n - j
        below = sum(math.comb(n, k) for k in range(j)) / 2**n  # P(fewer than j of n rounds fall below the median)
        assert 0.95 <= 1 - 2 * below < 0.99, n
    assert median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)


def test_train_step_ratios_need_a_full_precision_row_of_the_same_model_and_mode():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_train_step import add_fp_ratios

    rows = [dict(model="bert-base", mode="eager", variant="fp", step_ms=10.0, peak_gib=2.0),
            dict(model="bert-base", mode="eager", variant="w4a4", step_ms=15.0, peak_gib=2.5),
            dict(model="bert-base", mode="compiled:default", variant="w4a4", step_ms=12.0, peak_gib=2.5)]
    add_fp_ratios(rows)
    assert [(r["time_vs_fp"], r["memory_vs_fp"]) for r in rows] == [(1.0, 1.0), (1.5, 1.25), (None, None)]
    assert all("back_to_back_vs_fp" not in r for r in rows)
    timed_back_to_back = [dict(r, back_to_back_ms=ms) for r, ms in zip(rows, (8.0, 9.0, 9.5))]
    add_fp_ratios(timed_back_to_back)
    assert [r["back_to_back_vs_fp"] for r in timed_back_to_back] == [1.0, 1.125, None]


def test_gpu_idle_counts_only_time_no_kernel_covers():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_step import gpu_span_and_idle

    # Overlapping kernels (0-4, 2-6), a gap 6-8, one nested inside another (9-10 in 8-12), a gap 12-15.
    assert gpu_span_and_idle([(15.0, 16.0), (0.0, 4.0), (8.0, 12.0), (2.0, 6.0), (9.0, 10.0)]) == (16.0, 5.0)
    assert gpu_span_and_idle([(3.0, 5.0)]) == (2.0, 0.0)


def test_compiler_settings_are_applied_labelled_and_bad_ones_named(capsys):
    import argparse

    import torch._dynamo.config as dynamo_config

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_train_step import add_config_arguments, apply_config_settings, config_label

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--dynamo", "use_recursive_dict_tags_for_guards=True", "--inductor", "cpp_wrapper=True",
                              "--guard_filter", "skip_guard_on_all_nn_modules_unsafe"])
    before = dynamo_config.use_recursive_dict_tags_for_guards
    try:
        assert apply_config_settings(args.dynamo, "dynamo", parser) == {"use_recursive_dict_tags_for_guards": True}
        assert dynamo_config.use_recursive_dict_tags_for_guards is True
    finally:
        dynamo_config.use_recursive_dict_tags_for_guards = before
    assert config_label(args) == ("+cpp_wrapper=True+use_recursive_dict_tags_for_guards=True"
                                  "+guard_filter=skip_guard_on_all_nn_modules_unsafe")
    bad_settings = {"no_such_setting=1": "KEY a torch._dynamo.config setting",
                    "cache_size_limit=x y": "must be a Python literal"}
    for setting, message in bad_settings.items():
        with pytest.raises(SystemExit):
            apply_config_settings([setting], "dynamo", parser)
        assert message in capsys.readouterr().err


def test_installed_guards_counts_each_compiled_models_own_guard_tree():
    """`bench_guard_eval` counts the guards Dynamo installed: more for a quantized model than for the same model in
    full precision, more for more layers, and a class's earlier compiled models are not counted again."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_guard_eval import guard_managers, installed_guards
    from bench_train_step import compile_model
    from transformers import BertConfig, BertForSequenceClassification

    from hf_qvar import QVarConfig, quantize_model

    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    counts = {}
    for layers, bits, guard_filter in [(1, None, None), (1, 4, None), (2, 4, None),
                                       (2, 4, "skip_guard_on_all_nn_modules_unsafe")]:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                                         num_attention_heads=4, intermediate_size=64))
        if bits:
            quantize_model(model, QVarConfig(bits=bits, quantize_attention_probs=False))
        with torch.no_grad():
            model(input_ids=ids)  # calibrate
        known = guard_managers(model)
        compile_model(model, guard_filter=guard_filter, backend="aot_eager")(input_ids=ids)
        counts[layers, bits, guard_filter] = installed_guards(model, known)
    assert all(len(graphs) == 1 for graphs in counts.values()), counts
    assert counts[1, None, None][0] < counts[1, 4, None][0] < counts[2, 4, None][0], counts
    # PyTorch's filter leaves out every guard on module attributes: most of them.
    assert counts[2, 4, "skip_guard_on_all_nn_modules_unsafe"][0] < counts[1, None, None][0] / 2, counts


def test_cprofile_table_names_the_quantizers_backward(tmp_path):
    """`profile_step --cprofile` writes its provenance, then cProfile's table, which reaches the quantizers'
    backward functions."""
    import argparse
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_step import write_cprofile

    from hf_qvar.quantizers.fake_quantizer import make_weight_quantizer

    weight = torch.randn(8, 8, requires_grad=True)
    quantizer = make_weight_quantizer(4, channels=8)
    quantizer.initialize(weight)
    out = tmp_path / "cprofile.txt"
    args = argparse.Namespace(cprofile=str(out), steps=3, rows=200, model="tiny", variant="w4", compiled=False,
                              compile_mode=None)
    write_cprofile(lambda: quantizer(weight).sum().backward(), args)
    header, table = out.read_text().split("\n", 1)
    assert json.loads(header)["steps"] == 3 and json.loads(header)["backward_on_calling_thread"]
    assert "functional.py" in table and "(backward)" in table
