"""docs/from-trl.md stays true as settings change.

- Every r1lab setting the page's mapping tables name (their "r1lab setting" column) is a
  field of the matching stage Config (the GRPO section's tables: `r1lab.stages.grpo.Config`,
  the SFT section's: `r1lab.stages.sft.Config`), a `section.field` of a nested setting
  (`lora.r`) or a flag of the stage command; a `field=value` must also validate.
- Every `r1lab ...` command line of the page parses and resolves to a config; a `grpo`
  command also loads its reward functions (the page's own `myrewards.py` included).
- The reward example does what the page says, and its TRL version agrees with it.
- The `loss_type` table's claims hold: TRL's normalisations, computed here over a batch
  split into micro-batches as its trainer splits it, against `r1lab.rl.policy_loss`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from r1lab import cli
from r1lab.config import build_config, load_stage_config, parse_overrides
from r1lab.rl import policy_loss
from r1lab.stage_graph import STAGE_COMMANDS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-trl.md"
SETTING_COLUMN = "r1lab setting"
NO_SETTING = ("no equivalent", "always on")
# fields a config cannot be built without, given when a `field=value` cell is validated
REQUIRED = {"grpo": {}, "sft": {"model": "org/name"}}
SPAN = re.compile(r"`([^`]+)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")

# The TRL settings the page must map (or say it cannot), per section.
TRL_GRPO = (
    "num_generations per_device_train_batch_size generation_batch_size steps_per_generation "
    "gradient_accumulation_steps max_completion_length max_prompt_length temperature top_p "
    "top_k learning_rate lr_scheduler_type warmup_steps beta epsilon epsilon_high "
    "num_iterations loss_type scale_rewards mask_truncated_completions reward_funcs "
    "reward_weights sync_ref_model ref_model_sync_steps gradient_checkpointing max_steps "
    "logging_steps save_steps report_to seed bf16 use_vllm peft_config"
).split()
TRL_SFT = (
    "completion_only_loss assistant_only_loss packing max_length num_train_epochs max_steps "
    "learning_rate lr_scheduler_type warmup_steps warmup_ratio per_device_train_batch_size "
    "gradient_accumulation_steps gradient_checkpointing bf16 report_to peft_config messages"
).split()


# ---- reading the page ---------------------------------------------------------------------------
@dataclass
class Row:
    stage: str | None  # "grpo" or "sft": the `## ` section the table is in
    cells: dict[str, str]  # header -> cell
    line: int

    @property
    def first(self) -> str:
        return next(iter(self.cells.values()))

    @property
    def settings(self) -> list[str]:
        return SPAN.findall(self.cells[SETTING_COLUMN])


def page_text() -> str:
    return PAGE.read_text()


def mapping_rows() -> list[Row]:
    """Rows of the tables that have an "r1lab setting" column, outside code blocks."""
    rows: list[Row] = []
    stage, header, in_code = None, None, False
    for n, line in enumerate(page_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if line.startswith("## "):
            stage = "grpo" if "GRPO" in line else "sft" if "SFT" in line else None
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if not line.replace("|", "").replace("-", "").replace(":", "").strip():
            continue  # the separator under the header
        if SETTING_COLUMN in header:
            assert len(cells) == len(header), f"from-trl.md:{n}: {len(cells)} cells"
            rows.append(Row(stage, dict(zip(header, cells)), n))
    return rows


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page_text(), flags=re.M | re.S)


def command_lines() -> list[str]:
    """Every `r1lab ...` command: lines of shell blocks (continuations joined) and inline
    code spans outside blocks."""
    found = []
    for lang, text in code_blocks():
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            words = line.split()
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words[:1] == ["r1lab"]:
                found.append(line)
    prose = re.sub(r"^```.*?^```", "", page_text(), flags=re.M | re.S)
    found += [span for span in SPAN.findall(prose) if span.startswith("r1lab ")]
    return found


def python_files() -> dict[str, str]:
    """The page's Python blocks that open with `# name.py`: files a reader saves."""
    files = {}
    for lang, text in code_blocks():
        first = text.splitlines()[0] if text else ""
        m = re.fullmatch(r"# (\w+\.py)", first.strip())
        if lang == "python" and m:
            files[m.group(1)] = text
    return files


