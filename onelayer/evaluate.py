"""Greedy held-out scoring of a policy on a task (the scorer that `train` reports before/after)."""
from __future__ import annotations

from typing import Sequence

from .rollout import SamplingParams, generate_completions
from .tasks import Row, Task


def render_prompt(tokenizer, task: Task, row: Row) -> str:
    """The task's prompt text, wrapped in the model's chat template for instruct-style tasks."""
    text = task.prompt(row)
    if not (task.chat and getattr(tokenizer, "chat_template", None)):
        return text
    messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt else [])
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def greedy_accuracy(lm, tokenizer, task: Task, rows: Sequence[Row], *, max_new_tokens: int,
                    batch_size: int = 64, progress=None) -> float:
    """Mean reward of greedy completions over `rows` (0.0 for no rows)."""
    if not rows:
        return 0.0
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        rollout = generate_completions(lm, tokenizer, [render_prompt(tokenizer, task, r) for r in chunk],
                                       params)
        total += sum(task.rewards(rollout.texts, chunk))
        if progress is not None:
            progress.update(len(chunk))
    return total / len(rows)
