"""Reward plug-ins: weighted reward functions in TRL's convention, with failure handling.

A reward is named by a spec:

  math, code, format, length, task      built-ins (below)
  package.module:function               an importable function
  path/to/file.py:function              a function in a Python file

Every reward is called as TRL's GRPOTrainer calls a reward function, so one written for TRL
works unchanged:

    fn(prompts=[...], completions=[...], **columns) -> list[float | None]

prompts: the task's prompt for each row (the user text the model was given, before the chat
template); completions: the decoded completions, as strings (TRL's non-conversational form).
For a dataset of conversational prompts (lists of role / content messages), plug-ins get
TRL's conversational form instead: each prompt its messages, each completion
[{"role": "assistant", "content": text}]; built-ins always get strings. columns: every field
of the row, each as a list, under the dataset's own names plus the task's canonical ones
("prompt": the problem text without the task's instruction, "answer", "tests", "line", ...). completion_ids (lists of token ids) are passed only when the
trainer hands them to Task.rewards; trainer_state never is. A None score means "does not
apply": it is left out of that sample's weighted sum.

Failures: a call that raises scores 0 for its completions, is counted in reward_errors, and
the first traceback of each reward is logged (logger "onelayer.rewards"). Plug-ins run one
completion per call in a pool of `workers` daemon threads; a call still running `timeout`
seconds after it started is given up: its completion scores 0 (reward_timeouts), its thread is
abandoned (Python cannot kill a thread; a daemon thread does not keep the process alive) and
a fresh thread takes its place. A reward with MAX_HUNG abandoned calls still running is no
longer called: its completions score 0 and count as errors. Built-ins run in the calling
thread, with time limits of their own (math-verify's and the code sandbox's).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math as _math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .base import Row, RewardLog, Task, guarded

DEFAULT_TIMEOUT_S = 30.0
MAX_HUNG = 16  # abandoned calls of one reward, still running, before it is no longer called
LENGTH_LIMIT = 2000  # characters: `length` penalises what goes past this


# -- built-in rewards, in the same convention --------------------------------------------------

def math_answer(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's `answer` (math_reward)."""
    from .math import math_reward
    answer = answer or [None] * len(completions)
    return [None if a is None else math_reward(c, str(a)) for c, a in zip(completions, answer)]


def code_tests(prompts, completions, tests=None, entry_point=None, setup=None, prompt=None,
               **_) -> list[float | None]:
    """Fraction of the row's `tests` that pass (code_reward, sandboxed, in parallel)."""
    from .catalog import program_for
    from .code import run_many
    n = len(completions)
    if tests is None:
        return [None] * n
    rows = [{"tests": t, "entry_point": e or "", "setup": s or "", "prompt": p or ""}
            for t, e, s, p in zip(tests, entry_point or [""] * n, setup or [""] * n,
                                  prompt or [""] * n)]
    scored = [i for i, r in enumerate(rows) if r["tests"]]
    values = run_many([program_for(completions[i], rows[i]) for i in scored],
                      [rows[i]["tests"] for i in scored])
    out: list[float | None] = [None] * n
    for i, v in zip(scored, values):
        out[i] = v
    return out


def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 when a final answer can be extracted (\\boxed{}, "#### n", "the answer is ...")."""
    from .math import has_answer_format
    return [1.0 if has_answer_format(c) else 0.0 for c in completions]


def length_penalty(prompts, completions, **_) -> list[float]:
    """0 up to LENGTH_LIMIT characters, then -1 per LENGTH_LIMIT characters beyond, down to
    -1 at twice the limit: -min(1, max(0, len - L) / L)."""
    return [-min(1.0, max(0, len(c) - LENGTH_LIMIT) / LENGTH_LIMIT) for c in completions]


BUILTIN = {"math": math_answer, "code": code_tests, "format": answer_format,
           "length": length_penalty}
# "task": the task's own reward (whatever kind), bound when the task is known


# -- loading specs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reward:
    name: str  # metrics key: reward/<name>
    fn: Callable[..., list]
    weight: float = 1.0
    inline: bool = False  # built-ins: called in the calling thread, no watchdog


def load_reward(spec: str) -> tuple[str, Callable, bool]:
    """(name, function, is built-in) for a spec; a UserError naming what is wrong."""
    spec = spec.strip()
    if spec in BUILTIN or spec == "task":
        return spec, BUILTIN.get(spec), True
    if ":" not in spec:
        raise UserError(f"reward {spec!r}: give a built-in ({', '.join([*BUILTIN, 'task'])}), "
                        "package.module:function or path/to/file.py:function")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _module_from_file(Path(where), spec)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise UserError(f"reward {spec!r}: cannot import {where} ({type(e).__name__}: "
                            f"{_one_line(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {where} has no function {name!r}")
    return name, fn, False


def _module_from_file(path: Path, spec: str):
    if not path.is_file():
        raise UserError(f"reward {spec!r}: file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"onelayer_reward_{path.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # so pickling and dataclasses inside it work
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"reward {spec!r}: running {path} failed ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    return module


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _check_signature(name: str, fn: Callable, columns: set[str]) -> None:
    """Required parameters must be ones we pass, so a mismatch fails when the run is built."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins, some C callables: nothing to check
        return
    given = {"prompts", "completions", "completion_ids"} | columns
    for p in params:
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                and p.name not in given):
            raise UserError(f"reward {name}: it requires an argument {p.name!r}, which is not "
                            f"a field of the rows (they have {', '.join(sorted(columns))}); "
                            "reward functions get prompts, completions and the row's fields")


