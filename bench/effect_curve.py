"""Plot a held-out measure against the pairs a fit had queued when each checkpoint was taken.

Reads a ``conscience_effect.py`` JSON whose runs are a fit's checkpoints (``NAME=ADAPTER@...step=S.ckpt``,
the base as ``base=``) and the fit's ``metrics.csv`` (``conscience/pairs_enqueued`` per step), and
draws the caution rate and the frozen base's conscience score, mean ± se over prompts, against the
cumulative pairs enqueued before step S.

    python bench/effect_curve.py --effect bench/results/control_caution.json \
        --metrics runs/control_caution/logs/version_0/metrics.csv --out bench/results/control_caution.png
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pairs_before(metrics: Path) -> dict[int, float]:
    """Cumulative pairs enqueued by the conscience runs of steps < S, for every S seen."""
    per_step: dict[int, float] = {}
    with open(metrics, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("conscience/pairs_enqueued"):
                per_step.setdefault(int(row["step"]), float(row["conscience/pairs_enqueued"]))
    total, before = 0.0, {}
    for step in range(max(per_step, default=-1) + 2):
        before[step] = total
        total += per_step.get(step, 0.0)
    return before


def run_step(adapter: str | None, last_step: int) -> int:
    """0 for the base, S for a ``step=S`` checkpoint, the fit's length for the final adapter."""
    if not adapter:
        return 0
    found = re.search(r"step=(\d+)", adapter)
    return int(found.group(1)) if found else last_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effect", required=True, help="conscience_effect.py JSON")
    ap.add_argument("--metrics", required=True, help="the fit's metrics.csv")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    results = json.loads(Path(args.effect).read_text())["results"]
    before = pairs_before(Path(args.metrics))
    points = sorted((before[min(run_step(r["adapter"], max(before)), max(before))], r) for r in results.values())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (key, se, label) in zip(axes, (("caution_rate", "caution_se", "caution rate (rule)"),
                                           ("mean", "se", "frozen base's conscience score"))):
        ax.errorbar([p for p, _ in points], [r[key] for _, r in points], [r[se] for _, r in points], marker="o", capsize=3)
        ax.set_xlabel("pairs enqueued before the checkpoint")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"held-out prompts: {Path(args.effect).stem} (mean ± se over prompts)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
