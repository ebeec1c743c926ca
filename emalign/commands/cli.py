"""emalign's one command-line entry.

    python cli.py fit --config configs/demo.yaml          # train (LightningCLI: fit/validate/test)
    python cli.py test --config configs/demo.yaml         # task loss on data.test_file (else the validation split)
    python cli.py fit --config configs/demo.yaml --print_config
    python cli.py data em --out data/em                   # download and verify the upstream EM data
    python cli.py generate --prompts prompts.txt          # best-of-K answers reviewed by the conscience
    python cli.py chat                                    # the same, interactively
    python cli.py eval --questions first_plot_questions.yaml --out runs/eval
    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml
    python cli.py discern --out runs/discern              # how well the conscience tells good from bad
    python cli.py effect --out runs/effect --runs base= method_s0=runs/method_s0/adapter
    python cli.py self_correction --out runs/self_correction
    python cli.py plan --config configs/em/insecure_conscience.yaml   # peak GPU memory per phase, no GPU
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from emalign.commands import VERBS, verb_target
from emalign.commands.entry import check_config_files, quiet_third_party
from emalign.fence import parsing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prog() -> str:
    """``emalign`` when started by the console script, ``cli.py`` otherwise (for usage lines)."""
    name = Path(sys.argv[0]).name
    return "emalign" if name == "emalign" else "cli.py"


RESUME = {
    "eval": "interrupted: the finished answers are saved; the same command resumes",
    "experiment": "interrupted: finished fits and answers are saved; the same command resumes",
    "discern": "interrupted: the answers scored so far are saved; the same command scores the rest",
    "effect": "interrupted: every finished run is saved in --out; the same command resumes",
    "self_correction": "interrupted: each finished arm is saved in --out",
    "data": "interrupted: the same command downloads again (finished files are verified and kept)",
}


class OneLineErrors:
    """A jsonargparse parser mixin: a final parse error is one line (the key, the value and what is wrong
    with it) instead of a usage block."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying alternatives, not a final verdict
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        print(f"error: {one_line_error(message, parser)} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


@contextmanager
def _one_line(interrupted: str) -> Iterator[None]:
    """``friendly_errors``, also for the ``UserError`` that jsonargparse wraps while instantiating a class
    (a missing model, a setting checked in its dataclass)."""
    from emalign.errors import TYPED, friendly_errors
    from emalign.files import release_claims

    try:
        with friendly_errors(interrupted):
            try:
                yield
            except Exception as err:
                cause = _user_error_in(err)
                if cause is None or cause is err:
                    raise
                raise cause from None
            finally:
                release_claims()  # the verb's directories: free for the next writer
    finally:
        TYPED.update(flags=[], config=[])  # what this command typed names no later one's keys


def _extra_verb(verb: str, args: list[str]) -> None:
    with _one_line(RESUME.get(verb, "interrupted")):
        target = verb_target(verb)
        if getattr(target, "takes_fit_flags", False):  # plan: the fit's own parser reads its command line
            target(args)
        else:
            _run_verb(verb, args)


def remember_typed(args: list[str], config) -> None:
    """Keep the flags and the parsed config of this command, for :func:`emalign.errors.as_typed`."""
    from emalign.errors import TYPED

    flags = [a.partition("=")[0] for a in args if a.startswith("--") and a != "--config"]
    # A config key as a YAML file writes it: jsonargparse takes `conscience: {pair_builder: ...}` without init_args.
    items = [(k.replace(".init_args.", "."), v) for k, v in config.items()] if config is not None else []
    TYPED.update(flags=flags, config=items)


def _run_verb(verb: str, args: list[str]) -> None:
    from jsonargparse import CLI, ArgumentParser, capture_parser, set_parsing_settings

    target = verb_target(verb)
    parser_class = type("OneLineParser", (OneLineErrors, ArgumentParser), {})
    kwargs = dict(prog=f"{_prog()} {verb}", as_positional=False, parser_class=parser_class)
    # The verbs' settings dataclasses document each field in a docstring below it; --help shows that text.
    # Only here: for `fit` it would make every parser build 0.7 s slower (0.86 s against 0.15 s).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        parser = capture_parser(lambda: CLI(target, args=[], **kwargs))
        args = join_list_values(args, list_flags(parser))
        remember_typed(args, parser.parse_args(args) if "--help" not in args and "-h" not in args else None)
        CLI(target, args=args, **kwargs)
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)


