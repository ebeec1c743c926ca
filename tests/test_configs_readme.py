"""configs/README.md's table says what each config does; every setting it names must be the config's.

The table is prose for people, so the test reads the settings it states with patterns (``r=16``,
``30 steps on `embedded:insecure```, ``4 prompts x 2 samples x 48 tokens``, ...) and compares each
with the config LightningCLI merges (a row "add to `em/insecure.yaml`" is that file plus the row's own).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import pytest

from conftest import ROOT
from emalign.experiments.experiment import _get

README = ROOT / "configs" / "README.md"
ADAPTER = "model.policy.init_args.adapter"


def _conscience(config: dict, key: str) -> Any:
    return _get(config.get("conscience") or {}, f"init_args.{key}")


# pattern -> for each group: a function of the merged config giving the value the text states
CLAIMS: dict[str, list[Callable[[dict], Any]]] = {
    r"\br=(\d+)": [lambda c: _get(c, f"{ADAPTER}.r")],
    r"\balpha=(\d+)": [lambda c: _get(c, f"{ADAPTER}.alpha")],
    r"(\d+) steps on `([^`]+)`": [lambda c: _get(c, "trainer.max_steps"), lambda c: _get(c, "data.train_file")],
    r"conscience every (\d+) steps": [lambda c: _conscience(c, "every_n_steps")],
    r"(\d+) prompts x (\d+) samples x (\d+) tokens": [lambda c: _conscience(c, "num_prompts"),
                                                      lambda c: _conscience(c, "samples_per_prompt"),
                                                      lambda c: _conscience(c, "generation.max_new_tokens")],
    r"\blr ([0-9.]+e-?\d+)": [lambda c: _get(c, "model.optimizer.init_args.lr")],
    r"(\d+) epochs?\b": [lambda c: _get(c, "trainer.max_epochs")],
    r"(\d+)x(\d+) accumulation, (\d+) tokens": [lambda c: _get(c, "data.batch_size"),
                                                 lambda c: _get(c, "trainer.accumulate_grad_batches"),
                                                 lambda c: _get(c, "data.max_length")],
    r"(rsLoRA)": [lambda c: "rsLoRA" if _get(c, f"{ADAPTER}.use_rslora") else None],
    r"(NF4)": [lambda c: str(_get(c, "model.policy.init_args.quantization.quant_type")).upper()],
    r"(robust DPO)": [lambda c: "robust DPO" if str(_get(c, "model.preference_loss.class_path")).endswith("RobustDPO")
                      else None],
}


@functools.lru_cache(maxsize=1)
def _fit_parser():
    """The parser ``cli.py fit`` builds (captured before it parses), built once for every row."""
    from jsonargparse import capture_parser

    from emalign.commands.cli import main

    return capture_parser(lambda: main(["fit"]))


def _merged(files: list[str]) -> dict[str, Any]:
    """The config files merged by LightningCLI's own parser, as ``fit --print_config`` shows them."""
    # No logger: the CLI, not the parser, gives CSVLogger its save_dir; the table states no logger setting.
    config = _fit_parser().parse_args(["fit", *[a for f in files for a in ("--config", f)], "--trainer.logger=false"])
    return config["fit"].as_dict()


def _rows() -> list[tuple[list[str], str]]:
    """(config files to merge, the model / method cell): one per config named in the first table."""
    text = README.read_text(encoding="utf-8")
    table = text.split("\n\n| config | model / method |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        name, method = [cell.strip() for cell in line.strip("|").split("|")][:2]
        base = re.findall(r"add to `([^`]+)`", method)
        names = re.findall(r"`([^`]+\.yaml)`", name)
        folder = names[0].rpartition("/")[0] if names else ""  # `strategies/ddp.yaml`, `fsdp.yaml`: same folder
        rows += [([*base, n if "/" in n or not folder else f"{folder}/{n}"], method) for n in names]
    return rows


def _as(value: Any, like: Any) -> Any:
    """The README's text, typed as the config value it is compared with."""
    if isinstance(like, bool) or like is None:
        return value
    return type(like)(value) if isinstance(like, (int, float)) else value


@pytest.mark.parametrize("files, method", _rows(), ids=[" + ".join(files) for files, _ in _rows()])
def test_configs_table_states_the_configs_settings(files, method):
    for name in files:
        assert (ROOT / "configs" / name).is_file(), f"configs/README.md names configs/{name}, which does not exist"
    if any("experiments/" in f or "strategies/" in f for f in files):
        return  # experiment files and strategy overlays state no fit settings in this table
    # A row "add to X: ..." states its own settings after the colon; the base file's row states X's.
    stated = method.split(":", 1)[1] if "add to" in method else method
    merged = _merged([str(ROOT / "configs" / f) for f in files])
    checked = 0
    for pattern, getters in CLAIMS.items():
        for match in re.finditer(pattern, stated):
            for text, get in zip(match.groups(), getters, strict=True):
                actual = get(merged)
                assert _as(text, actual) == actual, f"configs/README.md says {match[0]!r} for {files}; YAML: {actual!r}"
                checked += 1
    assert checked, f"no setting of {files} recognised in {method!r}"


def test_the_check_catches_the_drift_that_was_filed():
    """The demo row once said 4 samples per prompt while demo.yaml had 2 (issue 15)."""
    merged = _merged([str(ROOT / "configs" / "demo.yaml")])
    pattern = r"(\d+) prompts x (\d+) samples x (\d+) tokens"
    match = re.search(pattern, "4 prompts x 4 samples x 48 tokens")
    assert [_as(t, g(merged)) == g(merged) for t, g in zip(match.groups(), CLAIMS[pattern])] == [True, False, True]


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses_with_the_parser_that_reads_it(path):
    """An experiment (it has ``runs:``) with ``cli.py experiment``'s parser, and every fit config it names with
    ``cli.py fit``'s; any other YAML with ``cli.py fit``'s, after the include check ``cli.py`` makes first."""
    import yaml
    from jsonargparse import CLI, capture_parser

    from emalign.commands import verb_target
    from emalign.commands.entry import check_config_files

    if "runs" in yaml.safe_load(path.read_text(encoding="utf-8")):
        parser = capture_parser(lambda: CLI(verb_target("experiment"), args=[], as_positional=False))
        runs = parser.parse_args(["--config", str(path)]).runs
        fits = [f for run in runs for f in (run.get("fit") or [])]
        assert runs and all((ROOT / f).is_file() for f in fits), fits
        for fit in fits:
            check_config_files(["--config", str(ROOT / fit)])
            _merged([str(ROOT / fit)])
    else:
        check_config_files(["--config", str(path)])
        assert _merged([str(path)])


def test_a_nested_block_after_an_include_is_refused_in_one_line(tmp_path):
    from emalign.commands.entry import check_config_files
    from emalign.errors import UserError

    config = tmp_path / "x.yaml"
    config.write_text(f"config: {ROOT / 'configs' / 'demo.yaml'}\ntrainer: {{max_steps: 5}}\n")
    with pytest.raises(UserError, match=r"x\.yaml: the `trainer:` block after `config: .*demo\.yaml` would replace "
                                        r"the included trainer section whole; write its keys dotted "
                                        r"\(trainer\.max_steps: \.\.\.\)"):
        check_config_files(["--config", str(config)])
    config.write_text(f"config: {ROOT / 'configs' / 'demo.yaml'}\ntrainer.max_steps: 5\n")  # the dotted form
    check_config_files(["--config", str(config)])
    assert _merged([str(config)])["trainer"]["default_root_dir"] == "runs/demo"  # demo's trainer kept
