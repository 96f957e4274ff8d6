"""Layer contribution, the paper's instrument: C(k) = (S_k - S_base) / (S_full - S_base).

One sweep, one model load, one base evaluation:

    S_base                      the untrained model, scored once
    full-parameter RL           for each lr in --full-lrs (and seed): train --layer all, score;
                                the best lr (mean over seeds) gives S_full
    single-layer RL, "paper"    each layer k (and seed) at that best lr: S_k, C(k)
    single-layer RL, "tuned"    with --layer-lrs, each layer at each of those lrs; the layer's
                                best lr (mean over seeds) gives its S_k and C(k)

Every run is the step loop of `onelayer train` (train.run_steps over single_turn.task_job,
same seeding and optimizer) on the shared model (onelayer.model.shared), saved in
OUTPUT/runs/NAME with its trained layer, metrics and scores.json. A rerun of the same command
skips every run whose scores.json exists and continues an interrupted run exactly from its
newest training checkpoint (OUTPUT/runs/NAME/checkpoints, written as `onelayer train` writes
them: every --save-every steps, at the last step and on SIGINT / SIGTERM); a run's checkpoints
are deleted once its scores.json is written. The sweep writes contribution.json,
contribution.csv, contribution.md and contribution.png.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import (CHECKPOINTS, SCORES_FILE, Checkpoint, checkpoints, load_checkpoint,
                         save_layer)
from .config import TrainConfig, config_json
from .errors import UserError
from .model.shared import FrozenModel, attach, load_frozen
from .evaluate import held_out_metric
from .tasks import eval_task_names


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

PAPER_FULL_LRS = (1e-6, 3e-6, 5e-6, 1e-5)


def contribution(score: float, base: float, full: float) -> float | None:
    """C = (S_k - S_base) / (S_full - S_base); None (undefined) when S_full == S_base."""
    if full == base:
        return None
    return (score - base) / (full - base)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all' (every block), 'a-b' (inclusive), 'i,j,k' or a mix ('0-2,5')."""
    if spec.strip().lower() == "all":
        return list(range(num_layers))
    layers: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise UserError(f"--layers must be 'all', a range a-b or a list i,j,k, not {spec!r}")
        for i in span:
            if not 0 <= i < num_layers:
                raise UserError(f"--layers {spec}: layer {i} is out of range (0..{num_layers - 1})")
            if i not in layers:
                layers.append(i)
    if not layers:
        raise UserError(f"--layers {spec!r} names no layer")
    return sorted(layers)


@dataclass(frozen=True)
class Run:
    """One training run of the sweep: what is trained ('all' or a block index), lr and seed."""
    layer: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        what = "full" if self.layer == "all" else f"L{self.layer}"
        return f"{what}-lr{self.lr:g}-seed{self.seed}"


@dataclass
class Sweep:
    """What to run. `cfg` holds every train option (its layer, lr and seed are replaced per run)."""
    cfg: TrainConfig
    layers: list[int]
    seeds: list[int]
    full_lrs: list[float]
    layer_lrs: list[float] = field(default_factory=list)
    full_score: float | None = None      # S_full measured elsewhere: no full-parameter runs
    output: Path = Path("runs/contribution")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def best_lr(scores: dict[tuple[float, int], float], lrs: list[float], seeds: list[int]) -> float:
    """The lr whose mean score over seeds is highest (the first of equals)."""
    return max(lrs, key=lambda lr: (statistics.fmean(scores[lr, s] for s in seeds), -lrs.index(lr)))


