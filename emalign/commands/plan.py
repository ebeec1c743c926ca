"""``cli.py plan``: a fit's peak GPU memory, per phase of its step, forecast on this machine without weights.

    python cli.py plan --config configs/em/insecure_conscience.yaml --out plan.json
    python cli.py plan --config configs/demo.yaml --conscience null --gpu_memory 16

It takes every fit flag, builds the fit's model at its real shape on the meta device from ``config.json``
alone, and runs one steady-state step through the project's code (``emalign.planning``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from emalign.errors import UserError


def plan(argv: list[str]) -> None:
    """Forecast a fit's peak GPU memory per phase of its step (sampling, review, task and pair steps, optimizer)."""
    from emalign.commands.cli import fit_cli_class
    from emalign.data.chat import ChatDataModule
    from emalign.files import write_json_atomic
    from emalign.models.policy import Policy
    from emalign.planning import plan_fit
    from emalign.planning.meta import MetaPolicy, materialize
    from emalign.planning.step import Shapes
    from emalign.training.module import EmergentAlignment

    base = fit_cli_class(argv, [])

    class PlanCLI(base):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--out", type=Optional[str], default=None,
                                help="write the plan as JSON to this file too")
            parser.add_argument("--gpu_memory", type=float, default=24.0,
                                help="GiB of the GPU the fit would run on: the plan says whether it fits")
            parser.add_argument("--model_config", type=Optional[str], default=None,
                                help="the model's config.json (default: the model's own, or the one emalign ships)")
            parser.add_argument("--device", type=Literal["meta", "cpu", "cuda"], default="meta",
                                help="meta: plan without weights; cpu: run the step for real with the model's weights "
                                     "(to check a plan); cuda: run it on a GPU with random weights of the real shape")
            parser.add_argument("--target", type=Literal["cuda", "cpu"], default="cuda",
                                help="with --device meta: the device whose kernels the plan assumes (cpu: to compare "
                                     "with a --device cpu run)")

        def instantiate_classes(self) -> None:
            _check(self.config)  # before any model is built
            if self.config["device"] == "cpu":  # the real model, weights and all
                self.config_init = self.parser.instantiate_classes(self.config)
                return
            policy = self.config["model"]["policy"]
            wanted = f"{Policy.__module__}.{Policy.__name__}"
            if getattr(policy, "class_path", wanted) != wanted:
                raise UserError(f"model.policy: plan builds {wanted} at its shape, not {policy.class_path}")
            policy.class_path = f"{MetaPolicy.__module__}.{MetaPolicy.__name__}"
            policy.init_args.model_config = self.config["model_config"]
            self.config_init = self.parser.instantiate_classes(self.config)

    cli = PlanCLI(EmergentAlignment, ChatDataModule, auto_configure_optimizers=False, parser_class=base.Parser,
                  args=argv, run=False, parser_kwargs={"prog": "cli.py plan", "description": plan.__doc__})
    config, built = cli.config, cli.config_init
    out, trainer = config["out"], config["trainer"]
    module, callback, data = built["model"], built["conscience"], built["data"]
    if config["device"] == "cuda":
        materialize(module.policy, "cuda")
    module.to(config["device"])  # the module's own device record, which the pair step reads
    runner = callback.runner if callback is not None else None
    generation = runner.generation if runner is not None else None
    shapes = Shapes(
        task_rows=data.batch_size if data.train_file else 0, task_tokens=data.max_length,
        accumulate=trainer.get("accumulate_grad_batches") or 1,
        prompts=callback.num_prompts if callback is not None else 0,
        prompt_tokens=(generation.max_prompt_tokens or data.max_length) if generation else 0,
        new_tokens=generation.max_new_tokens if generation else 0,
        pairs=module.pairs_per_step if callback is not None else 0)
    names = [a.removeprefix("--config=") for i, a in enumerate(argv)
             if a.startswith("--config=") or i and argv[i - 1] == "--config"]
    result = plan_fit(module, runner, shapes, trainer.get("precision"), trainer.get("gradient_clip_val"),
                      config["gpu_memory"], " + ".join(names) or "(flags)", module.policy.source, config["target"])
    print(result.table())
    if out is not None:
        write_json_atomic(Path(out), result.as_dict())
        print(f"plan written to {out}", file=sys.stderr)


def _check(config) -> None:
    """What plan cannot do with these settings, in one line, before anything is built."""
    from emalign.errors import check_range
    from emalign.planning import precision_of

    out, trainer = config["out"], config["trainer"]
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out {out}: a directory; plan writes one JSON file")
    check_range("--gpu_memory", config["gpu_memory"], 0, low_open=True)
    strategy = str(trainer.get("strategy") or "")
    if "fsdp" in strategy.lower() or "ModelParallel" in strategy:
        raise UserError("trainer.strategy: plan forecasts one unsharded process; FSDP is not planned yet")
    precision_of(trainer.get("precision"))


plan.takes_fit_flags = True  # cli.py hands it the command line as it is: the fit's parser reads it
