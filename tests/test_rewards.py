"""Reward plug-ins (TRL's convention), weights, and what happens when a reward fails."""
import json
import logging
import sys
import time

import pytest

import onelayer.tasks.math as math_module
from onelayer.errors import UserError
from onelayer.tasks import Task, load_task
from onelayer.tasks.rewards import LENGTH_LIMIT, length_penalty, with_rewards

ROWS = [{"question": f"What is {i}+{i}?", "answer": str(2 * i), "source": f"s{i}"}
        for i in range(1, 7)]

PLUGIN = '''
import threading
import time

RELEASE = threading.Event()  # the test sets it so the hung thread can finish
calls = []


def mentions_source(prompts, completions, source, answer, **kwargs):
    """TRL-style: columns arrive as lists; None where it does not apply (answer 4)."""
    calls.append(len(completions))
    return [None if a == "4" else (1.0 if s in c else 0.0)
            for c, s, a in zip(completions, source, answer)]


def explodes(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        raise ValueError("boom in completion")
    return [0.5 for _ in completions]


def hangs(prompts, completions, **kwargs):
    if any("hang" in c for c in completions):
        RELEASE.wait(60)
    return [1.0 for _ in completions]


def wants_ids(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def needs_trainer_state(prompts, completions, trainer_state, **kwargs):
    return [0.0 for _ in completions]
'''


