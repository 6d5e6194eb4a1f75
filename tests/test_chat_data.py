"""Chat data and prompt templates: messages rows in SFT, one renderer shared with eval,
system prompts and instructions, template files, and the prompt recorded in eval samples."""

from __future__ import annotations

import json

import pytest
from conftest import save_random_micro_model

from r1lab import cli
from r1lab.config import ConfigError, build_config
from r1lab.model.tokenizer import (
    ASSISTANT,
    EOS,
    R1_DISTILL_INSTRUCTION,
    SYSTEM,
    USER,
    PromptTemplate,
    load_tokenizer,
    render_prompt,
)
from r1lab.rows import DataError
from r1lab.stages import evaluate, sft
from r1lab.stages.packing import tokenize_examples
from r1lab.tasks.corpus import cold_start_examples
from r1lab.training import read_jsonl

CHAT = {
    "messages": [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "and 4+4?"},
        {"role": "assistant", "content": "8"},
    ]
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    examples = cold_start_examples("chain_sum", 200, 0, zh_fraction=0.0)
    folder = save_random_micro_model(
        tmp_path_factory.mktemp("chat") / "model",
        vocab_size=400,
        texts=[e["prompt"] + e["response"] for e in examples],
    )
    return folder, load_tokenizer(folder)


def config(base, **overrides) -> sft.Config:
    settings = dict(model=str(base[0]), batch_size=2, epochs=1, warmup_steps=0, val_examples=0)
    return sft.Config(**{**settings, **overrides})


def test_each_assistant_turn_is_one_example_with_the_chat_so_far_as_prompt(base):
    _, tok = base
    out = sft.render_examples([CHAT], tok, config(base))
    assert [e["response"] for e in out] == ["3", "8"]
    assert out[0]["prompt"] == f"{SYSTEM}You add numbers.{USER}1+2?{ASSISTANT}"
    assert out[1]["prompt"] == out[0]["prompt"] + f"3{EOS}{USER}and 4+4?{ASSISTANT}"


def test_loss_falls_on_assistant_tokens_only(base):
    _, tok = base
    docs, masks, _ = tokenize_examples(sft.render_examples([CHAT], tok, config(base)), tok, 256)
    learned = [tok.decode([t for t, m in zip(d, k) if m]) for d, k in zip(docs, masks)]
    assert learned == [f"3{EOS}", f"8{EOS}"]


def test_a_system_prompt_setting_fills_in_only_where_the_chat_has_none(base):
    _, tok = base
    chat = {"messages": CHAT["messages"][1:3]}
    out = sft.render_examples([chat, CHAT], tok, config(base, system_prompt="Be brief."))
    assert out[0]["prompt"].startswith(f"{SYSTEM}Be brief.{USER}")
    assert out[1]["prompt"].startswith(f"{SYSTEM}You add numbers.")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": "hi"}, r"line 2: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"line 2: messages\[0\]: unknown role"),
        ({"messages": [{"role": "user"}]}, r"line 2: messages\[0\]: missing field 'content'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "line 2: .*no non-empty assistant"),
        (
            {"messages": [*CHAT["messages"][:3], {"role": "user", "content": "q"}]},
            "line 2: .*end with an",
        ),
        ({"text": "x"}, r"line 2: missing field 'prompt' .*messages"),
    ],
)
def test_malformed_rows_name_file_and_line(base, tmp_path, row, message):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"chat.jsonl {message}"):
        sft.run(config(base, data=[str(data)]), tmp_path / "out")


def test_templates_take_a_system_prompt_and_an_instruction(base):
    _, tok = base
    q = "What is 2+2?"
    assert render_prompt("plain", q, instruction="Think.") == f"{q}\nThink."
    assert render_prompt("plain", q, system="S") == f"S\n\n{q}"
    chat = render_prompt("chat", q, tok, system="S")
    assert chat == f"{SYSTEM}S{USER}{q}{ASSISTANT}" == render_prompt("r1-chat", q, tok, system="S")
    assert render_prompt("r1-distill", q, tok) == f"{USER}{q}\n{R1_DISTILL_INSTRUCTION}{ASSISTANT}"
    assert "\\boxed{}" in R1_DISTILL_INSTRUCTION
    with pytest.raises(ValueError, match="tokenizer's own chat template"):
        render_prompt("chat", q, None)


def test_a_template_file_is_data(base, tmp_path, monkeypatch):
    _, tok = base
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: plain\nsystem: Solve it.\ninstruction: Answer.\n")
    assert render_prompt("mine.yaml", "1+1", tok) == "Solve it.\n\n1+1\nAnswer."
    assert render_prompt(PromptTemplate("r1-zero", instruction="!"), "q").endswith(
        "q\n!. Assistant:"
    )
    (tmp_path / "bad.yaml").write_text("base: plain\nsytem: x\n")
    with pytest.raises(ConfigError, match="bad.yaml.*unexpected: sytem"):
        build_config(evaluate.Config, {"model": "m", "template": "bad.yaml"})
    with pytest.raises(ConfigError, match="unknown template 'chatml'.*r1-distill"):
        build_config(sft.Config, {"model": "m", "template": "chatml"})


def test_sft_on_messages_then_eval_sees_the_same_prompt(base, tmp_path):
    folder, tok = base
    q = "What is 3 + 4?"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "7"}]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    cfg = config(base, data=[str(data)], template="chat", system_prompt="Be exact.", max_steps=2)
    summary = sft.run(cfg, tmp_path / "sft")
    assert summary["examples"] == 8
    assert "template: chat" in (tmp_path / "sft" / "config.yaml").read_text()

    ecfg = build_config(
        evaluate.Config,
        dict(
            model=str(tmp_path / "sft"),
            tasks=[{"name": "chain_sum", "n": 2}],
            k=1,
            max_new_tokens=4,
            template="chat",
            system_prompt="Be exact.",
        ),
    )
    evaluate.run(ecfg, tmp_path / "eval")
    samples = read_jsonl(tmp_path / "eval" / "samples.jsonl")
    for s in samples:
        trained = sft.render_examples(
            [
                {
                    "messages": [
                        {"role": "user", "content": s["question"]},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ],
            tok,
            cfg,
        )[0]["prompt"]
        trained_plain = sft.render_examples([{"prompt": s["question"], "response": "x"}], tok, cfg)
        assert s["prompt"] == trained == trained_plain[0]["prompt"]
    assert "template: chat" in (tmp_path / "eval" / "config.yaml").read_text()


def test_generate_takes_system_and_instruction(base, capsys):
    folder, _ = base
    argv = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "1+1",
        "--template",
        "r1-distill",
        "--system",
        "S",
        "--max-new-tokens",
        "2",
        "--show-prompt",
    ]
    assert cli.main(argv) == 0
    assert R1_DISTILL_INSTRUCTION in capsys.readouterr().out