def run_sweep(sweep: Sweep, *, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the sweep and write its files; returns the JSON result."""
    from .evaluate import describe_sets, held_out_tasks
    from .single_turn import load_training_task

    t0 = time.perf_counter()
    cfg = sweep.cfg
    task = load_training_task(cfg)
    eval_tasks = held_out_tasks(cfg, task)
    if sweep.full_score is None and cfg.frozen_dtype == "nf4":
        raise UserError("the full-parameter baseline cannot train NF4 weights: use --frozen-dtype "
                        "bf16 or fp32, or give --full-score measured elsewhere")
    if sweep.full_score is None and cfg.frozen_dtype is None and default_device(cfg.device).type == "cuda":
        # One frozen network for every run (like with like): the full baseline's bf16, not NF4.
        cfg = dataclasses.replace(cfg, frozen_dtype="bf16")
        echo("frozen blocks in bf16 for every run: the full-parameter baseline cannot train NF4")
    rank, world = launched_rank()
    if world > 1:
        if rank:
            echo, progress = (lambda line: None), False   # rank 0 speaks and writes the report
        if cfg.device is None and torch.cuda.is_available():
            cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', rank)}")
        echo(f"{world} processes: each trains its share of the runs")
    base = load_frozen(cfg.model, frozen_dtype=cfg.frozen_dtype, device=cfg.device, attn=cfg.attn)
    if max(sweep.layers) >= base.num_layers:
        raise UserError(f"--layers: the model has {base.num_layers} layers (0..{base.num_layers - 1})")
    out = sweep.output
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base.json"
    if rank:
        wait_for([base_file])
    if base_file.is_file():
        kept = json.loads(base_file.read_text())
        s_base, sets = kept["score"], kept.get("sets", {})
        echo(f"base score (kept from {base_file}): {s_base:.1%}")
    else:
        s_base, sets = base_score(base, eval_tasks, cfg)
        _write_json(base_file, {"score": s_base, "model": cfg.model, "task": cfg.task,
                                "eval_samples": cfg.eval_samples, "sets": sets})
        each = describe_sets(sets)
        echo(f"base score: {s_base:.1%} ({cfg.eval_samples} held-out problems, "
             f"{held_out_metric(cfg)[1]}" + (f"; {each})" if each else ")"))

    full_runs = ([] if sweep.full_score is not None else
                 [Run("all", lr, s) for lr in sweep.full_lrs for s in sweep.seeds])
    tuned_runs = [Run(str(k), lr, s) for k in sweep.layers for lr in sweep.layer_lrs for s in sweep.seeds]
    # The paper-protocol runs are known once the full sweep is done (some may be tuned runs too):
    # the bar counts them as new until then.
    total = len(full_runs) + len(sweep.layers) * len(sweep.seeds) + len(set(tuned_runs))
    scores: dict[Run, float] = {}
    set_scores: dict[Run, dict] = {}     # with --eval-task: each run's score per held-out set
    with tqdm(total=total, desc="contribution", disable=not progress, unit="run") as bar:
        def run_all(runs: list[Run]) -> None:
            pending = [run for run in dict.fromkeys(runs) if run not in scores]
            for run in pending[rank::world]:     # launched as several processes: a share each
                scores[run], set_scores[run] = run_or_skip(base, task, eval_tasks, cfg, run,
                                                           out / "runs" / run.name, progress, echo)
                bar.update(1)
            others = [run for run in pending if run not in scores]
            wait_for([out / "runs" / run.name / SCORES_FILE for run in others])
            for run in others:
                scores[run], set_scores[run] = run_or_skip(base, task, eval_tasks, cfg, run,
                                                           out / "runs" / run.name, progress, echo)
                bar.update(1)

        run_all(full_runs)
        if sweep.full_score is None:
            full = {(r.lr, r.seed): scores[r] for r in full_runs}
            lr_full = best_lr(full, sweep.full_lrs, sweep.seeds)
            s_full = statistics.fmean(full[lr_full, s] for s in sweep.seeds)
            echo(f"full-parameter RL: best lr {lr_full:g}, score {s_full:.1%}")
        else:
            lr_full, s_full = cfg.lr, sweep.full_score
        paper_runs = [Run(str(k), lr_full, s) for k in sweep.layers for s in sweep.seeds]
        bar.total = len(set(full_runs + paper_runs + tuned_runs))
        bar.refresh()
        run_all(paper_runs)
        run_all(tuned_runs)

    result = summarise(sweep, base, s_base, s_full, lr_full, scores, time.perf_counter() - t0,
                       base_sets=sets, set_scores=set_scores)
    if rank:
        return result
    write_outputs(result, out)
    c = result["full"]["undefined_reason"]
    echo(f"wrote {out / 'contribution.json'}, .csv, .md, .png"
         + (f" -- C is undefined: {c}" if c else ""))
    return result


def launched_rank() -> tuple[int, int]:
    """(rank, world size) of a sweep launched as several processes (torchrun, accelerate
    launch); (0, 1) otherwise. The runs are independent, so the processes share out the runs
    and meet through the files each run writes, with no process group: a run's own training
    stays single-process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# How often a process waiting for other processes' runs looks for their scores. A process that
# dies takes the launcher's whole job down, so the wait needs no timeout of its own.
POLL_S = 2.0


def wait_for(paths: list[Path]) -> None:
    while not all(p.is_file() for p in paths):
        time.sleep(POLL_S)


def _write_json(path: Path, data: dict) -> None:
    """Written aside and renamed: another process polling for `path` never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def base_score(base: FrozenModel, eval_tasks: list, cfg: TrainConfig) -> tuple[float, dict]:
    """Greedy held-out accuracy of the untrained model, as `onelayer train` scores it, and its
    per-task scores when there are several held-out tasks."""
    from .evaluate import HeldOut, eval_temperature
    from .resilience import HalveOnOOM
    from .single_turn import prompt_style

    style = prompt_style(cfg)
    held_out = HeldOut.build(base.tokenizer, eval_tasks, style, cfg.eval_samples,
                             cfg.max_prompt_tokens, cfg.model)
    score = held_out.score(base.lm, base.tokenizer, max_new_tokens=cfg.max_new_tokens,
                           seed=cfg.seed, style=style, stop=tuple(cfg.stop),
                           batch_size=HalveOnOOM("the held-out eval batch",
                                                 max(1, (cfg.generation_batch or 64) // cfg.eval_k)),
                           k=cfg.eval_k, temperature=eval_temperature(cfg))
    return score, held_out.last


def run_or_skip(base: FrozenModel, task, eval_tasks: list, cfg: TrainConfig, run: Run, out: Path,
                progress: bool, echo: Callable[[str], None]) -> tuple[float, dict]:
    """The run's held-out score after training and its score per held-out set ({} for one
    set): read from OUT/scores.json when the run finished before, else trained now (from its
    newest checkpoint when it was interrupted)."""
    done = out / SCORES_FILE
    rcfg = dataclasses.replace(cfg, layer=run.layer, lr=run.lr, seed=run.seed, output=str(out), resume=None)
    settings = run_settings(rcfg)
    if done.is_file():
        kept = json.loads(done.read_text())
        refuse_other_settings(out, kept["config"], settings)
        score, sets = kept["after"], kept.get("sets", {})
    else:
        score, seconds, sets = train_run(base, task, rcfg, out, progress, echo, eval_tasks)
        _write_json(done, {"run": run.name, "layer": run.layer, "lr": run.lr, "seed": run.seed,
                           "after": score, "sets": sets, "seconds": seconds, "config": settings})
        echo(f"{run.name}: {score:.1%} ({seconds:.0f} s)")
    # The result is kept: its checkpoints would only fill the disk (an optimizer state per run).
    # Also on the skip path, for a sweep stopped between writing scores.json and this.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return score, sets


def run_settings(cfg: TrainConfig) -> dict:
    """What decides a run's result: its config but where it is written and how it is shown."""
    settings = {k: v for k, v in json.loads(config_json(cfg)).items()
                if k not in ("output", "metrics", "resume", "save_every", "keep")}
    # The kind of device decides the arithmetic, not which GPU of a multi-process sweep ran it.
    return {**settings, "device": default_device(cfg.device).type}