def list_flags(parser) -> dict[str, bool]:
    """The flags that take a list (jsonargparse gives each an appending twin, ``--flag+``), each with whether
    one string is a value of its own too (``Union[list[str], str]``, as discern's ``--sets "code chat"``)."""
    import types
    import typing

    flags = {}
    for action in parsing.actions(parser):
        hint = parsing.type_hint(action)
        unions = (typing.Union, types.UnionType)  # list[str]'s args hold str too: only a union's count
        takes_text = hint is str or typing.get_origin(hint) in unions and str in typing.get_args(hint)
        flags.update({s[:-1]: takes_text for s in action.option_strings if s.endswith("+")})
        for sub in parsing.subparsers(action).values():  # subcommands (``data em``)
            flags.update(list_flags(sub))
    return flags


def join_list_values(args: list[str], flags: dict[str, bool]) -> list[str]:
    """``--flag a b`` -> ``--flag ["a", "b"]`` for list flags, as users type them (jsonargparse takes one
    token per flag), and ``--flag a`` -> ``--flag ["a"]`` where one string is not a value of its own;
    ``[a,b]``, ``null`` and ``--flag=...`` pass unchanged."""
    out: list[str] = []
    i = 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] not in flags:
            continue
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        single = (len(values) == 1 and not flags[out[-1]] and not values[0].lstrip().startswith("[")
                  and values[0] not in ("null", "None"))
        out += [json.dumps(values)] if len(values) > 1 or single else values  # one value is a list of one
    return out


