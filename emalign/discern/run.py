"""One discern run: labelled sets scored by a model's conscience, saved as they are scored, then analysed.

    from emalign.discern.run import run_discern
    result = run_discern("runs/discern", "smollm2-135m-instruct", None, ["chat"], [Wording("default", question)])

``python cli.py discern`` (:mod:`emalign.commands.discern`) is its command line.
The numbers and their intervals are defined in ``emalign.discern.labelled`` and ``emalign.discern.paired``.
Writes OUT/discern.json (every number plus every answer's score) and OUT/discern.md, and prints the same
tables and one verdict line per set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Union

from emalign.discern.labelled import Wording, analyse, by_group, consistency, load_set, score_set, summarize
from emalign.discern.paired import PairBootstrap
from emalign.errors import UserError
from emalign.files import RowWriter, claim_dir, read_rows, write_json_atomic, write_text_atomic
from emalign.models.policy import load_for_inference

log = logging.getLogger(__name__)


class DiscernError(UserError):
    """A discern run that cannot go on as asked (another result or saved scores in --out)."""

HEADER = ["set", "wording", "n", "accuracy [95% CI]", "AUROC [95% CI]", "gap ± se", "approved good", "approved bad"]


def _rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result["results"]:
        rows.append([
            r["set"], r["wording"], str(r["n"]), _cell(r["accuracy"]), _cell(r["auroc"]),
            _num(r["gap"]["mean"], "+.3f") + ("" if r["gap"]["se"] is None else f" ± {r['gap']['se']:.3f}"),
            f"{r['approval']['good']['value']:.2f}", f"{r['approval']['bad']['value']:.2f}",
        ])
    return rows


def _consistency_rows(result: dict) -> list[list[str]]:
    return [[c["set"], f"{c['inverted']} vs {c['direct']}", _cell(c["agree"]),
             _num(c["pearson"], "+.2f"), _num(c["spearman"], "+.2f")] for c in result["consistency"]]


def _num(value, spec: str) -> str:
    """``value`` formatted, or ``-`` where a statistic is undefined (one pair has no se, no correlation)."""
    return "-" if value is None or value != value else format(value, spec)


CONSISTENCY_HEADER = ["set", "wordings", "same preference [95% CI]", "Pearson", "Spearman"]
READS_HEADER = ["set", "reader", "AUROC [95% CI]", "accuracy [95% CI]"]
STYLE_HEADER = ["set", "split", "n", "judge accuracy", "c accuracy", "t accuracy"]


def _cell(metric: dict) -> str:
    if metric["value"] is None:
        return "-"
    return f"{metric['value']:.2f}" + (f" [{metric['ci'][0]:.2f}, {metric['ci'][1]:.2f}]" if metric["ci"] else "")


def _reads_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, a in result["analysis"].items():
        readers = {"judge (direct)": a["judge"], **{f"{k} ({'content' if k == 'c' else 'tilt'})": a["tilt_content"][k]
                                                   for k in ("c", "t") if "tilt_content" in a},
                   **{f"cue: {k}": v for k, v in a["cues"].items()}}
        rows += [[name, reader, _cell(v["auroc"]), _cell(v["accuracy"])] for reader, v in readers.items()]
        m = a["margin_over_best_cue"]
        rows.append([name, f"judge - best cue ({m['best_cue']})", _cell(m), ""])
        if "tilt_content" in a and a["tilt_content"]["gap_share_t"] is not None:
            rows.append([name, "tilt share of gap / variance", f"{a['tilt_content']['gap_share_t']:.0%}",
                         f"{a['tilt_content']['variance_share_t']:.0%}"])
    return rows


def _style_rows(result: dict) -> list[list[str]]:
    return [[name, part, str(v["n"])] + [_cell(v[k]) if k in v else "-" for k in ("judge", "c", "t")]
            for name, a in result["analysis"].items() for part, v in a["style"].items()]


def _markdown(result: dict) -> str:
    def table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    questions = "\n".join(f"- `{w['name']}`{' (inverted: yes/no swapped)' if w['inverted'] else ''}: {w['question']}"
                          for w in result["wordings"])
    text = [
        f"# Discernment of {result['model']}" + (f" + {result['adapter']}" if result["adapter"] else ""),
        "", f"Reviewer: {result['reviewer']}. Score = log P(yes) - log P(no); higher means better.",
        "Accuracy: Wilson 95% CI over pairs (ties count half). AUROC: pair-bootstrap 95% CI (pairs resampled,",
        "2000 times). Approval: share of score > 0.",
        "", "## Verdicts", "", *[f"- {a['verdict']['line']}" for a in result["analysis"].values()],
        "", questions, "", table(HEADER, _rows(result)),
        "", "## What the judge reads", "",
        "t = (direct - inverted) / 2 moves the same way whichever way the question is asked (question-independent,",
        "not content-free: it can still separate good from bad); c = (direct + inverted) / 2 flips with the question.",
        "Cues are fixed rules (longer is better, more commas is better). Hard pairs: the bad answer is longer.",
        "", table(READS_HEADER, _reads_rows(result)),
        "", table(STYLE_HEADER, _style_rows(result)),
    ]
    if result["consistency"]:
        text += ["", "## Inverted-question control", "", table(CONSISTENCY_HEADER, _consistency_rows(result))]
    for name in result["sets"]:
        runs = [r for r in result["results"] if r["set"] == name and r["groups"]]
        if runs:
            cell = "{accuracy:.2f} ({gap:+.2f})".format
            rows = [[g, str(v["n"])] + [cell(**r["groups"][g]) for r in runs] for g, v in runs[0]["groups"].items()]
            text += ["", f"### {name} by group: accuracy (mean gap)", "",
                     table(["group", "n"] + [r["wording"] for r in runs], rows)]
    text += ["", f"{result['answers_scored']} answers scored in {result['seconds']:.0f} s "
             f"(load average {result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f} after)."]
    return "\n".join(text) + "\n"


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, header, rows in (("Discernment", HEADER, _rows(result)),
                                ("Inverted-question control", CONSISTENCY_HEADER, _consistency_rows(result)),
                                ("What the judge reads", READS_HEADER, _reads_rows(result)),
                                ("Style control (hard: the bad answer is longer)", STYLE_HEADER, _style_rows(result))):
        if rows:
            table = Table(*header, title=title)
            for row in rows:
                table.add_row(*row)
            console.print(table)
    for a in result["analysis"].values():
        console.print(a["verdict"]["line"], markup=False, soft_wrap=True)


def _earlier(path: Path, model: str, adapter: Optional[str], loaded: dict, wordings: list[Wording]) -> Optional[dict]:
    """The result at ``path`` when it was made with these settings (model, adapter, sets in order and their
    sizes, questions), else None."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        was = (old["model"], old["adapter"], [(k, v["n_pairs"]) for k, v in old["sets"].items()],
               [(w["question"], w["inverted"]) for w in old["wordings"]])
        now = (model, adapter, [(k, len(v)) for k, v in loaded.items()], [(w.question, w.inverted) for w in wordings])
        same = was == now
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return old if same else None


