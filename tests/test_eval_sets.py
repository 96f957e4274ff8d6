"""--eval-task: a run scored on several held-out sets (the paper's S is a mean over benchmarks),
and `onelayer eval` of a list or of the sets a run scored."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from onelayer.config import build_config
from onelayer.evaluate import HeldOut, describe_sets, evaluate, held_out_metric
from onelayer.model import load_policy
from onelayer.single_turn import prompt_style
from onelayer.tasks import load_task

from conftest import run_cli


def test_the_held_out_score_is_the_mean_of_each_set_scored_alone():
    cfg = build_config({})   # the demo: its model, task, prompts and generation length
    policy = load_policy(cfg.model, layer=3, device="cpu")
    style = prompt_style(cfg)
    task = load_task(cfg.task)
    first = dataclasses.replace(task, name="first", test=task.test[:9])
    second = dataclasses.replace(task, name="second", test=task.test[9:25])
    held_out = HeldOut.build(policy.tokenizer, [first, second], style, cfg.eval_samples,
                             cfg.max_prompt_tokens, cfg.model)
    assert held_out.problems == 25
    options = dict(max_new_tokens=cfg.max_new_tokens, seed=0, style=style, stop=())
    score = held_out.score(policy.split.lm, policy.tokenizer, batch_size=64, **options)
    alone = {t.name: evaluate(policy.split.lm, policy.tokenizer, t, list(t.test), **options).score
             for t in (first, second)}
    assert held_out.last == alone
    assert score == pytest.approx((alone["first"] + alone["second"]) / 2)
    # The demo solves some but not all of them, unevenly: a mean over the 25 problems would differ.
    assert 0 < alone["first"] != alone["second"] < 1
    assert describe_sets(held_out.last) == (f"mean of first {alone['first']:.1%}, "
                                            f"second {alone['second']:.1%}")
    assert describe_sets({"first": 0.5}) == ""


def test_eval_k_scores_mean_at_k_of_sampled_problems_with_the_same_samples_each_time():
    cfg = build_config({"eval_k": 4, "eval_temperature": 1.5})
    assert held_out_metric(cfg) == ("mean@4", "4 samples a problem at temperature 1.5")
    assert held_out_metric(build_config({"temperature": 0.7, "eval_k": 2}))[1].endswith("0.7")
    policy = load_policy(cfg.model, layer=3, device="cpu")
    style = prompt_style(cfg)
    task = load_task(cfg.task)
    sets = [dataclasses.replace(task, name="first", test=task.test[:6]),
            dataclasses.replace(task, name="second", test=task.test[6:16])]
    held_out = HeldOut.build(policy.tokenizer, sets, style, cfg.eval_samples, 0, cfg.model)
    options = dict(max_new_tokens=cfg.max_new_tokens, seed=3, style=style, stop=(), k=4,
                   temperature=1.5)
    # The samples depend on the batches they are drawn in: the same batch size as `evaluate`'s.
    score = held_out.score(policy.split.lm, policy.tokenizer, batch_size=64, **options)
    alone = {t.name: evaluate(policy.split.lm, policy.tokenizer, t, list(t.test), **options)
             for t in sets}
    assert held_out.last == {name: r.mean_at_k for name, r in alone.items()}
    assert score == pytest.approx(sum(held_out.last.values()) / 2)
    # Some samples are right, not all; pass@4 counts problems any sample solved.
    assert 0 < score < 1 and any(r.mean_at_k < r.score for r in alone.values())
    # The same seed, the same samples: scores before and after training share them.
    assert held_out.score(policy.split.lm, policy.tokenizer, batch_size=64, **options) == score


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_scores_every_eval_task_and_eval_of_the_patch_reproduces_them(tiny_models,
                                                                            tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"q": f"what is {i} plus {i}", "sol": f"#### {2 * i}"} for i in range(12)])
    sums = write_jsonl(tmp_path / "sums.jsonl", [
        {"question": f"add {i} and {i + 1}", "answer": str(2 * i + 1)} for i in range(5)])
    products = write_jsonl(tmp_path / "products.jsonl", [
        {"problem": f"multiply {i} by 3", "answer": str(3 * i)} for i in range(5)])
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        ["train", "--model", tiny_models["qwen3"], "--task", data, "--prompt-field", "q",
         "--answer-field", "sol", "--test-size", "4", "--eval-task", f"{sums},{products}",
         "--eval-task", sums, "--steps", "2", "--eval-every", "1", "--prompts-per-step", "2",
         "--group-size", "2", "--max-new-tokens", "4", "--eval-samples", "3", "--lr", "1e-4",
         "--output", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    scores = json.loads((out / "manifest.json").read_text())["scores"]
    assert list(scores["sets"]) == [sums, products] and scores["held_out"] == 6
    for when in ("before", "after"):
        each = [scores["sets"][name][when] for name in (sums, products)]
        assert scores[when] == pytest.approx(sum(each) / 2)
    assert re.search(r"held-out accuracy before: .*mean of .*sums\.jsonl .*products\.jsonl",
                     stdout)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval_accuracy"] == pytest.approx(
        (first[f"eval_accuracy/{sums}"] + first[f"eval_accuracy/{products}"]) / 2)

    # `onelayer eval --patch` scores the sets the run scored, with the run's options.
    code, stdout, stderr = run_cli(["eval", "--patch", str(out), "--samples", "3", "--quiet"],
                                   capsys)
    assert code == 0, stderr
    header, *rows, wrote = stdout.splitlines()
    assert [re.split(r"\s{2,}", r.strip())[1] for r in rows] == [sums, products, "mean"]
    written = Path(wrote.removeprefix("wrote "))
    assert written.parent == out and written.name.startswith("eval-")
    record = json.loads(written.read_text())
    assert [t["task"] for t in record["tasks"]] == [sums, products]
    assert [t["score"] for t in record["tasks"]] == [scores["sets"][n]["after"]
                                                     for n in (sums, products)]
    assert record["score"] == pytest.approx(scores["after"])


def test_eval_task_input_errors_exit_2_before_loading(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "what is one", "answer": "1"}] * 6)
    cases = [
        (["train", "--task", "amc23"], "task amc23 is a test set with nothing to train on"),
        (["train", "--task", data, "--eval-task", "amc24"], "unknown task 'amc24'"),
        (["train", "--env", "gridworld", "--eval-task", "gsm8k"], "--eval-task applies to"),
        (["train", "--eval-k", "0"], "--eval-k must be >= 1"),
        # the demo's tokenizer writes digits and signs, not a math dataset's prompts
        (["train", "--eval-task", data], "its tokenizer has no token for"),
        (["eval", "--task", f"arithmetic,{tmp_path / 'missing.jsonl'}"], "does not exist"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_cli(args + ["--output", str(tmp_path / "never"), "--quiet"],
                                       capsys)
        assert code == 2, (args, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "never").exists()


def test_the_training_task_carries_its_reward_plugins():
    """One loader for every command that trains: --reward used to be dropped by contribution
    and the probe, which then trained and ranked layers on the task's own reward."""
    from onelayer.single_turn import load_training_task

    task = load_training_task(build_config({"reward": ["task", "length"],
                                            "reward_weight": [1.0, 0.5]}))
    assert task.scorer is not None
    assert load_training_task(build_config({})).scorer is None


