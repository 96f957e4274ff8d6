"""Scoring a policy on a task's held-out rows: greedy accuracy or pass@k.

A problem counts as solved when its reward is at least 1 (an exact answer, every code test
passed; a format bonus alone never solves it). `train` reports greedy accuracy before and
after; `onelayer eval` (and the contribution sweep) call `evaluate`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Sequence

import torch

from . import distributed
from .checkpoint import load_layer
from .errors import UserError
from .prompting import PromptStyle, check_style, prompt_fits, render_prompt
from .resilience import HalveOnOOM
from .rollout import SamplingParams, generate_completions
from .tasks import Row, Task

SOLVED = 1.0


@dataclass
class EvalResult:
    task: str
    problems: int
    k: int                      # 1 with greedy decoding: accuracy; > 1: pass@k of k samples
    score: float                # share of problems solved (by at least one of the k samples)
    mean_reward: float          # over every completion
    seconds: float
    per_problem: list[dict] = field(default_factory=list)
    greedy_metric: str = "greedy accuracy"   # what k = 1 measures: "success rate" for an env
    mean_at_k: float = 0.0      # share of all k samples that solve their problem (avg@k)

    @property
    def metric(self) -> str:
        return self.greedy_metric if self.k == 1 else f"pass@{self.k}"


def halving(batch_size: int | HalveOnOOM) -> HalveOnOOM:
    """The caller's HalveOnOOM (kept across evals), or a fresh one for a plain size."""
    return batch_size if isinstance(batch_size, HalveOnOOM) else HalveOnOOM("--batch-size", batch_size)


def evaluate(lm, tokenizer, task: Task, rows: Sequence[Row], *, max_new_tokens: int, k: int = 1,
             temperature: float = 1.0, batch_size: int | HalveOnOOM = 64, seed: int = 0,
             style: PromptStyle = PromptStyle(), stop: tuple[str, ...] = (),
             progress=None) -> EvalResult:
    """Greedy (k = 1) or k samples at `temperature` per row; deterministic for a fixed seed.

    batch_size: rows per generation call, or a HalveOnOOM that the caller keeps, so that a size
    halved once stays halved for its later evals. Out of memory, the batch is retried at half
    the size (greedy completions change only by float rounding; k > 1 draws other samples).
    Samples come from a generator of its own, seeded with `seed`: an eval in the middle of a
    run leaves the training run's random stream where it was."""
    t0 = time.perf_counter()
    batch = halving(batch_size)
    generator = torch.Generator(next(lm.parameters()).device).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            greedy=k == 1, stop=stop)

    def score_rows(chunk: list[Row]) -> list[dict]:
        prompts = [render_prompt(tokenizer, task, r, style) for r in chunk]
        rollout = generate_completions(lm, tokenizer, prompts, params, repeat=k,
                                       generator=generator)
        rewards = task.eval_rewards(rollout.texts, [r for r in chunk for _ in range(k)])
        return [{"prompt": task.prompt(row), "completions": rollout.texts[i * k:(i + 1) * k],
                 "rewards": rewards[i * k:(i + 1) * k],
                 "solved": max(rewards[i * k:(i + 1) * k]) >= SOLVED,
                 "samples_solved": sum(r >= SOLVED for r in rewards[i * k:(i + 1) * k])}
                for i, row in enumerate(chunk)]

    per_problem: list[dict] = []
    while len(per_problem) < len(rows):
        start = len(per_problem)
        per_problem += batch.run(lambda size: score_rows(list(rows[start:start + size])),
                                 len(rows) - start)
        if progress is not None:
            progress.update(len(per_problem) - start)
    n = len(per_problem)
    all_rewards = [r for p in per_problem for r in p["rewards"]]
    return EvalResult(task.name, n, k, sum(p["solved"] for p in per_problem) / n if n else 0.0,
                      sum(all_rewards) / len(all_rewards) if all_rewards else 0.0,
                      time.perf_counter() - t0, per_problem,
                      mean_at_k=sum(p["samples_solved"] for p in per_problem) / (n * k or 1))


