"""The run configuration: one typed record, from defaults <- preset <- config file <- CLI."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

ALGOS = ("grpo", "dr_grpo", "gigpo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None):
    """A run option, declared once: its type (the annotation), default and help feed the
    `train` command, config files, `--help` and the saved run config alike. `list` and `dict`
    as the default mean an empty one."""
    metadata = {"help": help, "choices": choices}
    if default in (list, dict):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every option of `onelayer train` (a config file's keys are these names, with dashes or
    underscores). Defaults suit a real model: the paper's AdamW learning rate 5e-6, no KL,
    clip 0.2."""
    # What is trained, on what
    model: str = option(
        "demo",
        "Hub id (Qwen/Qwen3-8B), local model directory, or 'demo': the packaged tiny arithmetic"
        " model. [default: demo]")
    layer: str = option(
        "mid", "What to train: an index (negative counts from the end), a list '3,5,7', 'mid' "
               "(floor(N/2 - 1/2)), 'mid-k' (the k middle layers), 'auto' (the probe's best "
               "layer within 40-60% of depth; 'auto:0.3-0.7' widens the band), 'top-k' (the "
               "probe's k best) or 'all' (full-parameter RL, the baseline of `contribution`; "
               "no NF4). [default: mid]")
    task: str = option(
        "arithmetic", "Built-in task name or a dataset file. [default: arithmetic]")
    prompt_field: str | None = option(
        None,
        "Dataset field holding the prompt. [default: the task's, else prompt/question/problem]")
    answer_field: str | None = option(
        None, "Dataset field holding the math answer. [default: the task's, else answer/solution]")
    tests_field: str | None = option(
        None, "Dataset field holding code tests (assert lines). [default: the task's, else "
              "tests/test_list]")
    entry_point_field: str | None = option(
        None, "Dataset field naming the function HumanEval-style tests call.")
    dataset_config: str | None = option(
        None, "Hub dataset configuration (subset) name.")
    split: str | None = option(
        None, "Training split of a hub dataset. [default: train]")
    test_split: str | None = option(
        None, "Held-out split of a hub dataset. [default: the task's]")
    test_size: float | None = option(
        None, "Rows (or a fraction < 1) held out of train when there is no test split.")
    system_prompt: str | None = option(
        None, "System prompt for chat-template (instruct) models.")
    format_bonus: float | None = option(
        None, "Math: reward added when a final answer can be extracted. [default: 0]")

    # Rewards to train on instead of the task's own (train only: eval scores with the task's)
    reward: list[str] = option(
        list,
        "Reward to train on (repeatable; their weighted sum replaces the task's): task, math, "
        "code, format, length, package.module:function or path/to/file.py:function (TRL's "
        "reward-function convention; docs/tasks.md).")
    reward_weight: list[float] = option(
        list, "Weight of each --reward, in the same order (repeatable). [default: 1 each]")
    reward_timeout: float | None = option(
        None, "Seconds a plug-in reward call may run before its completion scores 0. [default: 30]")

    # The algorithm
    algo: str = option(
        "grpo", "Algorithm preset: advantage estimator + loss aggregation + reward scaling "
                "(docs/algorithms.md). grpo: group std, seq-mean-token-mean; dr_grpo: no std, "
                "seq-mean-token-sum-norm; gigpo: multi-turn --env, episode + step advantages, "
                "token-mean. [default: grpo]",
        choices=('grpo', 'dr_grpo', 'gigpo'))
    steps: int = option(
        200, "RL steps (each: sample, score, update). [default: 200]")
    prompts_per_step: int = option(
        8, "Prompts per step. [default: 8; demo 16]")
    group_size: int = option(
        8, "Completions per prompt, G (>= 2). [default: 8]")
    lr: float = option(
        5e-6, "AdamW learning rate of the trained layer. [default: 5e-6, the paper's; demo 1e-3]")
    lr_scheduler: str = option(
        "constant", "Learning-rate schedule after warmup (transformers' schedulers): constant, "
                    "linear decay to 0 at the last step, or cosine. [default: constant]",
        choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(
        0, "Steps of linear warmup from 0 to --lr. [default: 0]")
    warmup_ratio: float = option(
        0.0, "Warmup as a fraction of --steps (used when --warmup-steps is 0). [default: 0]")
    weight_decay: float = option(
        0.0, "AdamW weight decay. [default: 0]")
    max_grad_norm: float = option(
        1.0, "Clip the layer's gradient to this L2 norm. [default: 1]")
    beta: float = option(
        0.0, "Weight of the k3 KL to the original layer; 0 skips the reference pass. [default: 0]")
    eps_low: float = option(
        0.2, "Lower clip range: ratio >= 1 - eps_low. [default: 0.2]")
    eps_high: float = option(
        0.2, "Upper clip range: ratio <= 1 + eps_high (DAPO clip-higher: 0.28). [default: 0.2]")
    loss_agg: str | None = option(
        None, "Loss aggregation. [default: the algorithm's: grpo seq-mean-token-mean, dr_grpo "
              "seq-mean-token-sum-norm]",
        choices=('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'))
    scale_rewards: str | None = option(
        None,
        "Divide advantages by the group's reward std, the batch's, or not at all. [default: the"
        " algorithm's]",
        choices=('group', 'batch', 'none'))
    dynamic_sampling: bool = option(
        False,
        "DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts"
        " to refill the batch.")

    # Multi-turn environments (GiGPO)
    env: str | None = option(
        None, "Multi-turn environment for --algo gigpo: gridworld, sokoban, household, or "
              "package.module:Class.")
    max_turns: int = option(
        20, "Turns per episode (multi-turn). [default: 20]")
    history_turns: int | None = option(
        None,
        "Multi-turn: each action sees the system prompt, the last K turns and the current "
        "observation, and each decision is its own training sequence (0: the observation "
        "alone). Bounds every context; unset, an episode is one sequence whose actions see "
        "everything before them. [default: unset]")
    gamma: float = option(
        0.95, "GiGPO discount of step returns. [default: 0.95]")
    omega: float = option(
        1.0, "GiGPO weight of the step-level advantage. [default: 1]")
    adv_norm: str = option(
        "std", "GiGPO normalisation: divide by the std, or not (mean). [default: std]",
        choices=('std', 'mean'))

    # Sampling and prompts
    max_new_tokens: int = option(
        512, "Longest completion. [default: 512; demo 8]")
    temperature: float = option(
        1.0, "Sampling temperature; log-probs use logits / temperature. [default: 1]")
    top_p: float = option(
        1.0, "Nucleus sampling threshold. [default: 1, off]")
    top_k: int = option(
        0, "Top-k sampling; 0 is off. [default: 0]")
    overlong_buffer: int = option(
        0, "DAPO's soft overlong punishment: a completion longer than --max-new-tokens minus N "
           "tokens loses reward linearly with each further token, down to -1 at "
           "--max-new-tokens (overlong_penalty in the metrics). 0 = off. [default: 0]")
    importance_level: str = option(
        "token", "Importance ratio of the clipped loss: token (GRPO's, each token its own ratio) "
                 "or sequence (GSPO: every token of a completion gets the exp of the mean of "
                 "its log-ratios, clipped as one; GSPO clips at about --eps-low 3e-4 --eps-high "
                 "4e-4). [default: token]",
        choices=("token", "sequence"))
    tis_cap: float = option(
        0.0, "Truncated importance sampling: weigh each token's policy-gradient term by "
             "min(pi_trainer / pi_sampler, CAP), the trainer's recomputed log-prob against the "
             "sampler's own, which corrects for a sampler whose numerics differ from the "
             "trainer's (a GPU's CUDA graph and NF4 decode kernels); needs --top-k 0 and "
             "--top-p 1. 0 = off. [default: 0]")
    chat: bool | None = option(
        None,
        "Wrap prompts in the model's chat template, or give plain text. [default: the template "
        "for math and code tasks when the tokenizer has one]")
    chat_template_kwargs: dict = option(
        dict,
        "JSON object of chat-template variables, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "(thinking is on by default).")
    stop: list[str] = option(
        list,
        "Stop string (repeatable): a completion ends right after it, the stop included. EOS and"
        " the chat template's end-of-turn token always stop. In bash, $'\\n\\nQuestion:' types "
        "newlines.")
    max_prompt_tokens: int = option(
        0, "Drop prompts longer than this (counted, never cut); 0 = no limit. [default: 0]")

    # The update
    mask_truncated: bool = option(
        False,
        "Completions cut at --max-new-tokens carry no loss (DAPO's overlong filtering); their "
        "rewards still count in the group.")
    epochs: int = option(
        1, "PPO epochs over each rollout batch. [default: 1]")
    minibatch: int = option(
        0, "Sequences per optimizer step; 0 = the whole batch. [default: 0]")
    micro_batch: int = option(
        0, "Sequences per forward/backward pass (also the prefix and log-prob passes); gradients "
           "accumulate over the minibatch, so the update is the same, in less memory. 0 = the "
           "whole minibatch. [default: 0, or the memory plan's choice on CUDA]")
    generation_batch: int = option(
        0, "Rows per generate call (whole groups of --group-size; with --env, episodes acting "
           "at once); 0 = all rows at once. Also the held-out eval batch (0: 64). Halved when "
           "the device runs out of memory. [default: 0, or the memory plan's choice on CUDA]")

    # Memory, devices, kernels
    max_memory: str | None = option(
        None,
        "GPU memory budget, e.g. 22GiB: the memory plan (`onelayer plan`) chooses --micro-batch"
        " and --generation-batch to fit it before any weight is loaded. [default: the device's "
        "free memory on CUDA]")
    offload_optimizer: bool = option(
        False,
        "Keep the trained layer's fp32 master weights, AdamW state and reference weights in "
        "host memory while rollouts run (12 B a trained parameter: 2.2 GiB for a Qwen3-8B "
        "layer, room for longer completions or more rows a generate call), for a copy to the "
        "host and one back each step. The memory plan counts it.")
    seed: int = option(
        0, "Seed of prompts, sampling and initialisation. [default: 0]")
    frozen_dtype: str | None = option(
        None, "Storage of the frozen blocks. [default: nf4 on GPU, fp32 on CPU]",
        choices=('nf4', 'bf16', 'fp32'))
    device: str | None = option(
        None, "cpu, cuda, cuda:1 ... [default: cuda when available]")
    optimizer_sharding: str = option(
        "zero1", "Several processes: shard AdamW's state over them (zero1: each keeps 1/N of "
                 "exp_avg and exp_avg_sq, for a Qwen3-8B layer 0.77 GB less per GPU on 2 GPUs, "
                 "1.35 GB on 8, for one all-gather of the layer per optimizer step) or keep it "
                 "whole on each (none). [default: zero1]",
        choices=("none", "zero1"))
    dist_timeout: float = option(
        1800.0, "Several processes (torchrun): seconds a rank waits for the others at a "
                "collective before the job stops; more than the longest step phase that has none "
                "(a rollout, a held-out eval shard, a checkpoint write). [default: 1800]")
    attn: str = option(
        "sdpa",
        "Attention kernel: sdpa, eager, or flash_attention_2 (when installed, on CUDA; SDPA "
        "otherwise); eager where the model needs it (Gemma2). [default: sdpa]",
        choices=('sdpa', 'eager', 'flash_attention_2'))
    loss_impl: str = option(
        "auto",
        "Policy-loss implementation: auto = Triton on CUDA, torch elsewhere. [default: auto]",
        choices=('auto', 'torch', 'triton'))

    # Evaluation and output
    eval_samples: int = option(
        256, "Held-out problems (of each --eval-task set) scored before and after training, "
             "greedily or with --eval-k samples each. [default: 256]")
    eval_every: int = option(
        0, "Also score held-out accuracy every N steps; 0 = only before/after.")
    eval_k: int = option(
        1, "Samples per held-out problem: 1 scores greedy accuracy; K > 1 scores mean@K, the "
           "share of K samples at --eval-temperature that are right (avg@K: less noise on small "
           "test sets such as amc23, and the protocol of papers that sample); with an --env, "
           "the share of K sampled episodes a task that succeed. [default: 1]")
    eval_temperature: float | None = option(
        None, "Sampling temperature of the held-out samples when --eval-k > 1. [default: "
              "--temperature]")
    eval_task: list[str] = option(
        list, "Held-out sets to score instead of the task's own test rows (repeatable or "
              "comma-separated): tasks, test sets (math500, olympiadbench, amc23, aime24, "
              "aime25), datasets, or paper-math (math500, gsm8k, olympiadbench, amc23: the "
              "paper's math score). The held-out score is the mean of their accuracies; each "
              "is reported too. [default: the task's test rows]")
    output: str | None = option(
        None, "Directory for the trained layer, its run config, metrics and reward plot. [default: "
              "runs/MODEL-LLAYER-TIME]")
    metrics: str | None = option(
        None, "JSONL file with one metrics object per step. [default: OUTPUT/metrics.jsonl]")

    # Checkpoints and failures
    save_every: int = option(
        50, "Write a training checkpoint (layer, AdamW state, step, data position, random states, "
            "metrics) to OUTPUT/checkpoints every N steps; the last step is always saved. 0 = only "
            "the last. [default: 50]")
    keep: int = option(
        2, "Training checkpoints kept, newest first; 0 = all. [default: 2]")
    resume: str | None = option(
        None,
        "Continue a run exactly: a checkpoint directory, a run's output directory (its newest "
        "checkpoint), or 'auto' (the newest in --output; a fresh start when there is none). "
        "Options typed beside it change the run where that is safe (e.g. --steps).")
    patch: str | None = option(
        None, "Start from a trained layer (a run directory or checkpoint) instead of the base "
              "model's; --model and --layer default to the patch's, and a patch made on another base "
              "model is refused.")
    max_bad_steps: int = option(
        5, "Stop (with a checkpoint) after this many steps in a row whose loss or gradient was "
           "NaN/Inf; such steps are skipped. [default: 5]")

    # Watching the run
    report_to: list[str] = option(
        list, "Also log each step's metrics (memory, learning rate and per-reward means "
              "included) to tensorboard (OUTPUT/tensorboard) and/or wandb (repeatable; optional "
              "extras: pip install 'onelayer[tensorboard]' or 'onelayer[wandb]'; "
              "WANDB_MODE=offline works). [default: none]",
        choices=("tensorboard", "wandb", "none"))
    log_completions: int = option(
        0, "Every N steps, write prompts, completions, rewards and advantages of a few groups "
           "to OUTPUT/completions.jsonl and the dashboards. 0 = never. [default: 0]")

    @property
    def aggregation(self) -> str:
        return self.loss_agg or ALGO_AGGREGATION[self.algo]

    @property
    def reward_scaling(self) -> str:
        return self.scale_rewards or ALGO_SCALING[self.algo]


# The presets of --algo (docs/algorithms.md); --loss-agg and --scale-rewards override them.
ALGO_AGGREGATION = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                    "gigpo": "token-mean"}
ALGO_SCALING = {"grpo": "group", "dr_grpo": "none", "gigpo": "group"}

# The packaged demo is a 1.6M-parameter model on a 2-core CPU: larger steps, short answers.
DEMO_PRESET = dict(steps=200, prompts_per_step=16, group_size=8, lr=1e-3, max_new_tokens=8,
                   eval_samples=256)

FIELDS = {f.name: f for f in fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a TOML or YAML file, normalised to field names (dashes become underscores)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            raise UserError(f"config {path}: use a .toml, .yaml or .yml file")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"config {path} is malformed: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a table of options at the top level")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(overrides: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """defaults <- demo preset (when the model is the demo) <- the resumed run's config
    <- config file <- explicit overrides."""
    values = read_config_file(config_file) if config_file else {}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"config {config_file}: unknown option {unknown[0]!r} "
                        f"(known: {', '.join(FIELDS)})")
    values.update(overrides)
    if values.get("resume"):
        values = resumed_values(values)
    if values.get("patch") and not values.get("resume"):
        values = patched_values(values)
    from .model.load import env_demo_values
    values = env_demo_values(values)   # --env without --model: the packaged agent demo
    if values.get("model", TrainConfig.model) == TrainConfig.model:
        values = {**DEMO_PRESET, **values}
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


# What a resumed run must share with the run it continues: the model, what is trained, the
# data and how it is drawn and scored. Everything else (more steps, another learning rate,
# smaller batches) may change, and the change is printed.
RESUME_FIXED = ("model", "layer", "task", "prompt_field", "answer_field", "tests_field",
                "entry_point_field", "dataset_config", "split", "test_split", "test_size",
                "system_prompt", "format_bonus", "reward", "reward_weight", "algo", "env",
                "history_turns", "prompts_per_step", "group_size", "seed", "frozen_dtype", "chat",
                "chat_template_kwargs", "max_prompt_tokens", "eval_task", "eval_k",
                "eval_temperature")


def resumed_values(values: dict[str, Any]) -> dict[str, Any]:
    """`values` over the config of the run that --resume continues; resume becomes the
    checkpoint's path (None for `auto` when the output directory has none yet)."""
    from .checkpoint import CONFIG_FILE, resolve_resume

    checkpoint = resolve_resume(str(values["resume"]), values.get("output"))
    if checkpoint is None:
        return {**values, "resume": None}
    saved = json.loads((checkpoint / CONFIG_FILE).read_text())
    saved = {k: v for k, v in saved.items() if k in FIELDS and k not in ("resume", "output")}
    for name in RESUME_FIXED:
        if name in values and _coerce(name, values[name]) != saved.get(name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"cannot resume {checkpoint} with {flag} {values[name]!r}: that run had "
                            f"{saved.get(name)!r}, and {flag} must stay the same")
    return {**saved, **values, "resume": str(checkpoint)}


def patched_values(values: dict[str, Any]) -> dict[str, Any]:
    """--patch: the model and layer default to the patch's own (its manifest)."""
    from .export import read_manifest

    manifest = read_manifest(Path(values["patch"]))
    if len(manifest["layers"]) != 1:
        raise UserError(f"--patch {values['patch']} holds layers {manifest['layers']}; "
                        "training continues one layer")
    return {"model": manifest["base_model"], "layer": str(manifest["layers"][0]), **values}


def resume_changes(cfg: TrainConfig, saved: dict[str, Any]) -> list[str]:
    """The options a resumed run changes, as 'name: old -> new'."""
    ignore = ("resume", "output", "metrics")
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k in saved and k not in ignore and saved[k] != v]


