"""The run of `onelayer train`: check every input, load the model, then the steps of a job
(single_turn.task_job: GRPO on a task; agentic.agentic_job: GiGPO in an environment) with
held-out scores before and after, checkpoints, exact resume, clean stops and out-of-memory
backoff; the trained layer is saved as a patch of its base model.

    train  ->  set_up (RunSetUp)  ->  run_steps (job.step, one metrics row each)  ->  finish
"""
from __future__ import annotations

import dataclasses
import json
import random
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (CHECKPOINTS, CONFIG_FILE, LAYER_FILE, SCORES_FILE, Checkpoint,
                         TrainingState, checkpoints, load_checkpoint, save_checkpoint, save_layer)
from .config import TrainConfig, config_json, resume_changes
from .data_parallel import build_optimizer, full_state_dict
from .errors import RunStopped, UserError
from .evaluate import describe_sets, held_out_metric
from .export import patch_manifest
from .model import Policy, load_policy
from .prompting import check_style
from .reporting import NoReporter, Reporter, check_report_to, terminal_lines
from .resilience import HalveOnOOM, stop_between_steps
from .single_turn import load_training_task, prompt_style, task_job
from .update import Job, build_objective


@dataclass
class TrainResult:
    accuracy_before: float
    accuracy_after: float
    steps: int
    seconds: float
    output: Path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def fit_batches(cfg: TrainConfig, echo: Callable[[str], None]) -> TrainConfig:
    """With --max-memory, or on CUDA, the micro-batch and generation batch the memory planner
    says fit (those the user left at 0), chosen before any weight is loaded."""
    from .memory import batches_for_run, parse_size

    cuda = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not (cfg.max_memory or cuda) or (cfg.micro_batch and cfg.generation_batch) or cfg.env:
        return cfg
    if not single_layer(cfg):
        echo(f"--layer {cfg.layer}: the memory plan models one trained layer, so --micro-batch "
             "and --generation-batch stay as given (halved if the GPU runs out of memory)")
        return cfg
    budget = (parse_size(cfg.max_memory) if cfg.max_memory else
              torch.cuda.mem_get_info(torch.device(cfg.device or "cuda"))[0])
    choice, prompt_tokens = batches_for_run(cfg, budget)
    cfg = dataclasses.replace(cfg, micro_batch=cfg.micro_batch or choice.micro_batch,
                              generation_batch=cfg.generation_batch or choice.generation_batch)
    echo(f"memory plan (prompts up to {prompt_tokens} tokens): micro-batch {cfg.micro_batch}, "
         f"generation batch {cfg.generation_batch}; peak {choice.plan.reserved / 2**30:.1f} GiB "
         f"of {budget / 2**30:.1f} GiB")
    return cfg


def single_layer(cfg: TrainConfig) -> bool:
    """Whether --layer names one block (what the memory planner models)."""
    from .memory import read_model_config
    from .model.load import resolve_layers

    num_layers = read_model_config(cfg.model).get("num_hidden_layers", 1)
    return len(resolve_layers(cfg.layer, num_layers)) == 1


def output_dir(cfg: TrainConfig, policy: Policy, resumed: Path | None) -> Path:
    """--output, else runs/MODEL-LLAYER-TIME; a resumed run keeps its checkpoint's directory."""
    if cfg.output:
        path = Path(cfg.output)
    elif resumed:
        path = resumed.parent.parent   # OUTPUT/checkpoints/step-N
    else:
        name = Path(cfg.model).name if cfg.model != "demo" else "demo"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{name}-L{policy.layer.spec.replace(',', '+')}-{stamp}"
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} exists and is not a directory")
    if resumed is None and any((path / f).exists() for f in (LAYER_FILE, CONFIG_FILE)):
        raise UserError(f"--output {path} already holds a trained layer; choose another directory")
    if resumed is None and checkpoints(path):
        raise UserError(f"--output {path} holds checkpoints of an earlier run: continue it with "
                        f"--resume {path}, or choose another directory")
    return path