def evaluate_env(policy, cfg, tasks: int, *, k: int = 1, temperature: float = 1.0,
                 batch_size: int | HalveOnOOM = 0, seed: int = 0, progress=None) -> EvalResult:
    """Success rate (k = 1, greedy episodes) or pass@k (k sampled episodes a task) on the first
    `tasks` held-out tasks of cfg.env: the tasks `onelayer train` scores, so that a greedy eval
    of a trained run's patch reproduces the run's score after training. batch_size: episodes
    acting at once (0: all), an int or a HalveOnOOM as for `evaluate`; progress: a bar that
    counts the episodes as they end."""
    from .agentic import HELD_OUT_SEED, check_playable, play

    t0 = time.perf_counter()
    check_playable(policy, cfg)
    batch = halving(batch_size)
    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + tasks))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                            greedy=k == 1, stop=tuple(cfg.stop))
    generator = torch.Generator(policy.device).manual_seed(seed)
    episodes = play(policy, cfg, seeds, k, params, generator, batch, progress)   # k rows a task
    per_problem = []
    for i, task_seed in enumerate(seeds):
        rows = range(i * k, (i + 1) * k)
        per_problem.append({"seed": task_seed, "episodes": [episodes.texts[r] for r in rows],
                            "returns": [episodes.returns[r].item() for r in rows],
                            "turns": [episodes.turns[r].item() for r in rows],
                            "solved": bool(episodes.success[i * k:(i + 1) * k].any())})
    return EvalResult(f"env {cfg.env}", tasks, k,
                      sum(p["solved"] for p in per_problem) / tasks if tasks else 0.0,
                      episodes.returns.mean().item() if tasks else 0.0,
                      time.perf_counter() - t0, per_problem, greedy_metric="success rate",
                      mean_at_k=episodes.success.float().mean().item() if tasks else 0.0)


def check_prompts_encode(tokenizer, task: Task, rows: Sequence[Row], style: PromptStyle,
                         model: str) -> None:
    """A UserError when the tokenizer cannot write the task's prompts (its first few rows): a
    model scored or trained on text it has no tokens for learns nothing and scores noise."""
    from .model.vocab import check_encodes

    for row in [rows[i] for i in range(min(4, len(rows)))]:
        check_encodes(tokenizer, render_prompt(tokenizer, task, row, style),
                      what=f"the prompts of task {task.name}", model=model)


def drop_long_prompts(tokenizer, task: Task, style: PromptStyle, rows: list[Row],
                      max_tokens: int) -> tuple[list[Row], int]:
    """(the rows whose prompt fits max_tokens, how many were dropped); a UserError when none
    fits."""
    fits = prompt_fits(tokenizer, task, style, max_tokens)
    kept = [r for r in rows if fits(r)]
    if rows and not kept:
        raise UserError(f"no held-out prompt of task {task.name} fits --max-prompt-tokens "
                        f"{max_tokens}")
    return kept, len(rows) - len(kept)


def held_out_tasks(cfg, task: Task) -> list[Task]:
    """The tasks whose test rows a run scores: --eval-task's, else the training task `task`
    alone. Loaded before the model, so that a bad name costs no model load."""
    from .tasks import eval_task_names

    return load_named(eval_task_names(cfg.eval_task), cfg, task) or [task]


def load_named(names: list[str], cfg, loaded: Task | None = None) -> list[Task]:
    """The tasks `names` to score. cfg.task, the run's own task, comes with the user's field
    and split options and its held-out rows (or is `loaded`, when given); any other is scored
    only: its test set, or every row of a dataset without one, with the run's system prompt."""
    from .config import task_options
    from .tasks import load_task

    options = task_options(cfg)
    prompt_only = {k: v for k, v in options.items() if k == "system_prompt"}
    return [(loaded or load_task(name, **options)) if name == cfg.task else
            load_task(name, scoring_only=True, **prompt_only) for name in names]


