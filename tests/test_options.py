"""Options are declared once (TrainConfig): every field is a `train` option and a config-file
key with the same type; the learning-rate schedule has the values transformers gives."""
import dataclasses

import click
import pytest
import torch

from onelayer.cli import cli
from onelayer.config import TrainConfig, build_config, option_type
from onelayer.errors import UserError
from onelayer.train import lr_schedule

# A value of each kind that differs from every default (the parsed value must round-trip).
SAMPLES = {int: ("7", 7), float: ("0.25", 0.25), str: ("abc", "abc"), bool: (None, True),
           dict: ('{"a": 1}', {"a": 1})}


def sample(name: str):
    kind, item = option_type(name)
    f = TrainConfig.__dataclass_fields__[name]
    if f.metadata["choices"]:
        choice = next(c for c in f.metadata["choices"] if c != f.default)
        return ([choice], [choice]) if kind is list else (choice, choice)
    if kind is list:
        text, value = SAMPLES[item]
        return [text, text], [value, value]
    return SAMPLES[kind]


def parsed_train_options(args: list[str]) -> dict:
    """What the `train` command hands to build_config for these arguments."""
    from onelayer.cli import _given
    params = cli.commands["train"].make_context("train", args).params
    return _given({k: v for k, v in params.items() if k not in ("config_file", "quiet")})


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_field_is_an_option_and_a_config_key(name, tmp_path):
    typed, value = sample(name)
    flag = "--" + name.replace("_", "-")
    args = [flag] if typed is None else (
        [a for t in typed for a in (flag, t)] if isinstance(typed, list) else [flag, typed])
    options = parsed_train_options(args)
    assert set(options) == {name}
    assert getattr(_config_of(options), name) == value
    # The same key in a config file, dashes or underscores.
    config = tmp_path / "run.yaml"
    import yaml
    config.write_text(yaml.safe_dump({name.replace("_", "-"): value}))
    assert getattr(_config_of({}, config), name) == value


# Options that are valid only beside another one.
CONTEXT = {"reward_weight": {"reward": ["task", "task"]}, "env": {"algo": "gigpo"},
           "history_turns": {"algo": "gigpo", "env": "gridworld"}}
# Options naming a directory: "abc" is not one, and saying so shows the value was read.
DIRECTORIES = {"resume", "patch"}


def _config_of(options, path=None):
    name = next(iter(options), None) or next(iter(__import__("yaml").safe_load(path.read_text())))
    name = name.replace("-", "_")
    if name in DIRECTORIES:
        with pytest.raises(UserError, match="abc"):
            build_config(options, path and str(path))
        return dataclasses.replace(TrainConfig(), **{name: "abc"})
    return build_config({**CONTEXT.get(name, {}), **options}, path and str(path))


def test_help_lists_every_field():
    text = cli.commands["train"].get_help(click.Context(cli.commands["train"]))
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_a_mistyped_value_is_one_line():
    with pytest.raises(UserError, match="option steps: expected int, got 'many'"):
        build_config({"steps": "many"})
    with pytest.raises(UserError, match="option reward_weight: expected a list of float"):
        build_config({"reward": ["math"], "reward_weight": ["heavy"]})


@pytest.mark.parametrize("name, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.853553, 0.5, 0.146447]),
])
def test_lr_schedule_values_and_resume(name, expected):
    cfg = build_config({"lr": 1.0, "steps": 6, "lr_scheduler": name, "warmup_steps": 2})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = lr_schedule(optimizer, cfg, done_steps=0)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, abs=1e-6)
    # A resumed run rebuilds the schedule at its step.
    again = lr_schedule(torch.optim.AdamW([param], lr=1.0), cfg, done_steps=4)
    assert again.get_last_lr()[0] == pytest.approx(expected[4], abs=1e-6)


def test_warmup_ratio_counts_in_steps():
    cfg = build_config({"lr": 1.0, "steps": 10, "warmup_ratio": 0.2})
    scheduler = lr_schedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg,
                            done_steps=1)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)