def fit_cli_class(args: list[str] | None, fitting: list):
    """The LightningCLI class of fit, validate and test (``plan`` builds on it): ``args`` as the command gave them
    (``None``: ``sys.argv``), ``fitting`` receives the fit's trainer once it starts."""
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningArgumentParser

    from emalign.callbacks import ConscienceCallback, StopOnSignal
    from emalign.errors import UserError
    from emalign.fence.lightning import CheckedCkptPathCLI
    from emalign.files import claim_dir
    from emalign.training.checkpoint import RunCheckpoint, check_checkpoint

    class Parser(OneLineErrors, LightningArgumentParser):
        pass

    class EmalignCLI(CheckedCkptPathCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # No predict: answers with the conscience's verdicts are `cli.py generate`.
            return {k: v for k, v in CheckedCkptPathCLI.subcommands().items() if k in ("fit", "validate", "test")}

        def add_arguments_to_parser(self, parser) -> None:
            # The conscience has a section of its own, beside trainer/model/data, so that one flag turns it
            # off (--conscience null) or tunes it (--conscience.every_n_steps 8) without restating the
            # trainer's callback list (a later list replaces an earlier one whole).
            parser.add_argument("--conscience", type=Optional[ConscienceCallback], default=None,
                                help="the conscience step (emalign.callbacks.ConscienceCallback); null: none")

        def instantiate_trainer(self, **kwargs):
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            conscience, callbacks = config.get("conscience"), list(config["trainer"].get("callbacks") or [])
            if conscience is None:
                return super().instantiate_trainer(**kwargs)
            if any(isinstance(c, ConscienceCallback) for c in callbacks):
                raise UserError("the conscience is given twice, in conscience and in trainer.callbacks; "
                                "keep the conscience section (--conscience null turns it off)")
            return super().instantiate_trainer(callbacks=[*callbacks, conscience], **kwargs)

        def check_ckpt_path(self, path: str) -> None:
            check_checkpoint(path)

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            self.datamodule.connect(self.model.tokenizer)  # the data is tokenised as the model reads it

        def parse_arguments(self, parser, args) -> None:
            if isinstance(args, (dict, Namespace)):
                return super().parse_arguments(parser, args)
            # A logger without a save_dir writes under the run's default_root_dir, so that one flag
            # (--trainer.default_root_dir) moves logs, checkpoints, rollouts and the adapter together.
            # The value must be in place before validation, which requires CSVLogger's save_dir.
            self.config = parsing.parse_unvalidated(parser, args)
            config = self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
            trainer = config["trainer"]
            loggers = trainer.get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                init_args = getattr(logger, "init_args", None)
                if not (isinstance(init_args, Namespace) and "save_dir" in init_args):
                    continue
                # WandbLogger's own default is "." (the working directory), not None.
                unset = init_args.save_dir is None or (logger.class_path.endswith(".WandbLogger")
                                                       and init_args.save_dir == ".")
                if unset:
                    init_args.save_dir = trainer.get("default_root_dir") or os.getcwd()
            try:
                parser.validate(self.config)
            except (TypeError, KeyError, ValueError) as err:
                parser.error(str(err), err)

        def before_instantiate_classes(self) -> None:
            remember_typed(list(args or sys.argv[1:]), self.config.get(self.subcommand) if self.subcommand else None)
            # FSDP's unsupported combinations fail here, in one line, before any weights load.
            from emalign.models.sharding import check_config

            config = self.config.get(self.subcommand) if self.subcommand else self.config
            policy = config.get("model.policy") or {}
            quantization = (policy.get("init_args") or {}).get("quantization") if hasattr(policy, "get") else None
            callbacks = [*(config.get("trainer.callbacks") or []), config.get("conscience")]
            check_config(config.get("trainer.strategy"), quantization, [c for c in callbacks if c])
            _settings_first(self.parser, self.config, self.subcommand)
            if self.subcommand == "fit":
                claim_dir(config.get("trainer.default_root_dir") or os.getcwd(), "--trainer.default_root_dir")
            if self.subcommand == "validate" and config.get("data.val_fraction") == 0:  # before the weights load
                raise UserError("nothing to validate: data.val_fraction is 0, so there is no validation split "
                                "(set it above 0, or run `test` with data.test_file)")

        def before_fit(self) -> None:
            trainer = self.trainer
            fitting.append(trainer)
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, RunCheckpoint):
                    callback.bind(trainer)
            if not any(isinstance(c, StopOnSignal) for c in trainer.callbacks):
                trainer.callbacks.append(StopOnSignal())  # SIGTERM/SIGINT: checkpoint, then stop
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            if ckpt_path == "last":  # the file Lightning will pick: the newest last*.ckpt
                runs = [c for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)]
                found = [f for f in (c.last_checkpoint(trainer) for c in runs) if f]
                if found:
                    check_checkpoint(max(found, key=os.path.getmtime))
                elif runs:
                    # Lightning would start fresh too, after a hint to set save_last=True (which is set).
                    hint = f"--ckpt_path last: no checkpoint in {runs[0].dirpath}; the fit starts fresh"
                    print(hint, file=sys.stderr)
                    self.config_init[self.subcommand]["ckpt_path"] = None
            # An explicit path was checked in check_ckpt_path already.

    EmalignCLI.Parser = Parser
    return EmalignCLI


def _lightning(args: list[str] | None) -> None:
    from emalign.callbacks import StopOnSignal
    from emalign.data.chat import ChatDataModule
    from emalign.files import discard_without_result
    from emalign.training.module import EmergentAlignment

    fitting: list = []  # the fit's trainer, once it starts
    EmalignCLI = fit_cli_class(args, fitting)
    try:
        cli = EmalignCLI(
            EmergentAlignment,
            ChatDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_class=EmalignCLI.Parser,
            args=args,
        )
    except BaseException:
        if fitting and fitting[0].log_dir:  # a fit that failed: its log version holds its config, no result
            discard_without_result(Path(fitting[0].log_dir))
        raise
    finally:
        _end_process_group()
    if cli.subcommand == "fit":
        stopped = [c.exit_code for c in cli.trainer.callbacks if isinstance(c, StopOnSignal) and c.exit_code]
        if stopped:
            raise SystemExit(stopped[0])  # 128 + signal: the fit stopped early, its checkpoint saved