SCORES_FILE, SCORES_CONFIG = "scores.jsonl", "scores_config.json"
"""Answers scored so far, a row a batch, and the settings they were scored with: a run that stops (Ctrl+C, a
crash) continues where it was; both go once discern.json is written."""


def run_discern(out: Union[str, Path], model: str, adapter: Optional[str], sets: list[str], wordings: list[Wording],
                batch_size: int = 8, limit: Optional[int] = None, show: bool = True, overwrite: bool = False,
                reuse: bool = False) -> dict:
    """Score ``sets`` with ``wordings``, write OUT/discern.json and OUT/discern.md, return the result.

    The output directory and the sets are checked before the model loads (scoring takes minutes). An
    OUT/discern.json made with other settings is replaced only with ``overwrite``; one made with these
    settings is returned as it is with ``reuse``, else scored again. Scores are saved as they are made
    (OUT/scores.jsonl): a rerun with the same settings scores only what is missing.
    """
    out = claim_dir(out)
    loaded = {name: load_set(name)[:limit] for name in sets}
    path = out / "discern.json"
    earlier = _earlier(path, model, adapter, loaded, wordings) if path.is_file() else None
    if earlier is not None and reuse:
        return earlier
    if path.is_file() and earlier is None and not overwrite:
        raise DiscernError(f"{path} holds a discern result made with other settings (model, adapter, sets or "
                          "questions); pass --overwrite true to replace it, or choose another --out")
    done = _saved_scores(out, _scoring(model, adapter, loaded, wordings), overwrite)
    result = _run(model, adapter, loaded, wordings, batch_size, done, out / SCORES_FILE)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "discern.md", _markdown(result))
    for name in (SCORES_FILE, SCORES_CONFIG):
        (out / name).unlink()
    if show:
        _print(result)
        print(f"wrote {path} and {out / 'discern.md'}")
    return result