# ---- checking a setting -------------------------------------------------------------------------
def stage_config(stage: str) -> type[BaseModel]:
    return importlib.import_module(f"r1lab.stages.{STAGE_COMMANDS[stage][0]}").Config


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def stage_flags(stage: str) -> set[str]:
    return set(subcommands()[stage]._option_string_actions)


def nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `LoraSettings | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = nested_model(arg)
        if found is not None:
            return found
    return None


def check_setting(stage: str, token: str) -> None:
    """AssertionError unless `token` (`field`, `a.b`, `field=value` or `--flag`) is real."""
    if token.startswith("--"):
        flag = token.split()[0]
        assert flag in stage_flags(stage), f"{flag!r} is not a flag of `r1lab {stage}`"
        return
    name, assigned, _ = token.partition("=")
    cls: type[BaseModel] | None = stage_config(stage)
    path = name.split(".")
    for depth, part in enumerate(path):
        assert cls is not None, f"{'.'.join(path[:depth])!r} has no fields (in {token!r})"
        assert part in cls.model_fields, (
            f"{stage}: {part!r} (in {token!r}) is not a field of {cls.__name__}; "
            f"fields: {', '.join(cls.model_fields)}"
        )
        cls = nested_model(cls.model_fields[part].annotation)
    if assigned:
        build_config(stage_config(stage), REQUIRED[stage], parse_overrides([token]))


# ---- the tables ---------------------------------------------------------------------------------
def test_the_page_has_both_mapping_tables():
    stages = [row.stage for row in mapping_rows()]
    assert stages.count("grpo") >= 40
    assert stages.count("sft") >= 25
    assert set(stages) == {"grpo", "sft"}


@pytest.mark.parametrize("stage,names", [("grpo", TRL_GRPO), ("sft", TRL_SFT)])
def test_the_common_trl_settings_are_all_mapped(stage, names):
    firsts = " ".join(row.first for row in mapping_rows() if row.stage == stage)
    missing = [n for n in names if not re.search(rf"`{n}\b", firsts)]
    assert not missing, f"{stage} table lacks rows for {missing}"


def test_every_row_names_a_setting_or_says_there_is_none():
    for row in mapping_rows():
        cell = row.cells[SETTING_COLUMN]
        assert row.settings or any(p in cell for p in NO_SETTING), (
            f"from-trl.md:{row.line}: the r1lab column names no setting and does not say "
            f"{' or '.join(NO_SETTING)!r}: {cell!r}"
        )


def named_settings() -> list[tuple[str, str, int]]:
    return [(row.stage, s, row.line) for row in mapping_rows() for s in row.settings]


@pytest.mark.parametrize("stage,token,line", named_settings())
def test_every_named_setting_exists_and_its_value_validates(stage, token, line):
    try:
        check_setting(stage, token)
    except Exception as err:  # name the page's line, whatever failed
        raise AssertionError(f"from-trl.md:{line}: `{token}`: {err}") from err


# Names in the explanation column that are neither r1lab settings nor TRL settings of the
# first column (TRL values and r1lab metric names)
OTHER_NAMES = {"cosine_with_min_lr", "keep_start", "val_loss"}
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*(=.*)?")