def _settings_first(parser, config, subcommand: Optional[str]) -> None:
    """Build every class of the config once with an :class:`~emalign.models.policy.UnloadedPolicy`, so that a
    setting out of range anywhere (data, conscience, queue, loss) is one line before the weights load: left to
    itself, jsonargparse builds the deeper ``model.policy``, weights and all, before those sections."""
    import copy

    from emalign.models.policy import Policy, UnloadedPolicy

    dry = copy.deepcopy(config)
    policy = dry.get(f"{subcommand}.model.policy" if subcommand else "model.policy")
    if policy is None or getattr(policy, "class_path", None) != f"{Policy.__module__}.{Policy.__name__}":
        return  # another policy class: its own checks run when it is built
    policy.class_path = f"{UnloadedPolicy.__module__}.{UnloadedPolicy.__name__}"
    parser.instantiate_classes(dry)


def _end_process_group() -> None:
    """Tear down the distributed process group a fit opened, before the interpreter exits: left to exit,
    its threads can abort a rank after a finished fit ("terminate called without an active exception",
    seen once in four two-node CI runs), and torchrun then waits 300 s at its exit barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party()
    with _one_line("interrupted"):
        check_config_files(argv)
    if argv and argv[0] in VERBS:
        _extra_verb(argv[0], argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.replace("python cli.py", "emalign") if _prog() == "emalign" else __doc__)
        print("Verbs beyond LightningCLI's:")
        for verb, (text, _) in VERBS.items():
            print(f"  {verb:<11} {text}")
        print("\nLightningCLI (fit, validate, test):")
    # Ctrl+C before or after training (StopOnSignal handles it during training).
    with _one_line("interrupted"):
        _lightning(None if from_shell else argv)


MOVED = {"emalign.evaluation.judges": "emalign.judges", "emalign.evaluation.local_judge": "emalign.judges",
         "emalign.evaluation.openai_judge": "emalign.judges", "emalign.evaluation.self_review": "emalign.judges",
         "emalign.evaluation.scoring": "emalign.judges"}
"""Modules whose classes a config may name that moved when the evaluation wing was split (2026-12)."""


def one_line_error(message: str, parser) -> str:
    """jsonargparse's many-line error for a ``class_path`` value as one line; other messages as they are.

    An unknown class names the classes that exist for that key (the subclasses of its type).
    """
    key = re.match(r'Parser key "([^"]+)":', message)
    problems = re.findall(r"Problem with given class_path '([^']+)':\n((?:\s{6,}.*\n?)+)", message)
    if not key or len(problems) != 1:
        return " ".join(message.split())
    path, reason = problems[0][0], " ".join(problems[0][1].split())
    module, _, name = path.rpartition(".")
    if module in MOVED:
        return f"{key[1]}: class_path {path!r} has moved: write {MOVED[module]}.{name}"
    if not re.search(r"has no attribute|No module named|Import path|not a subclass", reason):
        return f"{key[1]}: {reason}"
    known = sorted(known_subclasses(parsing.type_hint(parsing.option_action(parser, f"--{key[1]}"))))
    return f"{key[1]}: unknown class_path {path!r} ({reason}); classes that exist: {', '.join(known) or 'none found'}"


def known_subclasses(typehint) -> set[str]:
    """Import paths of the subclasses (imported so far) of the classes in ``typehint``, which lists them."""
    import inspect
    import typing

    bases = [t for t in (typing.get_args(typehint) or (typehint,)) if inspect.isclass(t) and t is not type(None)]
    found, todo = set(), [sub for base in bases for sub in base.__subclasses__()]
    while todo:
        cls = todo.pop()
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            found.add(f"{cls.__module__}.{cls.__qualname__}")
        todo += cls.__subclasses__()
    return found


def _user_error_in(err: BaseException):
    """The ``UserError`` behind ``err`` (jsonargparse wraps errors raised while instantiating classes), if any."""
    from emalign.errors import UserError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
