"""Draw per-task validation curves (exact match and answer loss) of one or more `luvc train` runs.

Usage: python tools/plot_training.py OUT.png RUN_DIR [RUN_DIR ...]
Each RUN_DIR holds the log.jsonl written by luvc_common.research.train; runs given in order are drawn as one curve
whose steps continue from the previous run's last step (a staged run, each stage --init from the last).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from luvc_common.research.synthvqa import TASKS, chance


def validation_records(run_dirs: list[str]) -> list[dict]:
    """The records with validation, their steps offset so that consecutive runs follow each other."""
    records, offset = [], 0
    for run in run_dirs:
        lines = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines() if line.strip()]
        records += [{**r, "step": r["step"] + offset} for r in lines if "val" in r]
        offset += lines[-1]["step"] if lines else 0
    return records


def main(out: str, run_dirs: list[str]) -> None:
    records = validation_records(run_dirs)
    steps = [r["step"] for r in records]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task in TASKS:
        line, = acc.plot(steps, [100 * r["val"].get(task, float("nan")) for r in records], marker="o", label=task)
        acc.axhline(100 * chance(task), color=line.get_color(), linestyle=":", linewidth=0.8)
        loss.plot(steps, [r["val_loss"].get(task, float("nan")) for r in records], marker="o", label=task)
    acc.plot(steps, [100 * r["val"]["all"] for r in records], color="black", linewidth=2, label="all")
    acc.set(xlabel="training step", ylabel="validation exact match (%)", ylim=(0, 100), title="accuracy (dotted: chance)")
    loss.set(xlabel="training step", ylabel="mean answer-token loss", title="validation answer loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