def refuse_other_settings(path: Path, kept: dict, settings: dict) -> None:
    """A run's scores or checkpoint made with other settings would mix two sweeps into one."""
    changed = sorted(k for k in settings if kept.get(k) != settings[k])
    if changed:
        raise UserError(f"{path} is from a run with other settings ({', '.join(changed[:3])}): "
                        "resume the sweep with its own options, or choose another --output")


def newest_checkpoint(out: Path, settings: dict) -> Checkpoint | None:
    """The run's newest training checkpoint (None when it has none), refused when it was saved
    with other settings."""
    found = checkpoints(out)
    if not found:
        return None
    saved = load_checkpoint(found[-1])
    refuse_other_settings(found[-1], saved.state.trainer.get("settings", {}), settings)
    return saved


def train_run(base: FrozenModel, task, cfg: TrainConfig, out: Path, progress: bool,
              echo: Callable[[str], None] = print,
              eval_tasks: list | None = None) -> tuple[float, float, dict]:
    """`onelayer train`'s step loop for cfg.layer on the shared model: same seeding, optimizer,
    rollouts, update, greedy scoring and training checkpoints in OUT/checkpoints, without its
    before-score (the sweep's base score is that). A run with a checkpoint in OUT continues
    from the newest one exactly: layer, AdamW state, random streams, data position and lr
    schedule. Returns (score after, seconds over every sitting, score per held-out set: {} for
    one set)."""
    from .data_parallel import build_optimizer
    from .evaluate import load_trained_layer
    from .export import patch_manifest
    from .reporting import write_jsonl
    from .resilience import HalveOnOOM
    from .single_turn import task_job
    from .train import Checkpointer, fit_batches, in_use, lr_schedule, restore_random, run_steps
    from .update import build_objective

    t0 = time.perf_counter()
    settings = run_settings(cfg)
    saved = newest_checkpoint(out, settings)
    # A resumed run goes on at the batch sizes it had reached (planned, or halved after running
    # out of memory), not at those a new memory plan would choose now.
    cfg = (dataclasses.replace(cfg, micro_batch=saved.run_config["micro_batch"],
                               generation_batch=saved.run_config["generation_batch"])
           if saved else fit_batches(cfg, lambda line: None))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with attach(base, cfg.layer, keep_reference=cfg.beta > 0) as policy:
        objective = build_objective(cfg, policy.device)
        optimizer = build_optimizer(policy.layer, cfg)
        generator = torch.Generator(policy.device).manual_seed(cfg.seed)
        gen_batch = HalveOnOOM("--generation-batch", cfg.generation_batch, unit=cfg.group_size,
                               echo=echo)
        micro = HalveOnOOM("--micro-batch", cfg.micro_batch, echo=echo)
        job = task_job(task, policy, optimizer, cfg, objective, generator, False, gen_batch, micro,
                       echo, eval_tasks)
        manifest = None if policy.split.full else patch_manifest(cfg.model, policy.model_path,
                                                                  policy.layer_indices)
        history, done_steps, earlier = [], 0, 0.0
        if saved:
            load_trained_layer(policy, saved.path)
            optimizer.load_state_dict(saved.state.optimizer)
            restore_random(saved.state.random, generator, job)
            history, earlier = saved.state.trainer["history"], saved.state.trainer["seconds"]
            done_steps = saved.state.step
            echo(f"{out.name}: resuming after step {done_steps} of {cfg.steps} from {saved.path}")
        checkpointer = Checkpointer(
            out, policy, cfg, optimizer, generator, job, gen_batch, micro, manifest, echo,
            last=saved.path if saved else None,
            trainer=lambda: {"history": history, "settings": settings,
                             "seconds": earlier + time.perf_counter() - t0})
        del saved   # the optimizer holds its state now: no second copy for the rest of the run
        scheduler = lr_schedule(optimizer, cfg, done_steps=done_steps)
        run_steps(job, cfg, history, done_steps + 1, scheduler=scheduler,
                  checkpointer=checkpointer, progress=progress,
                  desc=f"L{cfg.layer} lr {cfg.lr:g} seed {cfg.seed}", leave=False,
                  stopped=lambda path: rerun_hint(out.name, path), echo=echo)
        score = job.score("after")
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "metrics.jsonl", history)
        scores = {"metric": job.metric, "task": job.name, "after": score, "held_out": job.held_out,
                  "steps": cfg.steps}
        if job.breakdown():
            scores["sets"] = job.breakdown()
        save_layer(out, policy.layer.state_dict(), layer_index=policy.split.layer_index,
                   layers=policy.layer.spec, base_model=cfg.model,
                   run_config=json.loads(config_json(in_use(cfg, gen_batch, micro))), step=cfg.steps,
                   manifest=manifest and {**manifest, "scores": scores})
    return score, earlier + time.perf_counter() - t0, job.breakdown()


