"""The effect of a fit on held-out prompts, measured by what its loop did not optimise.

The conscience loop raises one number: the frozen base's direct verdict on the policy's answers. That
number alone cannot show the method works: most of it is a yes-tilt, the same whichever way the question is
asked (``cli.py discern``). For each model (the base, or an adapter of a fit) this measures, on prompts the fit
never sampled:

- the frozen base's verdicts on the policy's K answers per prompt under four wordings (the direct question
  the loop optimised, two rewordings, the inverted question), and from direct and inverted the content c
  and the tilt t (:mod:`emalign.discern.paired`). A gain that is tilt moves inverted against direct
  (Δinverted ≈ -Δdirect); a gain in what the judge reads from the answer moves both (Δinverted ≈ +Δdirect);
- the policy's own log-probability margin, log π(good) - log π(bad) summed over tokens, on labelled pairs
  whose prompts no fit trains on (the embedded chat pairs, the code twins): the preference DPO trains,
  read against human labels, with no judge;
- the degeneracy rate (:mod:`emalign.studies.degeneracy`) and the caution rate (the positive control's
  rule, :func:`emalign.conscience.controls.is_cautious`).

Every difference is paired: per prompt for answers (all models answer with the same sample seeds), per pair
for margins. Runs named ``ARM_sSEED`` are the seeds of one arm, and the training seed is the unit of an arm's
effect: per-seed values, an interval over seeds, a flag where the seeds disagree beyond their per-unit noise
(:mod:`emalign.studies.seeds`). Each run's own difference keeps its ± over prompts or pairs alone.

    python cli.py effect --out runs/effect --runs base= method_s0=runs/method_s0/adapter \\
        shuffled_s0=runs/shuffled_s0/adapter
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from emalign.conscience.controls import is_cautious
from emalign.conscience.prompts import load_prompts
from emalign.conscience.verdict import DEFAULT_QUESTION
from emalign.discern.labelled import EXTRA_QUESTIONS, INVERTED_QUESTION, Wording, load_set, score_answers
from emalign.discern.paired import split
from emalign.errors import UserError, check_range
from emalign.files import claim_dir, write_text_atomic
from emalign.judges.self_review import without_adapter
from emalign.models.logprobs import pair_logps
from emalign.models.policy import load_for_inference
from emalign.models.sampling import encode, GenerationSettings, render_prompt, sample_ids
from emalign.stats import mean_se
from emalign.studies.degeneracy import degenerate
from emalign.studies.seeds import disagreeing
from emalign.studies.seeds import effect as seeds_effect

WORDINGS = [Wording("direct", DEFAULT_QUESTION), Wording("q2", EXTRA_QUESTIONS[0]), Wording("q3", EXTRA_QUESTIONS[1]),
            Wording("inverted", INVERTED_QUESTION, inverted=True)]
ANSWER_METRICS = ["direct", "inverted", "c", "t", "q2", "q3", "caution", "degenerate", "tokens"]
_ARM = re.compile(r"^(?P<arm>.+)_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class EffectSettings:
    """What every model is measured on (the same for all, so that differences pair)."""

    prompts: str = "embedded:harmful_heldout"
    """Held-out prompts the policies answer (chat JSONL, ``embedded:NAME`` or one per line)."""
    samples: int = 4
    """Answers per prompt."""
    max_new_tokens: int = 48
    """Longest answer in tokens (the fits' rollouts are 48)."""
    temperature: float = 0.8
    """Sampling temperature (the fits')."""
    top_p: float = 0.95
    """Nucleus sampling mass (the fits')."""
    seed: int = 1234
    """Sample seeds: answer k to prompt i has the same seed in every model."""
    pair_sets: list[str] = field(default_factory=lambda: ["chat", "code"])
    """Labelled pair sets for the log-prob margin (embedded ``chat``/``code`` or a JSONL path)."""
    batch_size: int = 24
    """Sequences per generate call, and labelled pairs per log-prob forward."""

    def __post_init__(self) -> None:
        for key in ("samples", "max_new_tokens", "batch_size"):
            check_range(key, getattr(self, key), 1)
        check_range("temperature", self.temperature, 0)
        check_range("top_p", self.top_p, 0, 1, low_open=True)


def load_run(model_name: str, spec: str):
    """(model, tokenizer) for ``ADAPTER_DIR``, ``ADAPTER_DIR@CHECKPOINT`` (that step's LoRA weights) or ''
    (the base)."""
    adapter, _, ckpt = spec.partition("@")
    model, tokenizer = load_for_inference(model_name, adapter or None)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        weights = {k.removeprefix("policy.model."): v for k, v in state.items() if ".lora_" in k}
        missing = model.load_state_dict(weights, strict=False)
        if missing.unexpected_keys or [k for k in missing.missing_keys if ".lora_" in k] or not weights:
            raise UserError(f"{ckpt}: adapter weights do not match {adapter} ({missing})")
    return model, tokenizer


@torch.no_grad()
def margins(model, tokenizer, set_name: str, batch_size: int) -> list[float]:
    """Per labelled pair: the model's log π(good | prompt) - log π(bad | prompt), each summed over tokens."""
    pairs = load_set(set_name)
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [render_prompt(tokenizer, [{"role": "user", "content": p.prompt}]) for p in chunk]
        good, bad = pair_logps(model, prompts, [encode(tokenizer, p.good) for p in chunk],
                               [encode(tokenizer, p.bad) for p in chunk],
                               tokenizer.pad_token_id, device)
        out += (good - bad).tolist()
    return out


@torch.no_grad()
def measure(model, tokenizer, settings: EffectSettings) -> dict:
    """One model's answers to the held-out prompts, their per-prompt scores, and its margins per pair set."""
    prompts = load_prompts(settings.prompts)
    ids = [render_prompt(tokenizer, p) for p in prompts]
    generation = GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                    top_p=settings.top_p, batch_size=settings.batch_size)
    model.eval()
    rollouts = sample_ids(model, tokenizer, ids, generation, settings.samples, seed=settings.seed, step=0)
    with without_adapter(model) as base:  # the frozen base judges, as in training
        scores = score_answers(base, tokenizer, WORDINGS, [r.prompt_ids for r in rollouts],
                               [r.response_ids for r in rollouts], batch_size=8)
    per_answer = {name: scores[w.name] for name, w in zip(["direct", "q2", "q3", "inverted"], WORDINGS)}
    t, c = split(per_answer["direct"], per_answer["inverted"])
    per_answer["t"], per_answer["c"] = t.tolist(), c.tolist()
    per_answer["caution"] = [float(is_cautious(r.text)) for r in rollouts]
    reasons = [degenerate(r.text) for r in rollouts]
    per_answer["degenerate"] = [float(r is not None) for r in reasons]
    per_answer["tokens"] = [float(len(r.response_ids)) for r in rollouts]
    by_prompt: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_prompt.setdefault(r.prompt_index, []).append(i)
    rows = [by_prompt[k] for k in sorted(by_prompt)]
    per_prompt = {m: [sum(per_answer[m][i] for i in row) / len(row) for row in rows] for m in ANSWER_METRICS}
    return {
        "per_prompt": per_prompt,
        "margins": {s: margins(model, tokenizer, s, settings.batch_size) for s in settings.pair_sets},
        "answers": [{"prompt": r.prompt_index, "text": r.text, "direct": round(per_answer["direct"][i], 4),
                     "inverted": round(per_answer["inverted"][i], 4), "degenerate": reasons[i]}
                    for i, r in enumerate(rollouts)],
    }


