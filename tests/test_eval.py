"""`onelayer eval`: pass@k, determinism, JSON output and its errors."""
import json

import pytest

from onelayer.checkpoint import save_layer
from onelayer.errors import UserError
from onelayer.evaluate import EvalConfig, run_eval
from onelayer.model import load_policy


def test_pass_at_k_is_deterministic_for_a_seed(tmp_path):
    def run(name, seed):
        result = run_eval(EvalConfig(samples=16, k=4, seed=seed, output=str(tmp_path / name)),
                          progress=False, echo=lambda _: None)
        return result, json.loads((tmp_path / name).read_text())

    a, record_a = run("a.json", 0)
    b, record_b = run("b.json", 0)
    _, record_c = run("c.json", 1)
    assert record_a["per_problem"] == record_b["per_problem"] and a.score == b.score
    assert record_a["per_problem"] != record_c["per_problem"]
    assert record_a["metric"] == "pass@4" and record_a["problems"] == 16
    for problem in record_a["per_problem"]:
        assert len(problem["completions"]) == 4
        assert problem["solved"] == (max(problem["rewards"]) >= 1)
    assert a.score == sum(p["solved"] for p in record_a["per_problem"]) / 16
    # pass@4 can only be at least the share of single samples that are right
    assert a.score >= a.mean_reward


def test_greedy_eval_prints_a_table(tmp_path):
    lines = []
    result = run_eval(EvalConfig(samples=8, output=str(tmp_path / "g.json")), progress=False,
                      echo=lines.append)
    assert result.metric == "greedy accuracy"
    header, row = lines[0].splitlines()
    assert header.split()[:3] == ["model", "task", "problems"]
    assert "arithmetic" in row and f"{result.score:.1%}" in row
    assert lines[1].startswith("wrote ")


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