@dataclass
class HeldOut:
    """What a run scores before and after training: the first `samples` test rows of each
    held-out task whose prompts fit. Its score is the mean over the tasks of each task's greedy
    accuracy or mean@k (the paper's S is such a mean over benchmarks); one task: its own."""
    sets: list[tuple[Task, list[Row]]]
    dropped: int                                          # prompts longer than the limit
    last: dict[str, float] = field(default_factory=dict)  # per task, from the latest score

    @classmethod
    def build(cls, tokenizer, tasks: Sequence[Task], style: PromptStyle, samples: int,
              max_prompt_tokens: int, model: str) -> "HeldOut":
        sets, dropped = [], 0
        for task in tasks:
            check_prompts_encode(tokenizer, task, task.test, style, model)
            rows, n = drop_long_prompts(tokenizer, task, style, list(task.test[:samples]),
                                        max_prompt_tokens)
            sets.append((task, rows))
            dropped += n
        return cls(sets, dropped)

    @property
    def problems(self) -> int:
        return sum(len(rows) for _, rows in self.sets)

    def score(self, lm, tokenizer, *, max_new_tokens: int, seed: int, style: PromptStyle,
              stop: tuple[str, ...], batch_size: int | HalveOnOOM, k: int = 1,
              temperature: float = 1.0, progress=None) -> float:
        """Greedy accuracy (k = 1) or mean@k at `temperature` on every set (several ranks: each
        scores its share of each set). The samples come from a generator seeded with `seed`,
        so that scores before and after training share their random numbers."""
        self.last = {}
        for task, rows in self.sets:
            mine = distributed.shard(rows)
            result = evaluate(lm, tokenizer, task, mine, max_new_tokens=max_new_tokens, k=k,
                              temperature=temperature, seed=seed, style=style, stop=stop,
                              batch_size=batch_size, progress=progress)
            self.last[task.name] = distributed.weighted_mean(result.mean_at_k, len(mine))
        return sum(self.last.values()) / len(self.last)


def held_out_metric(cfg) -> tuple[str, str]:
    """(what a run's held-out score is, how it is drawn): ("accuracy", "greedy") or, with
    --eval-k K, ("mean@K", "K samples a problem at temperature T"); in an environment,
    ("success rate", ...) and ("mean@K success rate", "K episodes a task ...")."""
    what, unit = ("success rate", "episodes a task") if cfg.env else ("accuracy", "samples a problem")
    if cfg.eval_k == 1:
        return what, "greedy"
    return (f"mean@{cfg.eval_k}" + (f" {what}" if cfg.env else ""),
            f"{cfg.eval_k} {unit} at temperature {eval_temperature(cfg):g}")


def eval_temperature(cfg) -> float:
    return cfg.eval_temperature if cfg.eval_temperature is not None else cfg.temperature


def describe_sets(scores: dict[str, float]) -> str:
    """Per-set scores for a log line ("mean of a 40.0%, b 12.5%"); empty for one set."""
    if len(scores) < 2:
        return ""
    return "mean of " + ", ".join(f"{name} {score:.1%}" for name, score in scores.items())


def load_trained_layer(policy, directory: str | Path) -> dict:
    """Put a saved layer's (or layers') weights into the policy (same layers); returns its
    metadata. A layer saved with a manifest (every one since patches exist) must come from this
    very base model: its digest of the replaced blocks is checked first."""
    from .checkpoint import MANIFEST_FILE
    from .export import check_patch

    if (Path(directory) / MANIFEST_FILE).is_file():
        check_patch(Path(directory), policy.model_path, policy.model_name)
    try:
        tensors, meta = load_layer(Path(directory))
        held = meta.get("layers", meta["layer_index"])   # checkpoints of one layer before "layers"
    except (OSError, KeyError) as exc:
        raise UserError(f"{directory}: not a onelayer layer checkpoint ({exc})")
    if held != policy.layer.spec:
        what = "all parameters" if held == "all" else f"layer{'s' * (',' in held)} {held}"
        raise UserError(f"{directory} holds {what}, the model was set up to train {policy.layer.label}")
    missing = set(policy.layer.master) ^ set(tensors)
    if missing:
        raise UserError(f"{directory}: weights do not match the model's layer ({sorted(missing)[:3]})")
    with torch.no_grad():
        for name, p in policy.layer.master.items():
            p.copy_(tensors[name])
    policy.layer.refresh_compute_copy()
    return meta


