"""The code sandbox: each limit ends in its own reason, and results never depend on the pool."""

from __future__ import annotations

import os

import pytest

from r1lab.rewards.code import CodeReward, extract_code
from r1lab.sandbox import Limits, isolation_prefix, run_candidate, run_candidates

TESTS = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n"
FAST = Limits(wall_s=3, cpu_s=2, memory_mb=512, max_procs=16)
ISOLATED = bool(isolation_prefix())


def run(code: str, limits: Limits = FAST):
    return run_candidate(code, TESTS, "f", limits=limits)


def test_right_and_wrong_answers():
    assert run("def f(x):\n    return x + 1\n").ok
    wrong = run("def f(x):\n    return 2\n")
    assert (wrong.passed, wrong.total) == (1, 2)
    assert wrong.reason.startswith("wrong answer: assert candidate(2) == 3")


@pytest.mark.parametrize(
    "code, reason",
    [
        ("def f(x)\n    return x", "syntax error"),
        ("def g(x):\n    return x + 1\n", "no function"),
        ("def f(x):\n    return x.nope\n", "runtime error"),
        ("import os\nos._exit(0)\n", "crashed"),  # an early exit is never a pass
        ("def f(x):\n    a = bytearray(10 * 2**30)\n    return x + 1\n", "memory limit"),
        ("import os\ndef f(x):\n    while True:\n        os.fork()\n", "process limit"),
    ],
)
def test_failures_have_their_reason(code, reason):
    result = run(code)
    assert not result.ok and result.reason.startswith(reason), result.reason


def test_infinite_loop_times_out():
    result = run("def f(x):\n    while True:\n        pass\n", Limits(wall_s=1.5, cpu_s=1))
    assert result.reason.startswith("timeout") and result.seconds < 5


def test_sleeping_candidate_hits_the_wall_clock():
    result = run("import time\ndef f(x):\n    time.sleep(60)\n", Limits(wall_s=1, cpu_s=1))
    assert result.reason.startswith("timeout") and "wall" in result.reason


def test_fork_bomb_leaves_no_process_behind():
    before = set(os.listdir("/proc"))
    run("import os\ndef f(x):\n    while True:\n        os.fork()\n")
    left = [p for p in set(os.listdir("/proc")) - before if p.isdigit()]
    alive = []
    for p in left:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"import ast, ctypes" in f.read():  # the sandbox's harness
                    alive.append(p)
        except OSError:
            pass
    assert not alive


def test_writing_outside_its_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"def f(x):\n    open({str(target)!r}, 'w').write('x')\n    return x + 1\n"
    result = run(code)
    assert not result.ok and not target.exists()
    # its own directory is writable
    assert run("def f(x):\n    open('scratch.txt', 'w').write('x')\n    return x + 1\n").ok


@pytest.mark.skipif(not ISOLATED, reason="no isolation tool (unshare) on this machine")
def test_no_network_and_no_run_dir():
    code = (
        "import socket\ndef f(x):\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    return x + 1\n"
    )
    assert run(code).reason.startswith("runtime error: OSError")
    # the caller's working directory (the repo, the run dir) is hidden
    seen = f"import os\ndef f(x):\n    assert not os.listdir({os.getcwd()!r})\n    return x + 1\n"
    assert run(seen).ok


def test_results_do_not_depend_on_pool_size():
    codes = [
        "def f(x):\n    return x + 1\n",
        "def f(x):\n    return 2\n",
        "def f(x)\n",
        "def f(x):\n    return x + 1 if x < 2 else 0\n",
    ] * 3
    jobs = [{"code": c, "tests": TESTS, "entry_point": "f"} for c in codes]
    one = [(r.passed, r.total, r.reason) for r in run_candidates(jobs, FAST, workers=1)]
    four = [(r.passed, r.total, r.reason) for r in run_candidates(jobs, FAST, workers=4)]
    assert one == four


def test_reward_fraction_or_all_or_nothing_with_reasons():
    completions = [
        "<think>easy</think>\n```python\ndef f(x):\n    return x + 1\n```",
        "<think>hmm</think>\n```python\ndef f(x):\n    return 2\n```",
        "<think>hmm</think> the answer is f(x) = x + 1",
        "<think>never closed ```python\ndef f(x):\n    return x + 1\n```",
    ]
    cols = {"tests": [TESTS] * 4, "entry_point": ["f"] * 4}
    strict = CodeReward()(["q"] * 4, completions, **cols)
    assert list(strict) == [1.0, 0.0, 0.0, 0.0]
    assert strict.reasons[0] is None and strict.reasons[1].startswith("wrong answer")
    assert strict.reasons[2] == strict.reasons[3] == "no code"
    partial = CodeReward(all_or_nothing=False)(["q"] * 4, completions, **cols)
    assert list(partial) == [1.0, 0.5, 0.0, 0.0]
    missing = CodeReward()(["q"], completions[:1], tests=[None], entry_point=["f"])
    assert missing == [None] and missing.reasons[0] == "no tests for this problem"


def test_top_level_assert_tests_count_one_each():
    tests = "assert f(1) == 2\nassert f(2) == 4\n"
    result = run_candidate("def f(x):\n    return x + 1\n", tests, None, limits=FAST)
    assert (result.passed, result.total) == (1, 2)


