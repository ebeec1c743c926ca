"""The shape of the code: the library never imports upward, its wings keep the top level small and no name
shadows the standard library, and private APIs are used behind the fence only."""

from __future__ import annotations

import ast
import inspect
import re
import sys

from conftest import ROOT

PRIVATE = ("_parse_ckpt_path", "_find_last_checkpoints", "_save_checkpoint", "_monitor_candidates",
           "_save_last_checkpoint", "fit_loop", "_init_progress", "_get_train_description", "_update",
           "_metric_component", "_actions", "_name_parser_map", "_option_string_actions", "_typehint",
           "_gradient_checkpointing_func", "_parse_file", "_skip_validation")
"""The private names emalign uses, of Lightning, argparse, jsonargparse, transformers and bandit (all in
emalign/fence/)."""


def _imports(path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


ABOVE = {"callbacks": ("callbacks", "cli", "emalign.commands"), "commands": ("callbacks", "cli"),
         "": ("callbacks", "cli", "emalign.callbacks")}
"""What each part of emalign must not import: the checkout's aliases never; the callbacks not the commands;
the rest of the library not the callbacks (the commands sit on top, the callbacks below them)."""


def upward_imports(root) -> list[str]:
    found = []
    for path in sorted((root / "emalign").rglob("*.py")):
        wing = path.relative_to(root / "emalign").parts[0]
        above = ABOVE.get(wing, ABOVE[""])
        found += [f"{path.relative_to(root)}:{line}: imports {name}" for line, name in _imports(path)
                  if any(name == a or name.startswith(a + ".") for a in above)]
    return found


def test_the_library_never_imports_upward(tmp_path):
    assert upward_imports(ROOT) == []
    # The check itself can fail: planted upward imports (even inside a function) are found.
    for wing in ("training", "callbacks", "commands"):
        (tmp_path / "emalign" / wing).mkdir(parents=True)
    (tmp_path / "emalign" / "bad.py").write_text("def f():\n    from callbacks.checkpoint import x\n")
    (tmp_path / "emalign" / "training" / "bad.py").write_text("import emalign.callbacks.conscience\n")
    (tmp_path / "emalign" / "callbacks" / "bad.py").write_text("from emalign.commands import cli\n")
    (tmp_path / "emalign" / "commands" / "ok.py").write_text("from emalign.callbacks import x\nimport emalign\n")
    assert upward_imports(tmp_path) == ["emalign/bad.py:2: imports callbacks.checkpoint",
                                        "emalign/callbacks/bad.py:1: imports emalign.commands",
                                        "emalign/training/bad.py:1: imports emalign.callbacks.conscience"]


MAX_TOP_LEVEL_FILES = 6
"""emalign/'s own .py files, __init__.py included: the ground floor; everything else lives in a wing."""


def top_level_files(root) -> list[str]:
    return sorted(p.name for p in (root / "emalign").glob("*.py"))


def stdlib_shadows(root) -> list[str]:
    """Modules and packages under emalign/ named like a standard-library top-level module (``types``,
    ``queue``): inside the package they read as the standard library's and confuse readers and tools."""
    package = root / "emalign"
    names = [p for p in package.rglob("*.py") if p.name != "__init__.py"]
    names += [p for p in package.rglob("__init__.py") if p.parent != package]
    return sorted(str(p.relative_to(root)) for p in names
                  if (p.parent.name if p.name == "__init__.py" else p.stem) in sys.stdlib_module_names)


def test_the_top_level_is_a_small_ground_floor_and_no_name_shadows_the_standard_library(tmp_path):
    files = top_level_files(ROOT)
    assert "__init__.py" in files and len(files) <= MAX_TOP_LEVEL_FILES, files
    assert stdlib_shadows(ROOT) == []
    # The checks themselves can fail: a module and a package named after standard-library modules are found.
    (tmp_path / "emalign" / "wing" / "json").mkdir(parents=True)
    for name in ("__init__.py", "wing/__init__.py", "wing/queue.py", "wing/json/__init__.py", "wing/jsonl.py"):
        (tmp_path / "emalign" / name).write_text("")
    assert stdlib_shadows(tmp_path) == ["emalign/wing/json/__init__.py", "emalign/wing/queue.py"]
    for name in ("a", "b", "c", "d", "e", "f"):
        (tmp_path / "emalign" / f"{name}.py").write_text("")
    assert len(top_level_files(tmp_path)) == 7


def private_users(root) -> set[str]:
    files = [*root.glob("emalign/**/*.py"), *root.glob("callbacks/*.py"), root / "cli.py"]
    return {str(p.relative_to(root)) for p in files if p.is_file()
            for name in PRIVATE if re.search(rf"\b{name}\b", p.read_text())}


def test_private_names_are_used_only_behind_the_fence(tmp_path):
    assert private_users(ROOT) == {"emalign/fence/lightning.py", "emalign/fence/parsing.py",
                                   "emalign/fence/checkpointing.py", "emalign/fence/scanning.py"}
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "bar.py").write_text("def f(bar):\n    bar._update(1, 2)\n")
    assert private_users(tmp_path) == {"callbacks/bar.py"}