def check_writable(out: Path, policy: Policy, cfg: TrainConfig) -> None:
    """Refuse, before training, an output directory that cannot be written or lacks the room
    for the checkpoints the run will keep."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to --output {out}: {exc.strerror}")
    # fp32 weights + AdamW's two moments, for each checkpoint kept and the one being written.
    per_checkpoint = 12 * sum(p.numel() for p in policy.layer.parameters())
    count = (cfg.keep or max(1, cfg.steps // max(cfg.save_every, 1))) + 1
    free = shutil.disk_usage(out).free
    if free < per_checkpoint * count:
        raise UserError(f"--output {out} has {free / 2**30:.1f} GiB free; {count} checkpoints of "
                        f"{per_checkpoint / 2**30:.2f} GiB need {per_checkpoint * count / 2**30:.1f} "
                        "GiB (lower --keep, or choose another directory)")


def memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux



def random_state(generator: torch.Generator, job: Job) -> dict:
    """Every random stream a step draws from, and where the job is in its data."""
    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "generator": generator.get_state(), "job": job.state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random(state: dict, generator: torch.Generator, job: Job) -> None:
    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    job.restore(state["job"])


def in_use(cfg: TrainConfig, gen_batch: HalveOnOOM, micro: HalveOnOOM) -> TrainConfig:
    """The run's config as it runs now: the batch sizes it has halved to, no --resume."""
    return dataclasses.replace(cfg, generation_batch=gen_batch.size, micro_batch=micro.size,
                               resume=None)


@dataclass
class Checkpointer:
    """Writes a run's training checkpoints into OUT/checkpoints; `last` is the newest one
    written (or resumed from), for the message of a run that stops."""
    out: Path
    policy: Policy
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    job: Job
    gen_batch: HalveOnOOM
    micro: HalveOnOOM
    manifest: dict | None
    echo: Callable[[str], None]
    trainer: Callable[[], dict]    # what the run itself keeps: scores, metrics so far
    last: Path | None = None

    def save(self, step: int) -> Path | None:
        """A training checkpoint of the state after `step`; None (and a warning) when it could
        not be written, in which case the previous one is untouched."""
        optimizer_state = full_state_dict(self.optimizer)   # with zero1, gathered from every rank
        if not distributed.is_main():   # rank 0 writes it; every rank holds the same state
            return self.out / CHECKPOINTS / f"step-{step:06d}"
        state = TrainingState(step, optimizer_state, random_state(self.generator, self.job),
                              self.trainer())
        run_config = in_use(self.cfg, self.gen_batch, self.micro)
        try:
            self.last = save_checkpoint(self.out, self.policy.layer.state_dict(),
                                        layer_index=self.policy.split.layer_index,
                                        layers=self.policy.layer.spec, base_model=self.cfg.model,
                                        run_config=json.loads(config_json(run_config)),
                                        state=state, keep=self.cfg.keep, manifest=self.manifest)
        except OSError as exc:
            kept = f"the previous one, {self.last}, is intact" if self.last else "none saved yet"
            self.echo(f"could not save the checkpoint of step {step}: {exc}; {kept}")
            return None
        return self.last


def train(cfg: TrainConfig, *, progress: bool = True, echo: Callable[[str], None] = print) -> TrainResult:
    """Run single-layer RL as `cfg` says. All input is checked before anything is written.
    With cfg.resume (a checkpoint directory), continue that run exactly where it was saved."""
    t_start = time.perf_counter()
    # torchrun / accelerate launch with several processes: join them (docs/distributed.md).
    if distributed.init_from_env(cfg.device, cfg.dist_timeout):
        distributed.check_run(cfg)
        if not distributed.is_main():   # rank 0 alone speaks and writes
            echo, progress = (lambda line: None), False
    run = set_up(cfg, progress, echo)
    cfg, job, saved = run.cfg, run.job, run.saved
    if saved:
        before, history = saved.state.trainer["score_before"], saved.state.trainer["history"]
        sets_before = saved.state.trainer.get("sets_before", {})
        first_step = saved.state.step + 1
    else:
        before, history, first_step = job.score("before"), [], 1
        sets_before = job.breakdown()
        echo(f"held-out {job.metric} before: {before:.1%} ({held_out_note(job, cfg)})")
    lines = terminal_lines(progress)   # a log file gets one line per step, not a bar
    reporter = (Reporter(run.out, report_to=cfg.report_to, log_completions=cfg.log_completions,
                         history=history, first_step=first_step, steps=cfg.steps,
                         metrics_path=Path(cfg.metrics) if cfg.metrics else None,
                         config=json.loads(config_json(cfg)), optimizer=run.optimizer,
                         lines=lines, echo=echo)
                if distributed.is_main() else NoReporter())
    checkpointer = Checkpointer(
        run.out, run.policy, cfg, run.optimizer, run.generator, job, run.gen_batch, run.micro,
        run.manifest, echo, last=saved.path if saved else None,
        trainer=lambda: {"score_before": before, "sets_before": sets_before, "history": history,
                         "output": str(run.out), "world_size": distributed.world_size()})
    scheduler = lr_schedule(run.optimizer, cfg, done_steps=first_step - 1)
    if saved:
        restore_random(saved.state.random, run.generator, job)
    with reporter:
        run_steps(job, cfg, history, first_step, scheduler=scheduler, checkpointer=checkpointer,
                  reporter=reporter, progress=progress and not lines, echo=echo)
    return finish(run, before, sets_before, history, reporter, t_start, echo)


