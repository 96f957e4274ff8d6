"""Reporting: metrics.jsonl, completions.jsonl, TensorBoard event files read back, a W&B offline
run directory; the demo model, a few short steps."""
import importlib.util
import json
import os
import sys

import pytest

from onelayer.config import build_config
from onelayer.errors import UserError
from onelayer.reporting import (Reporter, StepSamples, check_report_to, markdown_table,
                                step_line, terminal_lines)
from onelayer.train import train

SHORT = dict(steps=2, prompts_per_step=2, group_size=4, eval_samples=4, save_every=0)


def run(tmp_path, **options):
    cfg = build_config({**SHORT, "output": str(tmp_path / "run"), **options})
    lines = []
    train(cfg, progress=False, echo=lines.append)
    return tmp_path / "run", lines


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_to_none_writes_only_metrics(tmp_path):
    out, _ = run(tmp_path, report_to=["none"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all("lr" in r and r["lr"] == pytest.approx(1e-3) for r in rows)   # demo preset lr
    assert all("samples" not in r for r in rows)
    for absent in ("completions.jsonl", "tensorboard", "wandb", "wandb-run-id"):
        assert not (out / absent).exists()


def test_completions_jsonl_every_n_steps(tmp_path):
    out, _ = run(tmp_path, steps=4, log_completions=2)
    rows = read_jsonl(out / "completions.jsonl")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    step2 = [r for r in rows if r["step"] == 2]
    assert len(step2) == 2 * 4                       # both groups (2 <= COMPLETION_GROUPS), G each
    assert set(step2[0]) == {"step", "group", "prompt", "completion", "reward", "advantage"}
    assert {r["group"] for r in step2} == {0, 1}
    for group in (0, 1):
        members = [r for r in step2 if r["group"] == group]
        assert len({r["prompt"] for r in members}) == 1          # one prompt per group
        assert members[0]["prompt"].endswith("=")                # an arithmetic question
        rewards = [r["reward"] for r in members]
        advantages = [r["advantage"] for r in members]
        # GRPO: advantages are the group's rewards centred (and scaled): same order.
        assert sum(advantages) == pytest.approx(0.0, abs=1e-5)
        if len(set(rewards)) > 1:
            best = max(range(4), key=rewards.__getitem__)
            assert advantages[best] == max(advantages)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all("samples" not in r for r in metrics)


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Two rewards, so that per-reward means (reward/<name>) are in the rows.
    out, _ = run(tmp_path, report_to=["tensorboard"], log_completions=1,
                 reward=["task", "length"], reward_weight=[1.0, 0.1])
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    metrics = read_jsonl(out / "metrics.jsonl")
    for key in ("reward_mean", "kl", "loss", "lr", "rss_gib", "reward/task", "reward/length"):
        assert key in metrics[0], key
        assert key in tags["scalars"], key
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in metrics], rel=1e-6)
    assert "summary/accuracy_after" in tags["scalars"]
    # add_text is stored as a tensor of the text plugin
    text_tags = [t for t in tags["tensors"] if t.startswith("completions")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "| group | reward | advantage | prompt | completion |" in text


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out, _ = run(tmp_path, report_to=["wandb"], log_completions=2)
    run_id = (out / "wandb-run-id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    # The run's record log (protobuf; offline runs write no summary file until synced): the
    # metrics and the end-of-run summary are in it.
    log = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"reward_mean", b"kl", b"lr", b"rss_gib", b"accuracy_after"):
        assert key in log, key
    tables = list((runs[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "group", "prompt", "completion", "reward", "advantage"]
    assert len(table["data"]) == 2 * 4 and table["data"][0][0] == 2


def test_resume_rewrites_completions_after_the_checkpoint(tmp_path):
    samples = StepSamples(["1+1="] * 2, ["2", "3"], [1.0, 0.0], [0.7, -0.7], [0, 0])
    out = tmp_path / "run"
    with Reporter(out, log_completions=1) as r:
        for step in (1, 2, 3):
            r.step({"step": step, "reward_mean": 0.5}, samples)
    r.finish()
    # resume from the checkpoint of step 1: steps 2 and 3 are run again
    with Reporter(out, log_completions=1, history=[{"step": 1, "reward_mean": 0.5}],
                  first_step=2) as r:
        r.step({"step": 2, "reward_mean": 0.25}, samples)
    r.finish()
    assert [row["step"] for row in read_jsonl(out / "completions.jsonl")] == [1, 1, 2, 2]
    assert [row["reward_mean"] for row in read_jsonl(out / "metrics.jsonl")] == [0.5, 0.25]


def test_completion_groups_are_capped_and_tables_escaped():
    samples = StepSamples([f"p{g}" for g in range(6) for _ in range(2)], ["a|b\nc"] * 12,
                          [1.0] * 12, [0.0] * 12, [g for g in range(6) for _ in range(2)])
    rows = samples.rows(7, groups=4)
    assert {r["group"] for r in rows} == {0, 1, 2, 3} and len(rows) == 8
    table = markdown_table(rows)
    assert "a\\|b<br>c" in table and table.count("\n") == 2 + 7


def test_bad_report_to_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="unknown --report-to"):
        check_report_to(["mlflow"])
    with pytest.raises(UserError, match="cannot be combined"):
        check_report_to(["none", "tensorboard"])
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    if importlib.util.find_spec("wandb"):   # an optional extra: CI installs only [test]
        assert check_report_to(["tensorboard,wandb", "wandb"]) == ["tensorboard", "wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'onelayer\[wandb\]'"):
        check_report_to(["wandb"])


def test_one_line_per_step_when_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert terminal_lines(True) and not terminal_lines(False)
    line = step_line({"step": 3, "reward_mean": 0.5, "kl": 0.001, "loss": -0.1, "lr": 1e-3,
                      "step_s": 1.25, "eval_accuracy": 0.4}, 10)
    assert "\n" not in line and line.startswith("step 3/10") and "eval_accuracy 0.400" in line
    assert "sampler gap" not in line
    assert "sampler gap 2.5e-07" in step_line({"step": 1, "sampler_logprob_gap": 2.5e-7}, 10)
    cfg = build_config({**SHORT, "output": str(tmp_path / "run")})
    lines = []
    train(cfg, progress=True, echo=lines.append)
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/2", "2/2"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX paths")
def test_cli_options_reach_the_config(tmp_path):
    from click.testing import CliRunner

    from onelayer.cli import cli

    seen = {}
    import onelayer.train as engine

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg

    runner = CliRunner()
    orig = engine.train
    engine.train = fake_train
    try:
        result = runner.invoke(cli, ["train", "--report-to", "tensorboard", "--report-to", "wandb",
                                     "--log-completions", "5", "--quiet"])
    finally:
        engine.train = orig
    assert result.exit_code == 0, result.output
    assert seen["cfg"].report_to == ["tensorboard", "wandb"]
    assert seen["cfg"].log_completions == 5


def test_the_reward_plot_draws_the_held_out_score_at_every_eval(tmp_path):
    from onelayer.train import held_out_curve, plot_rewards

    history = [{"step": s, "reward_mean": 0.1 * s} for s in range(1, 7)]
    history[1]["eval_accuracy"], history[3]["eval_accuracy"] = 0.35, 0.5   # --eval-every 2
    assert held_out_curve(history, 0.3, 0.55, "accuracy") == ([0, 2, 4, 6], [0.3, 0.35, 0.5, 0.55])
    history[3]["eval_mean@4"] = 0.42
    assert held_out_curve(history, 0.3, 0.6, "mean@4") == ([0, 4, 6], [0.3, 0.42, 0.6])
    assert held_out_curve([], 0.3, 0.3, "accuracy") == ([0, 0], [0.3, 0.3])
    plot_rewards(history, 0.3, 0.6, "mean@4", tmp_path / "reward.png")
    assert (tmp_path / "reward.png").stat().st_size > 0
