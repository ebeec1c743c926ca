"""``python cli.py ...`` from a checkout is the ``emalign`` command: its home is ``emalign.commands.cli``,
so that ``pip install .`` carries it (as the ``emalign`` console script) without a top-level ``cli``."""

from emalign.commands.cli import main

if __name__ == "__main__":
    main()
