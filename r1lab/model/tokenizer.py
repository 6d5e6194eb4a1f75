"""Tokenizers and prompt templates.

Two ways to get a tokenizer, both returning a `transformers.PreTrainedTokenizerFast` so the
rest of r1lab never cares where it came from:

- `load_tokenizer(path)`: any Hugging Face tokenizer folder (the one saved with a checkpoint).
- `train_tokenizer(texts, vocab_size)`: a small byte-level BPE for from-scratch models.

The trained tokenizer is shaped by what tiny models need:

- every digit is its own token, so the model sees numbers digit by digit (carries are
  learnable; "68" and "86" are not unrelated ids);
- apart from digits, merges may span spaces and words, so a long fixed prompt repeated in
  the corpus (the R1-Zero template) shrinks to a handful of tokens and leaves the short
  context for the question and the reasoning;
- the role markers `<|bos|> <|eos|> <|pad|> <|user|> <|assistant|> <|system|>` are special
  tokens (one id each, dropped by `decode(..., skip_special_tokens=True)`);
- the reasoning tags `<think> </think> <answer> </answer>` are one id each but are *not*
  special: rewards parse them from decoded text, so they survive decoding whatever
  `skip_special_tokens` says.

Templates are plain functions of the question text (`TEMPLATES`, `render_prompt`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1lab.tags import REASONING_TAGS

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM)

# The R1 chat format with our role markers. No BOS is written, so the rendered prompt is the
# same text `r1_chat_prompt` produces without a tokenizer; an assistant turn ends with EOS so
# SFT teaches the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM + "{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    + ASSISTANT
    + "{{ message['content'] }}"
    + EOS
    + "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)

_TAG_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + REASONING_TAGS))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """`tokenizer.save_pretrained(path)`, in a form transformers 4.x and 5.x both load.

    transformers 5 records its generic fast tokenizer as `TokenizersBackend` and the extra
    special tokens under `extra_special_tokens`; transformers 4.x knows neither name. Both
    versions read the older names (`PreTrainedTokenizerFast`, `additional_special_tokens`)
    to the same tokenizer, so those are written. A model-specific tokenizer class (a
    Qwen2Tokenizer, say) is left as it is.
    """
    import json

    tokenizer.save_pretrained(str(path))
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") != "TokenizersBackend":
        return
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list) and "additional_special_tokens" not in config:
        config["additional_special_tokens"] = extra
    elif extra is not None:
        config["extra_special_tokens"] = extra
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved in a local folder (never runs code shipped with it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {folder} (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), trust_remote_code=False, local_files_only=True, use_fast=True
    )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{folder} holds a slow tokenizer only; r1lab needs tokenizer.json")
    return tokenizer


def _byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Digits first (each its own piece), then bytes; no regex split, so merges cross spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _between_tags(texts: Iterable[str]) -> Iterator[str]:
    """Yield the text between special tokens and tags.

    At encode time those tokens are cut out before BPE runs; training on the same pieces
    keeps merges from being spent on tags that never reach the BPE model.
    """
    for text in texts:
        yield from (piece for piece in _TAG_SPLIT.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; see the module docstring for its shape."""
    n_reserved = 256 + len(SPECIAL_TOKENS) + len(REASONING_TAGS)
    if vocab_size < n_reserved:
        raise ValueError(
            f"vocab_size must be at least {n_reserved} (bytes + tags), got {vocab_size}"
        )
    tokenizer = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(REASONING_TAGS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_between_tags(texts), trainer)
    tokenizer.add_tokens(
        [AddedToken(tag, special=False, normalized=False) for tag in REASONING_TAGS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


# --- prompt templates -----------------------------------------------------------------

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt; a completion earning full format reward continues with
    `" <think> reasoning </think> <answer> answer </answer>"`."""
    return R1_ZERO_TEMPLATE.replace("{prompt}", question)


def r1_chat_prompt(question: str, tokenizer: PreTrainedTokenizerFast | None = None) -> str:
    """The R1 chat prompt, ending where the assistant starts to write.

    The completion is `"<think>\\nreasoning\\n</think>\\nsummary"` with the final answer
    in `\\boxed{...}`. A tokenizer with a chat template renders it (so a real checkpoint gets
    its own format); otherwise our role markers are used.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"{USER}{question}{ASSISTANT}"


TEMPLATES: dict[str, Callable[..., str]] = {
    "r1-zero": r1_zero_prompt,
    "r1-chat": r1_chat_prompt,
    "plain": lambda q: q,
}
# "chat": a user turn in the tokenizer's own chat template (which it must have)
BASE_TEMPLATES = (*TEMPLATES, "chat")

# How the R1 distilled models are evaluated: the question in a user turn of the model's own
# chat template, followed by this instruction, and no system prompt.
R1_DISTILL_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template as data: a base format, an optional system prompt, and an optional
    instruction appended to every question (after a newline).

    `base`: "plain" (the question as written), "r1-zero" (the R1-Zero prompt), "r1-chat"
    (a user turn in the tokenizer's chat template, or r1lab's role markers when it has none)
    or "chat" (the tokenizer's own chat template, which must exist).
    """

    base: str = "plain"
    system: str | None = None
    instruction: str | None = None

    def __post_init__(self):
        if self.base not in BASE_TEMPLATES:
            known = ", ".join(BASE_TEMPLATES)
            raise ValueError(f"unknown base template {self.base!r}; known: {known}")


NAMED_TEMPLATES: dict[str, PromptTemplate] = {
    "r1-distill": PromptTemplate("chat", instruction=R1_DISTILL_INSTRUCTION),
}


def template_names() -> list[str]:
    return [*sorted(TEMPLATES), "chat", *sorted(NAMED_TEMPLATES)]


def resolve_template(template: str | PromptTemplate) -> PromptTemplate:
    """A PromptTemplate from a name (built-in or named), a YAML/JSON template file
    (`{base, system, instruction}`, relative to the working directory) or itself."""
    if isinstance(template, PromptTemplate):
        return template
    if template in BASE_TEMPLATES:
        return PromptTemplate(template)
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    path = Path(template)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"prompt template file not found: {path}")
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - {"base", "system", "instruction"} if isinstance(data, dict) else {0}
        if unknown:
            raise ValueError(
                f"{path}: a prompt template file is a mapping of base, system and instruction; "
                f"unexpected: {', '.join(map(str, unknown))}"
            )
        try:
            return PromptTemplate(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
    raise KeyError(
        f"unknown template {template!r}; known templates: {', '.join(template_names())}, "
        "or a .yaml template file with base, system and instruction"
    )


def check_template(template: str) -> str:
    """`template` if it names a template (a validator for config fields), else ValueError."""
    try:
        resolve_template(template)
    except (KeyError, FileNotFoundError) as err:
        raise ValueError(str(err.args[0]) if err.args else str(err)) from None
    return template


# A config setting that names a prompt template (a name or a template file), checked by
# `check_template`: every stage that renders prompts takes the same values.
TemplateName = Annotated[str, AfterValidator(check_template)]


def chat_prompt(messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """`messages` in the tokenizer's own chat template (which it must have)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat' renders with the tokenizer's own chat template, and this "
            "tokenizer has none; use r1-chat (r1lab's role markers), r1-zero or plain"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_messages(messages: list[dict], tokenizer=None, add_generation_prompt=True) -> str:
    """A conversation as text: the tokenizer's chat template, else r1lab's role markers."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return chat_prompt(messages, tokenizer, add_generation_prompt)
    marks = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    text = "".join(
        marks[m["role"]] + m["content"] + (EOS if m["role"] == "assistant" else "")
        for m in messages
    )
    return text + (ASSISTANT if add_generation_prompt else "")


def render_prompt(
    template_name: str | PromptTemplate,
    question: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    system: str | None = None,
    instruction: str | None = None,
) -> str:
    """Render `question` with a template (a name, a template file or a PromptTemplate);
    `system` and `instruction` override the template's own."""
    spec = resolve_template(template_name)
    system = spec.system if system is None else system
    instruction = spec.instruction if instruction is None else instruction
    if instruction:
        question = f"{question}\n{instruction}"
    if spec.base in ("r1-chat", "chat"):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        if spec.base == "chat":
            return chat_prompt(messages, tokenizer)
        return render_messages(messages, tokenizer)
    text = r1_zero_prompt(question) if spec.base == "r1-zero" else question
    return f"{system}\n\n{text}" if system else text
