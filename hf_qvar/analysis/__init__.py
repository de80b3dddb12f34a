"""Variation analysis (method.md §1, §9.3): module sensitivity, outliers (kurtosis, max/std) and weight
oscillation, with a Markdown/PNG/JSON report. CLI: ``hf-qvar analyze``."""

from .api import analyze, analyze_batches, load_eval_set, load_model, make_batches
from .images import fashion_mnist_batches, image_statistics, is_image_config, load_image_model
from .oscillation import find_trainer_state, obr_curves, oscillation_curves, oscillation_summary, read_oscillation
from .outliers import ActivationRecorder, Moments, outlier_table, weight_stats
from .report import write_oscillation_report, write_report
from .sensitivity import calibrate, evaluate, module_sensitivity
from .sites import Site, find_sites, only_quantized, site_groups

__all__ = [
    "ActivationRecorder", "Moments", "Site", "analyze", "analyze_batches", "calibrate", "evaluate",
    "fashion_mnist_batches", "find_sites", "find_trainer_state", "image_statistics", "is_image_config",
    "load_eval_set", "load_image_model", "load_model", "make_batches", "module_sensitivity", "obr_curves",
    "only_quantized", "oscillation_curves", "oscillation_summary", "outlier_table", "read_oscillation", "site_groups",
    "weight_stats", "write_oscillation_report", "write_report",
]