# -- scoring ---------------------------------------------------------------------------------

class Scorer:
    """The weighted sum of several rewards, with per-reward means and failure counts."""

    def __init__(self, rewards: Sequence[Reward], *, timeout: float = DEFAULT_TIMEOUT_S,
                 workers: int | None = None):
        self.rewards = list(rewards)
        self.timeout = timeout
        self.log = RewardLog()
        self.pool = _Pool(workers or max(1, min(8, os.cpu_count() or 1)))

    def score(self, task: Task, completions: Sequence[str], rows: Sequence[Row],
              completion_ids=None) -> list[float]:
        n = len(completions)
        prompts = [task.prompt(r) for r in rows]
        # Plug-ins first (they run in the pool meanwhile), then built-ins in this thread.
        batch = self.pool.submit([r for r in self.rewards if not r.inline], prompts,
                                 completions, rows, completion_ids, self.timeout)
        results: dict[str, list] = {}
        for r in self.rewards:
            if r.inline:
                results[r.name] = self._inline(task, r, prompts, completions, rows)
        results.update(batch.collect(self.log))
        total = [0.0] * n
        for r in self.rewards:
            for i, v in enumerate(results[r.name]):
                if v is not None:
                    self.log.add(r.name, v)
                    total[i] += r.weight * v
        return total

    def _inline(self, task, r: Reward, prompts, completions, rows) -> list:
        if r.fn is None:  # "task": the task's own reward
            return guarded(task.default_rewards, completions, rows, r.name, self.log)

        def batch_fn(cs, rs):
            ps = prompts if len(cs) == len(prompts) else [task.prompt(x) for x in rs]
            return [_NAN if v is None else v for v in r.fn(prompts=ps, completions=list(cs),
                                                           **_columns(rs))]
        values = guarded(batch_fn, completions, rows, r.name, self.log)
        return [None if _math.isnan(v) else v for v in values]


_NAN = float("nan")


def _columns(rows: Sequence[Row]) -> dict[str, list]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: [r.get(k) for r in rows] for k in keys}


class _Job:
    __slots__ = ("reward", "i", "kwargs", "started", "done")

    def __init__(self, reward: Reward, i: int, kwargs: dict):
        self.reward, self.i, self.kwargs = reward, i, kwargs
        self.started = None  # time.monotonic() when a worker picked it up
        self.done = False


class _Pool:
    """`workers` daemon threads taking one-completion calls from a queue. Not a
    ThreadPoolExecutor: its threads are joined at interpreter exit, so one hung call would
    keep a finished run from exiting."""

    def __init__(self, workers: int):
        self.workers = workers
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.hung: dict[str, int] = {}  # reward -> abandoned calls still running
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="onelayer-reward").start()

    def _work(self) -> None:
        while True:
            job, out = self.jobs.get()
            with self.lock:
                job.started = time.monotonic()
            try:
                result = (True, job.reward.fn(**job.kwargs))
            except BaseException as e:  # noqa: BLE001 - anything the plug-in raises
                result = (False, e)
            with self.lock:
                job.done = True
                abandoned = job.started is None  # collect() gave up on it meanwhile
                if abandoned:
                    self.hung[job.reward.name] -= 1
            out.put((job, result))
            if abandoned:
                return  # its replacement already runs

    def submit(self, rewards, prompts, completions, rows, completion_ids, timeout) -> "_Batch":
        out: queue.Queue = queue.Queue()
        jobs, skipped = [], []
        for r in rewards:
            if self.hung.get(r.name, 0) >= MAX_HUNG:
                skipped.append(r)
                continue
            for i, row in enumerate(rows):
                kwargs = {"prompts": [prompts[i]], "completions": [completions[i]],
                          **_columns([row])}
                if row.get("prompt_messages"):   # TRL's conversational form, as TRL passes it
                    kwargs["prompts"] = [row["prompt_messages"]]
                    kwargs["completions"] = [[{"role": "assistant", "content": completions[i]}]]
                if completion_ids is not None:
                    kwargs["completion_ids"] = [list(completion_ids[i])]
                job = _Job(r, i, kwargs)
                jobs.append(job)
                self.jobs.put((job, out))
        return _Batch(self, rewards, skipped, jobs, out, len(completions), timeout)


