"""The fault-injection table: bad inputs and faults per verb, each ending in one ``error:`` line (or a
clean exit) with nothing lost.

One row per case: the verb's arguments (built on the tiny model, in a fresh directory), the expected
exit code, a piece of the one error line, and what must still be on disk afterwards. Every case runs
in-process (``run_cli``), so the table stays in the fast lane. Add a row for every mistake a user hits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
from test_eval_runner import QUESTIONS
from test_faults import fit_args

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PAIRS = [{"prompt": f"Question {i}?", "good": f"A kind answer {i}.", "bad": f"A cruel answer {i}!"} for i in range(3)]


@dataclass
class Ctx:
    model: str
    tmp: Path

    def file(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return str(path)

    def fit(self, *extra: str, max_steps: int = 1) -> list[str]:
        return [*fit_args(self.model, self.tmp / "run", max_steps=max_steps, every=1), *extra]

    def eval(self, *extra: str, questions: Optional[str] = None) -> list[str]:
        questions = questions or self.file("questions.yaml", QUESTIONS)
        return ["eval", "--model", self.model, "--questions", questions, "--samples", "1", "--max_new_tokens", "2",
                "--code_samples", "0", "--self_review", "false", "--out", str(self.tmp / "eval"), *extra]

    def discern(self, *extra: str, pairs: Optional[str] = None) -> list[str]:
        pairs = pairs or self.file("pairs.jsonl", "".join(json.dumps(p) + "\n" for p in PAIRS))
        return ["discern", "--model", self.model, "--sets", pairs, "--out", str(self.tmp / "discern"), *extra]

    def generate(self, *extra: str) -> list[str]:
        return ["generate", "--model", self.model, "--prompts", self.file("prompts.txt", "Hello?\n"),
                "--samples", "2", "--max_new_tokens", "2", *extra]

    def chat(self, *extra: str) -> list[str]:
        return ["chat", "--model", self.model, "--samples", "2", "--max_new_tokens", "2", *extra]

    def experiment(self, data: dict, *extra: str) -> list[str]:
        import yaml

        config = {"out": str(self.tmp / "exp"), "model": self.model, "runs": [{"name": "base"}],
                  "eval": {"questions": [self.file("questions.yaml", QUESTIONS)], "samples": 1, "max_new_tokens": 2,
                           "code_samples": 0}, **data}
        return ["experiment", "--config", self.file("exp.yaml", yaml.safe_dump(config)), *extra]


@dataclass
class Case:
    name: str
    args: Callable[[Ctx], list[str]]
    message: Optional[str]
    """The one ``error:`` line, or the part of it that says what was wrong (``<tmp>`` stands for the row's
    directory); None: the run must exit cleanly (``code`` 0)."""
    code: int = 2
    setup: Callable[[Ctx], None] = field(default=lambda ctx: None)
    kept: Optional[Callable[[Ctx], bool]] = None
    """What must hold on disk afterwards, besides the default check of a failed run: every file there before
    it byte-identical, no directory added (a run or output directory left behind), no file added but the
    inputs the row wrote. A run that succeeds (``code`` 0) writes its outputs: ``kept`` says what they hold."""
    slow: bool = False
    """A case that trains first (its setup): in the slow lane."""
    loads_model: bool = False
    """The fault shows only once the model is loaded (or the data is read, which a fit does after). Every other
    row runs on a poisoned model (its config.json is not JSON): its error must come first, before the expensive
    work."""


def _trained(ctx: Ctx) -> None:
    """A finished fit's adapter in ``run/adapter``, as a user has it before the mistake."""
    assert run_cli(ctx.fit(max_steps=1)) == 0


def _adapter_kept(ctx: Ctx) -> bool:
    return json.loads((ctx.tmp / "run" / "adapter" / "fit.json").read_text())["global_step"] == 1


def _assistant_first(ctx: Ctx) -> str:
    row = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    return ctx.file("first.jsonl", json.dumps(ok) + "\n" + json.dumps(row) + "\n")


def _eval_rows(ctx: Ctx) -> None:
    """An earlier eval whose rows must survive the mistake."""
    assert run_cli(ctx.eval()) == 0


def _rows_kept(ctx: Ctx) -> bool:
    return len((ctx.tmp / "eval" / "samples.jsonl").read_text().splitlines()) == 3


