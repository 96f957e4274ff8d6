"""The contribution sweep: C from the formula, files that agree with each other, resume, and
runs that are exactly `onelayer train`'s."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from onelayer.checkpoint import load_layer
from onelayer.config import build_config
from onelayer.contribution import Run, Sweep, contribution, markdown_table, parse_layers, summarise, train_run
from onelayer.errors import UserError
from onelayer.layers_cli import contribution_command
from onelayer.model.load import read_tensors
from onelayer.model.shared import load_frozen
from onelayer.tasks import load_task
from onelayer.train import train


def test_contribution_formula_on_hand_made_scores():
    assert contribution(0.60, base=0.40, full=0.50) == pytest.approx(2.0)    # beats full RL
    assert contribution(0.45, base=0.40, full=0.50) == pytest.approx(0.5)
    assert contribution(0.50, base=0.40, full=0.50) == pytest.approx(1.0)
    assert contribution(0.30, base=0.40, full=0.50) == pytest.approx(-1.0)   # below the base
    assert contribution(0.35, base=0.40, full=0.30) == pytest.approx(0.5)    # full RL hurt
    assert contribution(0.45, base=0.40, full=0.40) is None                  # undefined


def hand_made(full_scores: dict, layer_scores: dict, base: float, lrs=(1e-4, 3e-4)):
    seeds = [0, 1]
    scores = {Run("all", lr, s): full_scores[lr][s] for lr in lrs for s in seeds}
    scores.update({Run(str(k), lr, s): v[s] for (k, lr), v in layer_scores.items() for s in seeds})
    sweep = Sweep(build_config({}), [0, 1], seeds, list(lrs))
    means = {lr: sum(scores[Run("all", lr, s)] for s in seeds) / len(seeds) for lr in lrs}
    best = max(lrs, key=means.get)
    return summarise(sweep, SimpleNamespace(num_layers=2), base, means[best], best, scores, 1.0)


def test_summary_on_hand_made_scores():
    result = hand_made({1e-4: [0.5, 0.6], 3e-4: [0.7, 0.5]},
                       {(0, 3e-4): [0.45, 0.55], (1, 3e-4): [0.3, 0.4]}, base=0.4)
    assert result["full"]["lr"] == 3e-4 and result["full"]["S_full"] == pytest.approx(0.6)
    paper = [e["paper"] for e in result["layers"]]
    assert paper[0]["C"] == pytest.approx([0.25, 0.75]) and paper[0]["C_mean"] == pytest.approx(0.5)
    assert paper[1]["C"] == pytest.approx([-0.5, 0.0])
    assert paper[1]["C_std"] == pytest.approx(0.5 ** 0.5 * 0.5)


def test_undefined_contribution_is_said_plainly():
    result = hand_made({1e-4: [0.4, 0.4], 3e-4: [0.4, 0.4]},
                       {(0, 1e-4): [0.45, 0.55], (1, 1e-4): [0.3, 0.4]}, base=0.4)
    assert result["full"]["undefined_reason"].startswith("S_full == S_base")
    assert all(e["paper"]["C_mean"] is None and e["paper"]["C"] == [None, None] for e in result["layers"])
    table = markdown_table(result)
    assert "**C is undefined**" in table and "| undefined |" in table


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-2", 4) == [1, 2]
    assert parse_layers("3,0,1-2", 4) == [0, 1, 2, 3]
    for bad in ("4", "a-b", "1-9", ""):
        with pytest.raises(UserError):
            parse_layers(bad, 4)


def test_train_options_pass_through():
    import click
    params = contribution_command.make_context("contribution", [
        "--prompts-per-step", "4", "--no-chat", "--dynamic-sampling", "--stop", "a", "--stop=b",
        "--eval-samples=8"]).params
    given = {k: v for k, v in params.items() if v not in (None, ())}
    assert {k: given[k] for k in ("prompts_per_step", "chat", "dynamic_sampling", "stop",
                                  "eval_samples")} == {
        "prompts_per_step": 4, "chat": False, "dynamic_sampling": True, "stop": ("a", "b"),
        "eval_samples": 8}
    with pytest.raises(click.NoSuchOption):
        contribution_command.make_context("contribution", ["--bogus", "1"])


def test_a_sweep_run_is_exactly_onelayer_train(tmp_path):
    """Same trained weights as `onelayer train` (single layer and full-parameter), and the
    shared model holds its original, frozen weights again after each run."""
    model = "demo"    # rewards that differ within a group: a tiny random model's are all 0
    options = dict(model=model, steps=1, prompts_per_step=4, group_size=4, max_new_tokens=4,
                   eval_samples=2, lr=1e-3, save_every=0)
    base = load_frozen(model)
    task = load_task("arithmetic")
    original = read_tensors(base.model_path, [""])
    for layer in ("2", "all"):
        cfg = build_config({**options, "layer": layer})
        train(build_config({**options, "layer": layer, "output": str(tmp_path / f"train-{layer}")}),
              progress=False, echo=lambda line: None)
        train_run(base, task, cfg, tmp_path / f"sweep-{layer}", progress=False)
        ours, _ = load_layer(tmp_path / f"sweep-{layer}")
        theirs, _ = load_layer(tmp_path / f"train-{layer}")
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours)
        assert any((ours[k] != original[k]).any() for k in ours)      # it did train
        params = dict(base.lm.named_parameters())
        assert all((params[k] == original[k]).all() for k in params)  # and is back to the base
        assert not any(p.requires_grad for p in base.lm.parameters())


def test_a_sweep_run_on_nf4_blocks_is_exactly_onelayer_train(tmp_path):
    """NF4 (the default on a GPU): the trained layer's 4-bit linears are swapped for plain ones
    during the run and the very same 4-bit modules are back after it; full-parameter runs are
    refused (NF4 holds no trainable weights)."""
    import bitsandbytes as bnb
    options = dict(model="demo", frozen_dtype="nf4", layer="2", steps=1, prompts_per_step=4,
                   group_size=4, max_new_tokens=4, eval_samples=2, lr=1e-3, save_every=0)
    base = load_frozen("demo", frozen_dtype="nf4", device="cpu")
    linears = {name: m for name, m in base.lm.model.layers[2].named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    packed = {name: m.weight.clone() for name, m in linears.items()}
    train(build_config({**options, "output": str(tmp_path / "train")}), progress=False, echo=lambda line: None)
    train_run(base, load_task("arithmetic"), build_config(options), tmp_path / "sweep", progress=False)
    ours, _ = load_layer(tmp_path / "sweep")
    theirs, _ = load_layer(tmp_path / "train")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    original = read_tensors(base.model_path, list(ours))
    assert any((ours[k] != original[k]).any() for k in ours)          # it did train
    after = dict(base.lm.model.layers[2].named_modules())
    assert all(after[name] is m and torch.equal(m.weight, packed[name]) for name, m in linears.items())
    with pytest.raises(UserError, match="NF4 cannot hold"):
        train_run(base, load_task("arithmetic"), build_config({**options, "layer": "all"}),
                  tmp_path / "sweep-all", progress=False)


def invoke(args):
    result = CliRunner().invoke(contribution_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


SWEEP = ["--model", "demo", "--layers", "2,5", "--seeds", "2", "--steps", "1", "--full-lrs", "1e-3,1e-2",
         "--eval-samples", "8", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
         "--quiet"]


def test_sweep_files_are_complete_and_consistent_and_resume(tmp_path):
    out = tmp_path / "sweep"
    first = invoke([*SWEEP, "--output", str(out)])
    assert first.count("seed") == 8     # 2 full lrs x 2 seeds + 2 layers x 2 seeds, one line each
    result = json.loads((out / "contribution.json").read_text())
    assert result["run_config"]["prompts_per_step"] == 2 and result["seeds"] == [0, 1]
    s_base, s_full = result["S_base"], result["full"]["S_full"]
    assert [r["lr"] for r in result["full"]["sweep"]] == [1e-3, 1e-3, 1e-2, 1e-2]
    assert result["full"]["lr"] in (1e-3, 1e-2)

    with open(out / "contribution.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["kind"] == "base" and float(rows[0]["score"]) == s_base
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    assert len([r for r in rows if r["kind"] == "full"]) == 4 and len(layer_rows) == 4
    table = (out / "contribution.md").read_text()
    for entry in result["layers"]:
        paper = entry["paper"]
        assert paper["lr"] == result["full"]["lr"]
        mine = [r for r in layer_rows if int(r["layer"]) == entry["layer"]]
        assert [float(r["score"]) for r in mine] == paper["scores"]
        for r, c in zip(mine, paper["C"]):
            assert (r["C"] == "undefined") if c is None else float(r["C"]) == pytest.approx(c)
            if c is not None:
                assert c == pytest.approx((float(r["score"]) - s_base) / (s_full - s_base))
        # every run's own files: the trained layer, its scores and metrics
        for seed in (0, 1):
            run = out / "runs" / f"L{entry['layer']}-lr{paper['lr']:g}-seed{seed}"
            assert {"layer.safetensors", "scores.json", "metrics.jsonl", "manifest.json"} <= {
                p.name for p in run.iterdir()}
            assert json.loads((run / "scores.json").read_text())["after"] == paper["scores"][seed]
        cell = (f"| {entry['layer']} | {entry['depth']:.0%} | {paper['score_mean']:.1%} ± "
                f"{paper['score_std']:.1%} |")
        assert cell in table
    assert f"S_base = {s_base:.1%}; S_full = {s_full:.1%}" in table
    assert (out / "contribution.png").stat().st_size > 1000

    # A rerun of the same command trains nothing and writes the same results.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("layer.safetensors")}
    again = invoke([*SWEEP, "--output", str(out)])
    assert "seed" not in again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("layer.safetensors")} == stamps
    rerun = json.loads((out / "contribution.json").read_text())
    assert rerun["rows"] == result["rows"] and rerun["S_base"] == s_base

    # An unfinished run (no scores.json) is trained again, the others are kept.
    victim = out / "runs" / f"L5-lr{result['full']['lr']:g}-seed1"
    (victim / "scores.json").unlink()
    third = invoke([*SWEEP, "--output", str(out)])
    assert third.count("seed1:") == 1 and victim.name in third
    assert json.loads((out / "contribution.json").read_text())["rows"] == result["rows"]


def test_a_sweep_launched_as_two_processes_shares_out_its_runs(tmp_path):
    """torchrun with 2 processes: each trains a share of the runs (no process group: a run's
    training stays single-process), rank 0 waits for the others' scores and writes the report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "sweep"
    args = ["--model", "demo", "--layers", "2", "--seeds", "1", "--steps", "1", "--full-lrs",
            "1e-3,1e-2", "--eval-samples", "4", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--quiet", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "onelayer", "contribution", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "contribution.json").read_text())
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert set(runs) == {"full-lr0.001-seed0", "full-lr0.01-seed0",
                         f"L2-lr{result['full']['lr']:g}-seed0"}
    for run in runs:
        scores = json.loads((out / "runs" / run / "scores.json").read_text())
        assert (out / "runs" / run / "layer.safetensors").is_file()
        assert scores["after"] in [r["score"] for r in result["rows"]]
    # Only rank 0 speaks: it names the runs it trained itself, fewer than all of them.
    trained_here = [line for line in done.stdout.splitlines() if "-seed0: " in line]
    assert 1 <= len(trained_here) < len(runs)
    assert done.stdout.count("wrote ") == 1


RESUMABLE = ["--model", "demo", "--layers", "2", "--seeds", "1", "--full-score", "0.5", "--lr", "1e-3",
             "--steps", "4", "--save-every", "2", "--eval-samples", "8", "--prompts-per-step", "2",
             "--group-size", "4", "--max-new-tokens", "6", "--quiet"]
TIMING = {"step_s", "gen_s", "update_s", "tokens_per_s", "rss_gib", "peak_mem_gib"}


def counting_steps(monkeypatch, interrupt_at=None):
    """Count the RL steps taken; SIGINT (Ctrl-C) arrives during step `interrupt_at`."""
    import signal

    from onelayer import single_turn

    real, calls = single_turn.rl_step, []

    def step(*args, **kwargs):
        calls.append(len(calls) + 1)
        if calls[-1] == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(single_turn, "rl_step", step)
    return calls


def run_files(run):
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return load_layer(run)[0], json.loads((run / "scores.json").read_text())["after"], metrics


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path, monkeypatch):
    from onelayer.checkpoint import checkpoints
    from onelayer.errors import RunStopped

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    invoke([*RESUMABLE, "--output", str(whole)])
    run = "L2-lr0.001-seed0"
    assert not (whole / "runs" / run / "checkpoints").exists()   # gone once scores.json is written

    calls = counting_steps(monkeypatch, interrupt_at=3)
    with pytest.raises(RunStopped, match=f"stopped by SIGINT after step 3. Run {run}'s checkpoint"):
        invoke([*RESUMABLE, "--output", str(stopped)])
    saved = checkpoints(stopped / "runs" / run)
    assert [p.name for p in saved] == ["step-000002", "step-000003"]   # --save-every 2, the stop
    assert not (stopped / "runs" / run / "scores.json").exists()

    with pytest.raises(UserError, match=r"other settings \(steps\)") as refused:
        invoke([*RESUMABLE, "--steps", "5", "--output", str(stopped)])
    assert "\n" not in str(refused.value)
    assert checkpoints(stopped / "runs" / run) == saved           # refused, and left alone

    calls.clear()
    resumed = invoke([*RESUMABLE, "--output", str(stopped)])
    assert f"{run}: resuming after step 3 of 4" in resumed and calls == [1]   # one step, the 4th
    assert not (stopped / "runs" / run / "checkpoints").exists()
    ours, score, metrics = run_files(stopped / "runs" / run)
    theirs, whole_score, whole_metrics = run_files(whole / "runs" / run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert score == whole_score and metrics == whole_metrics
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]


