"""Every settings type refuses what is not a setting: found by walking the library, not listed.

A settings type is any class of ``emalign`` whose constructor takes a number (``int`` or ``float``, optional or
not): the classes a config or a verb builds. Records and results that carry numbers but are never built
from user input are named in ``NOT_SETTINGS`` with the reason; anything new is covered as it lands.
Each number is fed NaN, +inf and -inf (floats) and 0 and -1 (both): a float must refuse the first three in
one ``SettingError`` naming its key; any value must end in a ``SettingError`` or be accepted, never in
another exception.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import typing

import pytest

import emalign
from emalign.errors import SettingError

NOT_SETTINGS = {
    # results and records: built by the library from its own numbers
    "emalign.records.Rollout", "emalign.records.Pair", "emalign.conscience.step.StepResult",
    "emalign.conscience.decoding.Candidate", "emalign.conscience.decoding.Answer",
    "emalign.evaluation.codesec.Finding", "emalign.judges.scoring.JudgeResult",
    "emalign.evaluation.questions.EvalItem", "emalign.evaluation.questions.EvalItems",
    "emalign.data.download.EMFile", "emalign.data.download.ChecksumError",
    "emalign.planning.report.Plan", "emalign.planning.report.PhasePlan",
    # machinery built by the library from settings already checked where the user gave them
    "emalign.models.sampling.SeededSampler", "emalign.models.logprobs.SharedPrefixRows",
    "emalign.data.chat.PadCollator", "emalign.data.chat.ResumableSampler", "emalign.data.chat.EmptyTaskDataset",
    "emalign.discern.paired.PairBootstrap", "emalign.evaluation.metrics.ShareMetric",
    "emalign.evaluation.metrics.MisalignmentRate", "emalign.fence.lightning.CheckpointWriter",
    "emalign.fence.lightning.RichBar", "emalign.planning.step.Shapes",
}
NEEDS = {
    "ChatDataset": {"conversations": [], "tokenizer": None},
    "ConscienceDecoder": {"model": None, "tokenizer": None},
    "WarmupCosine": {"optimizer": "OPTIMIZER"},
    "Question": {"id": "q", "type": "free_form_judge_0_100", "paraphrases": ["Hi?"]},
    "FrozenJudge": {"reference": None, "tokenizer": None, "name": "judge"},
    "ConscienceStep": {"conscience": None, "pair_builder": None, "generation": None},
}
"""Required non-numeric arguments of a settings type (the numbers are checked before they are used)."""


def _numeric(hint) -> type | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return next((a for a in args if a in (int, float)), None)


def settings_types() -> dict[str, tuple[type, dict[str, type]]]:
    found = {}
    for info in pkgutil.walk_packages(emalign.__path__, "emalign."):
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__ or issubclass(cls, BaseException):
                continue
            own_init = "__init__" in vars(cls) or hasattr(cls, "__dataclass_fields__")
            hints = typing.get_type_hints(cls.__init__) if own_init else {}
            numbers = {k: t for k, h in hints.items() if k != "return" and (t := _numeric(h))}
            if numbers and f"{module.__name__}.{name}" not in NOT_SETTINGS:
                found[f"{module.__name__}.{name}"] = (cls, numbers)
    return found


CASES = [(f"{path}.{key}", cls, key, kind) for path, (cls, numbers) in sorted(settings_types().items())
         for key, kind in numbers.items()]


def test_the_walk_finds_the_settings_types():
    names = {path.rsplit(".", 1)[1] for path in settings_types()}
    assert {"GenerationSettings", "EvalSettings", "OpenAIJudge", "PairQueue", "PairBuilder", "LoRA"} <= names
    assert len(names) >= 25


def _build(cls, key, value):
    needs = dict(NEEDS.get(cls.__name__, {}))
    if needs.get("optimizer") == "OPTIMIZER":
        import torch

        needs["optimizer"] = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return cls(**{**needs, key: value})


@pytest.mark.parametrize("name, cls, key, kind", CASES, ids=[c[0] for c in CASES])
def test_every_number_refuses_what_is_not_a_setting(name, cls, key, kind):
    bad = [math.nan, math.inf, -math.inf] if kind is float else []
    for value in bad:
        with pytest.raises(SettingError) as err:
            _build(cls, key, value)
        assert key in str(err.value).split(":")[0], str(err.value)
    for value in (0, -1):
        try:
            _build(cls, key, value)
        except SettingError as err:
            assert key in str(err).split(":")[0], str(err)
