"""The verbs ``cli.py`` adds beyond LightningCLI's fit/validate/test, one module per verb family.

``inference`` holds generate, chat and ``data em``; ``evaluation`` holds eval and experiment; ``discern``
holds discern; ``studies`` holds effect and self_correction; ``plan`` holds plan, which reads the fit's flags
with the fit's own parser (its target says so with ``takes_fit_flags``). ``VERBS`` below registers them all, in
one place: ``cli.py`` prints its verb list from it and dispatches through it. Each target is a ``"module:function"``
string (or a dict of them, one per subcommand), imported only when its verb runs, so that ``cli.py --help``
stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Union

Target = Union[str, dict[str, str]]

VERBS: dict[str, tuple[str, Target]] = {
    "data": ("download and verify datasets (`data em --out DIR`)",
             {"em": "emalign.commands.inference:data_em"}),
    "generate": ("answer prompts with the conscience picking (and revising) the best of K samples",
                 "emalign.commands.inference:generate"),
    "chat": ("interactive chat with the conscience at inference", "emalign.commands.inference:chat"),
    "eval": ("the EM evaluation: sampled answers judged for alignment and coherence, code security",
             "emalign.commands.evaluation:eval"),
    "experiment": ("run or reuse a set of fits, evaluate each, write one comparison",
                   "emalign.commands.evaluation:experiment"),
    "discern": ("what the conscience reads: question vs yes-tilt, trivial cues, paired CIs, a verdict per set",
                "emalign.commands.discern:discern"),
    "effect": ("what fits did on held-out prompts, by measures their loop did not optimise; seeds as the unit",
               "emalign.commands.studies:effect"),
    "self_correction": ("does the model fix its own bad answers: revisions of insecure code and bad chat answers",
                        "emalign.commands.studies:self_correction"),
    "plan": ("a fit's peak GPU memory per phase of its step, forecast at the real shape without weights or a GPU",
             "emalign.commands.plan:plan"),
}
"""verb -> (one-line description, ``"module:function"`` target, or a dict of them per subcommand)."""


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def verb_target(verb: str) -> Union[Callable[..., Any], dict[str, Callable[..., Any]]]:
    """The function behind ``verb`` (a dict of functions for a verb with subcommands), imported now."""
    target = VERBS[verb][1]
    if isinstance(target, dict):
        return {name: _resolve(value) for name, value in target.items()}
    return _resolve(target)
