"""What the trainer needs from a task: rows, how a row becomes a prompt, and a reward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

Row = dict


@dataclass(frozen=True)
class Task:
    """A single-turn RL task.

    train / test: rows (plain dicts). prompt(row) gives the user text of the prompt; the trainer
    wraps it in the model's chat template when ``chat`` is true and the tokenizer has one.
    reward(completion, row) scores one decoded completion (1.0 right, 0.0 wrong, or partial).
    """

    name: str
    train: Sequence[Row]
    test: Sequence[Row]
    prompt: Callable[[Row], str]
    reward: Callable[[str, Row], float]
    chat: bool = False
    system_prompt: str | None = None
    extra: dict = field(default_factory=dict)

    def rewards(self, completions: Sequence[str], rows: Sequence[Row]) -> list[float]:
        """Score a batch. Tasks with slow rewards (code tests) replace this with a pool."""
        return [float(self.reward(c, r)) for c, r in zip(completions, rows)]