def test_s_over_several_held_out_sets_is_their_mean_and_the_table_names_them():
    import dataclasses

    from onelayer.contribution import base_score

    cfg = build_config({"eval_samples": 10})
    base = load_frozen(cfg.model, device="cpu")
    task = load_task(cfg.task)
    sets = [dataclasses.replace(task, name="first", test=task.test[:10]),
            dataclasses.replace(task, name="second", test=task.test[100:])]
    s_base, each = base_score(base, sets, cfg)
    assert list(each) == ["first", "second"] and s_base == pytest.approx(sum(each.values()) / 2)
    assert base_score(base, sets[1:], cfg)[0] == each["second"]
    sweep = Sweep(build_config({"eval_task": ["paper-math"]}), [0], [0], [1e-4])
    scores = {Run("all", 1e-4, 0): 0.5, Run("0", 1e-4, 0): 0.45}
    result = summarise(sweep, SimpleNamespace(num_layers=2), 0.4, 0.5, 1e-4, scores, 1.0)
    assert result["held_out_sets"] == ["math500", "gsm8k", "olympiadbench", "amc23"]
    assert ("trained on arithmetic, S the mean over math500, gsm8k, olympiadbench, amc23 "
            "(greedy accuracy, 256 held-out problems each" in markdown_table(result))


