"""The fence: every private API emalign touches, each behind a public name, in one subpackage.

Dependencies may change private names between minor versions without notice. Only the modules here
touch them (tests/test_architecture.py finds any other use by pattern), and that test checks that each still
exists (with the signature or the behaviour used), so an upgrade fails there, loudly, rather than in a fit:

- :mod:`emalign.fence.lightning`: ``ModelCheckpoint``'s, ``LightningCLI``'s and ``RichProgressBar``'s
  private methods, the fit loop's batch counter, the trainer a module runs under;
- :mod:`emalign.fence.models`: what a transformers model was loaded from, its decoder layer classes, its
  attention kernel;
- :mod:`emalign.fence.parsing`: argparse's action tables and jsonargparse's type hint of an action;
- :mod:`emalign.fence.checkpointing`: transformers' per-layer activation checkpointing function;
- :mod:`emalign.fence.scanning`: bandit's per-file scan step.

The submodules are imported where used (this file imports nothing), so reading a parser does not load
Lightning.
"""
