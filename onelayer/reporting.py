"""Where a run's numbers and samples go: one `Reporter` the training loop calls at the start,
once per step, and at the end.

    OUTPUT/metrics.jsonl       always: one JSON object per step (the row the loop built, plus
                               the learning rate)
    OUTPUT/completions.jsonl   --log-completions N: every N steps, prompt / completion /
                               reward / advantage of the first COMPLETION_GROUPS groups
    OUTPUT/tensorboard/        --report-to tensorboard: every number of the row as a scalar,
                               the completions as a markdown table (text plugin)
    OUTPUT/wandb/              --report-to wandb: the same numbers, the completions as a
                               wandb.Table; WANDB_MODE=offline works without a network

Dashboards and the terminal are side effects of the loop, not of the step: the step only hands
over its `StepSamples` when completions are logged (cfg.log_completions > 0).

Resuming: metrics.jsonl and completions.jsonl are rewritten from what the checkpoint saw (rows
after it came from steps that are now run again); TensorBoard purges its events from the first
resumed step on; W&B continues the run whose id OUTPUT/wandb-run-id holds.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPORT_TO = ("tensorboard", "wandb", "none")
# Groups of each logged step written to completions.jsonl and the dashboards.
COMPLETION_GROUPS = 4
# Characters of a prompt / completion kept in the dashboards (the JSONL file keeps them whole).
DASHBOARD_CHARS = 2000
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


@dataclass
class StepSamples:
    """What one step sampled, one entry per completion (B of them, groups in consecutive rows).
    Multi-turn: one entry per trajectory: the first observation as the prompt, the whole
    played text as the completion, the episode return and its steps' mean advantage."""
    prompts: list[str]        # [B]
    completions: list[str]    # [B]
    rewards: list[float]      # [B]
    advantages: list[float]   # [B] the sequence's advantage (0.0 where the step trained nothing)
    group_ids: list[int]      # [B] equal within a group

    def rows(self, step: int, groups: int = COMPLETION_GROUPS) -> list[dict]:
        """JSON rows of the first `groups` groups."""
        first = sorted(set(self.group_ids))[:groups]
        keep = set(first)
        return [{"step": step, "group": g, "prompt": p, "completion": c, "reward": r,
                 "advantage": a}
                for p, c, r, a, g in zip(self.prompts, self.completions, self.rewards,
                                         self.advantages, self.group_ids) if g in keep]


def prompt_texts(tokenizer, rollout) -> list[str]:
    """The prompt of each rollout row as the model saw it (left padding removed, special tokens
    such as a chat template's kept)."""
    ids = rollout.sequences[:, :rollout.prompt_len].cpu()
    mask = rollout.attention_mask[:, :rollout.prompt_len].bool().cpu()
    return [tokenizer.decode(row[keep].tolist()) for row, keep in zip(ids, mask)]


