"""bandit's per-file scan step, run on an in-memory snippet (bandit's public entry point reads files)."""

from __future__ import annotations

import io


def scan_snippet(manager, name: str, source: bytes) -> None:
    """Run every plugin of ``manager`` (a ``BanditManager``) on ``source`` as the file ``name``; the results
    land in ``manager.results`` and ``manager.skipped`` as in ``run_tests``."""
    manager._parse_file(name, io.BytesIO(source), [name])