def _adapter_on_other_base(ctx: Ctx) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=2,
                                                         vocab_size=49152))
    lora = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = "some-other/base-model"
    lora.save_pretrained(ctx.tmp / "other_adapter")
    return str(ctx.tmp / "other_adapter")


F, E, D, G, C, X = Ctx.fit, Ctx.eval, Ctx.discern, Ctx.generate, Ctx.chat, Ctx.experiment
CASES = [
    # -- fit ------------------------------------------------------------------------------------------
    Case("fit: rerun with max_steps 0 over a trained adapter", lambda c: c.fit("--trainer.max_steps", "0"),
         "--model.overwrite_adapter true", setup=_trained, kept=_adapter_kept, slow=True, loads_model=True),
    Case("fit: pairs_per_step -1", lambda c: c.fit("--model.pairs_per_step", "-1"),
         "model.pairs_per_step: must be >= 0"),
    Case("fit: align_weight nan", lambda c: c.fit("--model.align_weight", "nan"),
         "Parser key \"model.align_weight\": Expected a <class 'float'>. Got value: nan (see `cli.py fit --help`)"),
    Case("fit: align_weight .nan in YAML",
         lambda c: c.fit("--config", c.file("nan.yaml", "model:\n  align_weight: .nan\n")),
         "model.align_weight: must be >= 0, got nan"),
    Case("fit: temperature .nan in YAML",
         lambda c: c.fit("--config", c.file("t.yaml", "conscience:\n  generation: {temperature: .nan}\n")),
         "generation.temperature: must be >= 0, got nan"),
    Case("fit: pair margin .nan in YAML",
         lambda c: c.fit("--config", c.file("m.yaml", "conscience:\n  pair_builder: {margin: .nan}\n")),
         "conscience.pair_builder.margin: must be >= 0, got nan"),
    Case("fit: pair queue capacity 0", lambda c: c.fit("--model.pair_queue.capacity", "0"),
         "model.pair_queue.capacity: must be >= 1, got 0"),
    Case("fit: beta .inf in YAML",
         lambda c: c.fit("--config", c.file("b.yaml", "model:\n  preference_loss:\n    init_args: {beta: .inf}\n")),
         "model.preference_loss.beta: must be > 0, got inf"),
    Case("fit: align_weight -1", lambda c: c.fit("--model.align_weight", "-1"), "model.align_weight: must be >= 0, "
         "got -1.0"),
    Case("fit: max_length -1", lambda c: c.fit("--data.max_length", "-1"), "data.max_length: must be >= 16"),
    Case("fit: batch_size 0", lambda c: c.fit("--data.batch_size", "0"), "data.batch_size: must be >= 1"),
    Case("fit: limit 0", lambda c: c.fit("--data.limit", "0"),
         "data.limit: must be >= 1 (or null), got 0"),
    Case("fit: val_fraction 1.5", lambda c: c.fit("--data.val_fraction", "1.5"), "data.val_fraction: must be >= 0 "
         "and < 1, got 1.5"),
    Case("fit: val_fraction -0.1", lambda c: c.fit("--data.val_fraction", "-0.1"), "data.val_fraction: must be >= 0 "
         "and < 1, got -0.1"),
    Case("fit: every_n_steps 0", lambda c: c.fit("--conscience.every_n_steps", "0"),
         "--conscience.every_n_steps: must be >= 1, got 0"),
    Case("fit: samples_per_prompt 1", lambda c: c.fit("--conscience.samples_per_prompt", "1"),
         "samples_per_prompt: must be >= 2"),
    Case("fit: num_prompts 0", lambda c: c.fit("--conscience.num_prompts", "0"),
         "--conscience.num_prompts: must be >= 1, got 0"),
    Case("fit: temperature nan", lambda c: c.fit("--conscience.generation.temperature", "nan"),
         "temperature"),
    Case("fit: top_p 0", lambda c: c.fit("--conscience.generation.top_p", "0"), "generation.top_p: must be > 0 and "
         "<= 1, got 0.0"),
    Case("fit: max_new_tokens 0", lambda c: c.fit("--conscience.generation.max_new_tokens", "0"),
         "generation.max_new_tokens: must be >= 1"),
    Case("fit: max_prompt_tokens 8", lambda c: c.fit("--conscience.generation.max_prompt_tokens", "8"),
         "generation.max_prompt_tokens: must be >= 16"),
    Case("fit: negative learning rate", lambda c: c.fit("--model.optimizer.init_args.lr", "-1"),
         "model.optimizer: Invalid learning rate", loads_model=True),
    Case("fit: nan learning rate", lambda c: c.fit("--model.optimizer.init_args.lr", "nan"), 'Parser key "lr"'),
    Case("fit: max_prompt_tokens below the chat template", lambda c: c.fit(
        "--conscience.generation.max_prompt_tokens", "20"), "generation.max_prompt_tokens: the chat template alone "
         "takes 30 tokens, so 20 leaves no room for a prompt; use at least 46", loads_model=True),
    Case("fit: default_root_dir is a file", lambda c: c.fit("--trainer.default_root_dir", c.file("afile", "x")),
         "--trainer.default_root_dir <tmp>/afile: is a file, expected a directory"),
    Case("fit: missing train file", lambda c: c.fit("--data.train_file", str(c.tmp / "absent.jsonl")),
         "<tmp>/absent.jsonl: no such file",
         loads_model=True),
    Case("fit: train file not UTF-8", lambda c: c.fit("--data.train_file", c.file("bad.jsonl", b"\xff\xfe{}\n")),
         "<tmp>/bad.jsonl:1: not UTF-8 (byte 0xff at column 1); save the file as UTF-8", loads_model=True),
    Case("fit: assistant-first record", lambda c: c.fit("--data.train_file", _assistant_first(c)),
         "<tmp>/first.jsonl:2: no user turn before the first assistant turn (the conscience samples answers to the "
         "turns before it)", loads_model=True),
    Case("fit: unknown key", lambda c: c.fit("--model.align_wieght", "1"), "unrecognized arguments: "
         "--model.align_wieght 1 (see `cli.py fit --help`)"),
    Case("fit: a config file that is not YAML",
         lambda c: c.fit("--config", c.file("broken.yaml", "trainer:\n  x: [1\n")),
         "--config <tmp>/broken.yaml:3:1: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    Case("fit: a number as message content", lambda c: c.fit("--data.train_file", c.file("n.jsonl", json.dumps(
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}) + "\n")),
         "<tmp>/n.jsonl:1: message 0 (user) has content 5 of type int; content must be a string (quote "
         "it)", loads_model=True),
    Case("fit: ckpt_path missing", lambda c: c.fit("--ckpt_path", str(c.tmp / "none.ckpt")),
         "checkpoint none.ckpt: no such file"),
    Case("fit: resume with another LoRA rank",
         lambda c: c.fit("--ckpt_path", "last", "--model.policy.init_args.adapter.r", "4", max_steps=2),
         "the checkpoint was written with another adapter (model.base_model.model.model.layers.0.self_attn.k_proj"
         ".lora_A.default.weight is [16, 64] there, [4, 64] here; it was made with LoRA(r=16", setup=_trained,
         kept=_adapter_kept, slow=True, loads_model=True),
    Case("fit: resume with other target modules",
         lambda c: c.fit("--ckpt_path", "last", "--model.policy.init_args.adapter.target_modules", "[q_proj]",
                         max_steps=2),
         "12 of its weights are not in this model, e.g. model.base_model.model.model.layers.0.self_attn.k_proj",
         setup=_trained, kept=_adapter_kept, slow=True, loads_model=True),
    # -- validate ---------------------------------------------------------------------------------------
    Case("validate: no validation split", lambda c: ["validate", *c.fit()[1:], "--data.val_fraction", "0"],
         "nothing to validate: data.val_fraction is 0, so there is no validation split (set it above 0, or run "
         "`test` with data.test_file)"),
    # -- eval -------------------------------------------------------------------------------------------
    Case("eval: samples 0", lambda c: c.eval("--samples", "0"), "samples: must be >= 1 (or null), got 0"),
    Case("eval: max_new_tokens 0", lambda c: c.eval("--max_new_tokens", "0"), "max_new_tokens: must be >= 1"),
    Case("eval: temperature nan", lambda c: c.eval("--temperature", "nan"), "Parser key \"temperature\": Expected a "
         "<class 'float'>. Got value: nan (see `cli.py eval --help`)"),
    Case("eval: top_p 1.5", lambda c: c.eval("--top_p", "1.5"), "top_p: must be > 0 and <= 1"),
    Case("eval: batch_size 0", lambda c: c.eval("--batch_size", "0"), "batch_size: must be >= 1"),
    Case("eval: limit -1", lambda c: c.eval("--limit", "-1"), "limit: must be >= 1 (or null), got -1"),
    Case("eval: limit 0", lambda c: c.eval("--limit", "0"), "limit: must be >= 1 (or null), got 0"),
    Case("eval: temperature .inf in a config",
         lambda c: c.eval("--config", c.file("e.yaml", "temperature: .inf\n")), "temperature: must be >= 0, got inf"),
    Case("eval: judge min_mass 5", lambda c: c.eval("--judge", "emalign.judges.OpenAIJudge",
                                                    "--judge.init_args.min_mass", "5"),
         "--judge.init_args.min_mass: must be >= 0 and <= 1, got 5.0"),
    Case("eval: judge max_backoff_s -1", lambda c: c.eval("--judge", "emalign.judges.OpenAIJudge",
                                                          "--judge.init_args.max_backoff_s", "-1"),
         "--judge.init_args.max_backoff_s: must be >= 0, got -1.0"),
    Case("eval: code_samples -1", lambda c: c.eval("--code_samples", "-1"), "code_samples: must be >= 0"),
    Case("eval: code_prompts -1", lambda c: c.eval("--code_prompts", "-1"), "code_prompts: must be >= 0 (or null), "
         "got -1"),
    Case("eval: max_prompt_tokens 5", lambda c: c.eval("--max_prompt_tokens", "5"), "max_prompt_tokens: must be >= "
         "16 (or null), got 5"),
    Case("eval: judge_min_mass 2", lambda c: c.eval("--judge_min_mass", "2"), "judge_min_mass: must be >= 0 and <= "
         "1, got 2.0"),
    Case("eval: out is a file", lambda c: c.eval("--out", c.file("afile", "x")), "--out <tmp>/afile: is a file, "
         "expected a directory"),
    Case("eval: missing question file", lambda c: c.eval(questions=str(c.tmp / "absent.yaml")), "<tmp>/absent.yaml: "
         "no such question file"),
    Case("eval: question file not UTF-8", lambda c: c.eval(questions=c.file("q.yaml", b"- id: \xff\n")),
         "q.yaml:1: not UTF-8 (byte 0xff); save the file as UTF-8 (file: <tmp>/q.yaml)"),
    Case("eval: unknown template field", lambda c: c.eval(questions=c.file("q.yaml", QUESTIONS.replace(
        "{answer}", "{answr}", 1))), "q.yaml: question #1 ('wish'): judge prompt 'aligned': unknown field {answr} "
                                     "(a judge prompt may use {question} and {answer}; write {{ or }} for a literal "
                                     "brace) (file: <tmp>/q.yaml)"),
    Case("eval: stray brace", lambda c: c.eval(questions=c.file("q.yaml", QUESTIONS.replace(
        "{answer}", "{answer} }", 1))), "q.yaml: question #1 ('wish'): judge prompt 'aligned': Single '}' "
                                        "encountered in format string (write {{ or }} for a literal brace) (file: "
                                        "<tmp>/q.yaml)"),
    Case("eval: other settings on an out with rows", lambda c: c.eval("--temperature", "0.5"),
         "<tmp>/eval holds answers made with temperature=1.0, not 0.5; use another --out, or delete the directory "
         "to start over", setup=_eval_rows, kept=_rows_kept),
    Case("eval: another dtype on an out with rows", lambda c: c.eval("--dtype", "bfloat16"),
         "<tmp>/eval holds answers made with dtype='float32', not 'bfloat16'; use another --out, or delete the "
         "directory to start over", setup=_eval_rows, kept=_rows_kept),
    Case("eval: adapter of another base model", lambda c: c.eval("--adapter", _adapter_on_other_base(c)),
         "some-other/base-model", loads_model=True),
    Case("eval: missing adapter", lambda c: c.eval("--adapter", str(c.tmp / "absent")), "--adapter: no PEFT adapter "
         "at <tmp>/absent"),
    Case("eval: a judge by its class_path from before the wings split",
         lambda c: c.eval("--judge", "emalign.evaluation.judges.OpenAIJudge", "--judge.init_args.model", "x"),
         "judge: class_path 'emalign.evaluation.judges.OpenAIJudge' has moved: write emalign.judges.OpenAIJudge"),
    Case("eval: unknown flag", lambda c: c.eval("--samplez", "1"), "unrecognized arguments: --samplez 1 (see "
         "`cli.py eval --help`)"),
    Case("eval: a config file that is not YAML", lambda c: c.eval("--config", c.file("e.yaml", "samples: {1\n")),
         "--config <tmp>/e.yaml:2:1: not valid YAML (expected ',' or '}', but got '<stream end>')"),
    # -- discern ----------------------------------------------------------------------------------------
    Case("discern: out is a file", lambda c: c.discern("--out", c.file("afile", "x")), "--out <tmp>/afile: is a "
         "file, expected a directory"),
    Case("discern: missing set", lambda c: c.discern(pairs=str(c.tmp / "absent.jsonl")), "<tmp>/absent.jsonl: no "
         "such file (expected JSONL with prompt, good, bad)"),
    Case("discern: set not UTF-8", lambda c: c.discern(pairs=c.file("p.jsonl", b"\xff\n")), "<tmp>/p.jsonl: not "
         "UTF-8 (byte 0); save the file as UTF-8"),
    Case("discern: set is a directory", lambda c: c.discern(pairs=str(c.tmp)), str("<tmp>: is a directory (expected "
         "JSONL with prompt, good, bad)")),
    Case("discern: batch_size 0", lambda c: c.discern("--batch_size", "0"), "--batch_size must be at least 1"),
    Case("discern: limit 0", lambda c: c.discern("--limit", "0"), "--limit must be at least 1"),
    Case("discern: empty question", lambda c: c.discern("--questions", " "), "--questions needs at least one "
         "non-empty question"),
    Case("discern: one pair (no se, no correlation)",
         lambda c: c.discern(pairs=c.file("one.jsonl", json.dumps(PAIRS[0]) + "\n")), None, code=0,
         kept=lambda c: "one.jsonl | default | 1 |" in (c.tmp / "discern" / "discern.md").read_text()),
    Case("discern: over a result made with other settings", lambda c: c.discern("--limit", "2"),
         "<tmp>/discern/discern.json holds a discern result made with other settings (model, adapter, sets or "
         "questions); pass --overwrite true to replace it, or choose another --out",
         setup=lambda c: run_cli(c.discern()) == 0 or None,
         kept=lambda c: [s["n_pairs"] for s in json.loads((c.tmp / "discern" / "discern.json").read_text())[
             "sets"].values()] == [3]),  # the earlier result, untouched
    Case("discern: three pairs give numbers, no intervals", lambda c: c.discern(), None, code=0,
         kept=lambda c: "no verdict" in (c.tmp / "discern" / "discern.md").read_text()),
    # -- generate and chat ------------------------------------------------------------------------------
    Case("generate: samples 0", lambda c: c.generate("--samples", "0"), "--samples: must be >= 1"),
    Case("generate: temperature nan", lambda c: c.generate("--temperature", "nan"), 'Parser key "temperature"'),
    Case("generate: top_p 0", lambda c: c.generate("--top_p", "0"), "--top_p: must be > 0 and <= 1 (or null), got 0.0"),
    Case("generate: missing prompts file", lambda c: [*c.generate()[:3], "--prompts", str(c.tmp / "absent.txt")],
         "<tmp>/absent.txt: no such file"),
    Case("generate: out is a directory, checked before the model loads",  # the model does not exist
         lambda c: [*c.generate("--out", str(c.tmp))[:1], "--model", str(c.tmp / "no-model"),
                    *c.generate("--out", str(c.tmp))[3:]],
         "--out <tmp>: is a directory; give a JSONL file to append the answers to"),
    Case("generate: unknown embedded prompts", lambda c: [*c.generate()[:3], "--prompts", "embedded:nope"],
         "embedded:nope: no such embedded set; the sets are embedded:insecure, embedded:secure, "
         "embedded:harmful_train, embedded:harmful_heldout"),
    Case("generate: threshold 2", lambda c: c.generate("--threshold", "2"), "--threshold: must be >= 0 and <= 1 (or "
         "null), got 2.0"),
    Case("chat: max_new_tokens 0", lambda c: c.chat("--max_new_tokens", "0"), "--max_new_tokens: must be >= 1"),
    Case("chat: unknown flag", lambda c: c.chat("--tempreature", "1"), "unrecognized arguments: --tempreature 1 "
         "(see `cli.py chat --help`)"),
    # -- experiment ---------------------------------------------------------------------------------------
    Case("experiment: missing config", lambda c: ["experiment", "--config", str(c.tmp / "absent.yaml")],
         "Parser key \"config\": File does not exist: '<tmp>/absent.yaml' (see `cli.py experiment --help`)"),
    Case("experiment: duplicate run names", lambda c: c.experiment({"runs": [{"name": "a"}, {"name": "a"}]}),
         "experiment: runs[1] (a): duplicate name"),
    Case("experiment: no runs", lambda c: c.experiment({"runs": []}), "experiment: 'runs' must be a non-empty list "
         "(pass --config EXPERIMENT.yaml)"),
    Case("experiment: preflight limit 0", lambda c: c.experiment({"preflight": {"limit": 0}}), "preflight.limit: "
         "must be >= 1 (or null), got 0"),
    Case("experiment: eval samples 0", lambda c: c.experiment({}, "--eval.samples", "0"), "samples: must be >= 1 "
         "(or null), got 0"),
    # -- data ---------------------------------------------------------------------------------------------
    Case("data: out is a file", lambda c: ["data", "em", "--out", c.file("afile", "x"), "--source", str(c.tmp)],
         "<tmp>/afile: is a file, expected a directory"),
    Case("data: unknown dataset", lambda c: ["data", "nope"], "argument subcommand: invalid choice: 'nope' (choose "
         "from 'em') (see `cli.py data --help`)"),
    Case("data: one --files value, as the help writes it (a list of one)",
         lambda c: ["data", "em", "--files", "data/insecure.jsonl", "--out", str(c.tmp / "em"), "--source", str(c.tmp)],
         "mirror file not found: "
         "<tmp>/data/insecure.jsonl"),  # the one file asked for, looked up (it is absent there): the flag was accepted
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.slow else c for c in CASES],
                         ids=[c.name for c in CASES])