class _Batch:
    def __init__(self, pool, rewards, skipped, jobs, out, n, timeout):
        self.pool, self.rewards, self.skipped = pool, rewards, skipped
        self.jobs, self.out, self.n, self.timeout = jobs, out, n, timeout

    def collect(self, log: RewardLog) -> dict[str, list]:
        """Wait for every call: each either returns, raises, or runs past the time limit."""
        results = {r.name: [None] * self.n for r in self.rewards}
        for r in self.skipped:
            results[r.name] = [0.0] * self.n
            for _ in range(self.n):
                log.error(r.name, f"{MAX_HUNG} calls are still hung; it is no longer called")
        waiting = set(self.jobs)
        while waiting:
            try:
                job, (ok, value) = self.out.get(timeout=self._next_deadline(waiting))
            except queue.Empty:
                self._give_up_overdue(waiting, results, log)
                continue
            if job not in waiting:
                continue  # given up on already
            waiting.discard(job)
            results[job.reward.name][job.i] = self._value(job, ok, value, log)
        return results

    def _next_deadline(self, waiting) -> float:
        now = time.monotonic()
        with self.pool.lock:
            starts = [j.started for j in waiting if j.started is not None]
        if not starts:
            return 0.05  # none started yet: the pool is busy with an earlier batch's calls
        return max(0.0, min(starts) + self.timeout - now) + 0.001

    def _give_up_overdue(self, waiting, results, log) -> None:
        now = time.monotonic()
        with self.pool.lock:
            overdue = [j for j in waiting if not j.done and j.started is not None
                       and now - j.started > self.timeout]
            for job in overdue:
                job.started = None  # tells its worker to retire when (if) it returns
                self.pool.hung[job.reward.name] = self.pool.hung.get(job.reward.name, 0) + 1
        for job in overdue:
            waiting.discard(job)
            results[job.reward.name][job.i] = 0.0
            log.timeout(job.reward.name, self.timeout)
            self.pool._spawn()

    @staticmethod
    def _value(job: _Job, ok: bool, value, log: RewardLog):
        if not ok:
            log.error(job.reward.name, value)
            return 0.0
        try:
            (v,) = list(value)
            if v is None or (isinstance(v, float) and _math.isnan(v)):
                return None
            return float(v)
        except Exception:
            log.error(job.reward.name, f"returned {value!r:.100}, not a list of one number or "
                                       "None per completion")
            return 0.0


# -- building --------------------------------------------------------------------------------

def with_rewards(task: Task, specs: Sequence[str], weights: Sequence[float] | None = None, *,
                 timeout: float | None = None, workers: int | None = None) -> Task:
    """`task` trained on the weighted sum of `specs` instead of its own reward."""
    specs = list(specs)
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(f"{len(weights)} reward weights for {len(specs)} rewards: give one "
                        "weight per --reward, in the same order")
    if timeout is not None and not timeout > 0:
        raise UserError(f"reward timeout {timeout}: give a positive number of seconds")
    columns = set(task.train[0]) if len(task.train) else set()
    rewards, names = [], set()
    for spec, weight in zip(specs, weights):
        name, fn, builtin = load_reward(spec)
        if spec.strip() == "math":
            from .math import check_math_verify
            check_math_verify()
        if not builtin:
            _check_signature(spec, fn, columns)
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}_{k}", k + 1
        names.add(unique)
        rewards.append(Reward(unique, fn, float(weight), inline=builtin))
    return replace(task, scorer=Scorer(rewards, timeout=timeout or DEFAULT_TIMEOUT_S,
                                       workers=workers))