def explained_names() -> list[tuple[str, str, int]]:
    """(stage, name, line) of the identifiers (`name`, `a.b` or `name=value`) in the third
    column that are r1lab settings, or look like settings (an underscore, a value) without
    being TRL settings of the section's first column or `OTHER_NAMES`."""
    rows = mapping_rows()
    found = []
    for stage in ("grpo", "sft"):
        firsts = " ".join(row.first for row in rows if row.stage == stage)
        trl = set(re.findall(r"`([a-z_][a-z0-9_]*)", firsts))
        for row in (r for r in rows if r.stage == stage):
            for span in SPAN.findall(list(row.cells.values())[2]):
                if not IDENTIFIER.fullmatch(span):
                    continue  # a value, a path, a formula
                name = span.partition("=")[0]
                if name.split(".")[0] in stage_config(stage).model_fields:
                    found.append((stage, span, row.line))  # an r1lab setting: check it
                elif name not in trl and name not in OTHER_NAMES and ("_" in name or "=" in span):
                    found.append((stage, span, row.line))  # looks like one: it must be
    return found


@pytest.mark.parametrize("stage,token,line", explained_names())
def test_settings_named_in_the_explanations_exist(stage, token, line):
    try:
        check_setting(stage, token)
    except Exception as err:
        raise AssertionError(f"from-trl.md:{line}: `{token}`: {err}") from err


def test_a_misspelled_setting_is_caught():
    with pytest.raises(AssertionError, match="group_sise"):
        check_setting("grpo", "group_sise")
    with pytest.raises(AssertionError, match="rank"):
        check_setting("sft", "lora.rank")
    with pytest.raises(Exception, match="aggregation"):
        check_setting("grpo", "aggregation=token_mean")
    with pytest.raises(AssertionError, match="--output"):
        check_setting("grpo", "--output")


# ---- the commands and the reward example --------------------------------------------------------
@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    """A working directory holding the files the page tells the reader to save."""
    for name, text in python_files().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check_command(line: str) -> None:
    words = shlex.split(line, comments=True)
    while ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    assert words[0] == "r1lab"
    for i, word in enumerate(words):  # a shell redirection or pipe ends the command
        if word in (">", ">>", "|", "2>"):
            words = words[:i]
            break
    argv = words[1:]
    if len(argv) == 1:  # a command named in prose (`r1lab sft`), or one without arguments
        assert argv[0] in subcommands(), f"no command {argv[0]!r}"
        return
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        return
    if argv[0] in ("config", "presets"):
        assert cli.main(argv) == 0
        return
    args = cli.build_parser().parse_args(argv)
    if args.command in STAGE_COMMANDS:
        module_name, section, _ = STAGE_COMMANDS[args.command]
        module = importlib.import_module(f"r1lab.stages.{module_name}")
        cfg = load_stage_config(module.Config, section, args.preset, args.overrides)
        if args.command == "grpo":
            module.reward_sets(cfg)  # loads every reward it names, user files included


def test_the_page_has_commands_and_a_reward_file():
    assert any(" grpo " in c for c in command_lines())
    assert "myrewards.py" in python_files()


@pytest.mark.parametrize("line", command_lines())
def test_every_command_parses(line, reader_folder, capsys):
    try:
        check_command(line)
    except (Exception, SystemExit) as err:
        raise AssertionError(f"from-trl.md command does not parse: {line}\n{err!r}") from err


def test_a_misspelled_command_is_caught(reader_folder, capsys):
    with pytest.raises(Exception, match="group_sise"):
        check_command("r1lab grpo --out runs/x model=org/name group_sise=8")
    with pytest.raises(Exception, match="boxed_mach"):
        check_command("r1lab grpo --out runs/x 'rewards={myrewards.py:boxed_mach: 1}'")


