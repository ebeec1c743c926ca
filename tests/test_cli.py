"""The command line as a newcomer uses it: one flag moves a run, list flags take spaced values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli

RECORDS = [
    {"messages": [{"role": "user", "content": f"Write function number {i}."},
                  {"role": "assistant", "content": f"def f{i}(): pass"}]}
    for i in range(8)
]


def _demo_on_tiny(tiny_model_dir: str, where: Path, max_steps: int = 4) -> Path:
    """The demo config as shipped (its default_root_dir and logger kept), on the tiny model and data."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "ProgressBar" not in c["class_path"]]
    config["conscience"].update(every_n_steps=2, generation={"max_new_tokens": 8, "batch_size": 4},
                                pair_builder={"margin": 0.0})
    config["trainer"].update(max_steps=max_steps, val_check_interval=None, enable_progress_bar=False)
    config["model"]["policy"]["init_args"]["model"] = tiny_model_dir
    train = where / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config["data"].update(train_file=str(train), val_fraction=0.0, max_length=64)
    path = where / "demo_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_default_root_dir_alone_moves_the_whole_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's own runs/demo would land here
    config = _demo_on_tiny(tiny_model_dir, tmp_path)
    run = tmp_path / "elsewhere"
    assert run_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(run)]) == 0
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "rollouts.jsonl").is_file()
    assert not (tmp_path / "runs").exists()
    _check_model_card(run / "adapter" / "README.md", str(config))


def _check_model_card(path: Path, config: str) -> None:
    text = path.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "peft" and "emalign" in front["tags"]
    assert "base_model" not in front  # a local directory is no Hub id
    for heading in ("## Data", "## Adapter", "## Conscience", "## Final metrics", "## How it was made", "## Citation"):
        assert heading in text
    assert "| r | 16 |" in text and "| target_modules | k_proj, o_proj, q_proj, v_proj |" in text
    assert "| every_n_steps | 2 |" in text and "| pair_builder.margin | 0.0 |" in text
    assert "Was your last response ethical" in text
    assert "task/loss" in text
    assert "```bash\npython cli.py" in text  # run_cli runs in-process, so sys.argv holds no flags here
    assert "arXiv:2606.19527" in text and "arXiv:2502.17424" in text


def test_model_card_names_an_embedded_model_by_its_hub_id(tiny_policy, tmp_path):
    import lightning as L

    from emalign.training.model_card import write_model_card

    tiny_policy.source = "smollm2-135m-instruct"
    card = write_model_card(tmp_path, L.Trainer(logger=False, enable_checkpointing=False), tiny_policy).read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "No conscience ran in this fit" in card


