"""A plan's verdict: the peak of each phase, what dominates it, the overall peak, and whether it fits a GPU.

The traced bytes are what tensors hold. A GPU needs more than that: ``ALLOWANCE`` states what the plan adds
for what it cannot trace (the CUDA context and library workspaces, the caching allocator's rounding and
fragmentation). ``LEVERS`` says, per kind that dominates, which setting moves it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from emalign.planning.step import Shapes
from emalign.planning.tracker import META_ASSUMPTIONS, LiveMemory

GIB = 2**30

CONTEXT_GIB = 0.75
"""Added once: the CUDA context and the cuBLAS/cuDNN workspaces (about 0.5-0.8 GiB with torch 2 on an H100;
not traced, an assumption until the GPU check script measures it)."""
FRAGMENTATION = 0.10
"""Added on the traced peak: the caching allocator's block rounding and fragmentation (an assumption, as above)."""

ALLOWANCE = (f"{CONTEXT_GIB} GiB for the CUDA context and library workspaces, plus {FRAGMENTATION:.0%} of the "
             "traced peak for the caching allocator's rounding and fragmentation (assumed, not traced)")

LEVERS = {
    "4-bit weights": "a smaller model",
    "weights": "model.policy.init_args.quantization (4-bit base weights); with QLoRA, peft keeps the embeddings "
               "and head in float32",
    "adapter": "model.policy.init_args.adapter.r or target_modules",
    "optimizer state": "model.policy.init_args.adapter.r or target_modules (AdamW keeps two float32 moments)",
    "gradients": "model.policy.init_args.adapter.r or target_modules",
    "kv cache": "conscience.generation.batch_size, max_new_tokens or max_prompt_tokens",
    "logits": "data.max_length or conscience.generation.batch_size (logits are vocabulary-wide)",
    "activations": "model.policy.init_args.gradient_checkpointing, model.checkpoint_pairs, data.batch_size or "
                   "data.max_length",
    "optimizer temporaries": "the optimizer's foreach setting (model.optimizer.init_args.foreach: false)",
}


@dataclass
class PhasePlan:
    name: str
    peak_gib: float
    by_kind_gib: dict[str, float]
    """What was alive at the phase's peak, largest first."""
    allocated_gib: float | None = None
    """Run on a GPU: the CUDA allocator's peak over the phase (``torch.cuda.max_memory_allocated``)."""
    reserved_gib: float | None = None
    """Run on a GPU: what the caching allocator held at most (``torch.cuda.max_memory_reserved``)."""

    @property
    def dominant(self) -> str:
        return next(iter(self.by_kind_gib), "")


@dataclass
class Plan:
    config: str
    model: str
    device: str
    precision: str
    shapes: dict[str, int]
    phases: list[PhasePlan]
    gpu_memory_gib: float
    traced: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)
    """Run on a GPU: what the device says the process held beyond PyTorch's allocator (the CUDA context)."""

    @property
    def peak(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.peak_gib)

    @property
    def needed_gib(self) -> float:
        """The traced peak plus ``ALLOWANCE``."""
        return self.peak.peak_gib * (1 + FRAGMENTATION) + CONTEXT_GIB

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.gpu_memory_gib

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(peak_gib=self.peak.peak_gib, peak_phase=self.peak.name, needed_gib=round(self.needed_gib, 3),
                   fits=self.fits, allowance=ALLOWANCE)
        return out

    def table(self) -> str:
        lines = [f"plan: {self.config} ({self.model}, {self.precision}, on {self.device})",
                 "shapes: " + ", ".join(f"{k} {v}" for k, v in self.shapes.items()),
                 "", f"{'phase':<22} {'peak GiB':>9}  what is alive at the peak (GiB)"]
        for phase in self.phases:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in phase.by_kind_gib.items() if v >= 0.005)
            if phase.allocated_gib is not None:
                parts += f" | CUDA allocated {phase.allocated_gib:.2f}, reserved {phase.reserved_gib:.2f}"
            lines.append(f"{phase.name:<22} {phase.peak_gib:>9.2f}  {parts}")
        peak = self.peak
        verdict = "fits" if self.fits else "does NOT fit"
        lines += ["", f"peak: {peak.peak_gib:.2f} GiB traced, in {peak.name}; with the allowance {self.needed_gib:.2f}"
                      f" GiB: {verdict} in {self.gpu_memory_gib:g} GiB",
                  f"allowance: {ALLOWANCE}"]
        if not self.fits:
            lines.append(f"largest at the peak: {peak.dominant}; to lower it: {LEVERS.get(peak.dominant, '?')}")
        lines += [f"traced: {'; '.join(self.traced)}"] + ([f"computed: {'; '.join(self.computed)}"]
                                                          if self.computed else [])
        return "\n".join(lines)


def make_plan(memory: LiveMemory, shapes: Shapes, **fields: Any) -> Plan:
    def gib(value):
        return None if value is None else round(value / GIB, 4)

    phases = [PhasePlan(name, gib(p.peak), {k: gib(v) for k, v in sorted(p.at_peak.items(), key=lambda kv: -kv[1])
                                            if v > 0}, gib(p.allocated), gib(p.reserved))
              for name, p in memory.phases.items()]
    assumptions = list(META_ASSUMPTIONS) if str(fields.get("device")).startswith("meta") else []
    return Plan(shapes={k: v for k, v in asdict(shapes).items()}, phases=phases, assumptions=assumptions, **fields)
