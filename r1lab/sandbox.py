"""Run untrusted Python (a model's code) against tests, one process per candidate.

Every candidate runs in its own process with, always:
- rlimits: CPU time, address space (memory), process count, file size, open files, no core;
- a wall-clock limit enforced by the parent, which then kills the whole process group;
- a private temporary working directory, removed afterwards;
- stdin/stdout/stderr detached (printing 100 MB costs CPU time, never the parent's memory);
- the verdict sent back on a private pipe with a per-run nonce, so a program that exits
  early (`sys.exit(0)`, `os._exit(0)`) is not mistaken for one that passed.

Where the machine allows it (`unshare` from util-linux with the needed namespaces), the
process also gets new network, mount, PID and IPC namespaces: no network at all (loopback
included), every mount read-only except a fresh tmpfs working directory, the run dir and
the caller's working directory hidden under an empty tmpfs, its own /proc, and no
capabilities (as root: a dedicated unprivileged uid per concurrent slot, so the process-count
limit counts only that candidate's processes). When `unshare` is missing or refused, one log
line says so and the rlimits still apply.

`run_candidates` judges many candidates on a thread pool (each thread waits on one child
process; `default_workers()` = the CPUs this process may use). A result depends only on its
candidate, never on the pool size or the order of completion.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Failure reasons (the start of `SandboxResult.reason`).
PASSED = "passed"
WRONG = "wrong answer"
SYNTAX = "syntax error"
RUNTIME = "runtime error"
TIMEOUT = "timeout"
MEMORY = "memory limit"
PROCESSES = "process limit"
NO_FUNCTION = "no function"
CRASHED = "crashed"
SANDBOX_ERROR = "sandbox error"  # the sandbox itself failed: the candidate is not judged


@dataclass(frozen=True)
class Limits:
    """What one candidate may use."""

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_procs: int = 32  # processes and threads of the candidate (RLIMIT_NPROC)
    file_mb: int = 16  # largest file it may write; also the size of its tmpfs (x4)
    max_files: int = 64  # open file descriptors
    hide: tuple[str, ...] = ()  # more paths to hide (the run dir); the caller's cwd always is


@dataclass
class SandboxResult:
    """The outcome for one candidate: tests passed of total, and why it fell short."""

    passed: int
    total: int
    reason: str  # PASSED or a failure reason with its detail ("wrong answer: assert f(2) == 4")
    seconds: float
    isolation: str = "rlimits"
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def judged(self) -> bool:
        return not self.reason.startswith(SANDBOX_ERROR)


# ---- isolation ----------------------------------------------------------------------------------
_ISOLATION: list | None = None
_ISOLATION_LOCK = threading.Lock()
_NS_FLAGS = ["--net", "--mount", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc"]


def isolation_prefix() -> list[str]:
    """The `unshare` command line that isolates a candidate, or [] when none works here."""
    global _ISOLATION
    with _ISOLATION_LOCK:
        if _ISOLATION is None:
            _ISOLATION = _probe_isolation()
        return list(_ISOLATION)


def _probe_isolation() -> list[str]:
    if os.environ.get("R1LAB_SANDBOX_ISOLATION", "1") == "0":
        logger.warning("sandbox: isolation turned off (R1LAB_SANDBOX_ISOLATION=0); rlimits only")
        return []
    tool = shutil.which("unshare")
    if tool is None:
        logger.warning(
            "sandbox: no isolation tool (unshare not found): candidates run with rlimits, a "
            "private directory and a separate process, but with network and the file system"
        )
        return []
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix = [tool, *user, *_NS_FLAGS, "--"]
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=20)
        failed = done.returncode != 0 and done.stderr.decode(errors="replace").strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        failed = str(err)
    if failed:
        logger.warning(
            "sandbox: unshare cannot create namespaces here (%s): candidates run with rlimits, "
            "a private directory and a separate process, but with network and the file system",
            str(failed)[:200],
        )
        return []
    return prefix


# ---- running one candidate ----------------------------------------------------------------------
_FREE_SLOTS: list[int] = list(range(4096))
_SLOT_LOCK = threading.Lock()
_UID_BASE = 2_000_000_000


def _take_slot() -> int:
    with _SLOT_LOCK:
        return _FREE_SLOTS.pop(0)


def _give_slot(slot: int) -> None:
    with _SLOT_LOCK:
        _FREE_SLOTS.append(slot)
        _FREE_SLOTS.sort()


def _python() -> str:
    """The base interpreter (a venv's python may live inside a hidden directory)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def run_candidate(
    code: str,
    tests: str,
    entry_point: str | None = None,
    prelude: str = "",
    limits: Limits | None = None,
) -> SandboxResult:
    """Run `prelude + code`, then the tests against `entry_point` (or the tests as a script).

    `tests` is code that raises on failure: either a `check(candidate)` function (as
    HumanEval's), whose top-level statements count as one test each, or plain statements
    (asserts) run at top level. `prelude` is run first (a problem's imports and helpers).
    """
    limits = limits or Limits()
    started = time.perf_counter()
    prefix = isolation_prefix()
    nonce = secrets.token_hex(16)
    slot = _take_slot()
    # as root: a uid of its own per (process, slot), so RLIMIT_NPROC counts this candidate only
    uid = _UID_BASE + (os.getpid() % 100_000) * 4096 + slot if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="r1lab-sandbox-")
    os.chmod(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    hide = [os.getcwd(), *limits.hide]
    job = {
        "nonce": nonce,
        "code": code,
        "tests": tests,
        "entry_point": entry_point,
        "prelude": prelude,
        "workdir": workdir,
        "isolated": bool(prefix),
        "uid": uid,
        "hide": [os.path.realpath(p) for p in hide],
        "base_prefix": os.path.realpath(sys.base_prefix),
        "limits": {
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "max_procs": limits.max_procs + (0 if uid is not None else _user_processes()),
            "file_mb": limits.file_mb,
            "max_files": limits.max_files,
        },
    }
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        cmd = [*prefix, _python(), "-I", "-S", "-B", "-c", HARNESS, str(write_fd)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            cwd=workdir,
            start_new_session=True,
            close_fds=True,
        )
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        report = _read_report(read_fd, nonce)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)
        _give_slot(slot)
    seconds = time.perf_counter() - started
    isolation = "namespaces+rlimits" if prefix else "rlimits"
    if report is not None:
        return SandboxResult(
            int(report.get("passed", 0)),
            int(report.get("total", 0)),
            str(report.get("reason", CRASHED))[:500],
            seconds,
            isolation,
        )
    if timed_out:
        return SandboxResult(
            0, 0, f"{TIMEOUT}: over {limits.wall_s:g} s wall clock", seconds, isolation
        )
    code_ = proc.returncode if proc is not None else None
    if code_ is not None and code_ < 0 and -code_ in (signal.SIGXCPU, signal.SIGKILL):
        return SandboxResult(0, 0, f"{TIMEOUT}: over {limits.cpu_s} s CPU time", seconds, isolation)
    return SandboxResult(0, 0, f"{CRASHED}: no result (exit code {code_})", seconds, isolation)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _read_report(fd: int, nonce: str) -> dict | None:
    """The harness's verdict line (nonce-stamped), read without ever blocking for long."""
    data = b""
    deadline = time.monotonic() + 1.0
    while len(data) < 1 << 16 and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(nonce + " "):
            try:
                return json.loads(line[len(nonce) + 1 :])
            except ValueError:
                return None
    return None


