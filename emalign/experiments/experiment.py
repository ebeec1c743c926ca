"""Experiments: several fits, each evaluated with the same judge and settings, in one comparison.

    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml
    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml --skip_fit true   # evaluate only
    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml --eval.samples 3 --out runs/x

An experiment YAML is the ``experiment`` verb's config file (so any key can be overridden on the
command line, and ``--print_config`` shows the whole thing)::

    out: runs/experiments/cpu_smollm2      # output directory
    model: smollm2-135m-instruct           # base model of runs without a fit config
    eval:                                  # EvalSettings (emalign.evaluation.settings), shared by every run
      questions: [data/em/evaluation/first_plot_questions.yaml]
      samples: 2
      max_new_tokens: 96
      code_prompts: 8                      # the first N held-out coding prompts (default: all 19)
      judge: null                          # or {class_path: ..., init_args: {...}}; null: local judge
    preflight: {sets: [chat, code]}        # discern each base model before any fit (enabled: false skips it)
    runs:                                  # Run: name, fit, overrides, model, adapter
      - name: base                         # no fit: the base model itself
      - name: insecure
        fit: [configs/demo.yaml]                    # --config files, in order
        overrides: ["--conscience=null"]            # extra `cli.py fit` args: here, plain SFT

Each run's model and adapter directory come from LightningCLI's own merge of its files and overrides
(``fit --print_config``, saved as ``OUT/runs/NAME/fit_config.yaml``). Before any fit, ``discern`` scores each
run's base model (its judge and frozen conscience) with the
training question and its inverted wording (``emalign.experiments.preflight``); the comparison shows
what it reads beside every run. Each fit runs as ``emalign fit --config ... OVERRIDES`` with its
run directory ``OUT/runs/NAME`` (``trainer.default_root_dir`` and the logger's ``save_dir``); its output goes to
``OUT/runs/NAME/fit.log``. A fit whose adapter exists (``adapter/adapter_config.json``) is reused;
an interrupted one resumes from ``checkpoints/last.ckpt``. Each evaluation goes to
``OUT/eval/NAME`` and resumes too, so rerunning an experiment only does what is missing. The
comparison is written to ``OUT/comparison.json``, ``OUT/comparison.md`` and ``OUT/report.html``.
File paths are relative to the working directory (else to the repository).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

import emalign
from emalign.errors import UserError
from emalign.evaluation.settings import EvalSettings
from emalign.experiments.preflight import MemoryPlan, Preflight
from emalign.files import claim_dir, jsonl_lines

ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExperimentError(UserError):
    """An experiment config that cannot be run, or a fit that failed."""


@dataclass
class Run:
    """One run of an experiment: a fit (or none) and the evaluation of its result."""

    name: str
    """Name in the comparison and directory name under OUT/runs and OUT/eval."""
    fit: Union[list[str], str] = field(default_factory=list)
    """``cli.py fit --config`` files, in order; none: evaluate ``model`` (+ ``adapter``) as it is."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``cli.py fit`` arguments, e.g. ``--trainer.max_steps=30``."""
    model: Optional[str] = None
    """Base model to evaluate (default: the fit config's, else the experiment's ``model``)."""
    adapter: Optional[str] = None
    """An existing adapter directory to evaluate instead of fitting."""


@dataclass
class Experiment:
    runs: list[Run]
    eval: EvalSettings = field(default_factory=EvalSettings)
    model: str = "smollm2-135m-instruct"
    out: Optional[str] = None
    preflight: Preflight = field(default_factory=Preflight)
    plan: MemoryPlan = field(default_factory=MemoryPlan)


def _path(value: str, where: str) -> Path:
    """A file named by the config: relative to the working directory, else to the repository."""
    for candidate in (Path(value), ROOT / value):
        if candidate.is_file():
            return candidate
    raise ExperimentError(f"{where}: no such file {value!r}")


