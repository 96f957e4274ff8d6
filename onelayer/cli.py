"""The `onelayer` command: parse, build the run config, call the library."""
from __future__ import annotations

import sys

import click

from .errors import RunStopped, UserError

# Where a dataset task's data is and which fields hold what (train and eval).
TASK_FIELD_OPTIONS = [
    ("--prompt-field", str, "Dataset field holding the prompt. [default: the task's, else "
                            "prompt/question/problem]"),
    ("--answer-field", str, "Dataset field holding the math answer. [default: the task's, else "
                            "answer/solution]"),
    ("--tests-field", str, "Dataset field holding code tests (assert lines). [default: the "
                           "task's, else tests/test_list]"),
    ("--entry-point-field", str, "Dataset field naming the function HumanEval-style tests call."),
    ("--dataset-config", str, "Hub dataset configuration (subset) name."),
    ("--split", str, "Training split of a hub dataset. [default: train]"),
    ("--test-split", str, "Held-out split of a hub dataset. [default: the task's]"),
    ("--test-size", float, "Rows (or a fraction < 1) held out of train when there is no test split."),
    ("--system-prompt", str, "System prompt for chat-template (instruct) models."),
    ("--format-bonus", float, "Math: reward added when a final answer can be extracted. [default: 0]"),
]

# Rewards to train on instead of the task's own (train only; eval scores with the task's).
REWARD_OPTIONS = [
    ("--reward", str, "Reward to train on (repeatable; their weighted sum replaces the task's): task, "
                      "math, code, format, length, package.module:function or path/to/file.py:function "
                      "(TRL's reward-function convention; docs/tasks.md).", {"multiple": True}),
    ("--reward-weight", float, "Weight of each --reward, in the same order (repeatable). [default: 1 each]",
     {"multiple": True}),
    ("--reward-timeout", float, "Seconds a plug-in reward call may run before its completion scores 0. "
                                "[default: 30]"),
]

# How prompts are written and where completions stop (train and eval).
PROMPT_OPTIONS = [
    ("--chat/--no-chat", None, "Wrap prompts in the model's chat template, or give plain text. "
                     "[default: the template for math and code tasks when the tokenizer has one]"),
    ("--chat-template-kwargs", str, "JSON object of chat-template variables, e.g. "
                     "'{\"enable_thinking\": false}' for Qwen3 (thinking is on by default)."),
    ("--stop", str, "Stop string (repeatable): a completion ends right after it, the stop "
                    "included. EOS and the chat template's end-of-turn token always stop. "
                    "In bash, $'\\n\\nQuestion:' types newlines.", {"multiple": True}),
    ("--max-prompt-tokens", int, "Drop prompts longer than this (counted, never cut); "
                                 "0 = no limit. [default: 0]"),
]

