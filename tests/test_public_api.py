"""The public API: every exported name resolves, lazily, and the README's Python example runs."""

import ast
import re

from conftest import ROOT


def test_every_exported_name_resolves_and_import_stays_cheap():
    import emalign

    for name in emalign.__all__:
        assert getattr(emalign, name).__name__ == name
    # `import emalign` alone imports nothing heavy (the CLI's --help depends on it)
    tree = ast.parse((ROOT / "emalign" / "__init__.py").read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in tree.body
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported == {"__future__", "importlib", "typing"}


def test_readme_python_example_runs(tiny_model_dir, capsys):
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert block.count("\n") <= 10
    exec(compile(block.replace('"smollm2-135m-instruct"', repr(tiny_model_dir)), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[-1].endswith("pair(s) for DPO")  # 4 scored samples, then the pair count
    assert all(re.match(r"[+-]\d+\.\d\d  '", line) for line in out[:4])