def _paired(a: list[float], b: list[float]) -> list[Optional[float]]:
    return list(mean_se([x - y for x, y in zip(a, b)]))


def _values(run: dict) -> dict[str, list[float]]:
    """Every measured quantity of a run, per unit (prompt or pair): answers' metrics and ``margin_SET``."""
    return {**run["per_prompt"], **{f"margin_{s}": v for s, v in run["margins"].items()}}


def compare(runs: dict[str, dict], baseline: str) -> dict:
    """Each run's paired differences to ``baseline`` (± over units), and each arm's (runs ``ARM_sSEED``) to
    the baseline and to every other arm with seeds as the unit (:func:`emalign.studies.seeds.effect`)."""
    base = _values(runs[baseline])
    out: dict = {"vs_baseline": {}, "arms": {}, "arm_vs_arm": {}}
    for name, run in runs.items():
        out["vs_baseline"][name] = {k: _paired(v, base[k]) for k, v in _values(run).items()}
    arms: dict[str, dict[int, dict]] = {}
    for name in runs:
        if (match := _ARM.match(name)) and name != baseline:
            arms.setdefault(match["arm"], {})[int(match["seed"])] = _values(runs[name])
    for arm, seeds in arms.items():
        delta = {k: seeds_effect([v[k] for v in seeds.values()], [base[k]], list(seeds), fixed_b=True)
                 for k in base}
        out["arms"][arm] = {"runs": [f"{arm}_s{s}" for s in seeds], "seeds": list(seeds), "delta": delta,
                            "prediction": _prediction(delta)}
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out["arm_vs_arm"][f"{a} - {b}"] = {
                k: seeds_effect([v[k] for v in arms[a].values()], [v[k] for v in arms[b].values()],
                                list(arms[a]), list(arms[b])) for k in base}
    return out