# Options of `train`, mirrored one to one by the keys of a --config file (dashes or underscores).
# Every default is None here, so that only what the user typed overrides the file and presets.
TRAIN_OPTIONS = [
    ("--model", str, "Hub id (Qwen/Qwen3-8B), local model directory, or 'demo': the packaged "
                     "tiny arithmetic model. [default: demo]"),
    ("--layer", str, "What to train: an index (negative counts from the end), a list '3,5,7', "
                     "'mid' (floor(N/2 - 1/2)), 'mid-k' (the k middle layers), 'auto' (~44% of "
                     "depth, where the paper's best layers sit) or 'all' (full-parameter RL, "
                     "the baseline of `contribution`; no NF4). [default: mid]"),
    ("--task", str, "Built-in task name or a dataset file. [default: arithmetic]"),
    *TASK_FIELD_OPTIONS,
    *REWARD_OPTIONS,
    ("--algo", click.Choice(["grpo", "dr_grpo", "gigpo"]), "Algorithm preset: advantage "
                     "estimator + loss aggregation + reward scaling (docs/algorithms.md). grpo: "
                     "group std, seq-mean-token-mean; dr_grpo: no std, seq-mean-token-sum-norm; "
                     "gigpo: multi-turn --env, episode + step advantages, token-mean. "
                     "[default: grpo]"),
    ("--steps", int, "RL steps (each: sample, score, update). [default: 200]"),
    ("--prompts-per-step", int, "Prompts per step. [default: 8; demo 16]"),
    ("--group-size", int, "Completions per prompt, G (>= 2). [default: 8]"),
    ("--lr", float, "AdamW learning rate of the trained layer. [default: 5e-6, the paper's; "
                    "demo 1e-3]"),
    ("--weight-decay", float, "AdamW weight decay. [default: 0]"),
    ("--max-grad-norm", float, "Clip the layer's gradient to this L2 norm. [default: 1]"),
    ("--beta", float, "Weight of the k3 KL to the original layer; 0 skips the reference pass. "
                      "[default: 0]"),
    ("--eps-low", float, "Lower clip range: ratio >= 1 - eps_low. [default: 0.2]"),
    ("--eps-high", float, "Upper clip range: ratio <= 1 + eps_high (DAPO clip-higher: 0.28). "
                          "[default: 0.2]"),
    ("--loss-agg", click.Choice(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
     "Loss aggregation. [default: the algorithm's: grpo seq-mean-token-mean, dr_grpo "
     "seq-mean-token-sum-norm]"),
    ("--scale-rewards", click.Choice(["group", "batch", "none"]), "Divide advantages by the "
                     "group's reward std, the batch's, or not at all. [default: the algorithm's]"),
    ("--dynamic-sampling/--no-dynamic-sampling", None, "DAPO dynamic sampling: drop groups whose "
                     "rewards are all equal and sample more prompts to refill the batch."),
    ("--env", str, "Multi-turn environment for --algo gigpo: gridworld, sokoban, household, "
                   "or package.module:Class."),
    ("--max-turns", int, "Turns per episode (multi-turn). [default: 20]"),
    ("--gamma", float, "GiGPO discount of step returns. [default: 0.95]"),
    ("--omega", float, "GiGPO weight of the step-level advantage. [default: 1]"),
    ("--adv-norm", click.Choice(["std", "mean"]), "GiGPO normalisation: divide by the std, or "
                   "not (mean). [default: std]"),
    ("--max-new-tokens", int, "Longest completion. [default: 512; demo 8]"),
    ("--temperature", float, "Sampling temperature; log-probs use logits / temperature. [default: 1]"),
    ("--top-p", float, "Nucleus sampling threshold. [default: 1, off]"),
    ("--top-k", int, "Top-k sampling; 0 is off. [default: 0]"),
    *PROMPT_OPTIONS,
    ("--mask-truncated/--no-mask-truncated", None, "Completions cut at --max-new-tokens "
                     "carry no loss (DAPO's overlong filtering); their rewards still count in "
                     "the group."),
    ("--epochs", int, "PPO epochs over each rollout batch. [default: 1]"),
    ("--minibatch", int, "Sequences per optimizer step; 0 = the whole batch. [default: 0]"),
    ("--micro-batch", int, "Sequences per forward/backward pass (also the prefix and log-prob "
                           "passes); gradients accumulate over the minibatch, so the update is "
                           "the same, in less memory. 0 = the whole minibatch. [default: 0, "
                           "or the memory plan's choice on CUDA]"),
    ("--generation-batch", int, "Rows per generate call (whole groups of --group-size); also the "
                                "eval batch. 0 = all rows at once. [default: 0, or the memory "
                                "plan's choice on CUDA]"),
    ("--max-memory", str, "GPU memory budget, e.g. 22GiB: the memory plan (`onelayer plan`) "
                          "chooses --micro-batch and --generation-batch to fit it before any "
                          "weight is loaded. [default: the device's free memory on CUDA]"),
    ("--seed", int, "Seed of prompts, sampling and initialisation. [default: 0]"),
    ("--frozen-dtype", click.Choice(["nf4", "bf16", "fp32"]), "Storage of the frozen blocks. "
                     "[default: nf4 on GPU, fp32 on CPU]"),
    ("--device", str, "cpu, cuda, cuda:1 ... [default: cuda when available]"),
    ("--attn", click.Choice(["sdpa", "eager", "flash_attention_2"]), "Attention kernel: sdpa, eager, or "
                     "flash_attention_2 (when installed, on CUDA; SDPA otherwise); eager where the model "
                     "needs it (Gemma2). [default: sdpa]"),
    ("--loss-impl", click.Choice(["auto", "torch", "triton"]), "Policy-loss implementation: "
                     "auto = Triton on CUDA, torch elsewhere. [default: auto]"),
    ("--eval-samples", int, "Held-out problems scored greedily before and after. [default: 256]"),
    ("--eval-every", int, "Also score held-out accuracy every N steps; 0 = only before/after."),
    ("--output", str, "Directory for the trained layer, its run config, metrics and reward "
                      "plot. [default: runs/MODEL-LLAYER-TIME]"),
    ("--metrics", str, "JSONL file with one metrics object per step. [default: OUTPUT/metrics.jsonl]"),
    ("--save-every", int, "Write a training checkpoint (layer, AdamW state, step, data position, "
                          "random states, metrics) to OUTPUT/checkpoints every N steps; the last "
                          "step is always saved. 0 = only the last. [default: 50]"),
    ("--keep", int, "Training checkpoints kept, newest first; 0 = all. [default: 2]"),
    ("--resume", str, "Continue a run exactly: a checkpoint directory, a run's output directory "
                      "(its newest checkpoint), or 'auto' (the newest in --output; a fresh start "
                      "when there is none). Options typed beside it change the run where that "
                      "is safe (e.g. --steps)."),
    ("--patch", str, "Start from a trained layer (a run directory or checkpoint) instead of the "
                     "base model's; --model and --layer default to the patch's, and a patch "
                     "made on another base model is refused."),
    ("--max-bad-steps", int, "Stop (with a checkpoint) after this many steps in a row whose loss "
                             "or gradient was NaN/Inf; such steps are skipped. [default: 5]"),
    ("--report-to", click.Choice(["tensorboard", "wandb", "none"]), "Also log every step's "
                    "metrics (and --log-completions tables) to TensorBoard (OUTPUT/tensorboard) "
                    "or Weights & Biases (WANDB_MODE=offline works without a network); "
                    "repeatable. Needs pip install 'onelayer[tensorboard]' / '[wandb]'. "
                    "[default: none, metrics.jsonl only]", {"multiple": True}),
    ("--log-completions", int, "Every N steps, the prompts, completions, rewards and advantages "
                               "of a few groups to OUTPUT/completions.jsonl and the dashboards; "
                               "0 = never. [default: 0]"),
]


def _with_options(options):
    def decorate(command):
        for flag, kind, text, *extra in reversed(options):
            option = click.option(flag, type=kind, default=None, help=text, **dict(*extra))
            command = option(command)
        return command
    return decorate


def _given(options: dict) -> dict:
    """The options the user typed (a repeatable option left out comes as an empty tuple)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """onelayer: RL post-training (GRPO) of a single transformer layer.

    Run `onelayer train` with no arguments for the built-in demo: a tiny model learning
    arithmetic on the CPU in a few minutes.
    """


@cli.command()
@_with_options(TRAIN_OPTIONS)
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
@click.option("--task", help="Built-in task or dataset. [default: the checkpoint's, else arithmetic]")
@click.option("--samples", type=int, help="Held-out problems to score. [default: all]")
@click.option("--k", type=int, default=1, show_default=True,
              help="1: greedy accuracy; K > 1: pass@K of K samples at --temperature.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--max-new-tokens", type=int, help="[default: the checkpoint's run, else 512]")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--frozen-dtype", type=click.Choice(["nf4", "bf16", "fp32"]))
@click.option("--device")
@click.option("--output", help="JSON result file. [default: CHECKPOINT/eval-TASK.json, else "
                               "runs/eval-MODEL-TASK-TIME.json]")
@_with_options(TASK_FIELD_OPTIONS + PROMPT_OPTIONS)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(quiet, model, layer_checkpoint, task, samples, k, temperature, max_new_tokens,
                 batch_size, seed, frozen_dtype, device, output, **run_options):
    """Score a model (optionally with a trained layer) on a task's held-out problems: a short
    table on stdout and every completion in a JSON file. Deterministic for a fixed seed.
    Task and prompt options default to the checkpoint's run."""
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


# `plan`: the memory planner (onelayer.memory); reads only the model's config.json.
PLAN_OPTIONS = ("--model", "--layer", "--prompts-per-step", "--group-size", "--max-new-tokens", "--beta",
                "--minibatch", "--micro-batch", "--generation-batch", "--max-prompt-tokens",
                "--frozen-dtype", "--loss-impl", "--temperature", "--top-p", "--top-k")


@cli.command()
@_with_options([option for option in TRAIN_OPTIONS if option[0] in PLAN_OPTIONS])
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A `train` config file (TOML or YAML): plan that run (CLI options win).")
@click.option("--gpu-memory", default="24GiB", show_default=True,
              help="Memory of the card (24GiB, 22.5GB, 81559MiB); 0.5 GiB of it goes to the CUDA context.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(config_file, gpu_memory, as_json, **options):
    """Estimate the peak GPU memory of one training step, part by part, from the model's
    config.json alone (no weights), beside QLoRA and full-parameter RL on the same workload."""
    from .memory import plan_command

    click.echo(plan_command(options, config_file=config_file, gpu_memory=gpu_memory,
                            as_json=as_json))


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
