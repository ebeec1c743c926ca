"""The model wing: loading and wrapping causal LMs, and what is computed with them.

:mod:`~emalign.models.policy` loads models (a Hub id, a directory, a GGUF file) and wraps them for
fine-tuning (``Policy``, ``LoRA``) with their frozen reference; :mod:`~emalign.models.logprobs` computes
log-probs only where they are needed; :mod:`~emalign.models.sampling` samples with a seed per answer;
:mod:`~emalign.models.merge` decodes through merged LoRA layers; :mod:`~emalign.models.sharding` is FSDP2
for a ``Policy``; :mod:`~emalign.models.allocator` makes glibc give freed tensor memory back. Import from
the submodules (``from emalign.models.policy import Policy``); the main classes are also importable from
``emalign`` itself.
"""
