"""The CLI: bad input ends with one line on stderr and exit code 2, and writes nothing."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onelayer.config import DEMO_PRESET, TrainConfig, build_config
from onelayer.errors import UserError

from conftest import run_cli


def bad_inputs(tiny_models, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"question": "1+1=", "answer": "2"}\n{not json\n')
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text('steps = 3\nlearning_rate = 1e-3\n')
    broken_toml = tmp_path / "broken.toml"
    broken_toml.write_text('steps = = 3\n')
    model = tiny_models["qwen3"]
    return {
        "unknown model path": ["--model", str(tmp_path / "no-such-model")],
        "not a model directory": ["--model", str(tmp_path)],
        "layer out of range": ["--model", model, "--layer", "4"],
        "bad layer": ["--model", model, "--layer", "middle"],
        "unknown task": ["--model", model, "--task", "no-such-task"],
        "empty dataset": ["--model", model, "--task", str(empty)],
        "malformed dataset": ["--model", model, "--task", str(malformed)],
        "group size < 2": ["--model", model, "--group-size", "1"],
        "unknown config key": ["--model", model, "--config", str(unknown_key)],
        "malformed config": ["--model", model, "--config", str(broken_toml)],
        "missing config": ["--model", model, "--config", str(tmp_path / "none.yaml")],
        "unknown algorithm": ["--model", model, "--algo", "ppo"],
        "unknown device": ["--model", model, "--device", "tpu9"],
        "tis with top-p": ["--model", model, "--tis-cap", "2", "--top-p", "0.9"],
        "negative tis cap": ["--model", model, "--tis-cap", "-1"],
        "overlong buffer past the length": ["--model", model, "--overlong-buffer", "600"],
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_models, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, args in bad_inputs(tiny_models, inputs).items():
        out = tmp_path / "out"
        code, stdout, stderr = run_cli(["train", *args, "--output", str(out), "--quiet"], capsys)
        assert code == 2, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 or lines[0].startswith("Usage:"), (name, stderr)
        assert "Traceback" not in stderr, name
        assert not out.exists(), name


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onelayer", "train", "--model",
                           str(tmp_path / "missing"), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"onelayer: error: model '{tmp_path / 'missing'}' is neither a model directory nor a "
        "hub id (owner/name)"]


def test_existing_trained_layer_is_not_overwritten(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "layer.safetensors").write_bytes(b"precious")
    code, _, stderr = run_cli(["train", "--model", tiny_models["qwen3"], "--output", str(out),
                               "--quiet"], capsys)
    assert code == 2 and "already holds a trained layer" in stderr
    assert (out / "layer.safetensors").read_bytes() == b"precious"


def test_version_names_onelayer_and_the_libraries_it_runs_on(capsys):
    from importlib.metadata import version

    import onelayer
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.startswith(f"onelayer {onelayer.__version__} (python ")
    assert f"torch {version('torch')}, transformers {version('transformers')}, " in out
    assert out.count("\n") == 1
    assert version("onelayer") == onelayer.__version__    # pyproject reads it from there


def test_help_explains_every_option():
    main_help = subprocess.run([sys.executable, "-m", "onelayer", "train", "--help"],
                               capture_output=True, text=True, timeout=120)
    assert main_help.returncode == 0
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in main_help.stdout, field
    assert "--config" in main_help.stdout


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'model = "M"\nlayer = 3\nlr = 1e-4\ngroup-size = 4\nloss_agg = "token-mean"\n'),
    (".yaml", "model: M\nlayer: 3\nlr: 1.0e-4\ngroup-size: 4\nloss_agg: token-mean\n"),
])
def test_config_file_mirrors_options_and_cli_wins(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = build_config({"group_size": 6}, str(path))
    assert (cfg.model, cfg.layer, cfg.lr, cfg.group_size) == ("M", "3", 1e-4, 6)
    assert cfg.aggregation == "token-mean"
    assert cfg.steps == TrainConfig.steps  # no demo preset for a real model


def test_demo_preset_applies_only_to_the_demo_and_yields_to_the_user():
    cfg = build_config({})
    assert cfg.model == "demo" and cfg.lr == DEMO_PRESET["lr"]
    assert build_config({"lr": 1e-5}).lr == 1e-5
    assert build_config({"model": "Qwen/Qwen3-8B"}).lr == TrainConfig.lr


@pytest.mark.parametrize("overrides", [{"group_size": 1}, {"eps_low": 1.5}, {"steps": "many"},
                                       {"temperature": 0}, {"loss_agg": "sum"}])
def test_invalid_values_are_user_errors(overrides):
    with pytest.raises(UserError):
        build_config(overrides)


def test_example_configs_build():
    from pathlib import Path
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = build_config({}, str(path))
        assert cfg.model != "demo"


def test_train_and_eval_on_a_local_dataset_with_field_mapping(tiny_models, tmp_path, capsys, monkeypatch):
    # What a CUDA rollout over NF4 blocks would have measured: shown once, with the steps.
    from onelayer import nf4_dispatch
    monkeypatch.setitem(nf4_dispatch._MEASURED, "key", ((), "Some GPU, bfloat16: rows 1-64 cuda mma, more bnb"))
    data = tmp_path / "gsm8k_like.jsonl"
    rows = [{"q": f"what is {i} plus {i}", "sol": f"{i} and {i} make {2 * i}\n#### {2 * i}"}
            for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        ["train", "--model", tiny_models["qwen3"], "--task", str(data), "--prompt-field", "q",
         "--answer-field", "sol", "--test-size", "4", "--steps", "2", "--prompts-per-step", "2",
         "--group-size", "2", "--max-new-tokens", "4", "--eval-samples", "4", "--lr", "1e-4",
         "--output", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert "held-out accuracy after" in stdout
    assert stdout.count("NF4 matmul routes measured on Some GPU, bfloat16: rows 1-64 cuda mma, more bnb\n") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    config = json.loads((out / "run_config.json").read_text())
    assert (config["prompt_field"], config["answer_field"]) == ("q", "sol")
    code, stdout, stderr = run_cli(["eval", "--layer-checkpoint", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    header, row, wrote = stdout.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == ["model", "task", "problems", "metric", "score",
                                                   "mean reward"]
    # Cells are separated by two or more spaces (single spaces occur inside the model label).
    model, task, problems, metric, score, mean_reward = re.split(r"\s{2,}", row.strip())
    assert model == f"{tiny_models['qwen3']} + layer 1 ({out})"   # 4 layers: mid = 1
    assert (task, problems, metric) == (str(data), "4", "greedy accuracy")  # --test-size 4
    assert wrote.startswith("wrote ")
    record = json.loads(Path(wrote[len("wrote "):]).read_text())
    assert len(record["per_problem"]) == 4
    prompts = {p["prompt"] for p in record["per_problem"]}
    assert len(prompts) == 4 and all(p.startswith(tuple(r["q"] for r in rows)) for p in prompts)
    solved = sum(max(p["rewards"]) >= 1 for p in record["per_problem"]) / 4
    rewards = [r for p in record["per_problem"] for r in p["rewards"]]
    assert score == f"{solved:.1%}" and mean_reward == f"{sum(rewards) / len(rewards):.3f}"


def test_eval_bad_input_exits_2(tmp_path, capsys):
    code, _, stderr = run_cli(["eval", "--layer-checkpoint", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
