"""Markdown table of a folder of `run_suite.py` records: one row per (bits, rung), seeds side by side.

    python benchmarks/results_table.py benchmarks/results/text_minilm_rt

Accuracy is the final evaluation in percent (best epoch in brackets when higher); a run stopped by
``--time_limit`` shows its last logged evaluation, its best and the epoch it stopped at, and enters no mean.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
from collections import defaultdict

RUNG_ORDER = ("fp", "plain", "mdq", "kd", "obr", "full")


def _cell(record: dict) -> tuple[str, float | None]:
    """Text of one run's cell and the number that enters the mean (None for an unfinished run)."""
    if record["final"] is not None:
        final, best = 100 * record["final"]["eval_accuracy"], 100 * record["best_eval_accuracy"]
        return (f"{final:.2f}" + (f" ({best:.2f})" if best > final + 1e-9 else ""), final)
    if not record["epochs"]:
        return "no evaluation", None
    last, best = record["epochs"][-1], 100 * record["best_eval_accuracy"]
    return f"{100 * last['eval_accuracy']:.2f} (best {best:.2f}; stopped at epoch {last['epoch']:g})", None


def table(folder: str) -> str:
    rows: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        record = json.load(open(path))
        run = re.sub(r"-s\d+$", "", os.path.splitext(os.path.basename(path))[0])  # the file, not the record: reruns
        rows[(record["tags"]["bits"], record["tags"].get("rung", "fp"), run)][record["seed"]] = record
    seeds = sorted({seed for runs in rows.values() for seed in runs})
    lines = ["| run | bits | recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---" * (len(seeds) + 4) + "|"]
    order = sorted(rows, key=lambda key: (key[0] != "fp", key[0], RUNG_ORDER.index(key[1]), key[2]))
    for key in order:
        cells, finals = [], []
        for seed in seeds:
            text, final = _cell(rows[key][seed]) if seed in rows[key] else ("", None)
            cells.append(text)
            finals += [] if final is None else [final]
        mean = f"{statistics.mean(finals):.2f}" if len(finals) > 1 else ""
        lines.append(f"| {key[2]} | {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    print(table(parser.parse_args().folder))


if __name__ == "__main__":
    main()
