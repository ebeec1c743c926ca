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
    else:
        CLI(getattr(commands, verb), args=args, prog=f"cli.py {verb}", as_positional=False)


def _lightning(args: list[str] | None) -> None:
    from lightning.pytorch.cli import LightningCLI

    from callbacks.checkpoint import RunCheckpoint
    from emalign.data import ChatDataModule
    from emalign.module import EmergentAlignment

    class EmalignCLI(LightningCLI):
        def before_fit(self) -> None:
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, RunCheckpoint):
                    callback.bind(self.trainer)

    EmalignCLI(
        EmergentAlignment,
        ChatDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


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
        _lightning(None if from_shell else argv)


if __name__ == "__main__":
    main()
