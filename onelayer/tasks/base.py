"""What the trainer needs from a task: rows, how a row becomes a prompt, and a reward."""
from __future__ import annotations

import logging
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

Row = dict
log = logging.getLogger("onelayer.rewards")


class RewardSetupError(RuntimeError):
    """A reward that cannot run at all (no sandbox, a broken checker): raised, never scored
    0, since every sample would fail the same way."""


class RewardLog:
    """Per-reward sums and failure counts since the last `metrics()`; the first failure of
    each reward is logged with its traceback, later ones are only counted."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.errors = self.timeouts = 0
        self.reported: set[str] = set()

    def add(self, name: str, value: float) -> None:
        self.sums[name] += value
        self.counts[name] += 1

    def error(self, name: str, error: BaseException | str) -> None:
        """A sample that `name` failed to score (it gets 0)."""
        self.errors += 1
        if name in self.reported:
            return
        self.reported.add(name)
        if isinstance(error, BaseException):
            text = "".join(traceback.format_exception(error)).rstrip()
            log.error("reward %s failed; the sample scores 0 and later failures are only "
                      "counted (reward_errors):\n%s", name, text)
        else:
            log.error("reward %s: %s; the sample scores 0 and later failures are only counted "
                      "(reward_errors)", name, error)

    def timeout(self, name: str, seconds: float) -> None:
        self.timeouts += 1
        self.error(name, f"a call ran past its {seconds:g} s limit and was given up")

    def metrics(self, per_reward: bool = True) -> dict:
        out = {f"reward/{n}": self.sums[n] / self.counts[n] for n in self.counts} if per_reward else {}
        out.update(reward_errors=self.errors, reward_timeouts=self.timeouts)
        self.sums.clear()
        self.counts.clear()
        self.errors = self.timeouts = 0
        return out


@dataclass(frozen=True)
class Task:
    """A single-turn RL task.

    train / test: rows (dicts), a list or a sequence that builds each row when read
    (rows.Rows). prompt(row) gives the user text of the prompt; the trainer wraps it in the
    model's chat template when ``chat`` is true and the tokenizer has one. reward(completion,
    row) scores one decoded completion (1.0 right, 0.0 wrong, or partial).

    scorer: weighted reward functions that replace `reward` in training (rewards.with_rewards);
    evaluation keeps scoring with the task's own reward (`eval_rewards`).
    """

    name: str
    train: Sequence[Row]
    test: Sequence[Row]
    prompt: Callable[[Row], str]
    reward: Callable[[str, Row], float]
    chat: bool = False
    system_prompt: str | None = None
    extra: dict = field(default_factory=dict)
    scorer: object | None = None  # rewards.Scorer
    log: RewardLog = field(default_factory=RewardLog, compare=False, repr=False)  # training
    eval_log: RewardLog = field(default_factory=RewardLog, compare=False, repr=False)

    def rewards(self, completions: Sequence[str], rows: Sequence[Row],
                completion_ids: Sequence[Sequence[int]] | None = None) -> list[float]:
        """The training reward of each completion: the task's own, or the scorer's weighted
        sum. A reward that raises scores 0 and is counted (reward_metrics)."""
        if self.scorer is not None:
            return self.scorer.score(self, completions, rows, completion_ids)
        return guarded(self.default_rewards, completions, rows, "task", self.log)

    def eval_rewards(self, completions: Sequence[str], rows: Sequence[Row]) -> list[float]:
        """The task's own reward (what counts as solved), failures scored 0; kept out of
        reward_metrics, which describe training."""
        return guarded(self.default_rewards, completions, rows, "task", self.eval_log)

    def default_rewards(self, completions: Sequence[str], rows: Sequence[Row]) -> list[float]:
        """The task's own reward over a batch. Tasks with slow rewards (code tests) replace
        this with a pool."""
        return [float(self.reward(c, r)) for c, r in zip(completions, rows)]

    def reward_metrics(self) -> dict:
        """{"reward/<name>": mean, ..., "reward_errors": n, "reward_timeouts": n} over what
        `rewards` scored since the last call (per-reward means only with a scorer); then starts
        over."""
        if self.scorer is not None:
            return self.scorer.log.metrics()
        return self.log.metrics(per_reward=False)


def guarded(batch_fn: Callable[[Sequence[str], Sequence[Row]], list[float]],
            completions: Sequence[str], rows: Sequence[Row], name: str,
            log: RewardLog) -> list[float]:
    """batch_fn over the batch; if it raises, one completion at a time, so that only the
    completions it fails on score 0 (each counted in `log`)."""
    try:
        values = [float(v) for v in batch_fn(completions, rows)]
        if len(values) == len(completions):
            return values
    except RewardSetupError:
        raise
    except Exception:
        pass
    out = []
    for c, r in zip(completions, rows):
        try:
            out.append(float(batch_fn([c], [r])[0]))
        except RewardSetupError:
            raise
        except Exception as e:
            log.error(name, e)
            out.append(0.0)
    return out
