"""`onelayer eval`: pass@k, determinism, JSON output and its errors."""
import json
import re

import pytest

from onelayer.checkpoint import save_layer
from onelayer.errors import UserError
from onelayer.evaluate import EvalConfig, run_eval
from onelayer.model import load_policy


def solves(prompt: str, completion: str) -> bool:
    """Is the completion the answer of the demo's problem "a+b=" / "a-b="? (Worked out here,
    not by the task's reward.)"""
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    answer = int(a) + int(b) if op == "+" else int(a) - int(b)
    return completion.strip() == str(answer)


def test_pass_at_k_is_deterministic_for_a_seed(tmp_path):
    def run(name, seed, k=4):
        (result,) = run_eval(EvalConfig(samples=16, k=k, seed=seed, output=str(tmp_path / name)),
                            progress=False, echo=lambda _: None)
        return result, json.loads((tmp_path / name).read_text())

    a, record_a = run("a.json", 0)
    b, record_b = run("b.json", 0)
    _, record_c = run("c.json", 1)
    assert record_a["per_problem"] == record_b["per_problem"] and a.score == b.score
    assert record_a["per_problem"] != record_c["per_problem"]
    assert record_a["metric"] == "pass@4" and record_a["problems"] == 16
    problems = record_a["per_problem"]
    # Re-score every completion from its prompt, then pass@4 = share of problems with at least
    # one right completion, and the mean reward over all 64 completions.
    right = [[solves(p["prompt"], c) for c in p["completions"]] for p in problems]
    assert all(len(r) == 4 for r in right)
    assert [p["rewards"] for p in problems] == [[float(x) for x in r] for r in right]
    assert a.score == sum(any(r) for r in right) / 16
    assert a.mean_reward == sum(map(sum, right)) / 64
    # mean@4: the share of the 64 samples that are right (what RL papers call avg@k).
    assert [p["samples_solved"] for p in problems] == [sum(r) for r in right]
    assert a.mean_at_k == record_a["mean_at_k"] == sum(map(sum, right)) / 64 < a.score
    assert record_a["score"] == a.score and record_a["mean_reward"] == a.mean_reward

    # The same problems, greedy: pass@4 counts problems that only sampling solved. Measured
    # with the packaged demo model and seed 0: greedy 8/16, pass@4 at temperature 1 10/16.
    greedy, record_g = run("g.json", 0, k=1)
    greedy_right = [solves(p["prompt"], p["completions"][0]) for p in record_g["per_problem"]]
    assert [p["prompt"] for p in record_g["per_problem"]] == [p["prompt"] for p in problems]
    assert greedy.score == greedy.mean_at_k == sum(greedy_right) / 16
    assert any(any(r) and not g for r, g in zip(right, greedy_right))
    assert a.score > greedy.score


def test_greedy_eval_prints_a_table(tmp_path):
    lines = []
    (result,) = run_eval(EvalConfig(samples=8, output=str(tmp_path / "g.json")), progress=False,
                         echo=lines.append)
    assert result.metric == "greedy accuracy"
    header, row = lines[0].splitlines()
    assert header.split()[:3] == ["model", "task", "problems"]
    assert "arithmetic" in row and f"{result.score:.1%}" in row
    assert lines[1].startswith("wrote ")


def test_out_of_memory_halves_the_eval_batch_and_the_scores_stay(tmp_path, monkeypatch):
    """A generation call of more than 3 rows runs out of memory: the batch halves (and stays
    halved), and greedy scoring gives what it gives without the failures."""
    import torch

    from onelayer import evaluate as evaluate_module

    def run(name, lines):
        run_eval(EvalConfig(samples=10, batch_size=8, output=str(tmp_path / name)),
                 progress=False, echo=lines.append)
        return json.loads((tmp_path / name).read_text())["per_problem"]

    plain = run("plain.json", [])
    real = evaluate_module.generate_completions
    calls = []

    def short_of_memory(lm, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(prompts) > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(lm, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_completions", short_of_memory)
    lines = []
    assert run("oom.json", lines) == plain
    assert calls == [8, 4, 2, 2, 2, 2, 2]
    assert lines[:2] == ["out of memory: --batch-size 8 -> 4, retrying",
                         "out of memory: --batch-size 4 -> 2, retrying"]


def test_an_environment_scores_pass_at_k_over_sampled_episodes(tmp_path):
    """`onelayer eval --env gridworld --k 2`: the agent demo plays each held-out task twice; a
    task is solved when one of its episodes is."""
    (result,) = run_eval(EvalConfig(samples=3, k=2, run_options={"env": "gridworld"},
                                    output=str(tmp_path / "env.json")),
                         progress=False, echo=lambda _: None)
    record = json.loads((tmp_path / "env.json").read_text())
    assert record["model"] == "demo-agent" and record["task"] == "env gridworld"
    assert (result.metric, result.problems) == ("pass@2", 3)
    problems = record["per_problem"]
    assert [p["seed"] for p in problems] == [2**31, 2**31 + 1, 2**31 + 2]
    assert all(len(p["episodes"]) == len(p["returns"]) == len(p["turns"]) == 2 for p in problems)
    assert result.score == sum(p["solved"] for p in problems) / 3
    assert result.mean_reward == pytest.approx(sum(sum(p["returns"]) for p in problems) / 6)
    with pytest.raises(UserError, match="unknown environment .nowhere."):
        run_eval(EvalConfig(run_options={"env": "nowhere"}), progress=False, echo=lambda _: None)
    with pytest.raises(UserError, match="model demo: its tokenizer has no token for"):
        run_eval(EvalConfig(model="demo", samples=1, run_options={"env": "gridworld"}),
                 progress=False, echo=lambda _: None)


def test_eval_errors(tmp_path, tiny_models):
    with pytest.raises(UserError, match="run_config.json"):
        run_eval(EvalConfig(layer_checkpoint=str(tmp_path)), progress=False, echo=print)
    # A checkpoint of another layer than the run config says cannot be loaded silently.
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    save_layer(tmp_path / "ck", policy.layer.state_dict(), layer_index=2,
               base_model=tiny_models["qwen3"],
               run_config={"model": tiny_models["qwen3"], "layer": "1", "max_new_tokens": 4},
               step=0)
    with pytest.raises(UserError, match="layer 2"):
        run_eval(EvalConfig(layer_checkpoint=str(tmp_path / "ck"), samples=2), progress=False,
                 echo=print)
    with pytest.raises(UserError):
        run_eval(EvalConfig(samples=0), progress=False, echo=print)


def test_the_table_of_several_sampled_sets_has_mean_at_k_and_a_mean_row():
    from onelayer.evaluate import EvalResult, format_table

    results = [EvalResult("a", 10, 4, 0.5, 0.3, 1.0, mean_at_k=0.25),
               EvalResult("b", 30, 4, 0.7, 0.6, 1.0, mean_at_k=0.45)]
    header, a, b, mean = [re.split(r"\s{2,}", line.strip())
                          for line in format_table([("m", r) for r in results]).splitlines()]
    assert header == ["model", "task", "problems", "metric", "score", "mean@4", "mean reward"]
    assert a == ["m", "a", "10", "pass@4", "50.0%", "25.0%", "0.300"]
    assert mean == ["m", "mean", "40", "pass@4", "60.0%", "35.0%"]   # unweighted over the sets