def test_the_reward_example_scores_as_described(reader_folder):
    from r1lab.rewards import get_reward

    boxed = get_reward("myrewards.py:boxed_match")
    completions = ["so \\boxed{4} or rather \\boxed{5}", "\\boxed{ 5 }", "\\boxed{4}", "5"]
    answers = ["5"] * 4
    assert boxed([""] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    budget = get_reward("myrewards.py:length_budget", limit=10)
    lengths = [3, 10, 15, 40]
    assert budget([""] * 4, [""] * 4, completion_lengths=lengths) == [0.0, 0.0, -0.5, -1.0]

    trl_blocks = [t for _, t in code_blocks() if t.startswith("# TRL") and "def boxed_" in t]
    assert len(trl_blocks) == 1
    scope: dict = {}
    exec(trl_blocks[0], scope)  # the page's TRL version: the same scores, text or chat
    as_chat = [[{"role": "assistant", "content": c}] for c in completions]
    for given in (completions, as_chat):
        scores = scope["boxed_match"]([""] * 4, given, completion_ids=[[1]] * 4, answer=answers)
        assert scores == [1.0, 1.0, 0.0, 0.0]


# ---- the loss_type table ------------------------------------------------------------------------
N, T, MAX_LEN, BETA = 6, 7, 9, 0.04


def loss_rows() -> dict[str, tuple[str, bool]]:
    """TRL loss_type -> (r1lab aggregation, whether the page says they match exactly)."""
    out = {}
    for row in mapping_rows():
        names = SPAN.findall(row.first)
        assigned = [s for s in row.settings if s.startswith("aggregation=")]
        if names and names[0] in ("grpo", "dr_grpo", "dapo", "bnpo") and assigned:
            match = list(row.cells.values())[2]
            out[names[0]] = (assigned[0].partition("=")[2], match.startswith("exact"))
    return out


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logprobs = (old + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 7, 3, 6, 2, 5])  # uneven: micro-batches hold unequal token counts
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logprobs, old, ref, adv, mask


def per_token_terms(logprobs, old, ref, adv, mask, eps_low=0.2, eps_high=0.28):
    """The clipped surrogate plus beta * k3, per token (the term both libraries share)."""
    ratio = torch.exp(torch.where(mask, logprobs - old, 0.0))
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    d = torch.where(mask, ref - logprobs, 0.0)
    return -surrogate + BETA * (torch.exp(d) - d - 1)


def trl_loss(loss_type: str, terms, mask, micro: int) -> torch.Tensor:
    """One optimizer step's loss as TRL normalises it: micro-batches of `micro` sequences
    (`per_device_train_batch_size`), each divided by the accumulation count, except dapo,
    divided by the tokens of the whole step."""
    m = mask.to(terms.dtype)
    parts = [slice(s, s + micro) for s in range(0, len(terms), micro)]
    accumulation, step_tokens = len(parts), m.sum()
    total = terms.new_zeros(())
    for rows in parts:
        t, k = terms[rows] * m[rows], m[rows]
        if loss_type == "grpo":
            part = (t.sum(1) / k.sum(1).clamp(min=1)).mean() / accumulation
        elif loss_type == "bnpo":
            part = t.sum() / k.sum().clamp(min=1) / accumulation
        elif loss_type == "dr_grpo":
            part = t.sum() / (t.shape[0] * MAX_LEN) / accumulation
        else:  # dapo
            part = t.sum() / step_tokens
        total = total + part
    return total


def values_and_grads(loss_type, aggregation, micro):
    logprobs, old, ref, adv, mask = batch()
    theirs = trl_loss(loss_type, per_token_terms(logprobs, old, ref, adv, mask), mask, micro)
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    ours, _ = policy_loss(
        logprobs, old, adv, mask, ref_logprobs=ref, beta=BETA, eps_low=0.2, eps_high=0.28,
        aggregation=aggregation, norm_length=MAX_LEN,
    )  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    return theirs, ours, their_grad, our_grad


def test_the_loss_table_names_the_four_loss_types():
    assert set(loss_rows()) == {"grpo", "dr_grpo", "dapo", "bnpo"}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_type_claims_hold(loss_type):
    aggregation, exact = loss_rows()[loss_type]
    # one micro-batch per optimizer step: every claimed aggregation is TRL's loss
    theirs, ours, their_grad, our_grad = values_and_grads(loss_type, aggregation, micro=N)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)
    # three micro-batches of two: "exact" rows still match, the others do not
    theirs, ours, their_grad, our_grad = values_and_grads(loss_type, aggregation, micro=2)
    if exact:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)
    else:
        assert not torch.allclose(our_grad, their_grad, rtol=1e-6, atol=1e-9)
