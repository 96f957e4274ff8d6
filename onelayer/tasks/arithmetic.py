"""The built-in demo task: integer arithmetic written as characters ("347+85=" -> "432").

The same generator makes the supervised data that pre-trained the packaged demo model
(scripts/make_demo_model.py) and the RL prompts, with disjoint seeds for train and test.
"""
from __future__ import annotations

import random

from .base import Row, Task

# Operand range and operators. The demo model was pre-trained on exactly this distribution;
# changing it here without re-running scripts/make_demo_model.py makes the demo meaningless.
MAX_OPERAND = 999
OPERATORS = ("+", "-")
TRAIN_SEED, TEST_SEED = 0, 1


def make_problem(rng: random.Random) -> Row:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    op = rng.choice(OPERATORS)
    answer = a + b if op == "+" else a - b
    return {"question": f"{a}{op}{b}=", "answer": str(answer)}


def make_problems(n: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def arithmetic_reward(completion: str, row: Row) -> float:
    """1.0 when the completion, stripped of spaces, is exactly the answer."""
    return 1.0 if completion.strip() == row["answer"] else 0.0


def arithmetic_task(n_train: int = 20000, n_test: int = 256) -> Task:
    test = make_problems(n_test, TEST_SEED)
    held_out = {r["question"] for r in test}
    train = [r for r in make_problems(n_train, TRAIN_SEED) if r["question"] not in held_out]
    return Task(name="arithmetic", train=train, test=test,
                prompt=lambda row: row["question"], reward=arithmetic_reward)
