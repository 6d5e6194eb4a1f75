"""Hub ids (`org/name`, `org/name@rev`) wherever a model is named, from a hub cache on disk.

No network here: a stand-in `huggingface_hub` module serves snapshots from a cache laid out
as the real one (models--org--name/snapshots/<commit>/, refs/<branch>) and fails as the real
one does when a file is not cached and the network is needed.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
from conftest import save_random_micro_model

import r1lab
from r1lab import cli
from r1lab.config import build_config
from r1lab.model.hub import HubError, is_hub_id, split_revision

COMMIT = "a" * 40


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    return save_random_micro_model(
        tmp_path_factory.mktemp("hubmicro") / "model", n_documents=200, vocab_size=384
    )


def fake_hub(cache: Path, calls: list) -> types.ModuleType:
    """A `huggingface_hub` whose snapshot_download reads `cache` and has no network."""

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append(dict(repo_id=repo_id, revision=revision, local_files_only=local_files_only))
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else revision
        snap = repo / "snapshots" / str(commit)
        if snap.is_dir():
            return str(snap)
        if local_files_only:
            raise FileNotFoundError(f"{repo_id} is not in the local cache")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    return types.SimpleNamespace(snapshot_download=snapshot_download)


@pytest.fixture
def hub(tmp_path, micro_dir, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny"
    shutil.copytree(micro_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    calls: list = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(cache, calls))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_hub_id_syntax():
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("./org/name") and not is_hub_id("name") and not is_hub_id(Path("a/b"))
    assert split_revision("org/name@abc") == ("org/name", "abc")
    assert split_revision("org/name") == ("org/name", None)


def test_load_reads_the_cache_offline_and_pins_revisions(hub, monkeypatch):
    model, tokenizer = r1lab.load("someorg/tiny")
    assert model.num_parameters() > 0 and tokenizer is not None
    assert hub[-1]["revision"] is None
    r1lab.load(f"someorg/tiny@{COMMIT}")
    assert hub[-1]["revision"] == COMMIT
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r1lab.load("someorg/tiny")
    assert hub[-1]["local_files_only"] is True


def test_info_and_generate_take_a_hub_id(hub, capsys):
    assert cli.main(["info", "someorg/tiny"]) == 0
    assert "snapshots" in capsys.readouterr().out
    argv = ["generate", "--model", "someorg/tiny", "--prompt", "1+2", "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    assert "--- prompt 0" in capsys.readouterr().out


def test_grpo_and_eval_take_a_hub_id(hub, tmp_path):
    from r1lab.stages import evaluate, grpo

    cfg = build_config(
        grpo.Config,
        dict(
            model="someorg/tiny",
            steps=1,
            questions_per_step=1,
            group_size=2,
            max_new_tokens=4,
            eval_n=1,
            eval_k=1,
            warmup_steps=0,
            rewards={"format": 1},
        ),
    )
    grpo.run(cfg, tmp_path / "grpo")
    assert (tmp_path / "grpo" / "model" / "config.json").is_file()
    cfg = build_config(
        evaluate.Config,
        dict(model="someorg/tiny", tasks=[{"name": "chain_sum", "n": 1}], k=1, max_new_tokens=4),
    )
    report = evaluate.run(cfg, tmp_path / "eval")
    assert report["model"]["path"] == "someorg/tiny"


def test_offline_and_not_cached_is_one_clear_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="'otherorg/absent'.*HF_HUB_OFFLINE.*huggingface-cli"):
        r1lab.load("otherorg/absent")
    assert cli.main(["info", "otherorg/absent"]) == 2
    err = capsys.readouterr().err
    assert "otherorg/absent" in err and "Traceback" not in err


def test_no_network_names_the_id_and_what_to_do(hub):
    with pytest.raises(HubError, match="'otherorg/absent@v2'.*Failed to resolve.*revision"):
        r1lab.load("otherorg/absent@v2")


def test_missing_package_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(HubError, match=r"'org/name'.*pip install 'r1lab\[hub\]'"):
        r1lab.load("org/name")
    assert cli.main(["info", "org/name"]) == 2
    assert "r1lab[hub]" in capsys.readouterr().err
