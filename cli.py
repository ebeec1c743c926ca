"""emalign's one command-line entry.

    python cli.py fit --config configs/demo.yaml          # train (LightningCLI: fit/validate/test/predict)
    python cli.py fit --config configs/demo.yaml --print_config
    python cli.py data em --out data/em                   # download and verify the upstream EM data
    python cli.py generate --prompts prompts.txt          # best-of-K answers reviewed by the conscience
    python cli.py chat                                    # the same, interactively
    python cli.py eval --questions first_plot_questions.yaml --out runs/eval
    python cli.py experiment --config configs/experiments/cpu_smollm2.yaml
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VERBS = {
    "data": "download and verify datasets (`data em --out DIR`)",
    "generate": "answer prompts with the conscience picking (and revising) the best of K samples",
    "chat": "interactive chat with the conscience at inference",
    "eval": "the EM evaluation: sampled answers judged for alignment and coherence, code security",
    "experiment": "run or reuse a set of fits, evaluate each, write one comparison",
}


def _extra_verb(verb: str, args: list[str]) -> None:
    from jsonargparse import CLI

    from emalign import commands

    if verb == "data":
        CLI({"em": commands.data_em}, args=args, prog="cli.py data", as_positional=False)
    elif verb in ("eval", "experiment"):
        from emalign import eval_commands

        CLI(getattr(eval_commands, verb), args=args, prog=f"cli.py {verb}", as_positional=False)
    else:
        CLI(getattr(commands, verb), args=args, prog=f"cli.py {verb}", as_positional=False)


def _lightning(args: list[str] | None) -> None:
    from lightning.pytorch.cli import LightningCLI

    from callbacks.checkpoint import RunCheckpoint, check_checkpoint
    from callbacks.signals import StopOnSignal
    from emalign.data import ChatDataModule
    from emalign.module import EmergentAlignment

    def explicit_checkpoint(ckpt_path) -> bool:
        return bool(ckpt_path) and ckpt_path not in ("last", "best", "hpc") and "://" not in str(ckpt_path)

    class EmalignCLI(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the hyperparameters of an explicit --ckpt_path before anything else;
            # a truncated file must give our error, not torch's.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if explicit_checkpoint(ckpt_path):
                check_checkpoint(ckpt_path)
            super()._parse_ckpt_path()

        def before_fit(self) -> None:
            trainer = self.trainer
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, RunCheckpoint):
                    callback.bind(trainer)
            if not any(isinstance(c, StopOnSignal) for c in trainer.callbacks):
                trainer.callbacks.append(StopOnSignal())  # SIGTERM/SIGINT: checkpoint, then stop
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            if ckpt_path == "last":  # the file Lightning will pick: the newest last*.ckpt
                found = [c.last_checkpoint(trainer) for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)]
                found = [f for f in found if f]
                if found:
                    check_checkpoint(max(found, key=os.path.getmtime))
            # An explicit path was checked in _parse_ckpt_path already.

    cli = EmalignCLI(
        EmergentAlignment,
        ChatDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    if cli.subcommand == "fit":
        stopped = [c.exit_code for c in cli.trainer.callbacks if isinstance(c, StopOnSignal) and c.exit_code]
        if stopped:
            raise SystemExit(stopped[0])  # 128 + signal: the fit stopped early, its checkpoint saved


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in VERBS:
        _extra_verb(argv[0], argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Verbs beyond LightningCLI's:")
        for verb, text in VERBS.items():
            print(f"  {verb:<11} {text}")
        print("\nLightningCLI (fit, validate, test, predict):")
    from emalign.errors import friendly_errors

    with friendly_errors():
        try:
            _lightning(None if from_shell else argv)
        except KeyboardInterrupt:  # before or after training (StopOnSignal handles it during training)
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as err:
            cause = _user_error_in(err)
            if cause is None or cause is err:
                raise
            raise cause from None  # e.g. a missing model, wrapped by jsonargparse while instantiating


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