@pytest.fixture
def data(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(PLUGIN)
    return str(path), str(plugin)


def rows_by_answer(task):
    return {r["answer"]: r for r in list(task.train) + list(task.test)}


def test_plugin_by_path_weighted_with_a_builtin(data):
    path, plugin = data
    task = load_task(path, test_size=1, rewards=["math", f"{plugin}:mentions_source"],
                     reward_weights=[1.0, 0.5])
    rows = rows_by_answer(task)
    r2, r4, r6 = rows["2"], rows["4"], rows["6"]
    completions = ["\\boxed{2} from s1", "\\boxed{3} from s1", "\\boxed{4} from s2",
                   "\\boxed{6}", "no answer, s5"]
    batch = [r2, r2, r4, r6, r6]
    scores = task.rewards(completions, batch)
    # math: 1, 0, 1, 1, 0; mentions_source: 1, 1, None (answer 4), 0, 0 (s5 is not row 6's)
    assert scores == [pytest.approx(1.5), pytest.approx(0.5), pytest.approx(1.0),
                      pytest.approx(1.0), 0.0]
    metrics = task.reward_metrics()
    assert metrics["reward/math"] == pytest.approx(3 / 5)
    assert metrics["reward/mentions_source"] == pytest.approx(2 / 4)  # None left out
    assert metrics["reward_errors"] == 0 and metrics["reward_timeouts"] == 0
    assert task.reward_metrics() == {"reward_errors": 0, "reward_timeouts": 0}  # reset
    # evaluation still scores with the task's own reward (what counts as solved)
    assert task.eval_rewards(completions[:2], batch[:2]) == [1.0, 0.0]


def test_module_specs_task_reward_and_length_penalty():
    task = with_rewards(load_task("arithmetic", n_train=50, n_test=5),
                        ["task", "onelayer.tasks.rewards:length_penalty", "format"],
                        [1.0, 2.0, 0.25])
    row = task.train[0]
    long = "x" * (LENGTH_LIMIT + LENGTH_LIMIT // 2)  # task 0, length -0.5, format 0
    assert task.rewards([row["answer"], long, "\\boxed{1}"], [row] * 3) == [
        pytest.approx(1.0), pytest.approx(2 * -0.5), pytest.approx(0.25)]
    assert length_penalty([], ["x" * LENGTH_LIMIT, "x" * (3 * LENGTH_LIMIT)]) == [0.0, -1.0]
    assert set(task.reward_metrics()) == {"reward/task", "reward/length_penalty",
                                          "reward/format", "reward_errors", "reward_timeouts"}


def test_raising_reward_scores_zero_counted_and_logged_once(data, caplog):
    path, plugin = data
    task = load_task(path, test_size=1, rewards=["math", f"{plugin}:explodes"])
    row = rows_by_answer(task)["2"]
    caplog.set_level(logging.ERROR, logger="onelayer.rewards")
    for _ in range(3):
        scores = task.rewards(["\\boxed{2}", "\\boxed{2} boom", "boom"], [row] * 3)
        assert scores == [1.5, 1.0, 0.0]  # math 1, 1, 0 + explodes 0.5, 0 (raised), 0 (raised)
    assert task.reward_metrics()["reward_errors"] == 6
    failures = [r for r in caplog.records if r.name == "onelayer.rewards"]
    assert len(failures) == 1 and "ValueError: boom in completion" in failures[0].getMessage()
    assert "Traceback" in failures[0].getMessage()


def test_hanging_reward_gives_up_within_the_time_limit(data):
    path, plugin = data
    task = load_task(path, test_size=1, rewards=[f"{plugin}:hangs", "math"],
                     reward_timeout=0.5, reward_workers=2)
    row = rows_by_answer(task)["2"]
    start = time.monotonic()
    scores = task.rewards(["\\boxed{2}", "hang \\boxed{2}", "fine"], [row] * 3)
    elapsed = time.monotonic() - start
    assert scores == [2.0, 1.0, 1.0]  # the hung call scores 0; math still counts
    assert elapsed < 5
    metrics = task.reward_metrics()
    assert metrics["reward_timeouts"] == 1 and metrics["reward_errors"] == 1
    # the pool replaced the stuck thread: the next batch is scored as usual
    assert task.rewards(["\\boxed{2}"] * 3, [row] * 3) == [2.0] * 3
    next(module for name, module in sys.modules.items()   # other tests load a my_rewards.py too
         if name.startswith("onelayer_reward_my_rewards") and hasattr(module, "RELEASE")).RELEASE.set()


def test_default_reward_that_raises(caplog):
    def flaky(completion, row):
        if completion == "bad":
            raise RuntimeError("flaky")
        return 1.0

    task = Task("t", [{"q": 1}], [{"q": 1}], prompt=lambda r: "q", reward=flaky)
    caplog.set_level(logging.ERROR, logger="onelayer.rewards")
    assert task.rewards(["ok", "bad", "ok"], [{"q": 1}] * 3) == [1.0, 0.0, 1.0]
    assert task.reward_metrics() == {"reward_errors": 1, "reward_timeouts": 0}
    assert len(caplog.records) == 1


def test_completion_ids_passed_when_given(data):
    path, plugin = data
    task = load_task(path, test_size=1, rewards=[f"{plugin}:wants_ids"])
    row = task.train[0]
    assert task.rewards(["a", "b"], [row, row], completion_ids=[[1, 2, 3], [4]]) == [3.0, 1.0]


def test_bad_specs_are_user_errors(data, tmp_path):
    path, plugin = data
    arithmetic = load_task("arithmetic", n_train=20, n_test=2)
    cases = [(["poetry"], None, "give a built-in"),
             ([f"{tmp_path}/absent.py:f"], None, "does not exist"),
             ([f"{plugin}:nope"], None, "has no function 'nope'"),
             (["no_such_package_xyz.mod:f"], None, "cannot import"),
             ([f"{plugin}:needs_trainer_state"], None, "requires an argument 'trainer_state'"),
             ([f"{plugin}:mentions_source"], None, "requires an argument 'source'"),
             (["math", "format"], [1.0], "2 rewards"),
             ]
    for specs, weights, match in cases:
        with pytest.raises(UserError, match=match):
            with_rewards(arithmetic, specs, weights)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UserError, match="SyntaxError"):
        with_rewards(arithmetic, [f"{broken}:f"])
    with pytest.raises(UserError, match="positive"):
        with_rewards(arithmetic, ["format"], timeout=0)


def test_broken_math_verify_is_an_error_when_the_task_is_built(data, monkeypatch):
    path, _ = data
    monkeypatch.setattr(math_module, "_CHECKED", False)
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` fails
    with pytest.raises(UserError, match="math-verify.*cannot run"):
        load_task(path, test_size=1)
    with pytest.raises(UserError, match="math-verify"):
        with_rewards(load_task("arithmetic", n_train=20, n_test=2), ["math"])
    # a checker that runs but compares wrongly is caught too
    monkeypatch.delitem(sys.modules, "math_verify")
    monkeypatch.setattr(math_module, "_equivalent", lambda gold, pred, timeout: False)
    with pytest.raises(UserError, match="finds .* different"):
        load_task(path, test_size=1)


CONVERSATIONAL = [{"prompt": [{"role": "system", "content": "Answer in a box."},
                              {"role": "user", "content": f"What is {i}+{i}?"}],
                   "solution": str(2 * i)} for i in range(1, 7)]

TRL_STYLE = '''
import json
from pathlib import Path


def boxed_answer(prompts, completions, solution, **kwargs):
    """Written for TRL's conversational datasets: completion[0]["content"], prompt messages."""
    with open(Path(__file__).with_name("seen.jsonl"), "a") as f:
        f.write(json.dumps([prompts, completions]) + "\\n")
    return [float(f"\\\\boxed{{{s}}}" in c[0]["content"]) for c, s in zip(completions, solution)]
'''


def test_conversational_prompts_render_from_their_messages_and_reach_plugins_in_trl_form(
        tmp_path):
    """TRL's conversational datasets: the prompt field holds role / content messages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import char_tokenizer
    from onelayer.prompting import PromptStyle, render_prompt
    from test_prompting import TEMPLATE

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL))
    pq.write_table(pa.Table.from_pylist(CONVERSATIONAL), tmp_path / "chat.parquet")
    plugin = tmp_path / "trl_style.py"
    plugin.write_text(TRL_STYLE)
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    for source in (jsonl, tmp_path / "chat.parquet"):
        task = load_task(str(source), test_size=2, rewards=[f"{plugin}:boxed_answer"])
        row = task.train[0]
        assert row["prompt"] == "What is 1+1?" and row["prompt_messages"][0]["role"] == "system"
        assert task.prompt(row) == "What is 1+1?"   # the dataset's words: no instruction added
        assert render_prompt(tok, task, row) == (
            "system: Answer in a box.\nuser: What is 1+1?\nassistant: ")
        assert render_prompt(tok, task, row, PromptStyle(chat=False)) == (
            "Answer in a box.\n\nWhat is 1+1?")
        assert task.rewards(["so \\boxed{2}", "\\boxed{3}"], [row, row]) == [1.0, 0.0]
        seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
        assert all(prompts == [row["prompt_messages"]] for prompts, _ in seen[-2:])
        assert {json.dumps(c) for _, c in seen[-2:]} == {json.dumps(c) for c in (
            [[{"role": "assistant", "content": "\\boxed{3}"}]],
            [[{"role": "assistant", "content": "so \\boxed{2}"}]])}
        # The task's own reward (held-out scoring) reads the completion text as always.
        assert task.eval_rewards(["\\boxed{2}"], [row]) == [1.0]