def _prediction(delta: dict) -> dict:
    """Δinverted / Δdirect: about -1 if the gain is tilt, about +1 if the judge reads it from the answers; no
    reading unless the seed-level interval of Δdirect excludes zero."""
    d, i = delta["direct"], delta["inverted"]
    if d["reading"] != "detected":
        return {"inverted_over_direct": None, "reading": f"no direct effect to read (Δdirect {d['reading']})"}
    ratio = i["mean"] / d["mean"]
    return {"inverted_over_direct": ratio,
            "reading": "tilt (inverted moves against direct)" if ratio < -0.5 else
                       "content (inverted moves with direct)" if ratio > 0.5 else "mixed"}


def _fmt(pair: list[Optional[float]]) -> str:
    mean, se = pair
    return "—" if mean is None else f"{mean:+.3f} ± {se:.3f}" if se is not None else f"{mean:+.3f}"


def _seed_rows(effects: dict, keys: list[str], seeds: list[str], arms: list[str]) -> list[str]:
    """One comparison, a row per quantity: per seed (± over units), the seed-level interval, the reading."""
    lines = ["| Δ | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% CI, seeds as unit (df) "
             "| se over units | reading |", "|---" * (len(seeds) + 5) + "|"]
    for k in keys:
        e = effects[k]
        ci = "—" if e["ci"] is None else f"[{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}] ({e['df']:.1f})"
        flag = "".join(f"; **{arm}'s seeds disagree**" for side, arm in zip("ab", arms) if side in disagreeing(e))
        lines.append(f"| {k} | " + " | ".join(_fmt(e["per_seed"].get(s, [None, None])) for s in seeds)
                     + f" | {e['mean']:+.3f} | {ci} | {e['unit_se']:.3f} | {e['reading']}{flag} |")
    return lines


def table(result: dict) -> str:
    """Markdown: each run against the baseline (± over units), then each arm against the baseline and every
    pair of arms with seeds as the unit."""
    keys = ["direct", "inverted", "c", "t", "q2", "q3", *[f"margin_{s}" for s in result["settings"]["pair_sets"]],
            "degenerate", "caution"]
    base = result["baseline"]
    lines = [f"## Each run against {base}", "",
             "± is the standard error over that run's units (prompts for answers, labelled pairs for margins); "
             "it leaves out the training seed.", "",
             f"| vs {base} | " + " | ".join(f"Δ{k}" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_fmt(d[k]) for k in keys) + " |"
              for n, d in result["vs_baseline"].items() if n != base]
    lines += ["", "## Seeds as the unit", "",
              "Per seed: that seed's Δ ± its se over units. The interval: Student t over the seed means, its se "
              "the seeds' spread (Welch's between two arms) plus the se over units "
              "(`emalign.studies.seeds`), df by Satterthwaite. **X's seeds disagree**: arm X's seeds differ "
              "beyond their per-unit noise (F test, p < 0.05)."]
    comparisons = [(f"{arm} - {base}", a["delta"], [str(s) for s in a["seeds"]]) for arm, a in result["arms"].items()]
    comparisons += [(name, d, list(d["direct"]["per_seed"])) for name, d in result["arm_vs_arm"].items()]
    for name, effects, seeds in comparisons:
        lines += ["", f"### {name}", "", *_seed_rows(effects, keys, seeds, name.split(" - "))]
    return "\n".join(lines) + "\n"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _specs(runs: list[str]) -> list[tuple[str, str]]:
    """(name, adapter) of each ``NAME=ADAPTER``: a name is a file name in ``--out`` (no path)."""
    specs = []
    for spec in runs:
        name, eq, adapter = spec.partition("=")
        if not eq or not _NAME.match(name):
            raise UserError(f"--runs {spec!r}: expected NAME=ADAPTER_DIR (NAME=: the base), NAME letters, digits, "
                            "'_', '.' and '-' (it names NAME.json in --out)")
        specs.append((name, adapter))
    if len({n for n, _ in specs}) < len(specs):
        raise UserError("--runs: a NAME is given twice")
    return specs


