"""`onelayer runs`: a row per run found, from the files the runs wrote."""
import json
import shutil

from onelayer.run_table import run_table

from conftest import run_cli


def test_finished_full_parameter_and_stopped_runs_each_get_a_row(tmp_path, capsys):
    short = ["--eval-samples", "4", "--prompts-per-step", "2", "--quiet"]
    patch, full, stopped = tmp_path / "a", tmp_path / "sweep" / "runs" / "all", tmp_path / "b"
    for out, extra in ((patch, ["--steps", "2"]), (full, ["--steps", "1", "--layer", "all"]),
                       (stopped, ["--steps", "3", "--save-every", "1", "--keep", "3"])):
        code, _, stderr = run_cli(["train", *extra, *short, "--output", str(out)], capsys)
        assert code == 0, stderr
    # As if killed during step 3: no layer, manifest or run config yet, checkpoints up to step 2.
    for name in ("layer.safetensors", "manifest.json", "run_config.json"):
        (stopped / name).unlink()
    shutil.rmtree(stopped / "checkpoints" / "step-000003")

    rows = {row.run: row for row in run_table([tmp_path])}
    assert list(rows) == [str(patch), str(stopped), str(full)]
    scores = json.loads((patch / "manifest.json").read_text())["scores"]
    a = rows[str(patch)]
    assert (a.model, a.layers, a.task, a.algo, a.steps) == ("demo", "3", "arithmetic", "grpo", "2")
    assert (a.metric, a.before, a.after) == ("accuracy", scores["before"], scores["after"])
    everything = rows[str(full)]
    assert everything.layers == "all" and everything.after == json.loads(
        (full / "scores.json").read_text())["after"]
    b = rows[str(stopped)]
    assert (b.steps, b.before, b.after, b.metric) == ("2/3", None, None, "")

    code, stdout, _ = run_cli(["runs", str(tmp_path)], capsys)
    header, first, *_ = stdout.splitlines()
    assert code == 0 and header.split()[:3] == ["run", "model", "layer"]
    assert first.split()[-3:] == [f"{a.before:.1%}", f"{a.after:.1%}",
                                  f"{a.after - a.before:+.1%}"]
    code, stdout, _ = run_cli(["runs", "--json", str(patch)], capsys)
    assert code == 0 and json.loads(stdout)[0]["after"] == a.after


def test_no_runs_and_a_missing_directory(tmp_path, capsys):
    code, stdout, _ = run_cli(["runs", str(tmp_path)], capsys)
    assert code == 0 and stdout.strip() == f"no runs under {tmp_path}"
    code, _, stderr = run_cli(["runs", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such directory" in stderr
