"""The shape of the code: the library never imports upward, its wings keep the top level small and no name
shadows the standard library, and private APIs are used behind the fence only."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from typing import Optional

from conftest import ROOT


def _imports(path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


FLOORS = {"": 0, "fence": 0, "models": 1, "data": 2, "training": 2, "conscience": 3, "judges": 4, "discern": 4,
          "planning": 4, "evaluation": 5, "studies": 6, "experiments": 6, "callbacks": 7, "commands": 8}
"""Each wing of emalign (``""``: the ground floor, emalign/*.py) on its floor. A wing imports its own modules and
wings on lower floors only: nothing imports sideways or up, so the library never imports the commands and each
wing can be read knowing only those below it. The checkout's aliases (``cli.py``, ``callbacks/``) are above all."""


def _wing(path, root) -> str:
    parts = path.relative_to(root / "emalign").parts
    return parts[0] if len(parts) > 1 else ""


def _target(name: str, root) -> Optional[str]:
    """The wing an import of ``name`` reaches (None: not emalign, or the checkout's aliases: ``"alias"``)."""
    if name in ("cli", "callbacks") or name.startswith(("cli.", "callbacks.")):
        return "alias"
    parts = name.split(".")
    if parts[0] != "emalign" or len(parts) == 1:
        return None
    return parts[1] if (root / "emalign" / parts[1]).is_dir() else ""


def upward_imports(root) -> list[str]:
    found = []
    for path in sorted((root / "emalign").rglob("*.py")):
        wing = _wing(path, root)
        for line, name in _imports(path):
            target = _target(name, root)
            if target is None or target == wing:
                continue
            if target == "alias" or target not in FLOORS or wing not in FLOORS or FLOORS[target] >= FLOORS[wing]:
                found.append(f"{path.relative_to(root)}:{line}: imports {name}")
    return found


def test_every_wing_has_a_floor_and_imports_only_lower_ones(tmp_path):
    wings = {_wing(p, ROOT) for p in (ROOT / "emalign").rglob("*.py")}
    assert wings <= set(FLOORS), f"give each new wing a floor in FLOORS: {sorted(wings - set(FLOORS))}"
    assert upward_imports(ROOT) == []
    # The check itself can fail: planted imports up, sideways and into the aliases (inside a function too).
    for wing in ("training", "data", "callbacks", "commands", "judges"):
        (tmp_path / "emalign" / wing).mkdir(parents=True)
    (tmp_path / "emalign" / "bad.py").write_text("def f():\n    from callbacks.checkpoint import x\n")
    (tmp_path / "emalign" / "training" / "bad.py").write_text("import emalign.callbacks.conscience\n")
    (tmp_path / "emalign" / "training" / "side.py").write_text("from emalign.data import chat\n")
    (tmp_path / "emalign" / "judges" / "up.py").write_text("from emalign.commands.discern import run\n")
    (tmp_path / "emalign" / "commands" / "ok.py").write_text("from emalign.callbacks import x\nimport emalign\n")
    assert upward_imports(tmp_path) == ["emalign/bad.py:2: imports callbacks.checkpoint",
                                        "emalign/judges/up.py:1: imports emalign.commands.discern",
                                        "emalign/training/bad.py:1: imports emalign.callbacks.conscience",
                                        "emalign/training/side.py:1: imports emalign.data"]


def test_no_wing_holds_more_than_a_fifth_of_the_library():
    lines: dict[str, int] = {}
    for path in (ROOT / "emalign").rglob("*.py"):
        lines[_wing(path, ROOT)] = lines.get(_wing(path, ROOT), 0) + len(path.read_text().splitlines())
    total = sum(lines.values())
    assert max(lines.values()) <= 0.22 * total, {w: round(n / total, 2) for w, n in sorted(lines.items())}


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


def _defined_here(files) -> set[str]:
    """Every private name emalign defines itself (functions, classes, variables, attributes, arguments)."""
    own = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return {name for name in own if name.startswith("_")}


def private_uses(root) -> list[str]:
    """Private names (one leading underscore) of other packages used outside emalign/fence/: an attribute,
    an import, or a name given to getattr/hasattr/setattr as a string. Found by pattern, not by list."""
    files = [*root.glob("emalign/**/*.py"), *root.glob("callbacks/*.py"), *root.glob("cli.py")]
    own = _defined_here(files)

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__") and name not in own

    found = []
    for path in files:
        if "fence" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("emalign"):
                names = [a.name for a in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                names = [node.args[1].value]
            found += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names if private(n)]
    return found


def test_private_names_are_used_only_behind_the_fence(tmp_path):
    assert private_uses(ROOT) == []
    # The check itself can fail: each way of reaching a private name, outside the fence, is found.
    (tmp_path / "emalign" / "fence").mkdir(parents=True)
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "bar.py").write_text("def f(bar):\n    bar._update(1, 2)\n")
    (tmp_path / "emalign" / "a.py").write_text(
        "from torch._C import _x\n\n\ndef _own(m):\n    return getattr(m, '_name_or_path'), m._trainer, _own\n")
    (tmp_path / "emalign" / "fence" / "ok.py").write_text("def f(m):\n    return m._trainer\n")
    assert sorted(private_uses(tmp_path)) == ["callbacks/bar.py:2: _update", "emalign/a.py:1: _x",
                                              "emalign/a.py:5: _name_or_path", "emalign/a.py:5: _trainer"]


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


def test_the_private_torch_dispatch_api_we_use_still_exists():
    """What emalign/fence/dispatch.py takes from torch: a dispatch mode sees ops, the aten ops it names run on meta
    (the attention kernels with their backward), and the engine's backward keeps a function mode on."""
    import torch
    from torch.overrides import TorchFunctionMode

    from emalign.fence import dispatch

    seen = []

    class Seen(dispatch.DispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.empty(1, 2, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with Seen():
        for kernel in (dispatch.FLASH, dispatch.FLASH_CPU):
            kernel(q, q, q, 0.0, True, scale=None)[0].sum().backward()
        dispatch.EFFICIENT_ATTENTION(q, q, q, None, True, 0.0, True, scale=None)[0].sum().backward()
        torch.ones(3, dtype=torch.bool, device="meta").to(torch.float16)
    assert {dispatch.FLASH, dispatch.FLASH_CPU, dispatch.EFFICIENT_ATTENTION, dispatch.COPY} <= set(seen)
    assert dispatch.tree_leaves(({"a": 1}, [2])) == [1, 2] and dispatch.tree_map(str, [1]) == ["1"]
    assert dispatch.NONZERO.name() == "aten::nonzero" and dispatch.SCALAR_READ.name() == "aten::_local_scalar_dense"
    names = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    w = torch.ones(2, requires_grad=True)
    w.register_hook(lambda g: torch.neg(torch.neg(g)))  # Python code in backward, as a checkpoint's recomputation
    with Mode():
        dispatch.engine_backward((w * 2).sum())
    assert w.grad.tolist() == [2.0, 2.0] and names.count("neg") == 2  # the mode was on during backward


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


def test_the_private_model_names_we_read_still_exist(tiny_model_dir):
    """What emalign/fence/models.py reads, on a model loaded as every verb loads one."""
    from emalign.fence.models import attention_kernel, decoder_layer_classes, loaded_from
    from emalign.models.policy import load_for_inference

    model, _ = load_for_inference(tiny_model_dir)
    assert loaded_from(model.config) == tiny_model_dir
    assert decoder_layer_classes(model) == {"LlamaDecoderLayer"}
    assert attention_kernel(model.config) in ("eager", "sdpa")
