"""User rewards from files: `file.py:fn` and `module:fn` relative to the working directory,
with import failures named by file and line."""

from __future__ import annotations

import sys
import textwrap

import pytest

from r1lab import cli
from r1lab.rewards import get_reward
from r1lab.stages.judging import RewardSet, RewardSpec, load_reward
from r1lab.user_code import UserCodeError, load_callable

REWARD = textwrap.dedent(
    """
    from helper import LENGTH

    def short(prompts, completions, **columns):
        return [1.0 if len(c) <= LENGTH else 0.0 for c in completions]

    def at_most(limit):
        def score(prompts, completions, **columns):
            return [1.0 if len(c) <= limit else 0.0 for c in completions]
        return score

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myreward.py").write_text(REWARD)
    (tmp_path / "helper.py").write_text("LENGTH = 2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.py").write_text(REWARD)
    (tmp_path / "sub" / "helper.py").write_text("LENGTH = 5\n")
    before = dict(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - set(before):
        if name.startswith(("r1lab_user_", "myreward", "helper")):
            del sys.modules[name]


def test_a_file_in_the_working_directory_needs_no_pythonpath(workdir):
    fn = load_reward("myreward.py:short", {}, "plain")
    assert fn(["p", "p"], ["ab", "abc"]) == [1.0, 0.0]
    assert get_reward("myreward:short")(["p"], ["abc"]) == [0.0]  # module form, same folder


def test_a_file_in_a_subfolder_imports_its_neighbours(workdir):
    fn = get_reward("sub/other.py:short")
    assert fn(["p"], ["abcd"]) == [1.0]  # sub/helper.py, not ./helper.py


def test_a_factory_takes_options_through_the_reward_set(workdir):
    rewards = RewardSet({"myreward.py:at_most": RewardSpec(options={"limit": 3})}, "plain")
    assert rewards.items[0][0](["p", "p"], ["abc", "abcd"]) == [1.0, 0.0]


def test_failures_name_the_file_line_and_error(workdir):
    (workdir / "broken.py").write_text("x = 1\n\ndef f(:\n")
    with pytest.raises(UserCodeError, match=r"broken.py:3 failed: SyntaxError"):
        load_callable("broken.py:f")
    (workdir / "raises.py").write_text("import math\nimport not_installed_pkg\n")
    with pytest.raises(
        UserCodeError, match=r"raises.py:2 failed: ModuleNotFoundError.*not_installed"
    ):
        load_callable("raises.py:f")
    with pytest.raises(UserCodeError, match=r"raises.py:2 failed"):
        load_callable("raises:f")
    with pytest.raises(UserCodeError, match="file nothere.py not found"):
        load_callable("nothere.py:f")
    with pytest.raises(UserCodeError, match="no module named 'nothere'.*file.py:function"):
        load_callable("nothere:f")
    with pytest.raises(UserCodeError, match="has no 'shrot'; it defines: at_most, short"):
        load_callable("myreward.py:shrot")
    with pytest.raises(UserCodeError, match="'NOT_CALLABLE' is a int"):
        load_callable("myreward.py:NOT_CALLABLE")


def test_the_cli_reports_a_broken_reward_file_in_one_line(workdir):
    (workdir / "broken.py").write_text("def f(:\n")
    with pytest.raises(UserCodeError) as caught:
        load_reward("broken.py:f", {}, "plain")
    line = cli.error_line(caught.value)
    assert line is not None and "broken.py:1" in line and "\n" not in line
