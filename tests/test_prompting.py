"""--chat / --no-chat, --chat-template-kwargs, --stop, --max-prompt-tokens, --mask-truncated."""
import json

import pytest
import torch

from conftest import char_tokenizer
from onelayer.cli import main
from conftest import run_cli
from onelayer.config import build_config
from onelayer.errors import UserError
from onelayer.evaluate import EvalConfig, drop_long_prompts, run_eval
from onelayer.model import load_policy
from onelayer.prompting import PromptStyle, check_style, prompt_fits, render_prompt
from onelayer.single_turn import rl_step, without_truncated
from onelayer.tasks import Task
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.tasks.stream import TrainingRows
from onelayer.update import build_objective

# A template with a Qwen3-style switch: thinking unless enable_thinking is false.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: "
            "{% if enable_thinking is defined and not enable_thinking %}(no thinking) "
            "{% endif %}{% endif %}")


def toy_task(chat: bool) -> Task:
    return Task("toy", train=[], test=[], prompt=lambda row: row["q"], reward=lambda c, r: 0.0,
                chat=chat)


def test_chat_is_forced_either_way_and_template_kwargs_reach_the_template():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    row = {"q": "1+1="}
    assert render_prompt(tok, toy_task(True), row) == "user: 1+1=\nassistant: "
    assert render_prompt(tok, toy_task(False), row) == "1+1="
    forced = render_prompt(tok, toy_task(False), row, PromptStyle(chat=True))
    assert forced == "user: 1+1=\nassistant: "
    assert render_prompt(tok, toy_task(True), row, PromptStyle(chat=False)) == "1+1="
    no_thinking = PromptStyle(template_kwargs={"enable_thinking": False})
    assert render_prompt(tok, toy_task(True), row, no_thinking).endswith("(no thinking) ")
    check_style(tok, PromptStyle(chat=True), "m")              # has a template: fine
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        check_style(tok, PromptStyle(chat=True), "m")