def config_options(names: tuple[str, ...] | None = None):
    """Click options for TrainConfig's fields (all, or `names`), in declaration order. Every
    default is None here, so that only what the user typed overrides config files and presets."""
    import click

    def decorate(command):
        for f in reversed(fields(TrainConfig)):
            if names is not None and f.name not in names:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind, item = option_type(f.name)
            choices = f.metadata["choices"]
            if kind is bool:
                decls, click_type = [f"{flag}/--no-{flag[2:]}"], None
            else:
                decls = [flag]
                click_type = click.Choice(choices) if choices else {
                    int: int, float: float, list: item, dict: str}.get(kind, str)
            command = click.option(*decls, f.name, type=click_type, default=None,
                                   multiple=kind is list, help=f.metadata["help"])(command)
        return command
    return decorate


def option_type(name: str) -> tuple[type, type | None]:
    """(kind, item kind) of option `name` from its annotation: `int | None` -> (int, None),
    `list[str]` -> (list, str), `dict` -> (dict, None)."""
    hint = HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list, typing.get_args(hint)[0]
    return hint, None


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    kind, item = option_type(name)
    try:
        if kind is dict:
            return _json_object(name, value)
        if kind is list:
            values = [value] if isinstance(value, (str, int, float)) else list(value)
            return [_scalar(item, v) for v in values]
        return _scalar(kind, value)
    except (TypeError, ValueError):
        what = f"a list of {item.__name__}" if kind is list else kind.__name__
        raise UserError(f"option {name}: expected {what}, got {value!r}") from None


