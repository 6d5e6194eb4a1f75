"""Reading dataset files: jsonl / json / parquet rows, each with where it came from.

One reader for every stage and task, so a bad file gets the same clear error everywhere:
it names the file, the line (or row) and, from the caller, the field. The run logs
(metrics.jsonl, samples.jsonl) are read by the same parser (`read_jsonl`), and Hugging Face
hub datasets by `read_hub_rows`, which labels its rows the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Row = tuple[str, dict]  # (where: "file.jsonl line 12", fields)


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names file, line, field."""


# --- reading rows ---------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """Rows of a local `.jsonl` / `.json` / `.parquet` file, each with where it came from.

    JSON lines are numbered by line (1-based, blank lines skipped but counted); parquet
    and JSON-array rows by row (1-based).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = [(f"{path} row {i}", r) for i, r in enumerate(_read_parquet(path), 1)]
    elif suffix in (".jsonl", ".ndjson", ".json"):
        rows = _read_json(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str) -> list[dict]:
    """A chat conversation row's `messages`: a list of {role, content} with roles among
    system / user / assistant, at least one assistant turn, and a system turn only first.
    Errors name `where` (file and line) and the turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field 'messages' must be a non-empty list of {{role, content}}, "
            f"got {kind_name(messages)}"
        )
    checked = []
    for i, turn in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with role and content, got {kind_name(turn)}")
        for name in ("role", "content"):
            if name not in turn:
                raise DataError(f"{at}: missing field {name!r}")
        role, content = turn["role"], turn["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: content must be a string, got {kind_name(content)}")
        if role == "system" and i:
            raise DataError(f"{at}: a system turn may only come first")
        checked.append({"role": role, "content": content})
    answered = [t for t in checked if t["role"] == "assistant" and t["content"].strip()]
    if not answered:
        raise DataError(f"{where}: 'messages' has no non-empty assistant turn to learn from")
    if checked[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must end with an assistant turn")
    return checked


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a run log such as metrics.jsonl; a missing or empty file has none.

    A torn last line (what a kill or a full disk leaves mid-write) is dropped with a
    warning naming the file; any other bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        return []
    return [fields for _, fields in _read_json(path, torn_tail_ok=True)]


def warn_torn(path: Path, lineno: int) -> None:
    print(
        f"warning: {path} line {lineno}: dropped a partial last line (left by an "
        "interrupted write)",
        file=sys.stderr,
    )


def read_hub_rows(
    hub_id: str, config: str | None = None, split: str = "train", needed_by: str = ""
) -> list[Row]:
    """Rows of a Hugging Face hub dataset split (needs the optional `datasets` package).

    `needed_by` names what asked for the dataset, for the message when `datasets` is missing.
    """
    try:
        import datasets
    except ImportError as e:
        who = f"{needed_by} loads" if needed_by else "loading"
        raise ImportError(
            f"{who} {hub_id} from the Hugging Face hub, which needs the `datasets` package: "
            "pip install 'r1lab[hub]' (or pip install datasets), or pass a local "
            ".jsonl/.parquet file"
        ) from e
    ds = datasets.load_dataset(hub_id, config, split=split)
    rows = [(f"{hub_id} (split {split}) row {i}", dict(r)) for i, r in enumerate(ds, 1)]
    if not rows:
        raise DataError(f"{hub_id} (split {split}): no rows")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pyarrow: pip install pyarrow (or 'r1lab[hub]')"
        ) from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a bad file)
        raise DataError(f"{path}: cannot read parquet: {e}") from e


def _read_json(path: Path, torn_tail_ok: bool = False) -> list[Row]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if path.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON: {e}") from e
        rows = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path} row {i}: expected a JSON object, got {kind_name(item)}")
            rows.append((f"{path} row {i}", item))
        return rows
    rows = []
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            item = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn_tail_ok and lineno == len(lines):  # no newline after it: a torn write
                warn_torn(path, lineno)
                break
            if isinstance(e, UnicodeDecodeError):
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from e
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {kind_name(item)}")
        rows.append((where, item))
    return rows


def kind_name(value: Any) -> str:
    return type(value).__name__