def _user_processes() -> int:
    """Processes of this user now (RLIMIT_NPROC counts them all when not root)."""
    uid, n = os.getuid(), 0
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        n += 1
                except OSError:
                    pass
    except OSError:
        return 4096
    return n


# ---- many candidates ----------------------------------------------------------------------------
def default_workers() -> int:
    """One concurrent candidate per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_candidates(
    jobs: Sequence[dict], limits: Limits | None = None, workers: int | None = None
) -> list[SandboxResult]:
    """`run_candidate(**job)` for every job, `workers` at a time; results in job order."""
    workers = min(workers or default_workers(), max(1, len(jobs)))
    if workers == 1:
        return [run_candidate(**job, limits=limits) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: run_candidate(**job, limits=limits), jobs))


# ---- what runs inside ---------------------------------------------------------------------------
# Run by `python -I -S -B -c HARNESS <fd>` in the candidate's process. It reads the job on
# stdin, isolates itself (mounts, privileges, rlimits), runs prelude + code, then the tests,
# and writes "<nonce> <json>" to the result fd from the original process only.
HARNESS = r"""
import ast, ctypes, json, os, resource, sys
fd = int(sys.argv[1]); job = json.loads(sys.stdin.buffer.read()); nonce = job.pop("nonce")
me = os.getpid()
def report(passed, total, reason):
    if os.getpid() != me:
        os._exit(1)
    try:
        os.write(fd, (nonce + " " + json.dumps({"passed": passed, "total": total, "reason": reason[:400]}) + "\n").encode())
    finally:
        os._exit(0)
def short(e):
    return (type(e).__name__ + ": " + str(e)).strip()[:300]
