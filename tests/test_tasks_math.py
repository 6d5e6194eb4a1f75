"""Math benchmark loaders on the real files, bad inputs, the generic jsonl task, reasoning-gym.

The benchmark files live in the shared data folder (R1LAB_DATA, else ../shared/data) and
are never copied into the repository; tests skip when the folder is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from r1lab.rewards import AccuracyReward
from r1lab.tasks import get_task, task_names
from r1lab.tasks.math import DataError, read_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(os.environ.get("R1LAB_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"benchmark data not found in {path}")
    return path


BENCHMARKS = [
    # (task, file, rows, question field in the file)
    ("math500", "math500.jsonl", 500, "problem"),
    ("aime24", "aime24.jsonl", 30, "problem"),
    ("amc23", "amc23.jsonl", 40, "question"),
    ("gsm8k", "gsm8k_test.jsonl", 1319, "question"),
    ("gsm8k", "gsm8k_train.jsonl", 7473, "question"),
]


def test_tasks_are_registered():
    assert {"gsm8k", "math500", "aime24", "amc23", "jsonl", "gym"} <= set(task_names())


@pytest.mark.parametrize("name, filename, rows, question_field", BENCHMARKS)
def test_every_row_loads_and_its_reference_earns_full_reward(
    data_dir, name, filename, rows, question_field
):
    task = get_task(name, path=data_dir / filename)
    examples = task.examples()
    assert len(examples) == rows
    raw = [json.loads(line) for line in (data_dir / filename).open()]
    assert [e.question for e in examples] == [r[question_field].strip() for r in raw]
    assert all(e.answer and e.answer == e.answer.strip() for e in examples)
    refs = [e.answer for e in examples]
    completions = [f" <think> done </think> <answer> {a} </answer>" for a in refs]
    scores = AccuracyReward()(["Q"] * len(refs), completions, answer=refs)
    assert list(scores) == [1.0] * rows


def test_gsm8k_final_answer_parsing(data_dir):
    train = get_task("gsm8k", path=data_dir / "gsm8k_train.jsonl").examples()
    first = get_task("gsm8k", path=data_dir / "gsm8k_test.jsonl").examples()[0]
    assert first.answer == "18"
    assert first.meta["solution"].endswith("$<<9*2=18>>18 every day at the farmer\u2019s market.")
    assert "####" not in first.meta["solution"]
    raw = [json.loads(line) for line in (data_dir / "gsm8k_train.jsonl").open()]
    with_commas = [i for i, r in enumerate(raw) if "," in r["answer"].rsplit("####", 1)[1]]
    assert with_commas, "expected some answers written with thousands separators"
    for i in with_commas:
        assert train[i].answer.isdigit() or train[i].answer.lstrip("-").replace(".", "").isdigit()
    assert "1080" in {train[i].answer for i in with_commas}


def test_math500_meta_and_references(data_dir):
    examples = get_task("math500", path=data_dir / "math500.jsonl").examples()
    first = examples[0]
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["subject"] == "Precalculus" and first.meta["level"] == 2
    assert first.meta["id"] == "test/precalculus/807.json"
    assert "\\boxed" in first.meta["solution"]


def test_aime_and_amc_answers_are_plain_integers(data_dir):
    aime = get_task("aime24", path=data_dir / "aime24.jsonl").examples()
    raw = [json.loads(line)["answer"] for line in (data_dir / "aime24.jsonl").open()]
    assert "025" in raw
    assert [e.answer for e in aime] == [str(int(a)) for a in raw]
    assert {"id", "solution", "url"} <= set(aime[0].meta)
    amc = get_task("amc23", path=data_dir / "amc23.jsonl").examples()
    assert amc[0].answer == "27" and amc[0].meta["id"] == 0
    assert all(e.answer.lstrip("-").isdigit() for e in amc)


def test_subset_is_seeded_and_in_file_order(data_dir):
    task = get_task("math500", path=data_dir / "math500.jsonl")
    a, b = task.examples(n=20, seed=3), task.examples(n=20, seed=3)
    assert [e.meta["id"] for e in a] == [e.meta["id"] for e in b]
    assert [e.meta["id"] for e in a] != [e.meta["id"] for e in task.examples(n=20, seed=4)]
    order = [e.meta["id"] for e in task.examples()]
    assert [order.index(e.meta["id"]) for e in a] == sorted(order.index(e.meta["id"]) for e in a)
    assert len(task.examples(n=10_000)) == 500


def test_task_verify_uses_math_equivalence():
    task = get_task("math500", path="unused.jsonl")
    assert task.verify("0.5", "\\frac{1}{2}")
    assert not task.verify("0.6", "\\frac{1}{2}")
    assert task.judge("\\dfrac{1}{2}", "\\frac12").score == 1.0


# --- loading from the hub (no network: datasets is faked or absent) --------------------


def test_hub_loading_requests_the_right_dataset(data_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return [json.loads(line) for line in (data_dir / "aime24.jsonl").open()]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = get_task("aime24").examples()
    assert calls == [("HuggingFaceH4/aime_2024", None, "train")]
    assert len(examples) == 30
    with pytest.raises(ValueError, match="no split 'train'"):
        get_task("math500").examples("train")


def test_hub_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"r1lab\[hub\].*path="):
        get_task("math500").examples()


# --- bad inputs --------------------------------------------------------------------------


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_missing_field_names_file_line_and_field(tmp_path):
    f = write(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"problem": "1+1?", "answer": "2"}),
            "",
            json.dumps({"problem": "2+2?"}),
        ],
    )
    with pytest.raises(DataError) as err:
        get_task("math500", path=f).examples()
    message = str(err.value)
    assert "bad.jsonl line 3" in message and "'answer'" in message and "problem" in message


def test_empty_field_and_wrong_type(tmp_path):
    f = write(tmp_path / "e.jsonl", [json.dumps({"problem": "  ", "answer": "2"})])
    with pytest.raises(DataError, match=r"e.jsonl line 1: field 'problem' is empty"):
        get_task("math500", path=f).examples()
    f = write(tmp_path / "t.jsonl", [json.dumps({"problem": "q", "answer": ["2"]})])
    with pytest.raises(DataError, match=r"t.jsonl line 1: field 'answer' must be text or a number"):
        get_task("math500", path=f).examples()


def test_bad_json_line_names_file_and_line(tmp_path):
    f = write(
        tmp_path / "broken.jsonl",
        [json.dumps({"question": "q", "answer": "#### 1"}), '{"question": "q", "answer": '],
    )
    with pytest.raises(DataError, match=r"broken.jsonl line 2: invalid JSON"):
        get_task("gsm8k", path=f).examples()
    f = write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"list.jsonl line 1: expected a JSON object"):
        read_rows(f)
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl line 1: not valid UTF-8"):
        read_rows(f)


def test_empty_or_missing_or_unsupported_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows"):
        get_task("amc23", path=empty).examples()
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        get_task("amc23", path=tmp_path / "nowhere.jsonl").examples()
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "data.csv")


def test_gsm8k_answer_without_final_marker(tmp_path):
    f = write(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "it is 4"})])
    with pytest.raises(DataError, match=r"g.jsonl line 1: field 'answer' has no final '####"):
        get_task("gsm8k", path=f).examples()


def test_parquet_and_json_array_files(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [
        {"id": 1, "question": "q1", "answer": 27.0},
        {"id": 2, "question": "q2", "answer": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "amc.parquet")
    with pytest.raises(DataError, match=r"amc.parquet row 2: field 'answer' is empty or null"):
        get_task("amc23", path=tmp_path / "amc.parquet").examples()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "ok.parquet")
    assert get_task("amc23", path=tmp_path / "ok.parquet").examples()[0].answer == "27"
    (tmp_path / "arr.json").write_text(
        json.dumps([{"question": "q", "answer": "1"}, {"question": "q"}])
    )
    with pytest.raises(DataError, match=r"arr.json row 2: missing field 'answer'"):
        get_task("jsonl", path=tmp_path / "arr.json").examples()


# --- the generic file task ---------------------------------------------------------------


def test_jsonl_task_fields_kind_and_meta(tmp_path):
    f = write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"q": "Capital of France?", "a": "Paris", "topic": "geo"}),
            json.dumps({"q": "Half?", "a": 0.5}),
        ],
    )
    exact = get_task("jsonl", path=f, question_field="q", answer_field="a", kind="exact")
    examples = exact.examples()
    assert [(e.question, e.answer) for e in examples] == [
        ("Capital of France?", "Paris"),
        ("Half?", "0.5"),
    ]
    assert examples[0].meta == {"topic": "geo", "source": "mine"}
    assert exact.verify("Paris", "Paris") and not exact.verify("paris", "Paris")
    maths = get_task("jsonl", path=f, question_field="q", answer_field="a")
    assert maths.verify("\\frac{1}{2}", "0.5")
    with pytest.raises(ValueError, match="kind"):
        get_task("jsonl", path=f, kind="fuzzy")
    with pytest.raises(DataError, match=r"mine.jsonl line 1: missing field 'question'"):
        get_task("jsonl", path=f).examples()


# --- reasoning-gym -----------------------------------------------------------------------


def test_gym_family_examples_and_scoring():
    pytest.importorskip("reasoning_gym")
    task = get_task("gym", family="chain_sum", size=8, seed=1, min_terms=2, max_terms=3)
    examples = task.examples()
    assert len(examples) == 8
    assert [e.question for e in examples] == [e.question for e in task.examples()]
    assert [e.question for e in examples] != [e.question for e in task.examples("train")]
    reward = AccuracyReward()
    completions = [f"<think>adding</think><answer>{e.answer}</answer>" for e in examples]
    completions[1] = "<think>adding</think><answer>-99999</answer>"
    meta = [e.meta for e in examples]
    refs = [e.answer for e in examples]
    by_task = reward(["Q"] * 8, completions, answer=refs, task=[task] * 8, meta=meta)
    by_kind = AccuracyReward(kind="gym")(["Q"] * 8, completions, answer=refs, meta=meta)
    expected = [1.0, 0.0] + [1.0] * 6
    assert list(by_task) == expected and list(by_kind) == expected
    assert task.verify(examples[0].answer, examples[0].answer, examples[0])


def test_gym_errors():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(KeyError, match="unknown reasoning-gym family"):
        get_task("gym", family="no_such_family")
    with pytest.raises(ValueError, match="bad options"):
        get_task("gym", family="chain_sum", size=2, wobble=3).examples()
    verdict = get_task("gym").judge("1", "1")
    assert verdict.score is None and "family" in verdict.reason


def test_gym_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match=r"r1lab\[gym\]"):
        get_task("gym", family="chain_sum")