def test_c_per_held_out_set_on_hand_made_scores():
    """Set a: S_full 0.7, the layer's mean 0.55 -> C 0.5; set b: full RL did not move it ->
    undefined. With S_full measured elsewhere there is no S_full per set, so no C per set."""
    sweep = Sweep(build_config({"eval_task": ["a,b"]}), [0], [0, 1], [1e-4])
    scores = {Run("all", 1e-4, 0): 0.5, Run("all", 1e-4, 1): 0.6, Run("0", 1e-4, 0): 0.45,
              Run("0", 1e-4, 1): 0.55}
    set_scores = {Run("all", 1e-4, 0): {"a": 0.6, "b": 0.4},
                  Run("all", 1e-4, 1): {"a": 0.8, "b": 0.4},
                  Run("0", 1e-4, 0): {"a": 0.5, "b": 0.4}, Run("0", 1e-4, 1): {"a": 0.6, "b": 0.5}}
    result = summarise(sweep, SimpleNamespace(num_layers=2), 0.4, 0.55, 1e-4, scores, 1.0,
                       base_sets={"a": 0.4, "b": 0.4}, set_scores=set_scores)
    assert result["sets"]["a"]["S_full"] == pytest.approx(0.7)
    assert result["sets"]["b"] == {"S_base": 0.4, "S_full": pytest.approx(0.4)}
    per = result["layers"][0]["paper"]["sets"]
    assert per["a"]["score_mean"] == pytest.approx(0.55) and per["a"]["C"] == pytest.approx(0.5)
    assert per["b"]["score_mean"] == pytest.approx(0.45) and per["b"]["C"] is None
    assert "| 0 | 55.0% (C 0.50) | 45.0% (C undefined) |" in markdown_table(result)
    elsewhere = Sweep(build_config({"eval_task": ["a,b"]}), [0], [0, 1], [], full_score=0.55)
    layer_only = {r: v for r, v in scores.items() if r.layer != "all"}
    result = summarise(elsewhere, SimpleNamespace(num_layers=2), 0.4, 0.55, 1e-4, layer_only, 1.0,
                       base_sets={"a": 0.4, "b": 0.4}, set_scores=set_scores)
    assert result["sets"] == {} and "sets" not in result["layers"][0]["paper"]


