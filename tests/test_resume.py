"""Runs you can trust: checkpoints, exact resume, clean stops, NaN steps, out-of-memory backoff,
an unwritable or full disk. The demo model on CPU; a few steps each."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onelayer import checkpoint as ck
from onelayer import update
from onelayer.config import build_config
from onelayer.errors import RunStopped, UserError
from onelayer.train import train

SMALL = dict(steps=6, prompts_per_step=4, group_size=4, eval_samples=4, save_every=2)
TIMING = {"step_s", "gen_s", "update_s", "tokens_per_s", "rss_gib", "peak_mem_gib"}
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def run(out, echo=None, **options):
    cfg = build_config({**SMALL, "output": str(out), **options})
    return train(cfg, progress=False, echo=echo or (lambda line: None))


def cli(*args):
    return [sys.executable, "-m", "onelayer", "train", "--quiet", *args]


def metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def same_layer(a, b):
    x, y = load_file(Path(a) / ck.LAYER_FILE), load_file(Path(b) / ck.LAYER_FILE)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    run(out)
    return out


def wait_for(predicate, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_checkpoints_are_complete_and_bounded(uninterrupted):
    kept = ck.checkpoints(uninterrupted)
    assert [p.name for p in kept] == ["step-000004", "step-000006"]  # --keep 2
    for path in kept:
        assert ck.is_training_checkpoint(path)
        state = ck.load_checkpoint(path).state
        assert len(state.trainer["history"]) == state.step
        assert state.optimizer["state"]  # AdamW moments of the layer
        assert {"python", "numpy", "torch", "generator", "job"} <= set(state.random)
    assert same_layer(kept[-1], uninterrupted)   # the final save is the last checkpoint


def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    proc = subprocess.Popen(cli(*options, "--output", str(out)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ck.checkpoints(out), proc)
    proc.kill()
    proc.wait()
    assert not (out / ck.LAYER_FILE).exists(), "killed too late: the run had finished"
    resumed = subprocess.run(cli("--resume", "auto", "--output", str(out)), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert metrics(out) == metrics(uninterrupted)
    assert same_layer(out, uninterrupted)


def test_sigterm_saves_and_the_printed_command_resumes(uninterrupted, tmp_path):
    out = tmp_path / "stopped"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    proc = subprocess.Popen(cli(*options, "--save-every", "0", "--output", str(out)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = out / "metrics.jsonl"
    wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    args = command.removeprefix("resume with: ").split()
    assert args[:3] == ["onelayer", "train", "--resume"]
    saved = ck.load_checkpoint(Path(args[3])).state.step
    assert 1 <= saved < SMALL["steps"]
    resumed = subprocess.run(cli(*args[2:]), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(out) == metrics(uninterrupted) and same_layer(out, uninterrupted)


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-000004" in str(path):
            Path(path).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    lines = []
    run(tmp_path / "run", echo=lines.append, keep=0)
    found = [p.name for p in ck.checkpoints(tmp_path / "run")]
    assert found == ["step-000002", "step-000006"]
    assert not [p for p in (tmp_path / "run" / ck.CHECKPOINTS).iterdir() if p.name.startswith(".")]
    assert any("could not save the checkpoint of step 4" in line and "step-000002, is intact" in line
               for line in lines)
    # A crash mid-write (a hidden directory left behind) is not a checkpoint either.
    (tmp_path / "run" / ck.CHECKPOINTS / ".step-000008.abc").mkdir()
    assert ck.resolve_resume("auto", str(tmp_path / "run")).name == "step-000006"


def test_resume_refuses_another_layer_and_allows_more_steps(uninterrupted, tmp_path):
    step4 = str(ck.checkpoints(uninterrupted)[0])
    with pytest.raises(UserError, match="--layer must stay the same"):
        build_config({"resume": step4, "layer": "2"})
    with pytest.raises(UserError, match="--seed"):
        build_config({"resume": step4, "seed": 5})
    lines = []
    out = tmp_path / "longer"
    run(out, echo=lines.append, resume=step4, steps=7)
    assert "resume: steps: 6 -> 7" in lines
    assert [row["step"] for row in metrics(out)] == list(range(1, 8))
    assert metrics(out)[:6] == metrics(uninterrupted)
    with pytest.raises(UserError, match="--resume auto .* --output"):
        build_config({"resume": "auto"})
    with pytest.raises(UserError, match="not a training checkpoint"):
        build_config({"resume": str(tmp_path)})


def test_a_fresh_run_will_not_write_over_an_unfinished_one(uninterrupted, tmp_path):
    out = tmp_path / "unfinished"
    (out / ck.CHECKPOINTS).mkdir(parents=True)
    import shutil
    shutil.copytree(ck.checkpoints(uninterrupted)[0], out / ck.CHECKPOINTS / "step-000004")
    with pytest.raises(UserError, match="--resume"):
        run(out)


def nan_loss_at(monkeypatch, steps: set[int]):
    """micro_batch_loss returns NaN during the given RL steps (1-based: one update per step)."""
    real, calls = update.micro_batch_loss, {"n": 0}

    def loss(*args, **kwargs):
        value, metrics = real(*args, **kwargs)
        return (value * float("nan") if calls["n"] + 1 in steps else value), metrics

    real_update = update.update

    def counting_update(*args, **kwargs):
        try:
            return real_update(*args, **kwargs)
        finally:
            calls["n"] += 1

    monkeypatch.setattr(update, "micro_batch_loss", loss)
    monkeypatch.setattr(update, "update", counting_update)


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    lines = []
    out = tmp_path / "nan"
    run(out, echo=lines.append, save_every=1, keep=0)
    rows = metrics(out)
    assert [row["skipped_updates"] for row in rows] == [0, 0, 1, 0, 0, 0]
    # No update at step 3: the layer after step 3 is the layer after step 2.
    assert same_layer(out / ck.CHECKPOINTS / "step-000002", out / ck.CHECKPOINTS / "step-000003")
    assert not same_layer(out / ck.CHECKPOINTS / "step-000003", out / ck.CHECKPOINTS / "step-000004")
    assert any("step 3: NaN/Inf" in line for line in lines)


def test_too_many_bad_steps_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, set(range(1, 100)))
    with pytest.raises(RunStopped, match="2 steps in a row") as stopped:
        run(tmp_path / "bad", max_bad_steps=2, save_every=0)
    assert stopped.value.exit_code == 1
    assert [p.name for p in ck.checkpoints(tmp_path / "bad")] == ["step-000002"]
    assert "resume with: onelayer train --resume" in str(stopped.value)


def oom_above(monkeypatch, rows: int):
    """Every forward of more than `rows` sequences through a block runs out of memory."""
    from onelayer import model as model_pkg
    real_load = model_pkg.load.load_policy

    def load(*args, **kwargs):
        policy = real_load(*args, **kwargs)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[0] > rows:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        policy.split.lm.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        return policy

    monkeypatch.setattr("onelayer.train.load_policy", load)


def test_out_of_memory_halves_the_batches_and_completes(tmp_path, monkeypatch):
    oom_above(monkeypatch, 4)
    lines = []
    out = tmp_path / "oom"
    result = run(out, echo=lines.append, steps=2, eval_samples=6)
    assert result.steps == 2 and (out / ck.LAYER_FILE).exists()
    # The held-out eval too; halved once, for the eval after training as well.
    assert lines.count("out of memory: the held-out eval batch 6 -> 3, retrying") == 1
    assert "out of memory: --generation-batch 16 -> 8, retrying" in lines
    assert "out of memory: --generation-batch 8 -> 4, retrying" in lines
    assert "out of memory: --micro-batch 16 -> 8, retrying" in lines
    saved = json.loads((out / ck.CONFIG_FILE).read_text())
    assert saved["generation_batch"] == 4 and saved["micro_batch"] == 4


def test_out_of_memory_at_one_group_gives_up_naming_the_knob(tmp_path, monkeypatch):
    oom_above(monkeypatch, 3)   # below one group of 4; the 3 held-out prompts still fit
    with pytest.raises(UserError, match="out of memory even with --generation-batch 4"):
        run(tmp_path / "oom", steps=2, eval_samples=3)


def test_unwritable_or_full_output_is_refused_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to --output"):
        run(blocker / "run")
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1024))
    with pytest.raises(UserError, match="GiB free"):
        run(tmp_path / "full")
    assert not (tmp_path / "full" / "metrics.jsonl").exists()
