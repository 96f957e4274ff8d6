"""Built-in math and code tasks, and tasks built from any dataset with a field mapping.

Each built-in names the hub dataset(s) and the dataset's own field names. Rows are turned into
canonical rows once, at load time: {"prompt", "answer"} for math, {"prompt", "tests",
"entry_point", "setup"} for code, plus "line" (the row's number in its file or split).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from .base import Row, Task
from .datasets import is_local, number_unit, read_table, select_rows
from .rows import Rows

MATH_INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."
CODE_INSTRUCTION = "Write a Python solution in a single ```python code block."


@dataclass(frozen=True)
class Source:
    dataset: str
    config: str | None
    split: str
    fields: dict  # canonical name -> the dataset's field name (required)
    optional: dict = field(default_factory=dict)  # canonical name -> dataset field, may be absent


@dataclass(frozen=True)
class Spec:
    kind: str  # "math" or "code"
    train: Source | None  # None: a benchmark, a test set and nothing to train on
    test: Source | None  # None: hold out `test_size` rows of train
    style: str = "plain"  # code prompts: "mbpp" shows a test, "humaneval" the signature


GSM8K_FIELDS = {"prompt": "question", "answer": "answer"}  # answer: worked solution, "#### n"
BUILTIN: dict[str, Spec] = {
    "gsm8k": Spec("math",
                  Source("openai/gsm8k", "main", "train", GSM8K_FIELDS),
                  Source("openai/gsm8k", "main", "test", GSM8K_FIELDS)),
    # MATH train solutions carry a \boxed{} answer; MATH-500 is the standard test subset
    "math": Spec("math",
                 Source("DigitalLearningGmbH/MATH-lighteval", "default", "train",
                        {"prompt": "problem", "answer": "solution"}),
                 Source("HuggingFaceH4/MATH-500", None, "test",
                        {"prompt": "problem", "answer": "answer"})),
    "numina": Spec("math",
                   Source("AI-MO/NuminaMath-CoT", None, "train",
                          {"prompt": "problem", "answer": "solution"}),
                   Source("AI-MO/NuminaMath-CoT", None, "test",
                          {"prompt": "problem", "answer": "solution"})),
    "deepscaler": Spec("math",
                       Source("agentica-org/DeepScaleR-Preview-Dataset", None, "train",
                              {"prompt": "problem", "answer": "answer"}), None),
    "mbpp": Spec("code",
                 Source("google-research-datasets/mbpp", "full", "train",
                        {"prompt": "text", "tests": "test_list"}, {"setup": "test_setup_code"}),
                 Source("google-research-datasets/mbpp", "full", "test",
                        {"prompt": "text", "tests": "test_list"}, {"setup": "test_setup_code"}),
                 style="mbpp"),
    "humaneval": Spec("code",
                      Source("openai/openai_humaneval", None, "test",
                             {"prompt": "prompt", "tests": "test", "entry_point": "entry_point"}),
                      None, style="humaneval"),
}

# Test sets with no training split: scored by `onelayer eval` and `--eval-task`, never trained
# on. The paper's math score S is the mean of math500, gsm8k, olympiadbench and amc23.
BENCHMARKS: dict[str, Source] = {
    "math500": BUILTIN["math"].test,
    # the English, text-only, open-ended competition-math subset; final_answer is a list
    "olympiadbench": Source("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train",
                            {"prompt": "question", "answer": "final_answer"}),
    "amc23": Source("math-ai/amc23", None, "test", {"prompt": "question", "answer": "answer"}),
    "aime24": Source("HuggingFaceH4/aime_2024", None, "train",
                     {"prompt": "problem", "answer": "answer"}),
    "aime25": Source("math-ai/aime25", None, "test", {"prompt": "problem", "answer": "answer"}),
}
# Names that stand for several held-out sets.
SUITES = {"paper-math": ("math500", "gsm8k", "olympiadbench", "amc23")}

FIELD_OPTIONS = {"prompt_field": "prompt", "answer_field": "answer", "tests_field": "tests",
                 "entry_point_field": "entry_point"}
_GUESSES = {"prompt": ("prompt", "question", "problem", "text", "instruction"),
            "answer": ("answer", "solution", "final_answer"),
            "tests": ("tests", "test_list", "test")}


def builtin_task(name: str, **options) -> Task:
    spec = BUILTIN[name] if name in BUILTIN else Spec("math", None, BENCHMARKS[name])
    return build_task(name, spec, **options)


def dataset_task(source: str, *, reward: str | None = None, config: str | None = None,
                 split: str = "train", test_split: str | None = None, **options) -> Task:
    """A task from any dataset; the reward kind is `reward` or guessed from the fields."""
    if test_split and is_local(source) and not Path(source).is_dir():
        # A single file has one split: reading it again as the "test split" would score the
        # model on its own training rows.
        raise UserError(f"--test-split {test_split}: {source} is a single file with one split; "
                        "hold rows out with --test-size instead")
    first = read_table(source, config=config, split=split).columns  # the fields rows have
    kind = reward or ("code" if options.get("tests_field") or
                      any(k in first for k in ("test_list", "tests")) else "math")
    if kind not in ("math", "code"):
        raise UserError(f"unknown reward {kind!r}: choose math or code")
    wanted = ("prompt", "answer") if kind == "math" else ("prompt", "tests")
    fields = {c: next((f for f in _GUESSES[c] if f in first), _GUESSES[c][0]) for c in wanted}
    if kind == "code" and "entry_point" in first:
        fields["entry_point"] = "entry_point"
    train = Source(source, config, split, fields)
    test = Source(source, config, test_split, fields) if test_split else None
    style = "humaneval" if "entry_point" in fields else "mbpp"
    return build_task(source, Spec(kind, train, test, style=style), **options)


def build_task(name: str, spec: Spec, *, dataset: str | None = None,
               test_dataset: str | None = None, split: str | None = None,
               test_split: str | None = None, config: str | None = None,
               test_size: float = 0.1, limit: int | None = None, seed: int = 0,
               chat: bool = True, system_prompt: str | None = None, format_bonus: float = 0.0,
               timeout: float = 5.0, workers: int | None = None, scoring_only: bool = False,
               **mapping) -> Task:
    """scoring_only: the task is scored, never trained on (--eval-task): no training rows are
    read where it has a test set of its own, and every row is held out where it has none."""
    unknown = set(mapping) - set(FIELD_OPTIONS)
    if unknown:
        raise UserError(f"unknown task option(s) {', '.join(sorted(unknown))} for task {name!r}")
    remap = {FIELD_OPTIONS[k]: v for k, v in mapping.items() if v}
    if spec.train is None:   # a benchmark: scored only, and `dataset` is a copy of its test set
        spec, test_dataset, dataset = replace(spec, train=spec.test), test_dataset or dataset, None
        scoring_only = True
    train_src = _override(spec.train, dataset, config, split, remap)
    # A test set of its own when one is named (by the user, or by the built-in unless the user
    # swapped in another train dataset); otherwise `test_size` rows held out of train.
    if test_dataset or (spec.test is not None and not dataset):
        base = spec.test or replace(spec.train, split="test")
        test = _canonical_rows(_override(base, test_dataset, config, test_split, remap),
                               spec.kind)
        train = test.take([]) if scoring_only else _canonical_rows(train_src, spec.kind)
    else:
        train = _canonical_rows(train_src, spec.kind)
        train, test = ((train.take([]), train) if scoring_only else
                       _hold_out(train, test_size, seed, name))
    if limit is not None:
        train = train[:limit]
    if spec.kind == "math":
        from .math import check_math_verify
        check_math_verify()
        return MathTask(name=name, train=train, test=test,
                        prompt=partial(_as_given, _math_prompt), reward=None, chat=chat,
                        system_prompt=system_prompt, extra={"kind": "math", "source": train_src.dataset},
                        format_bonus=format_bonus)
    return CodeTask(name=name, train=train, test=test,
                    prompt=partial(_as_given, _CODE_PROMPTS[spec.style]),
                    reward=None, chat=chat, system_prompt=system_prompt,
                    extra={"kind": "code", "source": train_src.dataset},
                    timeout=timeout, workers=workers)


def _override(src: Source, dataset, config, split, remap) -> Source:
    """A built-in source with the user's dataset, config, split and field names applied."""
    fields = {c: remap.get(c, f) for c, f in src.fields.items()}
    if dataset:  # a local copy or mirror: the built-in's config does not apply to a file
        return Source(dataset, config, split or src.split, fields, src.optional)
    return Source(src.dataset, config or src.config, split or src.split, fields, src.optional)