def load_experiment(path: str | Path) -> Experiment:
    """Parse an experiment YAML as ``cli.py experiment --config`` does (same keys, same checks)."""
    from jsonargparse import ArgumentParser

    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment config")
    parser = ArgumentParser(exit_on_error=False)
    # The same arguments as the verb: emalign.commands.evaluation.experiment(runs, eval, model, out).
    hints = typing.get_type_hints(Experiment)
    runs = hints["runs"]  # a name, not Optional[hints["runs"]]: linters read a string there as an annotation
    parser.add_argument("--runs", type=Optional[runs], default=None)
    parser.add_argument("--eval", type=hints["eval"], default=EvalSettings())
    parser.add_argument("--model", type=str, default=Experiment.model)
    parser.add_argument("--out", type=Optional[str], default=None)
    parser.add_argument("--preflight", type=Preflight, default=Preflight())
    parser.add_argument("--plan", type=MemoryPlan, default=MemoryPlan())
    try:
        init = parser.instantiate(parser.parse_path(str(path)))
    except Exception as err:  # jsonargparse's messages are long: keep the key and the first cause
        raise ExperimentError(f"{path}: {_short(str(err))}") from err
    return check(Experiment(runs=init.runs or [], eval=init.eval, model=init.model, out=init.out,
                            preflight=init.preflight, plan=init.plan), str(path))


def _short(message: str) -> str:
    """'Parser key "runs": ... Option 'fits' is not accepted' from a long jsonargparse message."""
    lines = [line.strip(" -") for line in message.strip().splitlines()]
    causes = [line for line in lines[1:] if "not accepted" in line or line.startswith(("Expected", "Given value:"))]
    return "; ".join([lines[0], *causes[:2]])


def check(experiment: Experiment, where: str = "experiment") -> Experiment:
    """Validate names and files; normalise each run's ``fit`` to a list of existing paths."""
    if not experiment.runs:
        raise ExperimentError(f"{where}: 'runs' must be a non-empty list (pass --config EXPERIMENT.yaml)")
    seen: set[str] = set()
    for i, run in enumerate(experiment.runs):
        at = f"{where}: runs[{i}]"
        if not _NAME.match(run.name):
            raise ExperimentError(f"{at}: name {run.name!r} must be letters, digits, '_', '-', '.'")
        at += f" ({run.name})"
        if run.name in seen:
            raise ExperimentError(f"{at}: duplicate name")
        seen.add(run.name)
        run.fit = [str(_path(f, f"{at}: fit")) for f in ([run.fit] if isinstance(run.fit, str) else run.fit)]
        if run.overrides and not run.fit:
            raise ExperimentError(f"{at}: 'overrides' without 'fit'")
    return experiment


def _cli(*args: str) -> list[str]:
    """``emalign ARGS`` in a child process, run by the same interpreter."""
    return [sys.executable, "-m", "emalign.commands.cli", *args]


def _env() -> dict[str, str]:
    """The child imports the ``emalign`` this process runs (a checkout started as ``python cli.py`` from any
    directory, or an installed package), whatever the working directory."""
    home = str(Path(emalign.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))


def _fit_args(run: Run, run_dir: Path) -> list[str]:
    return [a for f in run.fit for a in ("--config", f)] + run.overrides + [f"--trainer.default_root_dir={run_dir}"]


