"""``hf-qvar`` command line (also ``python -m hf_qvar.cli``)."""

from __future__ import annotations

import argparse
import logging
import time

from .analysis.sensitivity import RANK_KEYS

#: ``--model`` value for the bundled offline MiniLM-L6 (`hf_qvar.assets.minilm_path`).
OFFLINE_MINILM = "offline-minilm"


def _analyze(args: argparse.Namespace) -> None:
    """Load model + eval set (text or image, from the model's config), run the analysis, write the report
    folder; with ``--training_run`` and no ``--model``, only the oscillation section (training logs, no model
    evaluated)."""
    from .analysis.report import write_oscillation_report, write_report

    start = time.perf_counter()
    if args.training_run is not None:  # fail before any model work on a wrong path
        from .analysis.oscillation import find_trainer_state

        try:
            find_trainer_state(args.training_run)
        except FileNotFoundError as error:
            raise SystemExit(f"hf-qvar analyze --training_run: {error}") from None
    if args.model is None:
        if args.training_run is None:
            raise SystemExit(
                "hf-qvar analyze: give --model (a from_pretrained path, a Hub id, or "
                f"'{OFFLINE_MINILM}' for the bundled MiniLM-L6) and/or --training_run (a QVarTrainer output "
                "folder, checkpoint folder or trainer_state.json; alone it writes the oscillation section only)."
            )
        path = write_oscillation_report(args.training_run, args.output_dir)
        print(f"Oscillation report (training logs only) written to {path} in {time.perf_counter() - start:.1f} s.")
        return
    model_path = args.model
    if model_path == OFFLINE_MINILM:
        from .assets import minilm_path

        model_path = minilm_path()
    result = _analyze_images(args, model_path) if _is_image_model(model_path) else _analyze_text(args, model_path)
    result["model"] = ("MiniLM-L6 (offline, hf_qvar.assets.minilm_path)" if args.model == OFFLINE_MINILM
                       else args.model)
    path = write_report(result, args.output_dir)
    print(f"Report written to {path} in {time.perf_counter() - start:.1f} s.")


def _is_image_model(model_path: str) -> bool:
    """Image classifier (its config has ``num_channels``/``image_size`` and no vocabulary) or text."""
    from transformers import AutoConfig

    from .analysis import is_image_config

    return is_image_config(AutoConfig.from_pretrained(model_path))


def _analyze_text(args: argparse.Namespace, model_path: str) -> dict:
    """Sentence classifier on ``--eval_file`` or the offline Rotten Tomatoes dev split."""
    from .analysis import analyze, load_eval_set, load_model

    if args.dataset == "fashion_mnist":
        raise SystemExit(f"hf-qvar analyze: --dataset fashion_mnist needs an image classifier; {args.model!r} "
                         "is a text model (its config has a vocabulary or no num_channels/image_size).")
    sentences, labels = load_eval_set(args.eval_file, args.num_samples)
    model, tokenizer = load_model(model_path, num_labels=max(max(labels) + 1, 2))
    result = analyze(
        model, tokenizer, sentences, labels, bits=args.bits, training_run=args.training_run,
        per_module=args.per_module, rank_by=args.rank_by, batch_size=args.batch_size, max_length=args.max_length,
    )
    result["eval_set"] = args.eval_file or "Rotten Tomatoes dev (offline, hf_qvar.assets.rotten_tomatoes)"
    return result


def _analyze_images(args: argparse.Namespace, model_path: str) -> dict:
    """Image classifier on the offline Fashion-MNIST test split (the only image eval set)."""
    from .analysis import analyze_batches, fashion_mnist_batches, image_statistics, load_image_model

    if args.eval_file is not None or args.dataset == "rotten_tomatoes":
        raise SystemExit(f"hf-qvar analyze: {args.model!r} is an image classifier; --eval_file and --dataset "
                         "rotten_tomatoes are sentence eval sets. Image models are evaluated on "
                         "--dataset fashion_mnist (the default for them), a 10-class 28x28 greyscale test set.")
    model = load_image_model(model_path, num_labels=10)
    mean, std = image_statistics(model_path, model.config.num_channels)
    try:
        batches, labels = fashion_mnist_batches(model, mean, std, args.num_samples, args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"hf-qvar analyze: no image eval set for {args.model!r}: {error}") from None
    result = analyze_batches(model, batches, labels, bits=args.bits, training_run=args.training_run,
                             per_module=args.per_module, rank_by=args.rank_by, inputs="images")
    result["eval_set"] = "Fashion-MNIST test (offline, hf_qvar.assets.fashion_mnist)"
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-qvar", description="hf_qvar tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    analyze = commands.add_parser(
        "analyze", help="Variation report: module sensitivity, outliers (kurtosis), oscillation.",
        description="Quantize a model once, probe each module group alone on a small eval set, measure "
                    "weight/activation outliers and read a QVarTrainer run's oscillation logs. With --training_run "
                    "and no --model: the oscillation section alone, from the training logs.",
    )
    analyze.add_argument("--model", help=f"from_pretrained path, Hub id or '{OFFLINE_MINILM}' (bundled MiniLM-L6); "
                                         "a text or image (ViT/DeiT/Swin) classifier; left out with --training_run: "
                                         "oscillation section only.")
    analyze.add_argument("--dataset", choices=("rotten_tomatoes", "fashion_mnist"),
                         help="offline eval set; default from the model's config: fashion_mnist (test split) for "
                              "image classifiers (num_channels/image_size, no vocabulary), rotten_tomatoes (dev) "
                              "for text ones.")
    analyze.add_argument("--eval_file", help="text models: csv with sentence,label columns (replaces rotten_tomatoes).")
    analyze.add_argument("--num_samples", type=int, default=512, help="eval sentences or images used (first N).")
    analyze.add_argument("--bits", type=int, default=2, choices=(1, 2, 3, 4, 8), help="weight and activation bits.")
    analyze.add_argument("--training_run", help="QVarTrainer output folder, checkpoint folder or trainer_state.json: "
                                                "oscillation, frozen %% and OBR curves.")
    analyze.add_argument("--per_module", action="store_true", help="also probe each (layer, kind) cell alone.")
    analyze.add_argument("--rank_by", default="accuracy_drop", choices=RANK_KEYS,
                         help="sensitivity ranking; kl_to_fp suits models whose task head is untrained.")
    analyze.add_argument("--batch_size", type=int, default=64)
    analyze.add_argument("--max_length", type=int, default=64, help="text models: tokens per sentence.")
    analyze.add_argument("--output_dir", required=True, help="report folder (report.md, report.json, *.png).")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