@dataclass
class EvalConfig:
    """`onelayer eval`'s options; None means: from the layer checkpoint's run, else the default."""
    model: str | None = None
    layer_checkpoint: str | None = None
    task: str | None = None
    samples: int | None = None          # problems scored (None: all held-out rows)
    k: int | None = None                # 1: greedy accuracy; > 1: pass@k at `temperature`
    temperature: float | None = None
    max_new_tokens: int | None = None
    batch_size: int = 64
    seed: int = 0
    frozen_dtype: str | None = None
    device: str | None = None
    output: str | None = None           # JSON file (default: beside the checkpoint, or runs/)
    run_options: dict = field(default_factory=dict)  # task fields, prompt and stop options


def run_eval(cfg: EvalConfig, *, progress: bool = True, echo=print) -> list[EvalResult]:
    """Score as `cfg` says; one result per task scored (several for a list or a suite)."""
    import json
    import re
    from datetime import datetime

    from .model import load_policy

    run = eval_run_config(cfg)
    # A trained run's own held-out protocol unless told otherwise: its --eval-k samples at its
    # --eval-temperature (mean@k is then the run's score), else greedy.
    cfg = dataclasses.replace(cfg, k=run.eval_k if cfg.k is None else cfg.k, temperature=(
        cfg.temperature if cfg.temperature is not None else eval_temperature(run)))
    if cfg.k < 1 or cfg.batch_size < 1 or (cfg.samples is not None and cfg.samples < 1):
        raise UserError("--k, --batch-size and --samples must be >= 1")
    score = env_scorer(cfg, run, echo) if run.env else task_scorer(cfg, run, echo)   # input checked
    policy = load_policy(run.model, layer=run.layer, frozen_dtype=cfg.frozen_dtype, device=cfg.device)
    label = run.model
    if cfg.layer_checkpoint:
        load_trained_layer(policy, cfg.layer_checkpoint)
        label += f" + {policy.layer.label} ({cfg.layer_checkpoint})"
    results = score(policy, progress)
    name = re.sub(r"[^\w.-]+", "-", cfg.task or ",".join(r.task for r, _ in results))
    output = Path(cfg.output) if cfg.output else (
        Path(cfg.layer_checkpoint) / f"eval-{name}.json" if cfg.layer_checkpoint else
        Path("runs") / f"eval-{Path(run.model).name}-{name}-{datetime.now():%Y%m%d-%H%M%S}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    records = [{"task": r.task, "metric": r.metric, "score": r.score, "mean_at_k": r.mean_at_k,
                "mean_reward": r.mean_reward, "problems": r.problems, "prompts_dropped": dropped, "seconds": r.seconds,
                "per_problem": r.per_problem} for r, dropped in results]
    head = {"model": run.model, "layer_checkpoint": cfg.layer_checkpoint, "k": cfg.k,
            "seed": cfg.seed, "max_new_tokens": run.max_new_tokens}
    if len(records) == 1:
        record = {**head, **records[0]}
    else:   # the mean over the tasks, as `--eval-task` scores a run
        record = {**head, "score": sum(r["score"] for r in records) / len(records),
                  "tasks": records}
    output.write_text(json.dumps(record, indent=1) + "\n")
    echo(format_table([(label, r) for r, _ in results]))
    echo(f"wrote {output}")
    return [r for r, _ in results]


def eval_run_config(cfg: EvalConfig):
    """The run being scored: what the user typed, then the trained run's options, then the
    defaults (--env without --model: the agent demo, as for `onelayer train`)."""
    import json

    from .checkpoint import CONFIG_FILE
    from .config import build_config

    trained = {}
    if cfg.layer_checkpoint:
        path = Path(cfg.layer_checkpoint) / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"--patch {cfg.layer_checkpoint}: no {CONFIG_FILE} here")
        trained = json.loads(path.read_text())
    typed = {k: v for k, v in {"model": cfg.model, "task": cfg.task,
                               "max_new_tokens": cfg.max_new_tokens, **cfg.run_options}.items()
             if v is not None}
    values = {k: v for k, v in {"task": "arithmetic", **trained, **typed}.items() if v is not None}
    if values.get("env"):   # what trains in an environment; scoring it needs no choice
        values = {"algo": "gigpo", **values}
    return build_config(values)