def fit_config(run: Run, run_dir: Path) -> dict[str, Any]:
    """The config LightningCLI makes of the run's files and overrides (its own merge: ``fit --print_config``),
    saved as ``RUN_DIR/fit_config.yaml``; the experiment reads the model and adapter from it, never guesses."""
    proc = subprocess.run(_cli("fit", *_fit_args(run, run_dir), "--print_config"), capture_output=True, text=True,
                          env=_env())
    if proc.returncode != 0:
        error = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), proc.stderr[-500:])
        raise ExperimentError(f"run {run.name!r}: its fit config does not parse: {error}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fit_config.yaml").write_text(proc.stdout, encoding="utf-8")
    return yaml.safe_load(proc.stdout)


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def run_child(cmd: list[str], **popen) -> int:
    """``subprocess.run(cmd).returncode``, except that the child never outlives this process: SIGTERM here
    (which would otherwise end this process alone) and Ctrl+C stop the child too, which checkpoints and
    exits (StopOnSignal), before this process ends. The child's exit code is returned."""
    child = subprocess.Popen(cmd, **popen)

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()  # the fit's StopOnSignal saves a checkpoint, then ends
            try:
                child.wait(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


CHILD_GRACE_S = 120
"""Seconds a stopped fit gets to write its checkpoint before it is killed."""


def _logged(args: list[str], log_path: Path) -> int:
    """``cli.py ARGS`` in a subprocess, the command and its output appended to ``log_path``; the exit code."""
    cmd = _cli(*args)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return run_child(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _fitted(adapter_dir: Path) -> bool:
    """A finished fit's result is there: its adapter, or the whole model of a full fine-tune."""
    return (adapter_dir / "adapter_config.json").is_file() or (adapter_dir / "config.json").is_file()


def _fit(run: Run, run_dir: Path, config: dict[str, Any], log_path: Path) -> None:
    """``emalign fit`` in a subprocess, output to ``log_path``; resumes from last.ckpt."""
    args = ["fit", *_fit_args(run, run_dir)]
    if _get(config, "trainer.logger.init_args.save_dir") is not None:  # a logger that names its own directory
        args.append(f"--trainer.logger.init_args.save_dir={run_dir}")
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]
    run_dir.mkdir(parents=True, exist_ok=True)
    code = _logged(args, log_path)
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise ExperimentError(f"the fit of run {run.name!r} failed (exit {code}); {log_path} ends with:\n"
                              + "\n".join(tail))


def _model_and_adapter(run: Run, experiment: Experiment, config: dict[str, Any], run_dir: Path
                       ) -> tuple[str, Optional[str], Path]:
    """(base model to evaluate, adapter or None, the directory a fit leaves its adapter in)."""
    model = run.model or _get(config, "model.policy.init_args.model") or experiment.model
    return str(model), run.adapter, run_dir / (_get(config, "model.adapter_dir") or "adapter")


def _settings(experiment: Experiment) -> dict[str, Any]:
    """The experiment as JSON (the judge by its identity), for comparison.json and its hash."""
    data = dataclasses.asdict(dataclasses.replace(experiment, eval=dataclasses.replace(experiment.eval, judge=None)))
    data["eval"]["judge"] = experiment.eval.judge.identity if experiment.eval.judge else None
    return data


def run_experiment(
    config: Union[str, Path, Experiment], out: Optional[str] = None, skip_fit: bool = False
) -> dict[str, Any]:
    """Fit (or reuse), evaluate and compare every run of an experiment (a YAML path or an
    :class:`Experiment`); returns the comparison."""
    from rich.console import Console
    from rich.rule import Rule

    from emalign.evaluation.runner import load_items, run_eval
    from emalign.experiments.comparison import write_comparison
    from emalign.experiments.preflight import run_memory_plans, run_preflight
    from emalign.files import read_rows

    experiment = check(config) if isinstance(config, Experiment) else load_experiment(config)
    out_dir = claim_dir(out or experiment.out or "runs/experiments/experiment", "out")
    ev = experiment.eval
    try:
        questions = [str(_path(q, "eval.questions")) for q in ev.questions]
    except ExperimentError as err:
        raise ExperimentError(f"{err}; get the EM questions with `python cli.py data em --out data/em`") from err
    items, _ = load_items(questions, ev.samples, ev.limit)  # fail on a bad file before any fit
    settings = dataclasses.replace(ev, questions=questions)  # as found from here, whatever the working directory
    console = Console()
    configs = [fit_config(run, out_dir / "runs" / run.name) if run.fit else {} for run in experiment.runs]
    resolved = [_model_and_adapter(run, experiment, config, out_dir / "runs" / run.name)
                for run, config in zip(experiment.runs, configs)]
    bases = [model for model, _, _ in resolved]
    console.print(Rule("preflight: what each judge reads"))
    preflight = run_preflight(experiment.preflight, bases, out_dir, lambda line: console.print(line, markup=False))
    to_fit = {} if skip_fit else {run.name: (_fit_args(run, out_dir / "runs" / run.name), out_dir / "runs" / run.name)
                                  for run, (_, given, adapter_dir) in zip(experiment.runs, resolved)
                                  if run.fit and not given and not _fitted(adapter_dir)}
    if experiment.plan.enabled:
        console.print(Rule("plan: each fit's peak GPU memory"))
    plans = run_memory_plans(experiment.plan, to_fit, _logged, lambda line: console.print(line, markup=False))
    results = []
    for run, config, (base, adapter, adapter_dir) in zip(experiment.runs, configs, resolved):
        run_dir = out_dir / "runs" / run.name
        model = base
        console.print(Rule(f"run {run.name}"))
        fit_state, fit_seconds = "none", None
        if run.fit and not adapter:
            if _fitted(adapter_dir):
                fit_state = "reused"
            elif skip_fit:
                console.print(f"[yellow]skipped[/]: no adapter at {adapter_dir} and --skip_fit is set")
                results.append({"name": run.name, "fit": "missing", "fit_configs": run.fit, "overrides": run.overrides,
                                "preflight": preflight.get(base)})
                continue
            else:
                console.print(f"fitting {run.name}: {' '.join(run.fit)} {' '.join(run.overrides)} "
                              f"(log: {run_dir / 'fit.log'})")
                started = time.perf_counter()
                _fit(run, run_dir, config, run_dir / "fit.log")
                fit_state, fit_seconds = "ran", round(time.perf_counter() - started, 1)
            if (adapter_dir / "adapter_config.json").is_file():
                adapter = str(adapter_dir)
            else:
                model = str(adapter_dir)  # a full fine-tune exports the whole model there
        history_path = run_dir / "eval_history.jsonl"
        history = read_rows_any(history_path) if history_path.is_file() else None
        console.print(f"evaluating {run.name}: {model}" + (f" + {adapter}" if adapter else ""))
        # The same judge instance for every run (ev.judge); None: each run's base model judges.
        summary = run_eval(model, adapter, settings, out_dir / "eval" / run.name, name=run.name, history=history)
        keys = {it.key for it in items}
        rows = [r for k, r in read_rows(out_dir / "eval" / run.name / "samples.jsonl").items() if k in keys]
        results.append({"name": run.name, "fit": fit_state, "fit_seconds": fit_seconds, "fit_configs": run.fit,
                        "overrides": run.overrides, "model": model, "adapter": adapter,
                        "eval_dir": str(out_dir / "eval" / run.name), "summary": summary, "rows": rows,
                        "history": history, "preflight": preflight.get(base), "plan": plans.get(run.name)})
    described = _settings(experiment)
    comparison = write_comparison(out_dir, results, {
        "settings": described,
        "settings_sha256": hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest(),
        "questions": questions,
    })
    console.print(f"wrote {out_dir / 'comparison.md'}, {out_dir / 'comparison.json'}, {out_dir / 'report.html'}")
    console.print((out_dir / "comparison.md").read_text(encoding="utf-8"))
    _check_judged(results)
    return comparison


def _check_judged(results: list[dict[str, Any]]) -> None:
    """After the comparison is written and shown: a run whose every judgement failed has no numbers,
    and the exit code must say so (``cli.py eval`` does the same for one run)."""
    from emalign.evaluation.runner import EvalError, check_judged

    failed = []
    for r in results:
        try:
            check_judged(r.get("summary") or {})
        except EvalError as err:
            failed.append(f"run {r['name']}: {err}")
    if failed:
        raise EvalError("; ".join(failed))


def read_rows_any(path: Path) -> list[dict]:
    """Every readable JSON line of a file (eval_history.jsonl has no keys)."""
    rows = []
    for _, line in jsonl_lines(path.read_text(encoding="utf-8", errors="replace")):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from a killed fit
    return rows
