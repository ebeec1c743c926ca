"""One home per setting: each verb's --help shows the settings of the one type that declares them.

The evaluation settings (``EvalSettings``) are eval's flags, an experiment's ``--eval.*`` and the in-fit
callback's ``settings``; the decoding settings (``Decoding``) are the flags generate and chat share.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing

from conftest import run_cli
from emalign.commands.inference import Decoding
from emalign.evaluation.settings import EvalSettings

OWN = {"config", "print_config"}
"""What jsonargparse adds to every verb."""


def attribute_docs(cls) -> dict[str, str]:
    """{field: the docstring below it} of a dataclass, as jsonargparse reads it for --help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(after.value.value.split()) for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value.value, str)}


def options(help_text: str, prefix: str = "") -> dict[str, str]:
    """{option name without ``--PREFIX``: its help entry with all white space removed} of a --help."""
    entries = re.split(r"\n(?=  -)", help_text)
    found = {}
    for entry in entries:
        flag = re.match(rf"\s*--{re.escape(prefix)}([\w.]+)", entry)
        if flag and not re.search(r"(^|\.)help$", flag[1]):  # --judge.help shows a class's help, no setting
            found[flag[1]] = "".join(entry.split())
    return found


def _help(verb: str, capsys) -> str:
    assert run_cli([verb, "--help"]) == 0
    return capsys.readouterr().out


def _same_settings(cls, shown: dict[str, str], own: set[str], overridden: frozenset[str] = frozenset()) -> None:
    """Every field of ``cls`` is documented and in ``shown`` (a verb's options), with that documentation unless
    the verb ``overridden`` it with a default of its own; the other options are the verb's ``own``."""
    docs = attribute_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}  # every setting has its docstring
    assert set(shown) == set(docs) | OWN | own
    for name in set(docs) - overridden:
        assert "".join(docs[name].split()) in shown[name], name


def test_eval_and_experiment_show_the_same_evaluation_settings_from_one_type(capsys):
    from emalign.callbacks import AlignmentEvalCallback
    from emalign.evaluation.runner import run_eval
    from emalign.experiments.experiment import Experiment

    _same_settings(EvalSettings, options(_help("eval", capsys)), {"model", "adapter", "out"})
    experiment = options(_help("experiment", capsys), prefix="eval.")
    _same_settings(EvalSettings, {**experiment, **dict.fromkeys(OWN)}, set())  # only the --eval.* options
    # The library's homes take the same type: the runner, the experiment and the in-fit callback.
    assert typing.get_type_hints(run_eval)["settings"] == typing.Optional[EvalSettings]
    assert typing.get_type_hints(Experiment)["eval"] is EvalSettings
    assert typing.get_type_hints(AlignmentEvalCallback.__init__)["settings"] is EvalSettings


def test_generate_and_chat_show_the_same_decoding_settings_from_one_type(capsys):
    generate, chat = options(_help("generate", capsys)), options(_help("chat", capsys))
    _same_settings(Decoding, generate, {"prompts", "model", "adapter", "system", "out", "show_candidates"})
    _same_settings(Decoding, chat, {"model", "adapter", "show_score", "system"}, frozenset({"max_new_tokens"}))
    assert "default:256" in chat["max_new_tokens"] and "default:128" in generate["max_new_tokens"]


def test_a_setting_missing_from_a_help_is_found(capsys):
    shown = options(_help("eval", capsys))
    del shown["judge_min_mass"]
    try:
        _same_settings(EvalSettings, shown, {"model", "adapter", "out"})
    except AssertionError:
        return
    raise AssertionError("a help without --judge_min_mass passed")


def test_a_setting_error_names_the_key_as_the_user_typed_it(monkeypatch):
    """Whichever class checks a number, its error names the flag typed, else the config key holding that value
    (as a YAML file writes it, without init_args), else the class's own name for it."""
    from emalign.errors import TYPED, SettingError, as_typed, check_range

    def error(key, value):
        try:
            check_range(key, value, 1)
        except SettingError as err:
            return as_typed(err)

    monkeypatch.setitem(TYPED, "flags", ["--model", "--conscience.every_n_steps"])
    monkeypatch.setitem(TYPED, "config", [("conscience.pair_builder.margin", float("nan")), ("data.limit", 0),
                                          ("eval.limit", 5)])
    assert error("ConscienceCallback.every_n_steps", 0) == "--conscience.every_n_steps: must be >= 1, got 0"
    assert error("margin", float("nan")) == "conscience.pair_builder.margin: must be >= 1, got nan"
    assert error("limit", 0) == "data.limit: must be >= 1, got 0"  # the one key holding the bad value
    assert error("batch_size", 0) == "batch_size: must be >= 1, got 0"  # typed nowhere: as the class says