def _scoring(model: str, adapter: Optional[str], loaded: dict, wordings: list[Wording]) -> dict:
    """What the saved scores mean: the reviewer, every pair's text and the questions."""
    pairs = {name: hashlib.sha256(json.dumps([vars(p) for p in v], sort_keys=True).encode()).hexdigest()
             for name, v in loaded.items()}
    return {"model": model, "adapter": adapter, "pairs_sha256": pairs, "wordings": [vars(w) for w in wordings]}


def _saved_scores(out: Path, scoring: dict, overwrite: bool) -> dict[str, dict[int, dict[str, float]]]:
    """{set: {answer number: {wording: score}}} saved by a run that stopped with these settings; saved scores
    made with other settings are refused, or dropped with ``overwrite``."""
    config = out / SCORES_CONFIG
    if config.is_file():
        try:
            same = json.loads(config.read_text(encoding="utf-8")) == scoring
        except ValueError:
            same = False  # a torn file: its scores cannot be trusted
        if not same and not overwrite:
            raise DiscernError(f"{out / SCORES_FILE} holds scores of a stopped run with other settings "
                               "(model, adapter, sets or questions); pass --overwrite true to drop them, or choose "
                               "another --out")
        if not same:
            (out / SCORES_FILE).unlink(missing_ok=True)
    elif (out / SCORES_FILE).exists():
        (out / SCORES_FILE).unlink()  # no record of what they were scored with
    write_json_atomic(config, scoring)
    done: dict[str, dict[int, dict[str, float]]] = {}
    for key, row in read_rows(out / SCORES_FILE).items():
        name, _, number = key.rpartition(":")
        done.setdefault(name, {})[int(number)] = row["scores"]
    if done:
        log.info("%s: %d answers scored before are kept", out / SCORES_FILE, sum(map(len, done.values())))
    return done


def _run(model: str, adapter: Optional[str], loaded: dict, wordings: list[Wording], batch_size: int,
         done: dict[str, dict[int, dict[str, float]]], scores_file: Path) -> dict:
    from rich.progress import Progress

    lm, tokenizer = load_for_inference(model, adapter)
    start, load_before = time.time(), os.getloadavg()
    total = sum(2 * len(pairs) for pairs in loaded.values()) * len(wordings)
    scores: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    writer = RowWriter(scores_file)
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("answers scored", total=total)
            for name, pairs in loaded.items():
                def save(numbers: list[int], values: dict[str, list[float]], name: str = name) -> None:
                    for j, number in enumerate(numbers):
                        writer.write({"key": f"{name}:{number}", "scores": {w: v[j] for w, v in values.items()}})

                by_wording = score_set(lm, tokenizer, wordings, pairs, batch_size, lambda n: progress.advance(task, n),
                                       done=done.get(name, {}), saved=save)
                scores.update({(name, wording): values for wording, values in by_wording.items()})
    finally:
        writer.close()
    results, checks, analysis = [], [], {}
    direct = next(w for w in wordings if not w.inverted)
    inverted = next((w for w in wordings if w.inverted), None)
    for name, pairs in loaded.items():
        boot = PairBootstrap(len(pairs))
        analysis[name] = analyse(name, pairs, scores[name, direct.name],
                                 scores[name, inverted.name] if inverted else None, tokenizer, boot)
        for wording in wordings:
            good, bad = scores[name, wording.name]
            results.append({"set": name, "wording": wording.name, **summarize(good, bad, boot),
                            "groups": by_group(pairs, good, bad), "scores": {"good": good, "bad": bad}})
            if wording.inverted:
                checks.append({"set": name, "inverted": wording.name, "direct": direct.name,
                               **consistency(scores[name, direct.name], scores[name, wording.name])})
    return {
        "model": model, "adapter": adapter,
        "reviewer": "the model with its adapter on (its own conscience)" if adapter else "the model",
        "sets": {name: {"n_pairs": len(pairs), "source": name} for name, pairs in loaded.items()},
        "wordings": [vars(w) for w in wordings], "batch_size": batch_size,
        "analysis": analysis, "results": results, "consistency": checks, "answers_scored": total,
        "seconds": time.time() - start, "load_before": list(load_before), "load_after": list(os.getloadavg()),
    }
