"""The run configuration: one typed record, from defaults <- preset <- config file <- CLI."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

ALGOS = ("grpo", "dr_grpo", "gigpo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class TrainConfig:
    """Defaults suit a real model (the paper's AdamW learning rate 5e-6, no KL, clip 0.2)."""
    model: str = "demo"                # hub id, local directory, or "demo" (the packaged tiny model)
    layer: str = "mid"                 # index, "a,b,c", "mid", "mid-k", "auto" or "all"
    task: str = "arithmetic"
    # Dataset tasks (onelayer.tasks.load_task): where the data is and which fields hold what.
    prompt_field: str | None = None
    answer_field: str | None = None
    tests_field: str | None = None
    entry_point_field: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    test_split: str | None = None
    test_size: float | None = None    # rows held out of train (or a fraction < 1) without a test split
    system_prompt: str | None = None
    format_bonus: float | None = None  # math: reward for an extractable final answer
    reward: list[str] = field(default_factory=list)          # reward specs (docs/tasks.md); empty: the task's own
    reward_weight: list[float] = field(default_factory=list)  # one per reward, same order; empty: 1 each
    reward_timeout: float | None = None                       # seconds per plug-in call; None: 30
    algo: str = "grpo"
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 5e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_agg: str | None = None        # None: the algorithm's own aggregation
    scale_rewards: str | None = None   # group | batch | none; None: the algorithm's own
    dynamic_sampling: bool = False     # DAPO: drop groups whose rewards are all equal, refill
    env: str | None = None             # multi-turn environment (built-in name or module:Class)
    max_turns: int = 20                # per episode (multi-turn)
    gamma: float = 0.95                # GiGPO step-return discount
    omega: float = 1.0                 # GiGPO weight of the step-level advantage
    adv_norm: str = "std"              # GiGPO F_norm: std or mean (divide by 1)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0: no top-k filtering
    chat: bool | None = None           # chat template: True always, False never, None the task's
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": False}
    stop: list[str] = field(default_factory=list)  # a completion ends after any of these strings
    max_prompt_tokens: int = 0         # longer prompts are dropped (0: no limit)
    mask_truncated: bool = False       # completions cut at max_new_tokens carry no loss
    epochs: int = 1                    # PPO epochs over each rollout batch
    minibatch: int = 0                 # sequences per optimizer step; 0: the whole batch
    micro_batch: int = 0               # sequences per forward/backward (exact); 0: the minibatch
    generation_batch: int = 0          # rows per generate call (whole groups); 0: all at once
    max_memory: str | None = None      # GPU budget, e.g. "22GiB"; None: the device's free memory
    seed: int = 0
    frozen_dtype: str | None = None    # None: nf4 on GPU, fp32 on CPU
    device: str | None = None          # None: cuda when available
    attn: str = "sdpa"
    loss_impl: str = "auto"            # auto: Triton on CUDA, torch elsewhere
    eval_samples: int = 256            # held-out problems scored greedily before and after
    eval_every: int = 0                # also score every N steps (0: only before and after)
    output: str | None = None          # directory for the trained layer, metrics and plot
    metrics: str | None = None         # JSONL metrics file (default: OUTPUT/metrics.jsonl)
    save_every: int = 50               # a training checkpoint every N steps (0: only the last)
    keep: int = 2                      # training checkpoints kept (0: all)
    resume: str | None = None          # a checkpoint, a run directory, or "auto" (in --output)
    patch: str | None = None           # start from a trained layer (a patch) of the same model
    max_bad_steps: int = 5             # stop after this many NaN/Inf steps in a row
    report_to: list[str] = field(default_factory=list)  # tensorboard / wandb / none; empty: none
    log_completions: int = 0           # every N steps, sampled completions to OUTPUT/completions.jsonl

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
                "system_prompt", "format_bonus", "reward", "reward_weight", "algo", "env", "prompts_per_step", "group_size",
                "seed", "frozen_dtype", "chat", "chat_template_kwargs", "max_prompt_tokens")


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


def _coerce(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    if value is None:
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("str"):
            return str(value)
        if kind == "dict":
            return _json_object(name, value)
        if kind == "list[float]":
            values = [value] if isinstance(value, (int, float, str)) else list(value)
            return [float(v) for v in values]
        if kind == "list[str]":
            values = [value] if isinstance(value, str) else list(value)
            if all(isinstance(v, str) for v in values):
                return values
    except (TypeError, ValueError):
        pass
    raise UserError(f"option {name}: expected {kind.split(' ')[0]}, got {value!r}")


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
    need(cfg.beta >= 0, "--beta must be >= 0")
    need(0 <= cfg.eps_low < 1 and cfg.eps_high >= 0, "--eps-low must be in [0, 1), --eps-high >= 0")
    need(cfg.temperature > 0, "--temperature must be positive")
    need(0 < cfg.top_p <= 1, "--top-p must be in (0, 1]")
    need(cfg.top_k >= 0, "--top-k must be >= 0")
    need(cfg.loss_impl in ("auto", "torch", "triton"), "--loss-impl must be auto, torch or triton")
    need(cfg.scale_rewards in (None, *SCALE_REWARDS),
         f"unknown --scale-rewards {cfg.scale_rewards!r} (choose {', '.join(SCALE_REWARDS)})")
    need(cfg.adv_norm in ("std", "mean"), "--adv-norm must be std or mean")
    need(cfg.max_turns >= 1, "--max-turns must be >= 1")
    need(cfg.test_size is None or cfg.test_size > 0, "--test-size must be positive")
    need(0 <= cfg.gamma <= 1, "--gamma must be in [0, 1]")
    need((cfg.algo == "gigpo") == (cfg.env is not None),
         "--algo gigpo trains on a multi-turn --env, and an --env needs --algo gigpo")
    need(cfg.eval_samples >= 0 and cfg.eval_every >= 0, "--eval-samples/--eval-every must be >= 0")
    need(all(cfg.stop), "--stop: a stop string cannot be empty")
    need(cfg.max_prompt_tokens >= 0, "--max-prompt-tokens must be >= 0 (0: no limit)")
    need(len(cfg.reward_weight) in (0, len(cfg.reward)), "--reward-weight: give one weight per --reward")
    need(cfg.reward_timeout is None or cfg.reward_timeout > 0, "--reward-timeout must be positive")
    need(cfg.save_every >= 0 and cfg.keep >= 0, "--save-every and --keep must be >= 0")
    need(cfg.max_bad_steps >= 1, "--max-bad-steps must be >= 1")
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