def test_the_private_lightning_api_we_use_still_exists():
    """Fails loudly on a Lightning upgrade that renames or re-signs what emalign/fence/lightning.py relies on."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    from emalign.fence.lightning import USED, batches_processed

    expected = {
        "_find_last_checkpoints": ["self", "trainer"],
        "_save_checkpoint": ["self", "trainer", "filepath"],
        "_monitor_candidates": ["self", "trainer"],
        "_save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
        "_parse_ckpt_path": ["self"],
        "_init_progress": ["self", "trainer"],
        "_get_train_description": ["self", "current_epoch"],
        "_update": ["self", "progress_bar_id", "current", "visible", "hard"],
    }
    for cls, names in USED.items():
        for name in names:
            method = getattr(cls, name, None)
            assert callable(method), f"lightning {L.__version__}: {cls.__name__}.{name} is gone"
            assert list(inspect.signature(method).parameters) == expected[name], f"{cls.__name__}.{name} changed"
    assert set(expected) == {n for names in USED.values() for n in names}
    checkpoint = ModelCheckpoint(dirpath="unused")
    # Lightning's own _save_checkpoint keeps this bookkeeping; our override must keep writing the same fields.
    assert {"_last_global_step_saved", "_last_checkpoint_saved"} <= set(vars(checkpoint))
    assert "trainer.save_checkpoint" in inspect.getsource(ModelCheckpoint._save_checkpoint)
    assert "ckpt_path" in inspect.getsource(LightningCLI._parse_ckpt_path)
    assert "_metric_component" in vars(RichProgressBar())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert batches_processed(trainer) == 0


def test_the_private_parser_api_we_use_still_exists():
    """argparse's action tables and jsonargparse's type hint, as emalign/fence/parsing.py reads them."""
    from jsonargparse import ArgumentParser

    from emalign.fence import parsing

    parser = ArgumentParser()
    parser.add_argument("--size", type=int)
    sub = parser.add_subcommands()
    sub.add_subcommand("em", ArgumentParser())
    actions = parsing.actions(parser)
    assert any("--size" in a.option_strings for a in actions)
    assert set(parsing.subparsers(next(a for a in actions if not a.option_strings and a.dest))) == {"em"}
    assert parsing.type_hint(parsing.option_action(parser, "--size")) is int
    assert parsing.option_action(parser, "--absent") is None
    required = ArgumentParser()
    required.add_argument("--name", type=str, required=True)
    assert parsing.parse_unvalidated(required, []).name is None  # unvalidated: the missing --name passes


def test_the_private_transformers_and_bandit_api_we_use_still_exists():
    """transformers' checkpointing hook and bandit's per-file scan, as emalign/fence/ uses them."""
    import torch
    from bandit.core.manager import BanditManager
    from transformers.modeling_layers import GradientCheckpointingLayer

    from emalign.evaluation.codesec import scan_code
    from emalign.fence.checkpointing import set_checkpoint_function

    class Layer(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.linear(x)

    calls = []
    layer = Layer().train()
    set_checkpoint_function(layer, lambda forward, *args: calls.append(1) or forward(*args))
    layer.gradient_checkpointing = True
    layer(torch.ones(1, 2, requires_grad=True)).sum().backward()
    assert calls == [1]  # the layer runs through the function we set (else checkpointing silently stops)
    assert list(inspect.signature(BanditManager._parse_file).parameters) == ["self", "fname", "fdata",
                                                                             "new_files_list"]
    assert [f.test_id for f in scan_code("import pickle\npickle.loads(b'x')\n")] == ["B403", "B301"]


def test_lightning_is_pinned_to_the_tested_minor():
    import lightning as L

    pin = re.search(r'"lightning>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must bound lightning from above (emalign/fence/lightning.py uses private API)"
    low, high = (int(pin[1]), int(pin[2])), (int(pin[3]), int(pin[4]))
    installed = tuple(int(x) for x in L.__version__.split(".")[:2])
    assert low <= installed < high, f"lightning {L.__version__} is outside the tested range {pin[0]}"


def test_the_conscience_callback_only_schedules_logs_and_writes():
    source = (ROOT / "emalign" / "callbacks" / "conscience.py").read_text()
    assert len(source.splitlines()) <= 100
    # Pairing, reviewing and revising live in emalign/conscience/step.py.
    assert not re.search(r"\.(build|review|revise)\(|sample_ids|revise_below", source)