def check_report_to(report_to: list[str] | tuple[str, ...], log_completions: int = 0) -> list[str]:
    """The dashboards asked for (without 'none'); a UserError for an unknown one, 'none' beside
    another, or a dashboard whose package is not installed. Cheap: imports nothing."""
    from .errors import UserError

    names = [name.strip().lower() for item in report_to for name in str(item).split(",")
             if name.strip()]
    for name in names:
        if name not in REPORT_TO:
            raise UserError(f"unknown --report-to {name!r} (choose {', '.join(REPORT_TO)})")
    if "none" in names and len(set(names)) > 1:
        raise UserError("--report-to none cannot be combined with a dashboard")
    if log_completions < 0:
        raise UserError("--log-completions must be >= 0")
    wanted = list(dict.fromkeys(n for n in names if n != "none"))
    for name in wanted:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report-to {name} needs the {module} package: "
                            f"pip install 'onelayer[{extra}]'")
    return wanted


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` in one rename (a resumed run drops what the crash left after
    its checkpoint)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a crash
            break
    return rows


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (bools as 0/1; strings, None and NaN left out)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, str) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def step_line(row: dict, steps: int) -> str:
    """The one line a step prints when output is not a terminal."""
    parts = [f"step {row['step']}/{steps}", f"reward {row.get('reward_mean', 0.0):.3f}"]
    if "success_rate" in row:
        parts.append(f"success {row['success_rate']:.2f}")
    parts += [f"kl {row.get('kl', 0.0):.4f}", f"loss {row.get('loss', 0.0):.4f}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    parts += [f"{key} {value:.3f}" for key, value in row.items() if key.startswith("eval_")]
    if "sampler_logprob_gap" in row:   # the sampler and the trainer disagreeing: worth a look
        parts.append(f"sampler gap {row['sampler_logprob_gap']:.1e}")
    parts.append(f"{row.get('step_s', 0.0):.1f} s")
    return "  ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """Completions as a markdown table for TensorBoard's text plugin."""
    def cell(text) -> str:
        text = str(text)[:DASHBOARD_CHARS]
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| group | reward | advantage | prompt | completion |", "|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['reward']:.3f} | {r['advantage']:+.3f} | {cell(r['prompt'])} "
              f"| {cell(r['completion'])} |" for r in rows]
    return "\n".join(lines)


def terminal_lines(progress: bool) -> bool:
    """True when a run with progress output should print one line per step instead of a
    progress bar: stderr (where the bar goes) is not a terminal, e.g. a log file."""
    return progress and not sys.stderr.isatty()


class Reporter:
    """metrics.jsonl, completions.jsonl, and the dashboards of --report-to, for one run.

    history: the rows of the steps already done (a resumed run's checkpoint), written again.
    config: the run config as a JSON object (W&B's run config, TensorBoard's first text).
    optimizer: read for the learning rate of each step (added to the row as `lr` unless the
    row has one). lines: print `step_line` through `echo` after each step."""

    def __init__(self, out: Path, *, report_to: list[str] | tuple[str, ...] = (),
                 log_completions: int = 0, history: list[dict] | None = None,
                 first_step: int = 1, steps: int = 0, metrics_path: Path | None = None,
                 config: dict | None = None, optimizer=None, lines: bool = False,
                 echo: Callable[[str], None] = print):
        self.out = Path(out)
        self.dashboards = check_report_to(report_to, log_completions)
        self.log_completions = log_completions
        self.steps, self.optimizer, self.lines, self.echo = steps, optimizer, lines, echo
        self.metrics_path = Path(metrics_path) if metrics_path else self.out / "metrics.jsonl"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.metrics_path, list(history or []))
        self.metrics_file = open(self.metrics_path, "a")
        self.completions_path = self.out / "completions.jsonl"
        self.completions_file = None
        if log_completions:
            done = [r for r in read_jsonl(self.completions_path) if r.get("step", 0) < first_step]
            write_jsonl(self.completions_path, done)
            self.completions_file = open(self.completions_path, "a")
        self.tensorboard = self.wandb = None
        if "tensorboard" in self.dashboards:
            self.tensorboard = self._open_tensorboard(first_step, config)
        if "wandb" in self.dashboards:
            self.wandb = self._open_wandb(config)

    def _open_tensorboard(self, first_step: int, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
        writer = SummaryWriter(log_dir=str(self.out / "tensorboard"),
                               purge_step=first_step if first_step > 1 else None)
        if config and first_step == 1:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        return writer

    def _open_wandb(self, config: dict | None):
        import wandb

        id_file = self.out / "wandb-run-id"
        # W&B ids are [a-z0-9]; 8 random hex digits, kept so that a resumed run continues this one.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        (self.out / "wandb").mkdir(exist_ok=True)
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "onelayer"),
                          name=self.out.name, id=run_id, resume="allow", dir=str(self.out),
                          config=config or {})

    def wants_samples(self, step: int) -> bool:
        return bool(self.log_completions) and step % self.log_completions == 0

    def step(self, row: dict, samples: StepSamples | None = None) -> None:
        """Log one finished step: `row` (with "step") goes to metrics.jsonl and the dashboards;
        `samples`, on a step that --log-completions picks, to completions.jsonl and the
        dashboards."""
        step = row["step"]
        if self.optimizer is not None and "lr" not in row:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        numbers = scalars(row)
        table = samples.rows(step) if samples is not None and self.wants_samples(step) else []
        if table:
            self.completions_file.writelines(json.dumps(r) + "\n" for r in table)
            self.completions_file.flush()
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            if table:
                self.tensorboard.add_text("completions", markdown_table(table), step)
        if self.wandb is not None:
            logged = dict(numbers)
            if table:
                import wandb
                columns = ["step", "group", "prompt", "completion", "reward", "advantage"]
                logged["completions"] = wandb.Table(
                    columns=columns, data=[[r[c] if c not in ("prompt", "completion")
                                            else r[c][:DASHBOARD_CHARS] for c in columns]
                                           for r in table])
            self.wandb.log(logged, step=step)
        if self.lines:
            self.echo(step_line(row, self.steps))

    def finish(self, summary: dict | None = None) -> None:
        """End of the run: `summary` (held-out score before / after) as W&B's run summary and
        TensorBoard scalars at the last step; then close everything."""
        numbers = scalars(summary or {})
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"summary/{key}", value, self.steps)
        if self.wandb is not None:
            self.wandb.summary.update(numbers)
        self.close()

    def close(self) -> None:
        for f in (self.metrics_file, self.completions_file):
            if f is not None and not f.closed:
                f.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Leaving the training loop: the files are closed; the dashboards stay open for
        `finish` unless the loop raised."""
        for f in (self.metrics_file, self.completions_file):
            if f is not None and not f.closed:
                f.close()
        if exc_type is not None:
            self.close()
        elif self.tensorboard is not None:
            self.tensorboard.flush()


class NoReporter:
    """What ranks other than 0 of a data-parallel run report: nothing (rank 0 reports)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def step(self, row: dict, samples: StepSamples | None = None) -> None:
        return None

    def finish(self, scores: dict) -> None:
        return None