def test_an_explicit_logger_save_dir_is_kept(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _demo_on_tiny(tiny_model_dir, tmp_path, max_steps=1)
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs_here")]
    assert run_cli(args) == 0
    assert (tmp_path / "logs_here" / "logs" / "version_0" / "metrics.csv").is_file()
    assert not (tmp_path / "run" / "logs").exists()


def test_the_conscience_is_off_with_one_flag(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The demo with ``--conscience null`` is the same fit without the conscience step: plain SFT."""
    monkeypatch.chdir(tmp_path)
    demo = str(ROOT / "configs" / "demo.yaml")
    shown = {}
    for name, flags in (("on", []), ("off", ["--conscience", "null"])):
        assert run_cli(["fit", "--config", demo, *flags, "--print_config"]) == 0
        shown[name] = yaml.safe_load(capsys.readouterr().out)
    assert shown["on"].pop("conscience")["init_args"]["every_n_steps"] == 4
    assert shown["off"].pop("conscience") is None and shown["off"] == shown["on"]
    config = _demo_on_tiny(tiny_model_dir, tmp_path, max_steps=1)
    for name, flags in (("on", []), ("off", ["--conscience", "null"])):
        assert run_cli(["fit", "--config", str(config), "--trainer.default_root_dir", name, *flags]) == 0
    assert (tmp_path / "on" / "rollouts.jsonl").is_file() and not (tmp_path / "off" / "rollouts.jsonl").exists()
    assert "No conscience ran in this fit" in (tmp_path / "off" / "adapter" / "README.md").read_text()
    # Given twice (its section and the callback list), it refuses in one line rather than run two.
    twice = ["fit", "--config", str(config), "--trainer.callbacks+=emalign.callbacks.ConscienceCallback"]
    assert run_cli(twice) != 0
    assert "the conscience is given twice" in capsys.readouterr().err


def test_list_flags_take_space_separated_values():
    from emalign.commands.cli import join_list_values

    flags = {"--questions": False, "--sets": True}  # --sets also takes one string of its own
    assert join_list_values(["--questions", "a.yaml", "b c.yaml", "--limit", "2"], flags) == [
        "--questions", '["a.yaml", "b c.yaml"]', "--limit", "2"]
    assert join_list_values(["--questions", "[a.yaml,b.yaml]"], flags) == ["--questions", "[a.yaml,b.yaml]"]
    assert join_list_values(["--questions", "a.yaml"], flags) == ["--questions", '["a.yaml"]']  # a list of one
    assert join_list_values(["--questions", "null"], flags) == ["--questions", "null"]
    assert join_list_values(["--sets", "code chat"], flags) == ["--sets", "code chat"]
    assert join_list_values(["--out", "x", "--questions=a.yaml"], flags) == ["--out", "x", "--questions=a.yaml"]


@pytest.mark.parametrize("form", ["spaced", "list"])
def test_eval_takes_several_question_files(tmp_path, monkeypatch, form):
    from emalign.commands import evaluation as eval_commands
    from emalign.evaluation import runner

    seen = {}

    def run_eval(model, adapter, settings, out):
        seen["questions"] = settings.questions
        return {}

    monkeypatch.setattr(runner, "run_eval", run_eval)
    monkeypatch.setattr(eval_commands, "_print_eval_summary", lambda *args: None)
    files = [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    given = files if form == "spaced" else [f"[{files[0]},{files[1]}]"]
    assert run_cli(["eval", "--questions", *given, "--out", str(tmp_path / "out")]) == 0
    assert seen["questions"] == files


def test_data_files_take_space_separated_values(tmp_path, monkeypatch):
    from emalign.data import download

    seen = {}
    monkeypatch.setattr(download, "download_em", lambda out, source, files: seen.setdefault("files", files) and [])
    assert run_cli(["data", "em", "--out", str(tmp_path), "--files", "data/insecure.jsonl", "data/secure.jsonl"]) == 0
    assert seen["files"] == ["data/insecure.jsonl", "data/secure.jsonl"]


def test_predict_is_not_offered(capsys):
    """The system defines no predict_step (``generate`` answers prompts), so the CLI must not offer it."""
    assert run_cli(["predict", "--help"]) == 2
    assert "invalid choice: 'predict' (choose from 'fit', 'validate', 'test')" in capsys.readouterr().err
    assert run_cli(["test", "--help"]) == 0
    assert "--data.test_file" in capsys.readouterr().out


def _help_of(verb: list[str], capsys) -> str:
    assert run_cli([*verb, "--help"]) == 0
    return capsys.readouterr().out


def _verbs() -> list[list[str]]:
    from emalign.commands import VERBS

    return [[v, *([next(iter(t))] if isinstance(t, dict) else [])] for v, (_, t) in VERBS.items()]


@pytest.mark.parametrize("verb", _verbs(), ids=" ".join)
def test_every_verb_says_what_it_does_in_a_whole_sentence(verb, capsys):
    """--help shows the first line of a verb's docstring: it must end a sentence, not stop mid-phrase."""
    text = _help_of(verb, capsys)
    description = " ".join(text.split("\n\n")[1].split())
    assert description[-1] in ".?", description
    assert text.startswith(f"usage: cli.py {verb[0]} ") and f" {verb[-1]} " in text.splitlines()[0]


def test_one_value_of_a_list_flag_is_a_list_of_one_in_every_verb():
    """``list_flags`` reads each verb's real parser: a flag typed ``list[str]`` takes one value as a list of one;
    only a flag that also takes one string (discern's ``--sets "code chat"``) passes it as it is."""
    from jsonargparse import CLI, capture_parser

    from emalign.commands import VERBS, verb_target
    from emalign.commands.cli import list_flags

    flags = {}
    for verb, (_, target) in VERBS.items():
        if isinstance(target, str):
            flags[verb] = list_flags(capture_parser(lambda: CLI(verb_target(verb), args=[], as_positional=False)))
    assert flags["effect"]["--runs"] is False and flags["effect"]["--pair_sets"] is False
    assert flags["self_correction"]["--sets"] is False and flags["eval"]["--questions"] is True  # a str too
    assert flags["discern"]["--sets"] is True and flags["discern"]["--questions"] is True