try:
    os.close(0); os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    libc = ctypes.CDLL(None, use_errno=True)
    wd, lim, uid = job["workdir"], job["limits"], job["uid"]
    if job["isolated"]:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
        def mount(src, target, fstype, flags, data):
            if libc.mount(src, target.encode(), fstype, flags, data) != 0:
                raise OSError(ctypes.get_errno(), "mount " + target)
        size = ("size=%dm,mode=0700" % (4 * lim["file_mb"])).encode()
        mount(b"tmpfs", wd, b"tmpfs", MS_NOSUID | MS_NODEV, size)
        if uid is not None:
            os.chown(wd, uid, uid)
            # the interpreter may sit under a directory closed to others (/root/.pyenv):
            # cover the closed ancestor with an empty tmpfs that holds only the interpreter
            prefix, closed = job["base_prefix"], None
            parts = prefix.strip("/").split("/")
            for i in range(1, len(parts)):
                a = "/" + "/".join(parts[:i])
                if not os.stat(a).st_mode & 0o001:
                    closed = a
                    break
            if closed:
                stage = wd + "/.python"
                os.mkdir(stage)
                mount(prefix.encode(), stage, None, MS_BIND | 16384, None)  # MS_REC
                mount(b"tmpfs", closed, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=4k,mode=0755")
                os.makedirs(prefix, exist_ok=True)
                mount(stage.encode(), prefix, None, 8192, None)  # MS_MOVE
                os.rmdir(stage)
        points = []
        for line in open("/proc/self/mountinfo"):
            p = line.split()[4].encode().decode("unicode_escape")
            if p != wd and p not in points:
                points.append(p)
        for p in points:
            try:
                st = os.statvfs(p)
            except OSError:
                continue
            keep = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            try:
                mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
            except OSError:
                if p == "/":
                    raise
        for p in job["hide"]:
            inside = lambda q: q == p or q.startswith(p.rstrip("/") + "/")
            if os.path.isdir(p) and p != "/" and not inside(job["base_prefix"]) and not inside(wd):
                mount(b"tmpfs", p, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k,mode=0555")
    os.chdir(wd)
    MB = 1 << 20
    for name, value in (("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)), ("RLIMIT_AS", lim["memory_mb"] * MB),
                        ("RLIMIT_FSIZE", lim["file_mb"] * MB), ("RLIMIT_NOFILE", lim["max_files"]), ("RLIMIT_CORE", 0)):
        v = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(getattr(resource, name), v)
    if uid is not None:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    elif job["isolated"]:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0); data = (ctypes.c_uint32 * 6)()
        if libc.capset(hdr, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["max_procs"], lim["max_procs"]))
    os.environ.clear(); os.environ.update(PATH="/usr/bin:/bin", HOME=wd, TMPDIR=wd)
except Exception as e:
    report(0, 0, "sandbox error: " + short(e))

def failure(e):
    if isinstance(e, MemoryError):
        return "memory limit: " + short(e)
    if isinstance(e, BlockingIOError) or (isinstance(e, OSError) and e.errno == 11):
        return "process limit: " + short(e)
    if isinstance(e, RecursionError):
        return "runtime error: " + short(e)
    return None

ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    code = compile(job["code"], "<candidate>", "exec")
except (SyntaxError, ValueError) as e:
    report(0, 0, "syntax error: " + short(e))
except MemoryError as e:
    report(0, 0, "memory limit: " + short(e))
try:
    if job["prelude"]:
        exec(compile(job["prelude"], "<prelude>", "exec"), ns)
    exec(code, ns)
except BaseException as e:
    report(0, 0, failure(e) or ("runtime error: " + short(e)))
entry = job["entry_point"]
if entry and not callable(ns.get(entry)):
    report(0, 0, "no function: %r is not defined" % entry)
try:
    tree = ast.parse(job["tests"])
except SyntaxError as e:
    report(0, 0, "sandbox error: the tests do not parse: " + short(e))
env = dict(ns)
check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
if entry and check is not None and check.args.args:
    try:
        exec(compile(tree, "<tests>", "exec"), env)
    except BaseException as e:
        report(0, 0, failure(e) or ("runtime error in tests: " + short(e)))
    env[check.args.args[0].arg] = ns[entry]
    steps = list(check.body)
else:  # plain statements (asserts) at top level
    steps = list(tree.body)
try:
    units = [(s, compile(ast.Module([s], []), "<tests>", "exec")) for s in steps]
except SyntaxError:  # `return` and the like: run check() whole, as one test
    units = [(None, compile("check(%s)" % entry, "<tests>", "exec"))]
if not units:
    report(1, 1, "passed")
def is_test(s):
    return s is None or any(isinstance(n, ast.Assert) for n in ast.walk(s))
total = sum(1 for s, _ in units if is_test(s))
passed, first = 0, None
for s, unit in units:
    counted = is_test(s)
    try:
        exec(unit, env)
        passed += counted
    except BaseException as e:
        why = failure(e)
        if why:
            report(passed, total, why)
        if isinstance(e, AssertionError):
            text = ast.unparse(s).splitlines()[0] if s is not None else "check(%s)" % entry
            first = first or ("wrong answer: " + (text + " " + str(e)).strip())[:300]
        else:
            first = first or "runtime error: " + short(e)
        if not counted:
            report(passed, total, first)
if total == 0:  # statements without an assert: running them all is the one test
    report(1, 1, "passed")
report(passed, total, "passed" if passed == total else first)
"""