def rerun_hint(name: str, checkpoint: Path | None) -> str:
    if checkpoint is None:
        return f"No checkpoint of run {name} was saved: the same command trains it again."
    return f"Run {name}'s checkpoint: {checkpoint}; the same command continues the sweep from it."


# ---------------------------------------------------------------------------------------------
# Results: JSON, CSV, Markdown, PNG
# ---------------------------------------------------------------------------------------------

def summarise(sweep: Sweep, base: FrozenModel, s_base: float, s_full: float, lr_full: float,
              scores: dict[Run, float], seconds: float, *, base_sets: dict | None = None,
              set_scores: dict[Run, dict] | None = None) -> dict:
    """contribution.json's content. base_sets and set_scores (with several held-out sets): the
    base's and each run's score per set, for C per set beside C of their mean."""
    seeds = sweep.seeds
    # C per held-out set needs each set's S_full: the full runs at lr_full (not --full-score).
    per_set = {} if len(base_sets or {}) < 2 or sweep.full_score is not None else {
        name: (s, statistics.fmean(set_scores[Run("all", lr_full, seed)][name] for seed in seeds))
        for name, s in base_sets.items()}
    undefined = ("S_full == S_base: full-parameter RL did not move the score, so no share of its "
                 "gain can be measured" if s_full == s_base else None)
    full_sweep = [{"lr": lr, "seed": s, "score": scores[Run("all", lr, s)]}
                  for lr in sweep.full_lrs for s in seeds] if sweep.full_score is None else []
    rows = [{"kind": "full", "protocol": "", "layer": "all", "lr": r["lr"], "seed": r["seed"],
             "score": r["score"], "C": contribution(r["score"], s_base, s_full)} for r in full_sweep]
    layers = []
    for k in sweep.layers:
        entry = {"layer": k, "depth": k / max(base.num_layers - 1, 1)}
        protocols = {"paper": lr_full}
        if sweep.layer_lrs:
            tuned = {(lr, s): scores[Run(str(k), lr, s)] for lr in sweep.layer_lrs for s in seeds}
            protocols["tuned"] = best_lr(tuned, sweep.layer_lrs, seeds)
        for protocol, lr in protocols.items():
            per_seed = [scores[Run(str(k), lr, s)] for s in seeds]
            cs = [contribution(x, s_base, s_full) for x in per_seed]
            score_mean, score_std = mean_std(per_seed)
            c_mean, c_std = mean_std(cs) if undefined is None else (None, None)
            entry[protocol] = {"lr": lr, "scores": per_seed, "C": cs, "score_mean": score_mean,
                               "score_std": score_std, "C_mean": c_mean, "C_std": c_std}
            if per_set:   # the mean over seeds of each set's score, and its C (C is linear in S)
                means = {name: statistics.fmean(set_scores[Run(str(k), lr, s)][name] for s in seeds)
                         for name in per_set}
                entry[protocol]["sets"] = {
                    name: {"score_mean": x, "C": contribution(x, *per_set[name])}
                    for name, x in means.items()}
            rows += [{"kind": "layer", "protocol": protocol, "layer": k, "lr": lr, "seed": s,
                      "score": x, "C": c} for s, x, c in zip(seeds, per_seed, cs)]
        if sweep.layer_lrs:   # every tuned run, not only the chosen lr: the layer's own lr sweep
            entry["tuned"]["sweep"] = [{"lr": lr, "seed": s, "score": scores[Run(str(k), lr, s)]}
                                       for lr in sweep.layer_lrs for s in seeds]
        layers.append(entry)
    metric, how = held_out_metric(sweep.cfg)
    return {
        "model": sweep.cfg.model, "task": sweep.cfg.task, "num_layers": base.num_layers,
        "metric": "greedy accuracy" if metric == "accuracy" else f"{metric}: {how}",
        "eval_samples": sweep.cfg.eval_samples,
        "held_out_sets": eval_task_names(sweep.cfg.eval_task) or [sweep.cfg.task],
        "seeds": seeds, "S_base": s_base,
        "sets": {name: {"S_base": b, "S_full": f} for name, (b, f) in per_set.items()},
        "full": {"S_full": s_full, "lr": lr_full, "measured_elsewhere": sweep.full_score is not None,
                 "sweep": full_sweep, "undefined_reason": undefined},
        "layers": layers, "rows": rows,
        "protocols": ["paper", "tuned"] if sweep.layer_lrs else ["paper"],
        "layer_lrs": sweep.layer_lrs, "full_lrs": sweep.full_lrs,
        "seconds": seconds, "run_config": json.loads(config_json(sweep.cfg)),
    }