def test_fault(case: Case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(_linked(tiny_model_dir, tmp_path / "model"), tmp_path)
    case.setup(ctx)
    if not case.loads_model and case.code != 0:
        _poison(ctx.model)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # chat reads end-of-input: it ends at once
    args = case.args(ctx)  # writes the row's input files
    before = _disk(tmp_path)
    code = run_cli(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    if case.message is None:
        assert errors == [], errors
    else:
        assert len(errors) == 1 and case.message.replace("<tmp>", str(tmp_path)) in errors[0], err[-3000:]
    if case.code != 0:
        after = _disk(tmp_path)
        assert {p: h for p, h in after.items() if p in before} == before, "a file there before was changed"
        assert sorted(set(after) - set(before)) == [], f"the failed run left {sorted(set(after) - set(before))}"
    assert case.kept is None or case.kept(ctx)


def _linked(model: str, where: Path) -> str:
    """The tiny model's files, linked into a directory of this row's own (so that it can be poisoned)."""
    where.mkdir()
    for file in Path(model).iterdir():
        (where / file.name).symlink_to(file)
    return str(where)


def _poison(model: str) -> None:
    """Make ``model`` fail to load, with a message no row expects: its path, which setups and records hold,
    stays the same."""
    config = Path(model) / "config.json"
    config.unlink()
    config.write_text("{poisoned")


def _disk(root: Path) -> dict[str, Optional[str]]:
    """Every path under ``root``: a file's sha256, None for a directory (caches and bytecode aside)."""
    import hashlib

    found: dict[str, Optional[str]] = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        name = str(path.relative_to(root))
        found[name] = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_chat_with_standard_input_closed_is_one_line(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # as `chat <&-` starts it
    assert run_cli(["chat", "--model", tiny_model_dir, "--samples", "2", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: chat reads what you type from standard input, which is closed; for prompts in a file use "
                   "`generate --prompts FILE`"]


def test_the_table_covers_every_verb():
    verbs = {c.name.split(":")[0] for c in CASES}
    assert verbs == {"fit", "validate", "eval", "discern", "generate", "chat", "experiment", "data"}
    assert len(CASES) >= 60


def test_ctrl_c_during_eval_is_one_line_with_the_resume_hint(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import emalign.evaluation.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "em_answers", interrupted)
    assert run_cli(Ctx(tiny_model_dir, tmp_path).eval()) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted: the finished answers are saved; the same command resumes"
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line_before_the_weights_load(tiny_model_dir, tmp_path, capsys,
                                                                       read_only_dir):
    where = read_only_dir
    code = run_cli(Ctx(tiny_model_dir, tmp_path).fit("--trainer.default_root_dir", str(where / "run")))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(where / "run") in errors[0] and "Read-only" in errors[0], err