@pytest.mark.parametrize(
    "text, code",
    [
        ("<think>a</think>\n```python\nx = 1\n```", "x = 1"),
        ("<think>```python\nx = 0\n```</think>\nDone.", None),  # only in the reasoning
        ("<think>a</think>\n```py\nx = 1\n```\nthen\n```python\nx = 2\n```\n", "x = 2"),
        ("<think>a</think>\n```\nx = 3\n```", "x = 3"),  # a bare fence is Python
        ("<think>a</think>\n```python\nx = 1\n```\n```text\nout: 1\n```", "x = 1"),
        ("<think>a</think> <answer>```python\nx = 5\n```</answer>", "x = 5"),
        ("<think>a</think>\n```python\nx = 1", None),  # fence never closed
        ("no think at all\n```python\nx = 4\n```", "x = 4"),
    ],
)
def test_extract_code_real_shapes(text, code):
    assert extract_code(text) == code


def test_extract_code_after_prefilled_think():
    assert extract_code("reasoning</think>\n```python\ny = 2\n```", prefilled=True) == "y = 2"


# ---- hostile candidates: each ends in a clear reason and leaves the machine as it was ----------
@pytest.fixture
def outside(tmp_path_factory):
    """A file in a temporary directory outside any sandbox directory, with known content."""
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text("the judge's secret\n")
    return path


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="not root: the candidate keeps this user's uid, so only the cwd and Limits.hide are "
    "out of its reach",
)
def test_reading_outside_its_directory_is_blocked(outside):
    # a file of the judge's (in a private temp dir, as the run dir's files): unreadable
    leak = f"def f(x):\n    return x + 1 + len(open({str(outside)!r}).read())\n"
    result = run(leak)
    assert not result.ok and result.reason.startswith("runtime error: PermissionError")
    assert outside.read_text() == "the judge's secret\n"


@pytest.mark.skipif(not ISOLATED, reason="no isolation tool (unshare) on this machine")
def test_hidden_paths_are_empty_even_when_world_readable():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="r1lab-outside-") as folder:
        os.chmod(folder, 0o755)
        secret = os.path.join(folder, "secret.txt")
        with open(secret, "w") as f:
            f.write("open to all\n")
        code = f"import os\ndef f(x):\n    return x + 1 + len(os.listdir({folder!r}))\n"
        assert not run(code).ok  # readable to anyone: seen
        hidden = Limits(wall_s=3, cpu_s=2, memory_mb=512, max_procs=16, hide=(folder,))
        assert run(code, hidden).ok  # under Limits.hide (the run dir): an empty directory
        assert open(secret).read() == "open to all\n"


def test_system_files_cannot_be_changed():
    # /etc/hostname is world-readable, so the candidate may read it (every mount is
    # read-only, nothing is secret there); writing it fails with a reason
    before = open("/etc/hostname").read()
    code = "def f(x):\n    open('/etc/hostname', 'a').write('pwned')\n    return x + 1\n"
    result = run(code)
    assert not result.ok and result.reason.startswith("runtime error: "), result.reason
    assert "PermissionError" in result.reason or "Read-only" in result.reason
    reads = "def f(x):\n    return x + 1 + 0 * len(open('/etc/hostname').read())\n"
    assert run(reads).ok
    assert open("/etc/hostname").read() == before


def test_deleting_files_outside_its_directory_is_blocked(outside):
    code = (
        "import os, shutil\ndef f(x):\n"
        f"    os.remove({str(outside)!r})\n"
        f"    shutil.rmtree({str(outside.parent)!r})\n"
        "    return x + 1\n"
    )
    result = run(code)
    assert not result.ok and result.reason.startswith("runtime error"), result.reason
    assert outside.read_text() == "the judge's secret\n"


@pytest.mark.skipif(
    not ISOLATED and os.geteuid() != 0,
    reason="without namespaces or a uid of its own the candidate could kill this process",
)
def test_killing_the_parent_fails_the_candidate_and_the_judge_lives():
    me = os.getpid()
    code = f"import os, signal\ndef f(x):\n    os.kill({me}, signal.SIGKILL)\n    return x + 1\n"
    result = run(code)  # the judge's pid is another namespace's (or another uid's)
    assert (
        not result.ok
        and result.reason.startswith("runtime error: ProcessLookupError")
        or (not ISOLATED and result.reason.startswith("runtime error: PermissionError"))
    ), result.reason
    # its own parent and process group: nothing outside the sandbox is reached
    for kill in ("os.kill(os.getppid(), signal.SIGKILL)", "os.killpg(0, signal.SIGKILL)"):
        run(f"import os, signal\ndef f(x):\n    {kill}\n    return 2\n")
    assert os.getpid() == me  # still here
    # and the next candidate is judged as usual
    assert run("def f(x):\n    return x + 1\n").ok


def test_printing_100_mb_ends_cleanly():
    import resource

    code = (
        "import sys\ndef f(x):\n    chunk = 'x' * (1 << 20)\n    for _ in range(100):\n"
        "        print(chunk)\n        sys.stdout.flush()\n    return 2\n"
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(code, Limits(wall_s=10, cpu_s=5, memory_mb=512, max_procs=16))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (result.passed, result.total) == (1, 2) and result.reason.startswith("wrong answer")
    assert result.seconds < 10
    assert rss_after - rss_before < 50 * 1024  # KiB: the output never reached the judge
