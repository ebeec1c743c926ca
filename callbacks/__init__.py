"""The design card's ``callbacks/``, kept for checkouts: the callbacks live in the library, ``emalign.callbacks``,
so that ``pip install .`` carries them and configs name them the same way installed or not.
``callbacks.ConscienceCallback`` here is ``emalign.callbacks.ConscienceCallback``."""

from emalign.callbacks import *  # noqa: F401,F403
from emalign.callbacks import __all__  # noqa: F401
