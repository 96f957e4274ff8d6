"""Code rewards: run a completion's program against test statements in a sandbox.

code_reward(completion, tests) = fraction of tests that pass. Each run is a fresh interpreter
(`python -I`) in its own session and process group, started with an empty environment, stdin
on /dev/null and a temporary working directory. Before any untrusted code runs, the child
(_sandbox_child.py) applies and then verifies:

  rlimits      CPU seconds, address space, file size, processes, open files, no core files
  user         when the trainer is root, a per-slot unprivileged uid (root ignores RLIMIT_NPROC
               and may signal or read anything); the slot's lock makes the uid ours alone
  namespaces   as root: new network namespace (no interface up) and mount namespace with a
               size-limited tmpfs as the working directory; otherwise, where the kernel
               allows unprivileged ones, user + network + PID namespaces (the program is the
               PID namespace's init: killing it kills all it started)
  no_new_privs setuid binaries cannot regain privileges
  Landlock     (Linux >= 5.13) writes only beneath the working directory and /dev/null; ABI >= 4:
               no TCP bind/connect; ABI >= 6: no signals or abstract sockets outside the sandbox
               (this also blocks ptrace-style reads such as /proc/<parent>/environ)

A wall-clock deadline then kills the whole process group; as root, every process left under
the slot's uid is killed as well (this catches programs that left the group with setsid).
Reading files is limited only by file permissions (and, as root, by covering directories the
sandbox user could not enter anyway, such as /root, with an empty tmpfs).
Results travel on a private pipe as lines tagged with a random nonce, so printing "all tests
passed", exiting early or patching the harness's module does not earn reward.

Worst-case memory of one run: nproc x memory (16 x 1 GiB by default); a pool of `workers` runs
multiplies that. Lower the limits on small machines.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from .base import RewardSetupError

CHILD_SOURCE = (Path(__file__).parent / "_sandbox_child.py").read_text()
# uids for the sandbox when the trainer runs as root: one per concurrent run, never a real user
UID_BASE = int(os.environ.get("ONELAYER_SANDBOX_UID_BASE", "60000"))
UID_SLOTS = 64
STARTUP_S = 20.0  # the trusted bootstrap must say "ready" within this (slow under heavy load)
REPORT_CAP = 1 << 20  # bytes read from the report pipe at most

_FENCE = re.compile(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


class SandboxError(RewardSetupError):
    """The sandbox could not be set up or verified; no untrusted code was run."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program can write
    disk_bytes: int = 64 << 20  # tmpfs working directory (root only)
    nproc: int = 16  # processes and threads (per sandbox uid as root)
    nofile: int = 64
    require_landlock: bool = False  # refuse to run where the kernel lacks Landlock