def held_out_note(job: Job, cfg: TrainConfig) -> str:
    """What a held-out score is over, for its log line."""
    each = describe_sets(job.breakdown())
    return f"{job.held_out} held out, {held_out_metric(cfg)[1]}" + (f"; {each}" if each else "")


@dataclass
class RunSetUp:
    """What `train` has built and checked before its first step."""
    cfg: TrainConfig             # with the probe's layer and the memory plan's batch sizes
    policy: Policy
    job: Job
    optimizer: torch.optim.Optimizer
    generator: torch.Generator   # the run's own random stream: sampling and minibatch order
    gen_batch: HalveOnOOM
    micro: HalveOnOOM
    out: Path
    manifest: dict | None        # None for a full-parameter run (no patch)
    saved: Checkpoint | None     # the checkpoint resumed, restored into policy and optimizer


def set_up(cfg: TrainConfig, progress: bool, echo: Callable[[str], None]) -> RunSetUp:
    """Check every input, load the model, build the job; restore a resumed checkpoint."""
    from .agentic import agentic_job, check_env
    from .evaluate import held_out_tasks, load_trained_layer
    from .probe import probe_choice

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    resumed = Path(cfg.resume) if cfg.resume else None
    saved = load_checkpoint(resumed) if resumed else None
    if saved:
        for change in resume_changes(cfg, saved.run_config):
            echo(f"resume: {change}")
    check_report_to(cfg.report_to, cfg.log_completions)
    if cfg.env:
        check_env(cfg)
    else:
        task = load_training_task(cfg)
        eval_tasks = held_out_tasks(cfg, task)
    cfg = probe_choice(cfg, echo)   # --layer auto / top-k: the layer probe's choice, before loading
    cfg = fit_batches(cfg, echo)
    policy = load_policy(cfg.model, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype,
                         device=cfg.device, attn=cfg.attn, keep_reference=cfg.beta > 0)
    check_style(policy.tokenizer, prompt_style(cfg), cfg.model)
    if cfg.patch and not saved:
        load_trained_layer(policy, cfg.patch)   # refuses a patch made on another base model
        echo(f"starting from the trained layer in {cfg.patch}")
    out = distributed.broadcast_object(output_dir(cfg, policy, resumed))
    objective = build_objective(cfg, policy.device)
    optimizer = build_optimizer(policy.layer, cfg)   # sharded over the ranks with zero1
    # Evals draw from generators of their own, so scoring held-out rows never shifts what
    # training samples.
    generator = torch.Generator(policy.device).manual_seed(cfg.seed)
    # A turn of multi-turn episodes samples any number of live rows; a single-turn step, groups.
    gen_batch = HalveOnOOM("--generation-batch", cfg.generation_batch,
                           unit=1 if cfg.env else cfg.group_size,
                           needs=lambda size: planned_need(cfg, generation_batch=size), echo=echo)
    micro = HalveOnOOM("--micro-batch", cfg.micro_batch,
                       needs=lambda size: planned_need(cfg, micro_batch=size), echo=echo)
    job = (agentic_job(policy, optimizer, cfg, objective, generator, micro, gen_batch, echo,
                       progress=progress) if cfg.env else
           task_job(task, policy, optimizer, cfg, objective, generator, progress, gen_batch, micro,
                    echo, eval_tasks))
    echo(f"onelayer: {cfg.model} ({policy.split.num_layers} layers), training "
         f"{policy.layer.label} with {cfg.algo} on {job.name}; frozen {policy.frozen_dtype}, "
         f"{policy.device.type}; output {out}")
    if distributed.is_main():
        check_writable(out, policy, cfg)
    if job.held_out_dropped:
        echo(f"dropped {job.held_out_dropped} held-out prompts longer than --max-prompt-tokens "
             f"{cfg.max_prompt_tokens}")
    # A patch names its base and a digest of the blocks it replaces; a full-parameter run
    # replaces the whole model and is no patch.
    manifest = (None if policy.split.full else
                patch_manifest(cfg.model, policy.model_path, policy.layer_indices))
    if saved:
        load_trained_layer(policy, resumed)
        optimizer.load_state_dict(saved.state.optimizer)
        saved.state.optimizer = {}   # the optimizer holds it now: no second copy for the run
        ranks = saved.state.trainer.get("world_size", 1)
        if ranks != distributed.world_size():
            echo(f"resume: {ranks} -> {distributed.world_size()} ranks")
        echo(f"resuming from {resumed} at step {saved.state.step} of {cfg.steps}; held-out "
             f"{job.metric} before training: {saved.state.trainer['score_before']:.1%}")
    return RunSetUp(cfg, policy, job, optimizer, generator, gen_batch, micro, out, manifest, saved)