def _scalar(kind: type, value: Any) -> Any:
    """A config file's or the command line's value as `kind`; ValueError if it is not one."""
    if isinstance(value, (list, dict)):
        raise ValueError
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in ("true", "1", "yes", "false", "0", "no"):
            raise ValueError
        return text in ("true", "1", "yes")
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise ValueError
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if kind is float:
        return float(value)
    return str(value)   # a TOML `layer = 3` is the layer "3"


def _json_object(name: str, value: Any) -> dict:
    """A table from a config file, or a JSON object typed on the command line."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, dict):
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"enable_thinking\": false}}' "
                        f"(got {value!r})")
    return value


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise UserError(message)

    need(cfg.algo in ALGOS, f"unknown --algo {cfg.algo!r} (choose {', '.join(ALGOS)})")
    need(cfg.loss_agg in (None, *AGGREGATIONS),
         f"unknown --loss-agg {cfg.loss_agg!r} (choose {', '.join(AGGREGATIONS)})")
    need(cfg.group_size >= 2, f"--group-size must be at least 2 (got {cfg.group_size}): "
         "group-relative advantages need several samples per prompt")
    need(cfg.steps >= 0, "--steps must be >= 0")
    need(cfg.prompts_per_step >= 1, "--prompts-per-step must be >= 1")
    need(cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
    need(cfg.epochs >= 1, "--epochs must be >= 1")
    need(cfg.minibatch >= 0, "--minibatch must be >= 0")
    need(cfg.micro_batch >= 0, "--micro-batch must be >= 0")
    need(cfg.generation_batch >= 0, "--generation-batch must be >= 0")
    need(cfg.lr > 0, "--lr must be positive")
    need(cfg.warmup_steps >= 0 and 0 <= cfg.warmup_ratio < 1,
         "--warmup-steps must be >= 0 and --warmup-ratio in [0, 1)")
    need(cfg.beta >= 0, "--beta must be >= 0")
    need(0 <= cfg.eps_low < 1 and cfg.eps_high >= 0, "--eps-low must be in [0, 1), --eps-high >= 0")
    need(cfg.temperature > 0, "--temperature must be positive")
    need(0 < cfg.top_p <= 1, "--top-p must be in (0, 1]")
    need(cfg.top_k >= 0, "--top-k must be >= 0")
    need(cfg.tis_cap >= 0, "--tis-cap must be >= 0 (0: off)")
    need(0 <= cfg.overlong_buffer <= cfg.max_new_tokens,
         "--overlong-buffer must be between 0 (off) and --max-new-tokens")
    need(not (cfg.env and cfg.overlong_buffer),
         "--overlong-buffer applies to single-turn tasks, not to an --env")
    need(cfg.tis_cap == 0 or (cfg.top_k == 0 and cfg.top_p == 1.0),
         "--tis-cap compares the sampler's log-probs with the trainer's: it needs --top-k 0 and "
         "--top-p 1 (filtered sampling draws from another distribution)")
    need(cfg.loss_impl in ("auto", "torch", "triton"), "--loss-impl must be auto, torch or triton")
    need(cfg.scale_rewards in (None, *SCALE_REWARDS),
         f"unknown --scale-rewards {cfg.scale_rewards!r} (choose {', '.join(SCALE_REWARDS)})")
    need(cfg.adv_norm in ("std", "mean"), "--adv-norm must be std or mean")
    need(cfg.max_turns >= 1, "--max-turns must be >= 1")
    need(cfg.history_turns is None or cfg.history_turns >= 0, "--history-turns must be >= 0")
    need(cfg.history_turns is None or cfg.env is not None, "--history-turns applies to an --env")
    need(cfg.test_size is None or cfg.test_size > 0, "--test-size must be positive")
    need(0 <= cfg.gamma <= 1, "--gamma must be in [0, 1]")
    need((cfg.algo == "gigpo") == (cfg.env is not None),
         "--algo gigpo trains on a multi-turn --env, and an --env needs --algo gigpo")
    need(cfg.eval_samples >= 0 and cfg.eval_every >= 0, "--eval-samples/--eval-every must be >= 0")
    need(cfg.eval_k >= 1, "--eval-k must be >= 1")
    need(cfg.eval_temperature is None or cfg.eval_temperature > 0,
         "--eval-temperature must be positive")
    need(not (cfg.env and cfg.eval_task),
         "--eval-task applies to single-turn tasks; an --env scores its own held-out tasks")
    need(all(cfg.stop), "--stop: a stop string cannot be empty")
    need(cfg.max_prompt_tokens >= 0, "--max-prompt-tokens must be >= 0 (0: no limit)")
    need(len(cfg.reward_weight) in (0, len(cfg.reward)), "--reward-weight: give one weight per --reward")
    need(cfg.reward_timeout is None or cfg.reward_timeout > 0, "--reward-timeout must be positive")
    need(cfg.save_every >= 0 and cfg.keep >= 0, "--save-every and --keep must be >= 0")
    need(cfg.max_bad_steps >= 1, "--max-bad-steps must be >= 1")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be positive seconds (got {cfg.dist_timeout:g})")
    need(not (cfg.env and (cfg.max_prompt_tokens or cfg.mask_truncated)),
         "--max-prompt-tokens and --mask-truncated apply to single-turn tasks, not to an --env")


def task_options(cfg) -> dict[str, Any]:
    """The load_task options that the user set (None means the task's default)."""
    size = cfg.test_size
    options = dict(prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                   tests_field=cfg.tests_field, entry_point_field=cfg.entry_point_field,
                   config=cfg.dataset_config, split=cfg.split, test_split=cfg.test_split,
                   test_size=int(size) if size is not None and size >= 1 else size,
                   system_prompt=cfg.system_prompt, format_bonus=cfg.format_bonus)
    return {k: v for k, v in options.items() if v is not None}


def reward_options(cfg) -> dict[str, Any]:
    """load_task's reward plug-in options (train only: eval scores with the task's own reward)."""
    return {"rewards": list(cfg.reward), "reward_weights": list(cfg.reward_weight),
            "reward_timeout": cfg.reward_timeout} if cfg.reward else {}


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)
