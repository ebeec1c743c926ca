"""Planning a fit's GPU memory before renting a GPU: one steady-state step of the fit run on the meta device at
the model's real shape, every phase's peak counted (``cli.py plan``).

- :mod:`emalign.planning.tracker`: live memory, op by op (a dispatch mode), with the kind of each storage;
- :mod:`emalign.planning.cuda`: what CUDA does that meta cannot (autocast's dtypes, the attention kernel);
- :mod:`emalign.planning.meta`: the policy built from ``config.json`` on meta, 4-bit layers included;
- :mod:`emalign.planning.step`: the step, phase by phase, through the project's own code;
- :mod:`emalign.planning.report`: the table, the allowance for what is not traced, and the verdict.
"""

from __future__ import annotations

from typing import Optional

import torch

from emalign.conscience.step import ConscienceStep
from emalign.errors import UserError
from emalign.planning.report import Plan, make_plan
from emalign.planning.step import PRECISIONS, Shapes, run_step
from emalign.training.module import EmergentAlignment

TRACED = [
    "every phase's tensors, op by op, through emalign's, transformers', peft's and bitsandbytes' own code",
]
QUANTIZED = "4-bit weights: sized by bitsandbytes' quantize_4bit on meta (its own rules; no weights quantised)"
SAMPLING = "sampling: decoded to max_new_tokens on every row, as sample_ids would with no end of turn"
ON_META = ["attention: the target's fused kernel, called on meta (emalign.planning.cuda)"]


def precision_of(value) -> str:
    """Lightning's ``trainer.precision`` as one of ``PRECISIONS`` (its short forms too), or one line why not."""
    name = {None: "32-true", 32: "32-true", "32": "32-true", "bf16": "bf16-mixed", 16: "16-mixed",
            "16": "16-mixed"}.get(value, value)
    if name not in PRECISIONS:
        raise UserError(f"trainer.precision={value!r}: plan runs {', '.join(PRECISIONS)} (the others are not "
                        "planned yet)")
    return name


def plan_fit(module: EmergentAlignment, conscience: Optional[ConscienceStep], shapes: Shapes, precision,
             clip: Optional[float], gpu_memory_gib: float, config: str, model: str, target: str = "cuda") -> Plan:
    """Run the step (``run_step``) on ``module``'s device and give the plan (on meta: for ``target``)."""
    name = precision_of(precision)
    memory = run_step(module, conscience, shapes, name, clip, target)
    device = next(module.policy.parameters()).device.type
    computed = [SAMPLING] if conscience is not None and shapes.prompts else []
    if device == "meta":
        computed += ON_META + ([QUANTIZED] if module.policy.quantized else [])
        if name != "32-true":
            computed.append(f"{name}: CUDA autocast's dtype choices emulated on meta (emalign.planning.cuda)")
    plan = make_plan(memory, shapes, config=config, model=model, device=f"meta, for {target}" if device == "meta"
                     else device, precision=name, gpu_memory_gib=gpu_memory_gib, traced=list(TRACED), computed=computed)
    if device == "cuda":  # what the device holds beyond torch's allocator: the CUDA context, library workspaces
        free, total = torch.cuda.mem_get_info()
        held, reserved = (total - free) / 2**30, torch.cuda.memory_reserved() / 2**30
        plan.measured = {"device_used_gib": round(held, 4), "torch_reserved_gib": round(reserved, 4),
                         "beyond_torch_gib": round(held - reserved, 4)}
    return plan