_ANNOUNCED: set[str] = set()   # NF4 route lines already shown in this process


def announce_nf4_routes(echo: Callable[[str], None]) -> None:
    """The NF4 matmul routes this process measured on its GPU (rollouts over NF4 blocks), each
    shown once."""
    from .nf4_dispatch import measured_summaries
    for line in measured_summaries():
        if line not in _ANNOUNCED:
            _ANNOUNCED.add(line)
            echo(f"NF4 matmul routes measured on {line}")


def run_steps(job: Job, cfg: TrainConfig, history: list[dict], first_step: int, *,
              scheduler, checkpointer: Checkpointer, reporter=NoReporter(),
              progress: bool = True, desc: str = "train", leave: bool = True,
              stopped: Callable[[Path | None], str] | None = None,
              echo: Callable[[str], None] = print) -> None:
    """Steps first_step..cfg.steps: each step's metrics row (reported, appended to `history`),
    the --eval-every scores, a checkpoint every --save-every steps and at the last. A run stops
    with a checkpoint and RunStopped after --max-bad-steps NaN/Inf steps in a row, or after the
    step during which SIGINT or SIGTERM came (a second signal abandons the step); stopped(path)
    tells how to go on from the newest checkpoint (default: `onelayer train --resume`)."""
    stopped = stopped or resume_hint
    device, generator = checkpointer.policy.device, checkpointer.generator
    bad_in_a_row = 0
    with stop_between_steps(echo) as stop, \
            tqdm(range(first_step, cfg.steps + 1), desc=desc, disable=not progress, leave=leave,
                 initial=first_step - 1, total=cfg.steps) as bar:
        step = first_step - 1
        try:
            for step in bar:
                if distributed.world_size() > 1:
                    generator.manual_seed(distributed.step_seed(cfg.seed, step))
                measured = {**job.step(), **memory_gib(device)}
                announce_nf4_routes(echo)
                samples = measured.pop("samples", None)
                row = {"step": step, "lr": scheduler.get_last_lr()[0],
                       **distributed.reduce_metrics(measured)}
                advance(scheduler)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    metric = f"eval_{job.metric.replace(' ', '_')}"
                    row[metric] = job.score(f"step {step}")
                    row.update((f"{metric}/{name}", s) for name, s in job.breakdown().items())
                reporter.step(row, samples)
                history.append(row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}")
                bad_in_a_row = bad_in_a_row + 1 if row["skipped_updates"] else 0
                if bad_in_a_row:
                    echo(f"step {step}: NaN/Inf loss or gradient, {row['skipped_updates']} "
                         f"update(s) skipped ({bad_in_a_row} step(s) in a row)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    path = checkpointer.save(step) or checkpointer.last
                    raise RunStopped(f"stopped: {bad_in_a_row} steps in a row had a NaN/Inf loss or "
                                     f"gradient (--max-bad-steps {cfg.max_bad_steps}); lower --lr or "
                                     f"check the rewards. {stopped(path)}", 1)
                if distributed.any_rank(stop.signal is not None):
                    path = checkpointer.save(step) or checkpointer.last
                    name = signal.Signals(stop.signal or signal.SIGTERM).name   # another rank's
                    raise RunStopped(f"stopped by {name} after step {step}. {stopped(path)}",
                                     stop.exit_code)
                if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    if checkpointer.save(step) is None and step == cfg.steps:
                        raise RunStopped(f"the final checkpoint could not be written. "
                                         f"{stopped(checkpointer.last)}", 1)
        except KeyboardInterrupt:
            raise RunStopped(f"abandoned step {step + 1}. {stopped(checkpointer.last)}",
                             128 + signal.SIGINT) from None
        except UserError as exc:  # out of memory even at the smallest batch
            raise UserError(f"{exc}. {stopped(checkpointer.last)}") from None


def finish(run: RunSetUp, before: float, sets_before: dict, history: list[dict], reporter,
           t_start: float, echo: Callable[[str], None]) -> TrainResult:
    """Score after training, say what was dropped or skipped, save the layer (a patch), the
    summary and the reward plot."""
    cfg, job, policy = run.cfg, run.job, run.policy
    after = job.score("after")
    echo(f"held-out {job.metric} after:  {after:.1%} ({after - before:+.1%}; {held_out_note(job, cfg)})")
    dropped = sum(row.get("prompts_dropped", 0) for row in history)
    if dropped:
        echo(f"dropped {dropped} training prompts longer than --max-prompt-tokens "
             f"{cfg.max_prompt_tokens} (prompts_dropped in the metrics)")
    skipped = sum(row["skipped_updates"] for row in history)
    if skipped:
        echo(f"skipped {skipped} update(s) for a NaN/Inf loss or gradient (skipped_updates in the metrics)")
    if not distributed.is_main():
        return TrainResult(before, after, cfg.steps, time.perf_counter() - t_start, run.out)
    scores = {"metric": job.metric, "task": job.name, "before": before, "after": after,
              "held_out": job.held_out, "steps": cfg.steps}
    if sets_before:   # --eval-task: the score is their mean
        scores["sets"] = {name: {"before": score, "after": job.breakdown()[name]}
                          for name, score in sets_before.items()}
    save_layer(run.out, policy.layer.state_dict(), layer_index=policy.split.layer_index,
               layers=policy.layer.spec, base_model=cfg.model,
               run_config=json.loads(config_json(in_use(cfg, run.gen_batch, run.micro))),
               step=cfg.steps, manifest=run.manifest and {**run.manifest, "scores": scores})
    if run.manifest is None:   # a full-parameter run is no patch: its scores go beside it
        (run.out / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    metric = job.metric.replace(" ", "_")
    reporter.finish({f"{metric}_before": before, f"{metric}_after": after})
    if history:
        plot_rewards(history, before, after, job.metric, run.out / "reward.png")
    seconds = time.perf_counter() - t_start
    echo(f"saved {policy.layer.label} to {run.out / LAYER_FILE} ({seconds:.0f} s in all)")
    return TrainResult(before, after, cfg.steps, seconds, run.out)


# --lr-scheduler -> transformers' schedule: each warms up linearly over the warmup steps.
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, done_steps: int):
    """The learning rate of each RL step (one scheduler step per RL step), a pure function of
    the step: a resumed run rebuilds it from --lr and moves it `done_steps` on, so that more
    steps or another --lr on resume are honoured."""
    from transformers import get_scheduler

    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, initial_lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * cfg.steps)
    scheduler = get_scheduler(SCHEDULES[cfg.lr_scheduler], optimizer, num_warmup_steps=warmup,
                              num_training_steps=cfg.steps)
    for _ in range(done_steps):
        advance(scheduler)
    return scheduler


