r"""Plot a held-out measure against the pairs a fit had queued when each checkpoint was taken.

Reads a ``conscience_effect.py`` JSON, keeps the base (``base=``) and the runs of one fit (its adapter and
checkpoints, ``NAME=FIT/adapter@FIT/checkpoints/...step=S.ckpt``), and the fit's ``metrics.csv``
(``conscience/pairs_enqueued`` per step), and draws the caution rate and the frozen base's conscience score,
mean ± se over prompts, against the cumulative pairs enqueued before step S.

    python bench/effect_curve.py --effect bench/results/harmful_heldout_effect.json --fit runs/control_caution \
        --out bench/results/control_caution_curve.png
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
    ap.add_argument("--fit", required=True, help="the fit's run directory (default_root_dir)")
    ap.add_argument("--metrics", help="the fit's metrics.csv (default: FIT/logs/version_0/metrics.csv)")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    results = json.loads(Path(args.effect).read_text())["results"]
    before = pairs_before(Path(args.metrics or Path(args.fit, "logs", "version_0", "metrics.csv")))
    fit = str(Path(args.fit))
    runs = [r for r in results.values() if not r["adapter"] or r["adapter"].startswith(fit)]
    points = sorted(((before[min(run_step(r["adapter"], max(before)), max(before))], r) for r in runs),
                    key=lambda point: point[0])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (key, se, label) in zip(axes, (("caution_rate", "caution_se", "caution rate (rule)"),
                                           ("mean", "se", "frozen base's conscience score"))):
        ax.errorbar([p for p, _ in points], [r[key] for _, r in points], [r[se] for _, r in points],
                    marker="o", capsize=3)
        ax.set_xlabel("pairs enqueued before the checkpoint")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(fit).name} on held-out prompts (mean ± se over prompts)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
