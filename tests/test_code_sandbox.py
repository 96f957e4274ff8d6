"""The code sandbox: correct and partial programs, then hostile ones.

Every hostile program runs only after `verified` has shown, from inside the same sandbox, that
the process limit and the unprivileged user are in force (the child also checks them itself
and refuses to run otherwise). Each hostile run must give reward 0 (or its honest partial),
leave this process alive, leave no process behind and write nothing outside its temp dir.
"""
import fcntl
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path

import pytest

from onelayer.tasks.code import (Limits, SandboxError, code_reward, code_rewards, extract_code,
                                 run_tests, uid_lock_dir, _pids_of_uid)

ROOT = os.geteuid() == 0
TMP = Path(tempfile.gettempdir())
INC = "def inc(x):\n    return x + 1\n"
INC_TESTS = ["assert inc(1) == 2", "assert inc(-1) == 0", "assert inc(41) == 42"]


def _leftovers(result) -> list[int]:
    """Processes of this run still alive: under its uid (checked while holding the uid's slot
    lock, so no concurrent run can be using it) or working in its directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == result.workdir:
                found.append(int(pid))
        except OSError:
            pass
    if ROOT:
        with open(uid_lock_dir() / f"{result.enforced['uid']}.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found += _pids_of_uid(result.enforced["uid"])
    return found


@pytest.fixture(scope="module")
def verified():
    """Limits seen from inside the sandbox; hostile tests depend on this passing."""
    probe = [
        f"import resource; assert resource.getrlimit(resource.RLIMIT_NPROC)[1] <= "
        f"{16 if ROOT else 100000}",
        "import resource; assert resource.getrlimit(resource.RLIMIT_AS)[1] <= 1 << 30",
        "import resource; assert resource.getrlimit(resource.RLIMIT_FSIZE)[1] <= 16 << 20",
        "import resource; assert resource.getrlimit(resource.RLIMIT_CPU)[1] <= 10",
        f"import os; assert os.getuid() != 0 or not {ROOT}",
        "import os; assert 'PYTEST_CURRENT_TEST' not in os.environ",
    ]
    result = run_tests("", probe, timeout=5)
    assert result.passed == [True] * len(probe), result
    if ROOT:
        assert result.enforced["uid"] != 0
    return result.enforced


def hostile(program: str, tests: list[str], *, timeout: float = 1.0, expect: float = 0.0,
            outside: list[Path] = ()) -> float:
    start = time.monotonic()
    result = run_tests(extract_code(program), tests, timeout=timeout)  # what code_reward runs
    elapsed = time.monotonic() - start
    assert result.fraction == pytest.approx(expect)
    assert elapsed < timeout + 8, elapsed
    assert _leftovers(result) == []
    assert not Path(result.workdir).exists()
    for path in outside:
        assert not path.exists(), path
    assert os.getpid() > 0 and sum(range(1000)) == 499500  # still here and computing
    return elapsed


# -- honest programs -------------------------------------------------------------------------

def test_correct_program_gets_one():
    assert code_reward(INC, INC_TESTS) == 1.0


def test_partial_program_gets_fraction():
    wrong_on_negative = "def inc(x):\n    return abs(x) + 1\n"
    assert code_reward(wrong_on_negative, INC_TESTS) == pytest.approx(2 / 3)


def test_markdown_fence_and_broken_programs():
    fenced = f"Here it is:\n```python\n{INC}```\nDone."
    assert code_reward(fenced, INC_TESTS) == 1.0
    assert code_reward("def inc(x) return x", INC_TESTS) == 0.0
    assert code_reward("raise ValueError('no')\n" + INC, INC_TESTS) == 0.0
    assert code_reward(INC, []) == 0.0


def test_extract_code_prefers_last_python_block():
    text = "```text\nnot code\n```\n```python\nold = 1\n```\n```py\nnew = 2\n```"
    assert extract_code(text) == "new = 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unterminated fence


def test_pool_scores_many_in_order():
    programs = [INC, "def inc(x):\n    return x\n", INC, "syntax error(", INC, "inc = lambda x: 2"]
    rewards = code_rewards(programs, [INC_TESTS] * len(programs), timeout=5, workers=2)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0, pytest.approx(1 / 3)]


def test_sandbox_reports_what_it_enforced(verified):
    if ROOT:
        assert verified["net_namespace"] and verified["mount_namespace"]
    assert set(verified) >= {"net_namespace", "landlock_abi", "uid"}


# -- hostile programs ------------------------------------------------------------------------

def test_infinite_loop(verified):
    elapsed = hostile(INC + "while True:\n    pass\n", INC_TESTS, timeout=1.0)
    assert elapsed >= 1.0


def test_infinite_loop_in_one_test_keeps_honest_partial(verified):
    tests = ["assert inc(1) == 2", "while True: pass", "assert inc(2) == 3"]
    hostile(INC, tests, timeout=1.0, expect=1 / 3)


def test_fork_bomb(verified):
    bomb = INC + (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"  # try to leave the process group the parent kills
        "    except OSError:\n"
        "        pass\n")
    hostile(bomb, INC_TESTS, timeout=2.0)


def test_allocate_50_gb(verified):
    hostile(INC + "hoard = bytearray(50 * 2**30)\n", INC_TESTS)
    hostile(INC, ["hoard = bytearray(50 * 2**30)", "assert inc(1) == 2"], expect=1 / 2)


def test_write_10_gb_file(verified):
    program = INC + (
        "block = b'x' * (1 << 20)\n"
        "with open('big.bin', 'wb') as fh:\n"
        "    for _ in range(10 * 1024):\n"
        "        fh.write(block)\n")
    hostile(program, INC_TESTS, timeout=3.0)
    sparse = INC + "with open('sparse.bin', 'wb') as fh:\n    fh.seek(10 << 30)\n    fh.write(b'x')\n"
    hostile(sparse, INC_TESTS)


def test_write_outside_temp_dir(verified, tmp_path):
    token = secrets.token_hex(6)
    targets = [TMP / f"onelayer-escape-{token}", Path("/var/tmp") / f"onelayer-escape-{token}",
               Path("/dev/shm") / f"onelayer-escape-{token}", tmp_path / "escape",
               Path.cwd() / f"escape-{token}", Path.home() / f"escape-{token}"]
    program = INC + "wrote = []\n" + "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x'); wrote.append({str(t)!r})\n"
        f"except OSError:\n    pass\n" for t in targets)
    program += ("import os\ntry:\n    os.mkdir('../escape-" + token + "'); wrote.append(1)\n"
                "except OSError:\n    pass\n")
    hostile(program, ["assert wrote"], outside=targets + [TMP / f"escape-{token}"])


def test_read_parent_environment(verified, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("ONELAYER_TEST_SECRET", secret)
    program = INC + (
        "import os\nfound = ' '.join(os.environ.values())\n"
        "for path in (f'/proc/{os.getppid()}/environ', f'/proc/{os.getppid()}/cmdline',\n"
        "             '/proc/1/environ'):\n"
        "    try:\n"
        "        found += open(path, 'rb').read().decode(errors='replace')\n"
        "    except OSError:\n"
        "        pass\n")
    hostile(program, [f"assert {secret!r} in found", "assert inc(1) == 2"], expect=1 / 2)


def test_socket_to_localhost(verified):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = INC + (
            "import socket\nconnected = False\n"
            "try:\n"
            f"    with socket.create_connection(('127.0.0.1', {port}), timeout=0.5) as s:\n"
            "        s.sendall(b'leak')\n"
            "        connected = True\n"
            "except OSError:\n"
            "    pass\n"
            "try:\n"
            f"    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))\n"
            "except OSError:\n"
            "    pass\n")
        hostile(program, ["assert connected"])
        with pytest.raises(BlockingIOError):
            server.accept()


def test_kill_parent(verified):
    program = INC + (
        "import os, signal\n"
        "for sig in (signal.SIGKILL, signal.SIGTERM):\n"
        "    try:\n"
        "        os.kill(os.getppid(), sig)\n"
        "    except OSError:\n"
        "        pass\n")
    hostile(program, ["assert False"] + INC_TESTS, expect=3 / 4)


def test_exit_before_tests(verified):
    hostile("import sys\nsys.exit(0)\n" + INC, INC_TESTS)
    hostile("import os\nos._exit(0)\n" + INC, INC_TESTS)
    hostile(INC + "import os\ndef inc(x):\n    os._exit(0)\n", INC_TESTS)


def test_fake_all_tests_passed(verified):
    program = (
        "import os, sys\n"
        "print('all tests passed'); print('3/3 tests passed', file=sys.stderr)\n"
        "for fd in range(64):\n"
        "    for line in (b'pass 0\\npass 1\\npass 2\\ndone\\n', b'ok 0\\ndone\\n'):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
        "def inc(x):\n    return -99\n")
    hostile(program, INC_TESTS)


def test_monkeypatch_harness(verified):
    program = (
        "import builtins, os, sys\n"
        "builtins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: compile('pass', '<fake>', 'exec')\n"
        "builtins.BaseException = type('Nothing', (Exception,), {})\n"
        "os._exit = lambda code: None\n"
        "real_write = os.write\n"
        "os.write = lambda fd, data: real_write(fd, data.replace(b'done', b'pass 0'))\n"
        "main = sys.modules['__main__']\n"
        "for name in list(vars(main)):\n"
        "    if callable(getattr(main, name)):\n"
        "        setattr(main, name, lambda *a, **k: None)\n"
        "sys.settrace(lambda *a: None)\n"
        "import atexit\natexit.register(lambda: real_write(1, b'pass 0\\n'))\n"
        "def inc(x):\n    return -99\n")
    hostile(program, INC_TESTS)


def test_limits_can_be_tightened(verified):
    tight = Limits(memory_bytes=256 << 20, nproc=4)
    result = run_tests("import resource\n", [
        "assert resource.getrlimit(resource.RLIMIT_AS) == (256 << 20, 256 << 20)"], limits=tight)
    assert result.passed == [True]


def test_setup_failure_refuses_before_running_anything():
    """A limit the child cannot set is a SandboxError, and the program never starts."""
    marker = TMP / f"onelayer-ran-{secrets.token_hex(6)}"
    with pytest.raises(SandboxError, match="refused"):
        run_tests(f"open({str(marker)!r}, 'w')", ["pass"], limits=Limits(nofile=-5))
    assert not marker.exists()