def _check_adapter(name: str, adapter: str) -> None:
    """An adapter to measure is an existing directory (or ``DIR@CHECKPOINT`` with both there)."""
    directory, _, checkpoint = adapter.partition("@")
    if directory and not Path(directory).is_dir():
        raise UserError(f"--runs {name}: adapter directory {directory} not found")
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f"--runs {name}: checkpoint {checkpoint} not found")


def _reusable(path: Path, key: dict) -> Optional[dict]:
    """The run saved at ``path`` if it was measured with ``key``; None if absent, other or unreadable (a kill
    mid-write leaves no such file, since it is written atomically; a damaged one is measured again)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        print(f"{path}: unreadable; measured again", file=sys.stderr)
        return None
    return saved if isinstance(saved, dict) and {k: v for k, v in saved.items() if k in key} == key else None


def run_effect(runs: list[str], out: str | Path, model: str, settings: EffectSettings, command: str) -> dict:
    """Measure every run of ``runs`` (``NAME=ADAPTER``; the first is the baseline) and compare them; writes
    OUT/NAME.json per run as it lands (reused on a rerun with the same settings) and OUT/effect.json/.md.
    Every input is checked before the first model loads."""
    specs = _specs(runs)
    for name in settings.pair_sets:  # read now: a bad pair file found after minutes of sampling loses them
        load_set(name)
    load_prompts(settings.prompts)
    out = claim_dir(out)
    keys = {name: {"model": model, "adapter": adapter, "settings": asdict(settings)} for name, adapter in specs}
    measured = {name: saved for name, _ in specs if (saved := _reusable(out / f"{name}.json", keys[name])) is not None}
    for name, adapter in specs:  # before measuring any: a saved run needs no adapter any more
        if name not in measured:
            _check_adapter(name, adapter)
    for name, adapter in specs:
        path, key = out / f"{name}.json", keys[name]
        if name in measured:
            print(f"{name}: reused {path}", flush=True)
            continue
        start = time.perf_counter()
        lm, tokenizer = load_run(model, adapter)
        measured[name] = {**key, **measure(lm, tokenizer, settings), "seconds": round(time.perf_counter() - start, 1)}
        write_text_atomic(path, json.dumps(measured[name], indent=1))  # each run kept as it lands
        print(f"{name}: {measured[name]['seconds']:.0f} s", flush=True)
    measured = {name: measured[name] for name, _ in specs}  # in the order given: the first is the baseline
    baseline = specs[0][0]
    result = {"command": command,
              "model": model, "settings": asdict(settings), "baseline": baseline,
              "units": {"answers": "prompts", "margins": "pairs"}, **compare(measured, baseline),
              "means": {n: {k: mean_se(v) for k, v in _values(r).items()} for n, r in measured.items()},
              "seconds": {n: r["seconds"] for n, r in measured.items()}}
    write_text_atomic(out / "effect.json", json.dumps(result, indent=1))
    write_text_atomic(out / "effect.md", table(result))
    print(table(result))
    return result
