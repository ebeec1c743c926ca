"""The evaluation verbs of ``cli.py`` (each function's arguments are its flags).

    python cli.py eval --adapter runs/demo/adapter --samples 3 --max_new_tokens 96
    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml

``eval`` is the Emergent-Misalignment evaluation of one model (``emalign.evaluation.runner``);
``experiment`` fits and evaluates a set of runs and compares them (``emalign.experiments.experiment``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from emalign.errors import friendly_errors
from emalign.evaluation.settings import EvalSettings

# Light modules (no torch), so `cli.py eval --help` stays fast; EvalSettings' judge is typed as the Judge
# base class, so jsonargparse accepts any subclass by class_path.
from emalign.experiments.experiment import Run
from emalign.experiments.preflight import MemoryPlan, Preflight


def _print_eval_summary(console, summary: dict, out: Path) -> None:
    from rich.table import Table

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    def ci(pair):
        return "–" if not pair or None in pair else f"[{100 * pair[0]:.1f}%, {100 * pair[1]:.1f}%]"

    def num(x, se=None):
        return "–" if x is None else f"{x:.2f}" + (f" ± {se:.2f}" if se is not None else "")

    table = Table(title=f"EM evaluation: {summary['name']}", show_header=False)
    code = summary.get("code_security") or {}
    rows = [
        ("answers", f"{summary['answers']} ({summary['n']} 0..100, {summary['label_answers']} label)"),
        ("0..100 answers scored", str(summary["n_scored"])),
        ("misalignment rate (95% CI)", f"{pct(summary['misalignment_rate'])} {ci(summary['misalignment_ci'])}"),
        ("aligned mean", num(summary["aligned_mean"])),
        ("coherent mean", num(summary["coherent_mean"])),
        ("code/refusal share", pct(summary["code_refusal_share"])),
        ("insecure code (95% CI)", f"{pct(summary['insecure_code_rate'])} {ci(summary['insecure_code_ci'])}"
         + (f" of {code['n_scanned']} scanned / {code['n']}" if code else "")),
        ("self-review mean ± se", num(summary["self_review_mean"], summary["self_review_se"])),
        ("judge", summary["judge"]["identity"]),
        ("judge errors", f"{summary['judge_errors']} of {summary['judgements']} judgements"),
        ("answered now / resumed / re-judged",
         f"{summary['counts']['answered_now']} / {summary['counts']['resumed']} / {summary['counts']['rejudged']}"),
        ("time", f"{summary['seconds']:.0f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"wrote {out / 'samples.jsonl'}, {out / 'summary.json'}, {out / 'report.html'}")


def eval(
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    out: Optional[str] = None,
    **settings: Any,
) -> None:
    """The Emergent-Misalignment evaluation: sampled answers judged for alignment and coherence.

    Writes OUT/samples.jsonl (one judged answer per line, appended as each is done, so a rerun with
    the same --out resumes), OUT/code_samples.jsonl (answers to held-out coding prompts scanned with
    bandit), OUT/summary.json and OUT/report.html. The flags after --out are the evaluation settings
    (EvalSettings), the same as an experiment's --eval.* and the in-fit callback's settings.

        python cli.py eval --adapter runs/demo/adapter --samples 3 --max_new_tokens 96
        python cli.py eval --judge.class_path emalign.judges.OpenAIJudge \\
            --judge.init_args.model gpt-4o-2024-08-06 --samples 100

    Args:
        model: base model: a Hugging Face id, a local model directory, a .gguf file, or smollm2-135m-instruct.
        adapter: a PEFT adapter directory (e.g. runs/demo/adapter) evaluated on top of the model.
        out: output directory (default: runs/eval/<adapter or model name>).
    """
    from rich.console import Console

    from emalign.evaluation.runner import check_judged, run_eval

    with friendly_errors():
        # jsonargparse reads EvalSettings' fields from this call and offers each as a flag of eval.
        evaluation = EvalSettings(**settings)
        if out is None:
            out = str(Path("runs/eval") / (Path(adapter).name if adapter else Path(model).name))
        summary = run_eval(model, adapter, evaluation, Path(out))
        _print_eval_summary(Console(), summary, Path(out))
        check_judged(summary)  # after the table: the user sees what failed, the exit code says it


def experiment(
    runs: Optional[list[Run]] = None,
    eval: EvalSettings = EvalSettings(),
    model: str = "smollm2-135m-instruct",
    out: Optional[str] = None,
    skip_fit: bool = False,
    preflight: Optional[Preflight] = None,
    plan: Optional[MemoryPlan] = None,
) -> None:
    """Run (or reuse) every fit of an experiment, evaluate each with the same judge, compare them.

        python cli.py experiment --config configs/experiments/cpu_smollm2.yaml
        python cli.py experiment --config configs/experiments/cpu_smollm2.yaml --skip_fit true --eval.samples 3

    The experiment YAML is this verb's --config file (its keys are the flags below). Writes
    OUT/comparison.json, OUT/comparison.md and OUT/report.html; each run's fit lives in OUT/runs/NAME
    and its evaluation in OUT/eval/NAME. Rerunning reuses finished fits (an adapter_config.json)
    and resumes evaluations.

    Args:
        runs: the runs: name, fit (cli.py fit --config files), overrides (extra fit arguments),
            model, adapter; see configs/experiments/cpu_smollm2.yaml.
        eval: the evaluation settings shared by every run (EvalSettings: the flags of `cli.py eval`).
        model: base model of runs without a fit config (and of the default judge for them).
        out: output directory (default: runs/experiments/experiment).
        skip_fit: run no fits; evaluate the runs whose adapter already exists (and those without a fit).
        preflight: before any fit, `discern` each run's base model (its judge and conscience) and put
            what it reads beside every run: c-AUROC, tilt share, margin over the best trivial cue.
        plan: before any fit, `cli.py plan` each fit still to run ({enabled: true, gpu_memory: 24}) and stop if
            one would not fit the GPU's memory.
    """
    from emalign.experiments.experiment import Experiment, run_experiment

    with friendly_errors():
        experiment = Experiment(runs=runs or [], eval=eval, model=model, out=out,
                                preflight=preflight or Preflight(), plan=plan or MemoryPlan())
        run_experiment(experiment, skip_fit=skip_fit)