def _canonical_rows(src: Source, kind: str) -> Rows:
    table = read_table(src.dataset, config=src.config, split=src.split)
    where = f"{src.dataset} ({src.split})" if not is_local(src.dataset) or Path(
        src.dataset).is_dir() else src.dataset
    kept = select_rows(table, src.fields, where, unit=number_unit(src.dataset))
    return Rows(table, kept, partial(_canonical, fields=src.fields, optional=src.optional,
                                     kind=kind))


def _canonical(row: dict, number: int, *, fields: dict, optional: dict, kind: str) -> Row:
    """A dataset row as a task row: the canonical fields ("prompt", "answer" / "tests", ...,
    "line", "prompt_messages"), then the row's other fields under their own names (for reward
    plug-ins). A conversational prompt (TRL's: a list of role / content messages) is kept
    whole in "prompt_messages"; "prompt" is then the text of its last user message."""
    canon = {c: row[f] for c, f in fields.items()}
    canon.update({c: row.get(f) or "" for c, f in optional.items()})
    canon["prompt_messages"] = conversation(canon["prompt"])
    if canon["prompt_messages"]:
        canon["prompt"] = next((m["content"] for m in reversed(canon["prompt_messages"])
                                if m["role"] == "user"), canon["prompt_messages"][-1]["content"])
    canon["prompt"], canon["line"] = str(canon["prompt"]), number
    if kind == "math":
        answer = canon["answer"]
        if isinstance(answer, (list, tuple, np.ndarray)):   # OlympiadBench: ["$-1$", "$1$"]
            answer = ", ".join(str(a).strip().strip("$") for a in answer)
        canon["answer"] = str(answer)
    else:
        canon["tests"] = _tests_list(canon["tests"], canon.get("entry_point"))
        canon.setdefault("entry_point", "")
        canon.setdefault("setup", "")
    canon.update((k, v) for k, v in row.items() if k not in canon)
    return canon


