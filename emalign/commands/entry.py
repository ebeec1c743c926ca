"""What the entry does before any verb runs: the command line's config files read and checked, and the
third-party notices that say nothing to a user hidden (EMALIGN_VERBOSE=1 shows them)."""

from __future__ import annotations

import os
from pathlib import Path

def check_config_files(args: list[str]) -> None:
    """Read every ``--config FILE`` of the command line, and the files it includes, as YAML first: a broken
    file is one line naming it, its line and column (jsonargparse would say ``"<unicode string>"``); a file
    that includes another and then gives a nested block for a section the include sets is refused (the block
    would replace that whole section, silently)."""
    for flag, value in zip(args, args[1:]):
        if flag == "--config" and Path(value).is_file():  # a missing file is the parser's to report, with the flag
            _included_sections(Path(value), f"--config {value}")


def _included_sections(path: Path, where: str, seen: tuple[Path, ...] = ()) -> set[str]:
    """The top-level sections ``path`` sets, its includes' (``config: other.yaml``, relative to it) among them."""
    import yaml

    from emalign.errors import UserError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise UserError(f"{at}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        return set()
    includes = data.get("config") or []
    included: set[str] = set()
    for name in [includes] if isinstance(includes, str) else includes:
        child = (path.parent / name).resolve()
        if child in seen or not child.is_file():
            continue  # a loop or a missing include is the parser's to report
        included |= _included_sections(child, f"{path}: config {name}", (*seen, path.resolve()))
    for key, value in data.items():
        if key in included and isinstance(value, dict):
            first = next(iter(value), "KEY")
            raise UserError(f"{path}: the `{key}:` block after `config: {includes}` would replace the included "
                            f"{key} section whole; write its keys dotted ({key}.{first}: ...) to change only them")
    return included | {str(k).split(".")[0] for k in data if k != "config"}


NOTICES = {  # logger -> what its notices that say nothing to a user start with or hold
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",  # a hub fetch it tries on import
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community",  # the same, offline
    "lightning.pytorch.utilities.rank_zero": "litlogger",  # an advertisement at every fit
}
WARNINGS = (r".*`is_gradient_checkpointing` is deprecated", r".*`gradient_checkpointing_(enable|disable)` is "
            "deprecated", r".*LeafSpec")
"""Third-party notices a user can do nothing about, hidden unless EMALIGN_VERBOSE=1."""


class _Hide:
    """A logging filter dropping the records whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Hide :data:`NOTICES` and :data:`WARNINGS` (at the entry, before the libraries load; once per process)."""
    import logging
    import warnings

    if os.environ.get("EMALIGN_VERBOSE") == "1":
        return
    for name, text in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Hide) for f in logger.filters):
            logger.addFilter(_Hide(text))
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
