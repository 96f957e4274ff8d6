"""The `onelayer` command: parse, build the run config, call the library."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import click

from .config import config_options
from .errors import RunStopped, UserError

# Option groups shared with other commands, by TrainConfig field name (declared once there).
TASK_FIELDS = ("prompt_field", "answer_field", "tests_field", "entry_point_field", "dataset_config",
               "split", "test_split", "test_size", "system_prompt", "format_bonus")
PROMPT_FIELDS = ("chat", "chat_template_kwargs", "stop", "max_prompt_tokens")
ENV_FIELDS = ("env", "max_turns", "history_turns")
PLAN_FIELDS = ("model", "layer", "prompts_per_step", "group_size", "max_new_tokens", "beta",
               "minibatch", "micro_batch", "generation_batch", "max_prompt_tokens",
               "frozen_dtype", "loss_impl", "temperature", "top_p", "top_k", "optimizer_sharding",
               "offload_optimizer")


def _given(options: dict) -> dict:
    """The options the user typed (a repeatable option left out comes as an empty tuple)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


# What `onelayer --version` reports beside onelayer's own: the libraries a result depends on.
REPORTED_LIBRARIES = ("torch", "transformers", "bitsandbytes", "triton", "datasets")


def _print_versions(ctx: click.Context, _param, wanted: bool) -> None:
    """--version: onelayer's version and those of Python and the libraries it runs on, one line
    to paste into a bug report or next to a benchmark figure."""
    if not wanted or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in REPORTED_LIBRARIES)
    click.echo(f"onelayer {__version__} (python {platform.python_version()}, {libraries})")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Print the versions of onelayer, Python and the libraries it runs on, and exit.")
def cli():
    """onelayer: RL post-training (GRPO) of a single transformer layer.

    Run `onelayer train` with no arguments for the built-in demo: a tiny model learning
    arithmetic on the CPU in a few minutes.
    """


@cli.command()
@config_options()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML file whose keys mirror these options (CLI options win).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(config_file, quiet, **options):
    """Train one layer of a causal LM with GRPO; only that layer is saved.

    Frozen blocks are stored in NF4 (GPU) and run without autograd before the trained
    layer; the trained layer keeps fp32 master weights and AdamW state.
    """
    from .config import build_config
    from .train import train as run

    _quiet_loading(quiet)
    cfg = build_config(_given(options), config_file)
    run(cfg, progress=not quiet, echo=click.echo)


@cli.command("eval")
@click.option("--model", help="Hub id, local directory or 'demo'. [default: the checkpoint's "
                               "base model, else demo]")
@click.option("--patch", "--layer-checkpoint", "layer_checkpoint", type=click.Path(file_okay=False),
              help="A trained layer (a `onelayer train` output directory or one of its "
                   "checkpoints): score the model with it. Refused if it was trained on "
                   "another base model.")
@click.option("--task", help="Task, test set (math500, olympiadbench, amc23, aime24, aime25) or "
                              "dataset; several comma-separated, or paper-math, for a row each "
                              "and their mean. [default: the sets the checkpoint's run scored, "
                              "else arithmetic]")
@click.option("--samples", type=int, help="Held-out problems (environment tasks) to score. "
                                          "[default: all; with --env, the run's --eval-samples]")
@click.option("--k", type=int,
              help="1: greedy accuracy (an environment's greedy success rate); K > 1: pass@K "
                   "of K samples (episodes) at --temperature, and mean@K. [default: the run's "
                   "--eval-k, else 1]")
@click.option("--temperature", type=float,
              help="[default: the run's --eval-temperature, else its --temperature, else 1]")
@click.option("--max-new-tokens", type=int, help="[default: the checkpoint's run, else 512]")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Problems (with --env, episodes) per generation call; halved when the "
                   "device runs out of memory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--frozen-dtype", type=click.Choice(["nf4", "bf16", "fp32"]))
@click.option("--device")
@click.option("--output", help="JSON result file. [default: CHECKPOINT/eval-TASK.json, else "
                               "runs/eval-MODEL-TASK-TIME.json]")
@config_options(TASK_FIELDS + PROMPT_FIELDS + ENV_FIELDS)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(quiet, model, layer_checkpoint, task, samples, k, temperature, max_new_tokens,
                 batch_size, seed, frozen_dtype, device, output, **run_options):
    """Score a model (optionally with a trained layer) on a task's held-out problems, or on an
    environment's held-out tasks (--env, or a patch trained with one): a short table on stdout
    and every completion (episode) in a JSON file. Deterministic for a fixed seed. Task,
    environment and prompt options default to the checkpoint's run."""
    from .evaluate import EvalConfig, run_eval

    _quiet_loading(quiet)
    cfg = EvalConfig(model, layer_checkpoint, task, samples, k, temperature, max_new_tokens,
                     batch_size, seed, frozen_dtype, device, output, _given(run_options))
    run_eval(cfg, progress=not quiet, echo=click.echo)