def advance(scheduler) -> None:
    """One step on. torch warns when the optimizer has not stepped first, which is what a
    resumed schedule and a skipped (NaN) update do on purpose."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()


def resume_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "No checkpoint was saved."
    return f"Checkpoint: {checkpoint}\nresume with: onelayer train --resume {checkpoint}"


def planned_need(cfg: TrainConfig, **batches: int) -> str:
    """What the memory plan says a step needs at these batch sizes ('' where it cannot say:
    the plan models single-turn steps)."""
    if cfg.env:
        return ""
    from .memory import ModelDims, plan_onelayer, read_model_config, workload_from_config
    try:
        dims = ModelDims.from_config(read_model_config(cfg.model), cfg.model)
        work = workload_from_config(cfg, dims, processes=distributed.world_size(), **batches)
        return f"the memory plan says {plan_onelayer(dims, work).reserved / 2**30:.1f} GiB at that size"
    except Exception:  # the plan is a courtesy in an error message, never a second error
        return ""


def held_out_curve(history: list[dict], before: float, after: float,
                   metric: str) -> tuple[list[int], list[float]]:
    """(steps, scores) of the held-out score: before (step 0), every --eval-every, after."""
    key = f"eval_{metric.replace(' ', '_')}"
    during = [(row["step"], row[key]) for row in history if key in row]
    last = history[-1]["step"] if history else 0
    points = [(0, before), *during, (last, after)]
    return [step for step, _ in points], [score for _, score in points]


def plot_rewards(history: list[dict], before: float, after: float, metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    rewards = [r["reward_mean"] for r in history]
    window = max(1, len(rewards) // 10)
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="reward (sampled)")
    ax.plot(steps, smooth, label=f"moving mean ({window} steps)")
    ax.axhline(before, color="grey", ls="--", lw=1, label=f"held-out {metric} before {before:.0%}")
    ax.plot(*held_out_curve(history, before, after, metric), "o-", color="green", ms=3,
            label=f"held-out {metric} (after: {after:.0%})")
    ax.set_xlabel("step")
    ax.set_ylabel("reward, held-out score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