def conversation(value) -> list[dict] | None:
    """TRL's conversational prompt, a non-empty list of {"role", "content"} messages, as plain
    dicts of strings; None for anything else."""
    if not isinstance(value, (list, tuple, np.ndarray)) or not len(value):
        return None
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return None
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _tests_list(tests, entry_point) -> list[str]:
    if isinstance(tests, str):  # HumanEval: one `def check(candidate)` to call on the function
        return [tests + (f"\ncheck({entry_point})\n" if entry_point else "")]
    return [str(t) for t in tests]


def _hold_out(rows: Rows, test_size: float, seed: int, name: str) -> tuple[Rows, Rows]:
    n_test = int(test_size) if test_size >= 1 else max(1, round(len(rows) * test_size))
    if not 0 < n_test < len(rows):
        raise UserError(f"task {name!r}: test_size {test_size} leaves no train or no test rows "
                        f"out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # the same split as when rows were lists
    is_test = np.zeros(len(rows), dtype=bool)
    is_test[order[:n_test]] = True
    return rows.take(np.flatnonzero(~is_test)), rows.take(np.flatnonzero(is_test))


# -- math ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MathTask(Task):
    format_bonus: float = 0.0  # added when the completion states an extractable final answer

    def __post_init__(self):
        if self.reward is None:
            object.__setattr__(self, "reward", self._one)

    def _one(self, completion: str, row: Row) -> float:
        from .math import has_answer_format, math_reward
        bonus = self.format_bonus if self.format_bonus and has_answer_format(completion) else 0.0
        return math_reward(completion, row["answer"]) + bonus


def _as_given(prompt: Callable[[Row], str], row: Row) -> str:
    """A conversational row is the dataset's own words (rendered from its messages): no
    instruction of the task's is added; any other row gets `prompt`."""
    return row["prompt"] if row.get("prompt_messages") else prompt(row)


def _math_prompt(row: Row) -> str:
    return f"{row['prompt']}\n\n{MATH_INSTRUCTION}"


# -- code ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeTask(Task):
    timeout: float = 5.0  # wall-clock seconds per completion
    workers: int | None = None  # concurrent sandboxes (default: CPUs, at most 8)

    def __post_init__(self):
        if self.reward is None:
            object.__setattr__(self, "reward", self._one)

    def _one(self, completion: str, row: Row) -> float:
        return self.default_rewards([completion], [row])[0]

    def default_rewards(self, completions: Sequence[str], rows: Sequence[Row]) -> list[float]:
        from .code import run_many
        programs = [program_for(c, r) for c, r in zip(completions, rows)]
        return run_many(programs, [r["tests"] for r in rows], timeout=self.timeout,
                        workers=self.workers)


def program_for(completion: str, row: Row) -> str:
    """The program to test: the completion's code, after the row's setup code. When the row
    names an entry point the code does not define (a base model continuing a HumanEval
    prompt), the prompt's signature goes first."""
    from .code import extract_code
    code = extract_code(completion)
    entry = row.get("entry_point")
    if entry and f"def {entry}" not in code:
        code = row["prompt"] + code
    return (row.get("setup") or "") + "\n" + code


def _mbpp_prompt(row: Row) -> str:
    example = f"\n\nYour code must pass tests such as:\n{row['tests'][0]}" if row["tests"] else ""
    return f"{row['prompt']}{example}\n\n{CODE_INSTRUCTION}"


def _humaneval_prompt(row: Row) -> str:
    return (f"Complete this Python function:\n\n```python\n{row['prompt']}```\n\n"
            f"Reply with the whole function in a single ```python code block.")


def _plain_code_prompt(row: Row) -> str:
    return f"{row['prompt']}\n\n{CODE_INSTRUCTION}"


_CODE_PROMPTS = {"mbpp": _mbpp_prompt, "humaneval": _humaneval_prompt, "plain": _plain_code_prompt}