@pytest.mark.parametrize("value", ["[1, 2]", "enable_thinking=false", '"x"'])
def test_template_kwargs_must_be_a_json_object(tiny_models, tmp_path, capsys, value):
    code, _, err = run_cli(["train", "--model", tiny_models["qwen3"], "--chat-template-kwargs", value,
                         "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "must be a JSON object" in err
    assert not (tmp_path / "out").exists()


def test_chat_without_a_template_is_one_line_exit_2(tiny_models, tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", tiny_models["qwen3"], "--chat",
                         "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no chat template" in err
    assert not (tmp_path / "out").exists()


def test_prompt_and_stop_options_from_the_cli_and_a_config_file(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr("onelayer.train.train", lambda cfg, **kwargs: runs.append(cfg))
    path = tmp_path / "run.toml"
    path.write_text('model = "M"\nstop = ["\\n\\nQuestion:"]\nchat = true\n'
                    'chat-template-kwargs = { enable_thinking = false }\nmax-prompt-tokens = 512\n')
    main(["train", "--config", str(path)])
    main(["train", "--config", str(path), "--stop", "\n\nQ:", "--stop", "</answer>", "--no-chat",
          "--chat-template-kwargs", '{"enable_thinking": true}', "--mask-truncated"])
    from_file, typed = runs
    assert (from_file.stop, from_file.chat, from_file.chat_template_kwargs,
            from_file.max_prompt_tokens, from_file.mask_truncated) == (
        ["\n\nQuestion:"], True, {"enable_thinking": False}, 512, False)
    assert (typed.stop, typed.chat, typed.chat_template_kwargs, typed.mask_truncated) == (
        ["\n\nQ:", "</answer>"], False, {"enable_thinking": True}, True)
    with pytest.raises(UserError, match="empty"):
        build_config({"stop": [""]})


def test_long_prompts_are_dropped_and_counted_never_cut():
    tok = char_tokenizer()
    rows = [{"q": "1+1="}, {"q": "12345+67890="}, {"q": "2+2="}, {"q": "99999-1="}]
    task = Task("toy", train=rows, test=rows, prompt=lambda r: r["q"], reward=lambda c, r: 0.0)
    fits = prompt_fits(tok, task, PromptStyle(), 8)
    assert [fits(r) for r in rows] == [True, False, True, True]
    stream = TrainingRows(rows, seed=0, fits=fits)
    taken = stream.take(5) + stream.take(4)
    assert all(len(r["q"]) <= 8 for r in taken) and len(taken) == 9
    assert stream.dropped == 3 and len(stream.fit) == 4        # every row measured once
    kept, dropped = drop_long_prompts(tok, task, PromptStyle(), rows, 8)
    assert kept == [rows[0], rows[2], rows[3]] and dropped == 1
    assert prompt_fits(tok, task, PromptStyle(), 0)(rows[1])   # 0: no limit
    with pytest.raises(UserError, match="max-prompt-tokens"):
        drop_long_prompts(tok, task, PromptStyle(), rows, 3)


def test_train_and_eval_report_dropped_prompts(tiny_models, tmp_path):
    from onelayer.tasks import load_task
    from onelayer.train import train
    data = tmp_path / "mixed.jsonl"
    questions = ["1 plus 1", "a much longer question about 2 plus 2"]
    data.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n"
                            for q in questions * 6))
    task = load_task(str(data), test_size=6)
    limit = len(task.prompt({"prompt": questions[0]}))        # one character, one token
    held_out_long = sum(len(task.prompt(r)) > limit for r in task.test)
    assert 0 < held_out_long < 6
    cfg = build_config({"model": tiny_models["qwen3"], "task": str(data), "test_size": 6,
                        "steps": 2, "prompts_per_step": 3, "group_size": 2, "max_new_tokens": 2,
                        "eval_samples": 6, "max_prompt_tokens": limit,
                        "output": str(tmp_path / "run")})
    lines = []
    train(cfg, progress=False, echo=lines.append)
    metrics = [json.loads(x) for x in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["prompts_dropped"] for r in metrics) >= 1
    assert (f"dropped {held_out_long} held-out prompts longer than --max-prompt-tokens "
            f"{limit}") in lines
    assert sum("training prompts longer than --max-prompt-tokens" in x for x in lines) == 1
    # `onelayer eval` of the layer applies the run's limit (and its generation length).
    echoed = []
    run_eval(EvalConfig(layer_checkpoint=str(tmp_path / "run"), output=str(tmp_path / "e.json")),
             progress=False, echo=echoed.append)
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["prompts_dropped"] == held_out_long and record["max_new_tokens"] == 2
    assert record["problems"] == 6 - held_out_long
    assert all("longer" not in p["prompt"] for p in record["per_problem"])
    assert (f"dropped {held_out_long} of 6 held-out problems longer than --max-prompt-tokens "
            f"{limit}") in echoed


def never_ending(policy):
    """The policy's sampler can never produce EOS (its logit is -inf), so every completion
    runs to max_new_tokens; the loss's log-probs do not go through this hook."""
    eos = policy.tokenizer.eos_token_id
    policy.split.lm.lm_head.register_forward_hook(
        lambda module, args, logits: logits.index_fill(-1, torch.tensor([eos]), float("-inf")))
    return policy


def test_mask_truncated_leaves_no_loss_on_completions_cut_at_max_length(tiny_models):
    task = arithmetic_task(n_train=10, n_test=1)
    task = Task(task.name, task.train, task.test, task.prompt,
                reward=lambda completion, row: float(len(completion.replace(" ", "")) % 2))
    moved = {}
    for mask_truncated in (True, False):
        policy = never_ending(load_policy(tiny_models["qwen3"], layer=1, device="cpu"))
        before = {n: p.detach().clone() for n, p in policy.layer.master.items()}
        cfg = build_config({"model": "M", "group_size": 4, "prompts_per_step": 2,
                            "max_new_tokens": 3, "lr": 1e-2, "mask_truncated": mask_truncated})
        optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
        metrics = rl_step(policy, optimizer, task, task.train[:2], cfg,
                          build_objective(cfg, policy.device),
                          generator=torch.Generator().manual_seed(0))
        assert metrics["truncated"] == 1.0 and metrics["completion_len"] == 3
        moved[mask_truncated] = any(not torch.equal(p, before[n])
                                    for n, p in policy.layer.master.items())
    assert moved == {True: False, False: True}


def test_without_truncated_masks_whole_rows_and_keeps_their_context(tiny_models):
    from onelayer.rollout import SamplingParams, generate_completions
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    rollout = generate_completions(policy.split.lm, policy.tokenizer, ["1+1=", "2+2="],
                                   SamplingParams(3), repeat=2,
                                   generator=torch.Generator().manual_seed(0))
    rollout.truncated = torch.tensor([True, False, True, False])   # as if rows 0 and 2 ran out
    masked = without_truncated(rollout)
    assert masked.completion_mask[[0, 2]].sum() == 0
    assert torch.equal(masked.completion_mask[[1, 3]], rollout.completion_mask[[1, 3]])
    assert torch.equal(masked.attention_mask, rollout.attention_mask)
