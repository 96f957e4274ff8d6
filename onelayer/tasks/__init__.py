"""Tasks: built-in names and local/hub datasets, each a Task (see base.py)."""
from .base import Row, Task

__all__ = ["Row", "Task", "load_task", "eval_task_names", "TASK_NAMES", "BENCHMARK_NAMES"]

TASK_NAMES = ("arithmetic", "gsm8k", "math", "numina", "deepscaler", "mbpp", "humaneval")
# Test sets only (tasks/catalog.py BENCHMARKS): scored, never trained on.
BENCHMARK_NAMES = ("math500", "olympiadbench", "amc23", "aime24", "aime25")


def eval_task_names(specs) -> list[str]:
    """Held-out sets named by --eval-task / eval --task values: each a comma-separated list of
    tasks, benchmarks, datasets or suites ("paper-math"), in order, each name once."""
    from .catalog import SUITES

    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    return list(dict.fromkeys(m for n in names for m in SUITES.get(n, (n,))))


def load_task(name_or_path: str, **options) -> Task:
    """A built-in task by name, or a task from a dataset (local .jsonl/.json/.parquet/.csv file or
    hub name "owner/name"). Bad names, files and options are a UserError.

    Options for dataset tasks (None means "the default"): dataset / test_dataset (replace a
    built-in's data, e.g. with a local copy), config, split, test_split, test_size (rows, or a
    fraction held out of train when there is no test split), limit, seed, prompt_field,
    answer_field, tests_field, entry_point_field, reward ("math" or "code" for a dataset),
    chat, system_prompt, format_bonus (math), timeout and workers (code).

    scoring_only: the task is only scored (--eval-task): its test set, or every row of a
    dataset that has none.

    Options for any task: rewards (reward specs, see rewards.py) with reward_weights,
    reward_timeout (seconds per plug-in call) and reward_workers: train on their weighted sum
    instead of the task's own reward.
    """
    options = {k: v for k, v in options.items() if v is not None}
    plugins = {k: options.pop(k) for k in ("reward_weights", "reward_timeout", "reward_workers")
               if k in options}
    specs = options.pop("rewards", None)
    task = _load_task(name_or_path, **options)
    if specs:
        from .rewards import with_rewards
        task = with_rewards(task, specs, plugins.get("reward_weights"),
                            timeout=plugins.get("reward_timeout"),
                            workers=plugins.get("reward_workers"))
    return task


def _load_task(name_or_path: str, **options) -> Task:
    from ..errors import UserError

    if name_or_path == "arithmetic":
        from .arithmetic import arithmetic_task
        options.pop("scoring_only", None)   # its test problems are its own either way
        return arithmetic_task(**options)
    from .catalog import BENCHMARKS, BUILTIN, builtin_task, dataset_task
    from .datasets import is_local, looks_like_hub_name

    try:
        if name_or_path in BUILTIN or name_or_path in BENCHMARKS:
            return builtin_task(name_or_path, **options)
        if is_local(name_or_path) or looks_like_hub_name(name_or_path):
            return dataset_task(name_or_path, **options)
    except TypeError as e:  # an option the builder does not take
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("argument", 1)[1].strip()
        raise UserError(f"task {name_or_path!r} takes no option {bad}") from None
    raise UserError(f"unknown task {name_or_path!r}: choose one of {', '.join(TASK_NAMES)}, a "
                    f"test set ({', '.join(BENCHMARK_NAMES)}; scored, not trained on) "
                    "or give a dataset file (.jsonl, .json, .parquet, .csv) or hub name "
                    "(owner/name)")
