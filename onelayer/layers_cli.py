"""`onelayer contribution` and `onelayer probe`: which layer to train. Registered in cli.py with
`cli.add_command(contribution_command)` and `cli.add_command(probe_command)`.

Both accept every `train` option as well (--algo, --prompts-per-step, --max-new-tokens,
--eval-samples, ... and a --config file of them), from TrainConfig's one declaration.
"""
from __future__ import annotations

from typing import Any

import click

from .config import FIELDS, config_options
from .errors import UserError

# Every `train` option, declared once in TrainConfig, except those these commands set themselves.
OWN = ("model", "task", "steps", "layer", "output")
TRAIN_FIELDS = tuple(f for f in FIELDS if f not in OWN)


def _floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of numbers, not {text!r}")


def _run_config(config_file: str | None, options: dict[str, Any]):
    from .cli import _given
    from .config import build_config
    return build_config(_given(options), config_file)


@click.command("contribution")
@click.option("--model", help="Hub id, local directory or 'demo'. [default: demo]")
@click.option("--task", help="Built-in task or dataset. [default: arithmetic]")
@click.option("--layers", default="all", show_default=True,
              help="Layers to measure: 'all', a range a-b (inclusive) or a list i,j,k.")
@click.option("--steps", type=int, help="RL steps of every run. [default: train's]")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Seeds per setting (0..n-1): error bars over seeds.")
@click.option("--full-lrs", default=",".join(f"{x:g}" for x in (1e-6, 3e-6, 5e-6, 1e-5)), show_default=True,
              help="Learning rates of the full-parameter baseline (the paper's sweep); the best "
                   "(mean over seeds) gives S_full, and the paper's protocol trains every layer at it.")
@click.option("--layer-lrs", help="Also the tuned protocol: every layer at each of these lrs, its "
                                  "best one kept (comma-separated).")
@click.option("--full-score", type=float, help="S_full measured elsewhere (a share in [0, 1]): no "
                                               "full-parameter runs; layers train at --lr.")
@click.option("--output", help="Sweep directory (a rerun skips finished runs and continues an "
                               "interrupted one from its checkpoint). [default: runs/contribution]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML file of train options (CLI options win).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@config_options(TRAIN_FIELDS)
def contribution_command(model, task, layers, steps, seeds, full_lrs, layer_lrs, full_score,
                         output, config_file, quiet, **train_options):
    """Measure C(k) = (S_k - S_base) / (S_full - S_base) for every requested layer: the base
    model scored once, full-parameter RL swept over --full-lrs, single-layer RL per layer and
    seed; writes contribution.json/.csv/.md/.png. Any `train` option may be added."""
    from pathlib import Path

    from transformers import AutoConfig

    from .contribution import Sweep, parse_layers, run_sweep
    from .model.load import resolve_model_path

    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    cfg = _run_config(config_file, {**train_options, "model": model, "task": task, "steps": steps})
    lrs = _floats(full_lrs, "--full-lrs")
    if full_score is None and not lrs:
        raise UserError("--full-lrs is empty: give learning rates, or --full-score")
    num_layers = AutoConfig.from_pretrained(resolve_model_path(cfg.model)).num_hidden_layers
    sweep = Sweep(cfg, parse_layers(layers, num_layers), list(range(seeds)), lrs,
                  _floats(layer_lrs, "--layer-lrs"), full_score,
                  Path(output or cfg.output or "runs/contribution"))
    run_sweep(sweep, progress=not quiet, echo=click.echo)


@click.command("probe")
@click.option("--model", help="Hub id, local directory or 'demo'. [default: demo]")
@click.option("--task", help="Built-in task or dataset. [default: arithmetic]")
@click.option("--batches", type=int, default=4, show_default=True,
              help="Rollout batches (of --prompts-per-step x --group-size) the score averages over.")
@click.option("--auto-band", default="0.4-0.6", show_default=True,
              help="Depth band (fractions of depth) where `auto` picks the best layer.")
@click.option("--output", help="JSON result file. [default: runs/probe-MODEL-TASK.json]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML file of train options (CLI options win).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options(TRAIN_FIELDS)
def probe_command(model, task, batches, auto_band, output, config_file, quiet, **train_options):
    """Rank layers by how much one Adam-like step on each alone would improve the RL objective
    (from a few rollout batches): the ranking, what `--layer auto` would pick, and the time."""
    import json
    from pathlib import Path

    from .probe import format_ranking, parse_band, run_probe

    cfg = _run_config(config_file, {**train_options, "model": model, "task": task})
    band = parse_band(auto_band)
    result = run_probe(cfg, batches=batches, progress=not quiet)
    click.echo(format_ranking(result, band))
    path = Path(output or f"runs/probe-{Path(cfg.model).name}-{Path(cfg.task).stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result.as_json(), "auto_band": list(band),
                                "auto": result.best_in_band(band)}, indent=2) + "\n")
    click.echo(f"wrote {path}")