def task_scorer(cfg: EvalConfig, run, echo):
    """Checks the tasks now: --task (a task, a comma-separated list or a suite), else the
    held-out sets the run scored (--eval-task), else its task. Returns score(policy, progress)
    -> [(result, prompts dropped)], a pair per task."""
    from tqdm.auto import tqdm

    from .tasks import eval_task_names

    names = eval_task_names([cfg.task]) if cfg.task else eval_task_names(run.eval_task)
    tasks = load_named(names or [run.task], run)
    sets = [(task, list(task.test[:cfg.samples] if cfg.samples else task.test)) for task in tasks]
    for task, rows in sets:
        if not rows:
            raise UserError(f"task {task.name}: no held-out rows to score")
    batch = HalveOnOOM("--batch-size", cfg.batch_size, echo=echo)

    def score(policy, progress: bool) -> list[tuple[EvalResult, int]]:
        style = PromptStyle(run.chat, run.chat_template_kwargs)
        check_style(policy.tokenizer, style, run.model)
        results = []
        for task, rows in sets:
            check_prompts_encode(policy.tokenizer, task, rows, style, run.model)
            kept, dropped = drop_long_prompts(policy.tokenizer, task, style, rows,
                                              run.max_prompt_tokens)
            if dropped:
                of = f" of {task.name}" if len(sets) > 1 else ""
                echo(f"dropped {dropped} of {len(rows)} held-out problems{of} longer than "
                     f"--max-prompt-tokens {run.max_prompt_tokens}")
            with tqdm(total=len(kept), desc=f"eval {task.name}", disable=not progress) as bar:
                results.append((evaluate(policy.split.lm, policy.tokenizer, task, kept, k=cfg.k,
                                         max_new_tokens=run.max_new_tokens,
                                         temperature=cfg.temperature, batch_size=batch,
                                         seed=cfg.seed, style=style, stop=tuple(run.stop),
                                         progress=bar), dropped))
        return results

    return score


def env_scorer(cfg: EvalConfig, run, echo):
    """Checks the environment now; returns score(policy, progress) -> [(result, 0)]: the first
    --samples held-out tasks (default: as many as the run scored, --eval-samples)."""
    from .agentic import check_env

    check_env(run)

    def score(policy, progress: bool) -> tuple[EvalResult, int]:
        from tqdm.auto import tqdm

        tasks = cfg.samples or run.eval_samples
        with tqdm(total=tasks * cfg.k, desc=f"eval env {run.env}", unit="episode",
                  disable=not progress) as bar:
            return [(evaluate_env(policy, run, tasks, k=cfg.k, temperature=cfg.temperature,
                                  seed=cfg.seed, progress=bar,
                                  batch_size=HalveOnOOM("--batch-size", cfg.batch_size,
                                                        echo=echo)), 0)]

    return score


def format_table(lines: list[tuple[str, EvalResult]]) -> str:
    """A row per (model, result); with several results, a last row of their means. With k > 1
    samples a problem, mean@k (the share of samples that solve theirs) beside pass@k."""
    sampled = lines[0][1].k > 1

    def row(model, task, problems, result_metric, score, at_k, reward):
        return (model, task, problems, result_metric, score, *([at_k] if sampled else []), reward)

    header = row("model", "task", "problems", "metric", "score", f"mean@{lines[0][1].k}",
                 "mean reward")
    body = [row(m, r.task, str(r.problems), r.metric, f"{r.score:.1%}", f"{r.mean_at_k:.1%}",
                f"{r.mean_reward:.3f}") for m, r in lines]
    if len(lines) > 1:
        results = [r for _, r in lines]
        body.append(row(lines[0][0], "mean", str(sum(r.problems for r in results)),
                        results[0].metric, f"{fmean(r.score for r in results):.1%}",
                        f"{fmean(r.mean_at_k for r in results):.1%}", ""))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *body])