def test_a_sweep_over_two_held_out_sets_keeps_each_runs_scores_per_set(tmp_path, monkeypatch):
    import dataclasses

    from onelayer import evaluate

    def two_sets(cfg, task):
        return [dataclasses.replace(task, name="first", test=task.test[:6]),
                dataclasses.replace(task, name="second", test=task.test[100:106])]

    monkeypatch.setattr(evaluate, "held_out_tasks", two_sets)
    out = tmp_path / "sweep"
    invoke(["--model", "demo", "--layers", "3", "--seeds", "1", "--steps", "1", "--full-lrs",
            "1e-3", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
            "--quiet", "--output", str(out)])
    base = json.loads((out / "base.json").read_text())["sets"]
    full = json.loads((out / "runs" / "full-lr0.001-seed0" / "scores.json").read_text())
    layer = json.loads((out / "runs" / "L3-lr0.001-seed0" / "scores.json").read_text())
    assert list(base) == list(full["sets"]) == list(layer["sets"]) == ["first", "second"]
    assert layer["after"] == pytest.approx(sum(layer["sets"].values()) / 2)
    result = json.loads((out / "contribution.json").read_text())
    per = result["layers"][0]["paper"]["sets"]
    for name in ("first", "second"):
        assert result["sets"][name] == {"S_base": base[name], "S_full": full["sets"][name]}
        assert per[name]["score_mean"] == layer["sets"][name]
        expected = contribution(layer["sets"][name], base[name], full["sets"][name])
        assert per[name]["C"] == (None if expected is None else pytest.approx(expected))
    assert "C per held-out set" in (out / "contribution.md").read_text()
