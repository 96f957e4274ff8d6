"""The first code that runs inside a code sandbox (see code.py); untrusted code runs after it.

The parent passes this file's source to ``python -I -c`` and writes a JSON job on stdin. This
script, still holding whatever privileges the trainer had, takes them away step by step
(namespaces, rlimits, user, no_new_privs, Landlock), checks that each step holds, and only then
runs the program and the tests. It imports nothing from onelayer and uses only the standard
library, so it runs in any interpreter the parent names.

Results go back on a private pipe (a dup of the original stdout) as lines prefixed with a
per-run random nonce: "<nonce> ready {...}", "<nonce> pass <i>", "<nonce> done". The program's
own stdout and stderr go to /dev/null, so printing "all tests passed" proves nothing.
"""


def main():
    import ctypes
    import json
    import os
    import resource
    import sys

    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDWR)
    report_fd = os.dup(1)  # non-inheritable: exec'd children never see it
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    nonce = job.pop("nonce")
    program, tests = job.pop("program"), job.pop("tests")
    write, exit_now = os.write, os._exit  # held locally: the program may patch the os module

    def say(line):
        try:
            write(report_fd, (nonce + " " + line + "\n").encode())
        except OSError:
            pass

    def refuse(why):
        say("refused " + why)
        exit_now(97)

    sys.excepthook = lambda kind, value, tb: refuse(f"{kind.__name__}: {value}")  # setup bugs
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            refuse(f"{what}: {os.strerror(ctypes.get_errno())}")

    work, uid = job["workdir"], job["uid"]
    enforced = {"net_namespace": False, "mount_namespace": False, "pid_namespace": False,
                "landlock_abi": 0}

    # Namespaces. As root: a private network namespace (no interface up, not even loopback) and
    # a private mount namespace with a size-limited tmpfs as the working directory. Not root: a
    # user + network namespace where the kernel allows unprivileged ones.
    CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
    CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
    if uid is not None:
        check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare(net, mount)")
        enforced["net_namespace"] = enforced["mount_namespace"] = True
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
        # Interpreter directories the unprivileged user cannot reach (e.g. /root/.pyenv): cover
        # the closed ancestor with a tmpfs and bind the needed directory back into it. The
        # covering also hides the rest of that ancestor (root's home) from the program.
        for closed, inners in job["expose"].items():
            keep = {inner: os.open(inner, os.O_PATH | os.O_DIRECTORY) for inner in inners}
            check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                             b"size=1m,mode=0755"), f"tmpfs over {closed}")
            for inner, fd in keep.items():
                os.makedirs(inner, exist_ok=True)
                check(libc.mount(f"/proc/self/fd/{fd}".encode(), inner.encode(), None,
                                 MS_BIND | MS_REC, None), f"bind {inner}")
                os.close(fd)
        opts = f"size={job['disk_bytes']},mode=0700,uid={uid},gid={uid}".encode()
        check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
              "tmpfs workdir")
    elif libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        # Not root: the program becomes init of a new PID namespace. Killing it (the parent does,
        # by the pid reported here) kills every process it started, even ones that left the
        # process group with setsid. This process waits without reaping, so the pid stays ours.
        enforced["net_namespace"] = enforced["pid_namespace"] = True
        child = os.fork()
        if child:
            say(f"init {child}")
            os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
            exit_now(0)
    elif libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        enforced["net_namespace"] = True
    os.chdir(work)

    limits = {name: int(v) for name, v in job["limits"].items()}
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))

    if uid is not None:  # root is exempt from RLIMIT_NPROC: become an unprivileged user
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")

    enforced["landlock_abi"] = _landlock(libc, work, check)

    # Verify before any untrusted byte runs.
    for name, value in limits.items():
        if resource.getrlimit(getattr(resource, name)) != (value, value):
            refuse(f"{name} is {resource.getrlimit(getattr(resource, name))}, not {value}")
    if uid is not None:
        if os.getresuid() != (uid,) * 3 or os.getresgid() != (uid,) * 3 or os.getgroups():
            refuse(f"still uid {os.getresuid()} gid {os.getresgid()}")
        try:
            os.setuid(0)
            refuse("setuid(0) succeeded after dropping privileges")
        except PermissionError:
            pass
    if libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        refuse("no_new_privs not set")
    for path in sys.path:  # the dropped user must still be able to import the standard library
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
            refuse(f"the sandbox user cannot read {path}")
    if job["require_landlock"] and not enforced["landlock_abi"]:
        refuse("Landlock is required but not available")
    enforced["uid"] = os.getuid()
    say("ready " + json.dumps(enforced))
    sys.excepthook = sys.__excepthook__

    # Untrusted from here on. A program that raises (SystemExit included) fails every test; one
    # that calls os._exit never reaches "done" and so passes only what was reported before.
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    run, compile_, base_exc = exec, compile, BaseException
    try:
        run(compile_(program, "<solution>", "exec"), namespace)
    except base_exc:
        say("done")
        exit_now(0)
    for i, test in enumerate(tests):
        try:
            run(compile_(test, f"<test {i}>", "exec"), namespace)
        except base_exc:
            continue
        say(f"pass {i}")
    say("done")
    exit_now(0)  # skips atexit handlers and threads the program left behind


def _landlock(libc, work, check):
    """Allow writes only beneath `work` (and to /dev/null); deny TCP; scope signals. -> ABI."""
    import ctypes
    import os

    create, add_rule, restrict = 444, 445, 446  # same numbers on every architecture
    abi = libc.syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi <= 0:
        return 0
    dir_write = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
    file_write = 1 << 1
    if abi >= 2:
        dir_write |= 1 << 13  # REFER (rename/link across directories)
    if abi >= 3:
        dir_write |= 1 << 14  # TRUNCATE
        file_write |= 1 << 14
    fields = [dir_write, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0]  # fs, tcp bind+connect, scope
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = (ctypes.c_uint64 * 3)(*fields)
    ruleset = libc.syscall(create, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        check(-1, "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for path, access in ((work, dir_write), (os.devnull, file_write)):
        fd = os.open(path, os.O_PATH)
        rule = PathBeneath(access, fd)
        check(libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule {path}")
        os.close(fd)
    check(libc.syscall(restrict, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


if __name__ == "__main__":
    main()