def test_a_run_with_eval_k_reports_mean_at_k(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["train", "--steps", "1", "--eval-samples", "6", "--eval-k",
                                    "3", "--output", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert re.search(r"held-out mean@3 before: [\d.]+% \(6 held out, 3 samples a problem at "
                     r"temperature 1\)", stdout), stdout
    scores = json.loads((out / "manifest.json").read_text())["scores"]
    assert scores["metric"] == "mean@3" and scores["held_out"] == 6
    # `onelayer eval --patch` samples as the run did: 3 a problem at its temperature, from the
    # same seed in one batch, so its mean@3 is the run's score after training.
    code, stdout, stderr = run_cli(["eval", "--patch", str(out), "--samples", "6",
                                    "--output", str(tmp_path / "e.json"), "--quiet"], capsys)
    assert code == 0, stderr
    record = json.loads((tmp_path / "e.json").read_text())
    assert (record["k"], record["metric"]) == (3, "pass@3")
    assert record["mean_at_k"] == scores["after"]
    assert "mean@3" in stdout.splitlines()[0]


def test_an_environment_run_with_eval_k_scores_the_success_share_of_sampled_episodes():
    import torch

    from onelayer.agentic import HELD_OUT_SEED, agentic_job, success_rate
    from onelayer.update import build_objective

    cfg = build_config({"env": "gridworld", "eval_k": 3, "eval_temperature": 1.3,
                        "eval_samples": 4})
    assert held_out_metric(cfg) == ("mean@3 success rate", "3 episodes a task at temperature 1.3")
    policy = load_policy(cfg.model, layer=cfg.layer, device="cpu")
    job = agentic_job(policy, torch.optim.SGD(policy.layer.parameters(), lr=0.0), cfg,
                      build_objective(cfg, policy.device), torch.Generator())
    score = job.score("test")
    seeds = [HELD_OUT_SEED + i for i in range(4) for _ in range(3)]
    expected = success_rate(policy, dataclasses.replace(cfg, temperature=1.3), seeds,
                            greedy=False, generator=torch.Generator().manual_seed(cfg.seed))
    assert job.metric == "mean@3 success rate" and score == expected == job.score("again")
    assert 0 < score < 1 and 12 * score == pytest.approx(round(12 * score))   # of 12 episodes
