"""--seed: the run's own random stream, which evals never touch."""
import dataclasses
import json

import pytest
import torch

from onelayer.checkpoint import load_layer
from onelayer.config import build_config
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.train import train

TIMING = {"step_s", "gen_s", "update_s", "tokens_per_s", "rss_gib", "peak_mem_gib"}


@pytest.fixture
def recorded_task(monkeypatch):
    """`train` gets one training problem (the same prompts at every step, whatever the seed)
    with a reward that differs between completions, so that updates depend on the samples.
    Returns the list of training completions the reward saw."""
    base = arithmetic_task(n_train=1, n_test=8)
    seen = []

    def reward(completion, row):
        if row in base.train:
            seen.append(completion)
        return float(len(completion) % 2)

    task = dataclasses.replace(base, reward=reward)
    monkeypatch.setattr("onelayer.train.load_training_task", lambda cfg: task)
    return seen


def run(tmp_path, name, model, **options):
    """(metrics rows without timings and evals, final layer weights) of a short run."""
    cfg = build_config({"model": model, "steps": 3, "prompts_per_step": 2, "group_size": 4,
                        "max_new_tokens": 4, "eval_samples": 8, "lr": 1e-2, "temperature": 1.5,
                        "output": str(tmp_path / name), **options})
    train(cfg, progress=False, echo=lambda _: None)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows = [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("eval_")}
            for r in rows]
    return rows, load_layer(tmp_path / name)[0]


def test_an_eval_in_the_middle_leaves_the_training_run_unchanged(tmp_path, tiny_models,
                                                                 recorded_task):
    plain, plain_weights = run(tmp_path, "plain", tiny_models["qwen3"])
    plain_samples = list(recorded_task)
    recorded_task.clear()
    evaluated, weights = run(tmp_path, "evaluated", tiny_models["qwen3"], eval_every=1)
    raw = (tmp_path / "evaluated" / "metrics.jsonl").read_text()
    assert raw.count("eval_accuracy") == 2                       # after steps 1 and 2
    assert recorded_task == plain_samples and evaluated == plain
    assert any(r["grad_norm"] > 0 for r in plain)                 # the layer did train
    for name, tensor in plain_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_two_seeds_sample_differently_from_the_same_prompts(tmp_path, tiny_models, recorded_task):
    samples = {}
    for name, seed in [("seed0", 0), ("again", 0), ("seed1", 1)]:
        recorded_task.clear()
        run(tmp_path, name, tiny_models["qwen3"], seed=seed)
        samples[name] = list(recorded_task)
    assert len(samples["seed0"]) == 3 * 2 * 4
    assert samples["seed0"] == samples["again"]
    assert samples["seed0"] != samples["seed1"]