@cli.command("export")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="A trained layer: a `onelayer train` output directory or one of its checkpoints.")
@click.option("--output", type=click.Path(file_okay=False),
              help="Write a complete Hugging Face checkpoint here (sharded safetensors, config, "
                   "tokenizer, generation config): the base model's own weights with the trained "
                   "layer merged in, loadable by AutoModelForCausalLM, vLLM, lm-eval.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Cast the weights. [default: the base checkpoint's own dtype]")
@click.option("--model", help="The base model (hub id or directory). [default: the manifest's]")
@click.option("--push-to-hub", "repo", help="Upload to this hub model repo with a model card: "
              "the export when --output is given, else the layer alone (a patch, ~1/36 of the "
              "model for an 8B).")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_command(checkpoint, output, dtype, model, repo, private, quiet):
    """Merge a trained layer into its base model's weights, streaming shard by shard (the
    frozen weights come from the original files, never from 4-bit copies), and/or push it to
    the Hugging Face hub."""
    from .export import export_to

    export_to(checkpoint, output, dtype=dtype, model=model, repo=repo, private=private,
              progress=not quiet, echo=click.echo)


@cli.command("diff")
@click.option("--tuned", required=True,
              help="The trained model: a checkpoint directory or hub id (full-parameter RL from any "
                   "trainer), or a onelayer run or checkpoint.")
@click.option("--base", help="The model it was trained from (hub id or directory). [default: a "
                             "onelayer run's base model]")
@click.option("--output", type=click.Path(file_okay=False),
              help="Directory for diff.json, diff.csv and diff.png. [default: runs/diff-NAME]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def diff_command(tuned, base, output, quiet):
    """Where training changed a model: per block, the relative change of its weights
    (||W_tuned - W_base|| / ||W_base||, also split into attention and MLP), its share of the
    whole change, and the share of weights whose stored value did not change. Reads one tensor
    at a time from both checkpoints; prints a table and writes JSON, CSV and a bar chart."""
    from tqdm.auto import tqdm

    from .weight_diff import base_of, format_table, weight_diff, write_outputs

    base = base or base_of(tuned)
    with tqdm(desc="diff", unit="tensor", disable=quiet) as bar:
        result = weight_diff(base, tuned, progress=lambda: bar.update(1))
    out = Path(output) if output else Path("runs") / f"diff-{Path(tuned.rstrip('/')).name}"
    write_outputs(result, out)
    click.echo(format_table(result))
    if result.only_base:
        click.echo(f"{len(result.only_base)} tensors of the base are not in {tuned} (unchanged "
                   "there, left out of the sums)")
    click.echo(f"whole model: relative change {result.total.relative:.3e}; wrote {out}/diff.json, "
               "diff.csv, diff.png")


@cli.command("runs")
@click.argument("directories", nargs=-1, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def runs_command(directories, as_json):
    """The runs under DIRECTORIES (default: runs), a row each: model, trained layer(s), task,
    algorithm, lr, steps done (of those asked, for a run that has not finished), and the
    held-out score before and after. Contribution sweeps' runs are included."""
    from .run_table import as_json as rows_json, format_rows, run_table

    rows = run_table([Path(d) for d in directories or ["runs"]])
    if as_json:
        click.echo(rows_json(rows))
    elif rows:
        click.echo(format_rows(rows))
    else:
        click.echo(f"no runs under {', '.join(directories or ['runs'])}")


def _register_layer_commands() -> None:
    from .layers_cli import contribution_command, probe_command
    cli.add_command(contribution_command)
    cli.add_command(probe_command)


_register_layer_commands()


# `plan`: the memory planner (onelayer.memory); reads only the model's config.json.
@cli.command()
@config_options(PLAN_FIELDS)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A `train` config file (TOML or YAML): plan that run (CLI options win).")
@click.option("--gpu-memory", default="24GiB", show_default=True,
              help="Memory of the card (24GiB, 22.5GB, 81559MiB); 0.5 GiB of it goes to the CUDA context.")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="Data-parallel processes (torchrun), one GPU each: with --optimizer-sharding "
                   "zero1 each holds 1/N of AdamW's state.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(config_file, gpu_memory, gpus, as_json, **options):
    """Estimate the peak GPU memory of one training step, part by part, from the model's
    config.json alone (no weights), beside QLoRA and full-parameter RL on the same workload.
    Prompts are planned at --max-prompt-tokens tokens, else 512 (fewer when the model's
    positions leave less beside --max-new-tokens)."""
    from .memory import plan_command

    click.echo(plan_command(options, config_file=config_file, gpu_memory=gpu_memory,
                            as_json=as_json, gpus=gpus))


def _quiet_loading(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="onelayer", standalone_mode=False)
    except UserError as exc:
        click.echo(f"onelayer: error: {exc}", err=True)
        sys.exit(2)
    except RunStopped as exc:
        click.echo(f"onelayer: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("onelayer: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