CSV_COLUMNS = ("kind", "protocol", "layer", "lr", "seed", "score", "C")


def write_outputs(result: dict, out: Path) -> None:
    (out / "contribution.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "contribution.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerow({"kind": "base", "protocol": "", "layer": "", "lr": "", "seed": "",
                         "score": result["S_base"], "C": 0.0 if result["full"]["undefined_reason"] is None
                         else "undefined"})
        for row in result["rows"]:
            writer.writerow({**row, "C": "undefined" if row["C"] is None else row["C"]})
    (out / "contribution.md").write_text(markdown_table(result))
    plot_contribution(result, out / "contribution.png")


def _fmt_c(mean: float | None, std: float | None) -> str:
    return "undefined" if mean is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(result: dict) -> str:
    full = result["full"]
    protocols = result["protocols"]
    sets = result.get("held_out_sets", [result["task"]])
    scored = (f"on {result['task']}" if sets == [result["task"]] else
              f"trained on {result['task']}, S the mean over {', '.join(sets)}")
    lines = [f"Layer contribution C(k) = (S_k - S_base) / (S_full - S_base) of {result['model']} "
             f"{scored} ({result['metric']}, {result['eval_samples']} held-out problems"
             f"{' each' * (len(sets) > 1)}, seeds {', '.join(map(str, result['seeds']))}; "
             "mean ± std over seeds).", "",
             f"S_base = {result['S_base']:.1%}; S_full = {full['S_full']:.1%} (full-parameter RL, lr "
             f"{full['lr']:g}{', measured elsewhere' if full['measured_elsewhere'] else ''}).", ""]
    if full["undefined_reason"]:
        lines += [f"**C is undefined**: {full['undefined_reason']}.", ""]
    if full["sweep"]:
        by_lr: dict[float, list[float]] = {}
        for r in full["sweep"]:
            by_lr.setdefault(r["lr"], []).append(r["score"])
        lines += ["| full-parameter lr | score |", "|---|---|"]
        lines += [f"| {lr:g}{' (best)' if lr == full['lr'] else ''} | "
                  f"{mean_std(v)[0]:.1%} ± {mean_std(v)[1]:.1%} |" for lr, v in by_lr.items()]
        lines.append("")
    head = "| layer | depth |" + "".join(
        f" S_k ({p}) | C ({p}) |" + (" lr (tuned) |" if p == "tuned" else "") for p in protocols)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for entry in result["layers"]:
        cells = f"| {entry['layer']} | {entry['depth']:.0%} |"
        for p in protocols:
            e = entry[p]
            cells += f" {e['score_mean']:.1%} ± {e['score_std']:.1%} | {_fmt_c(e['C_mean'], e['C_std'])} |"
            if p == "tuned":
                cells += f" {e['lr']:g} |"
        lines.append(cells)
    if result.get("sets"):
        lines += ["", _per_set_table(result)]
    return "\n".join(lines) + "\n"


def _per_set_table(result: dict) -> str:
    """C of each layer on each held-out set (the paper's protocol): S_base and S_full of the
    set on the first rows, then S_k (C) per layer."""
    names = list(result["sets"])
    lines = ["C per held-out set (paper protocol; mean over seeds):", "",
             "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| S_base | " + " | ".join(f"{result['sets'][n]['S_base']:.1%}" for n in names) + " |",
             "| S_full | " + " | ".join(f"{result['sets'][n]['S_full']:.1%}" for n in names) + " |"]
    for entry in result["layers"]:
        per = entry["paper"]["sets"]
        cells = [f"{per[n]['score_mean']:.1%} (C "
                 f"{'undefined' if per[n]['C'] is None else format(per[n]['C'], '.2f')})"
                 for n in names]
        lines.append(f"| {entry['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_contribution(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = result["protocols"]
    layers = [e["layer"] for e in result["layers"]]
    width = 0.8 / len(protocols)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(layers) + 2), 4.0))
    if result["full"]["undefined_reason"]:
        ax.text(0.5, 0.5, "C undefined: S_full == S_base", ha="center", va="center", transform=ax.transAxes)
    else:
        for j, p in enumerate(protocols):
            x = [k + (j - (len(protocols) - 1) / 2) * width for k in layers]
            ax.bar(x, [e[p]["C_mean"] for e in result["layers"]], width,
                   yerr=[e[p]["C_std"] for e in result["layers"]], capsize=2,
                   label=f"{p}: " + (f"lr {result['full']['lr']:g} (full-parameter best)" if p == "paper"
                                     else "each layer's best lr"))
        ax.axhline(1.0, color="black", ls="--", lw=1, label="C = 1 (full-parameter RL)")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.set_xticks(layers)
    ax.set_xlabel(f"layer (depth 0..{result['num_layers'] - 1})")
    ax.set_ylabel("C(k)")
    ax.set_title(f"{Path(result['model']).name} on {result['task']}: S_base {result['S_base']:.1%}, "
                 f"S_full {result['full']['S_full']:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