@dataclass
class RunResult:
    passed: list[bool]
    timed_out: bool = False
    enforced: dict = field(default_factory=dict)  # what the child verified (see module doc)
    workdir: str = ""  # the (now deleted) working directory, for leak checks

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def extract_code(completion: str) -> str:
    """The program in a completion: the last fenced Python block (or the last fenced block of
    any language when none says Python), else the whole text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    return (python or [body for _, body in blocks])[-1]


def code_reward(completion: str, tests: list[str], *, timeout: float = 5.0) -> float:
    """Fraction of `tests` (Python statements run after the program) that pass."""
    return run_tests(extract_code(completion), tests, timeout=timeout).fraction


def code_rewards(completions: Sequence[str], tests: Sequence[list[str]], *,
                 timeout: float = 5.0, workers: int | None = None) -> list[float]:
    """code_reward over many completions, at most `workers` sandboxes at a time."""
    return run_many([extract_code(c) for c in completions], tests, timeout=timeout,
                    workers=workers)


def run_many(programs: Sequence[str], tests: Sequence[list[str]], *, timeout: float = 5.0,
             workers: int | None = None, limits: Limits = Limits()) -> list[float]:
    """Fraction of tests passed for each program, at most `workers` sandboxes at a time.

    Threads suffice: each one only waits on its sandbox process. The default (<= 8, <= CPUs)
    keeps scoring off the critical path without oversubscribing the machine.
    """
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda pt: run_tests(pt[0], pt[1], timeout=timeout,
                                                  limits=limits).fraction,
                             zip(programs, tests)))


def run_tests(program: str, tests: Sequence[str], *, timeout: float = 5.0,
              limits: Limits = Limits()) -> RunResult:
    """Run `program` then each test statement in one sandboxed interpreter."""
    tests = list(tests)
    if not tests:
        return RunResult(passed=[])
    root = os.geteuid() == 0
    with _uid_slot() if root else _no_slot() as uid:
        work = tempfile.mkdtemp(prefix="onelayer-sandbox-")
        try:
            if uid is not None:
                os.chown(work, uid, uid)
            return _run(program, tests, work, uid, timeout, limits)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _run(program, tests, work, uid, timeout, limits) -> RunResult:
    nonce = secrets.token_hex(16)
    cpu = int(timeout) + 1
    nproc = limits.nproc if uid is not None else _tasks_of_uid(os.getuid()) + limits.nproc
    job = {
        "nonce": nonce, "program": program, "tests": tests, "workdir": work, "uid": uid,
        "disk_bytes": limits.disk_bytes, "require_landlock": limits.require_landlock,
        "expose": _closed_ancestors() if uid is not None else {},
        "limits": {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_bytes,
                   "RLIMIT_FSIZE": limits.file_bytes, "RLIMIT_NPROC": nproc,
                   "RLIMIT_NOFILE": limits.nofile, "RLIMIT_CORE": 0},
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
    proc = subprocess.Popen([sys.executable, "-I", "-c", CHILD_SOURCE], cwd=work, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    lines: list[str] = []
    try:
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = _read_report(proc, nonce, timeout, lines)
    finally:
        # Lines before "ready" come from the trusted bootstrap; after it, only "pass" lines
        # count, so a program that learned the nonce cannot make us kill a pid or give up.
        ready = next((i for i, x in enumerate(lines) if x.startswith("ready ")), len(lines))
        init = [int(x[5:]) for x in lines[:ready] if x.startswith("init ") and x[5:].isdigit()]
        _kill_all(proc, uid, init)
    for line in lines[:ready]:
        if line.startswith("refused "):
            raise SandboxError(f"code sandbox refused to run: {line[8:]}")
    if ready == len(lines):
        raise SandboxError("code sandbox did not start (no ready line from the child)")
    result = RunResult(passed=[False] * len(tests), timed_out=timed_out,
                       enforced=json.loads(lines[ready][6:]), workdir=work)
    for line in lines[ready + 1:]:
        kind, _, rest = line.partition(" ")
        if kind == "pass" and rest.isdigit() and int(rest) < len(tests):
            result.passed[int(rest)] = True
    return result


def _read_report(proc: subprocess.Popen, nonce: str, timeout: float, lines: list[str]) -> bool:
    """Append nonce-tagged lines from the child to `lines` until "done", its exit, or the
    deadline. -> whether the deadline passed."""
    fd, buf, prefix = proc.stdout.fileno(), b"", (nonce + " ").encode()
    deadline, ready = time.monotonic() + STARTUP_S, False
    while True:
        now = time.monotonic()
        if now >= deadline:
            return True
        readable, _, _ = select.select([fd], [], [], min(0.05, deadline - now))
        chunk = os.read(fd, 65536) if readable else b""
        if readable and not chunk:  # EOF: every writer is gone
            return False
        if len(buf) < REPORT_CAP:
            buf += chunk
        *complete, buf = buf.split(b"\n")
        for raw in complete:
            if raw.startswith(prefix):
                lines.append(raw[len(prefix):].decode(errors="replace"))
                if lines[-1].startswith("ready ") and not ready:
                    ready, deadline = True, time.monotonic() + timeout  # the program's clock
                elif (lines[-1] == "done") if ready else lines[-1].startswith("refused "):
                    return False
        if not readable and proc.poll() is not None:
            return False  # the main process exited; its children's writes do not count


def _kill_all(proc: subprocess.Popen, uid: int | None, init: list[int]) -> None:
    """SIGKILL the PID namespace's init (not root), the process group, and (root) everything
    running under the sandbox uid."""
    for pid in init:  # a zombie until the bootstrap dies, so the pid cannot be reused yet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()
    if uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    # kill(-1) from a process running as `uid` reaches all of that uid's processes at once, so a
    # fork bomb cannot outrun it the way a /proc scan followed by kills can.
    for _ in range(20):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        try:
            subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                           env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        except FileNotFoundError:  # no kill(1): one by one (NPROC bounds the refills)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.01)
    raise SandboxError(f"processes of sandbox uid {uid} survived SIGKILL")


def _pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:  # /proc/<pid> belongs to the process's effective uid: a cheap first filter
            if not entry.isdigit() or os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and "Z" not in fields.get("State", ""):
            pids.append(int(entry))
    return pids


def _tasks_of_uid(uid: int) -> int:
    """Threads of `uid` (RLIMIT_NPROC counts threads), to size the limit when not root."""
    total = 0
    for pid in os.listdir("/proc"):
        try:
            st = os.stat(f"/proc/{pid}")
            if pid.isdigit() and st.st_uid == uid:
                total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return total


@contextmanager
def _uid_slot() -> Iterator[int]:
    """Claim a sandbox uid no other run (in any process on this machine) is using."""
    lock_dir = uid_lock_dir()
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)  # in a shared /tmp: refuse a directory someone else prepared
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"{lock_dir} is not a private directory of this user")
    for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
        if _is_named_user(uid):
            continue
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _kill_uid(uid)  # leftovers of a crashed earlier run
            yield uid
        finally:
            os.close(fd)
        return
    raise SandboxError(f"all {UID_SLOTS} sandbox uids from {UID_BASE} are busy")


def uid_lock_dir() -> Path:
    """Where the per-uid slot locks live; holding one means no run uses that uid."""
    return Path(tempfile.gettempdir()) / "onelayer-sandbox-locks"


@contextmanager
def _no_slot() -> Iterator[None]:
    yield None


def _is_named_user(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


@lru_cache(maxsize=1)
def _closed_ancestors() -> dict[str, list[str]]:
    """Directories of this interpreter behind a directory other users cannot enter.

    {closed ancestor: [needed directories under it]}; e.g. a pyenv Python in /root (mode 0700)
    gives {"/root": ["/root/.pyenv/versions/3.11.7"]}. The child covers the ancestor with a tmpfs
    and binds the needed directories back, in its private mount namespace.
    """
    import sysconfig
    paths = sysconfig.get_paths()
    needed = sorted({os.path.realpath(p) for p in
                     [sys.base_prefix, sys.prefix, *(paths[k] for k in
                      ("stdlib", "platstdlib", "purelib", "platlib"))] if os.path.isdir(p)})
    outer = [p for p in needed if not any(p.startswith(q + "/") for q in needed if q != p)]
    closed: dict[str, list[str]] = {}
    for path in outer:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            ancestor = str(Path(*parts[:i]))
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                closed.setdefault(ancestor, []).append(path)
                break
    return closed
