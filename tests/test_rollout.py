"""Sampling: onelayer's own decode loop, its log-probs, stops, padding and masks."""
import dataclasses
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.rollout import SamplingParams, concat_rollouts, generate_completions, select_rollout
from onelayer.rollout.generate import (StopStrings, end_of_turn_id, restrict, sample,
                                       stop_token_ids)
from onelayer.single_turn import rl_step
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.update import build_objective, frozen_logprobs, optimize, schedule

# Different lengths, so that the batch is left-padded.
PROMPTS = ["1+1=", "23+45=", "999-1=", "abc", "7-8=", "hello", "0-0=", "12345+67890="]

# Fields transformers would apply on its own in `generate` when onelayer leaves them unset.
GENERATION_CONFIG = {"eos_token_id": 1, "pad_token_id": 0, "do_sample": True,
                     "temperature": 0.3, "top_k": 5, "top_p": 0.5, "min_p": 0.2,
                     "typical_p": 0.9, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2,
                     "suppress_tokens": [5, 6, 7], "bad_words_ids": [[8], [9]]}


@pytest.fixture(scope="module")
def opinionated_model(tmp_path_factory):
    """A tiny Qwen3 whose generation_config.json sets every sampling knob it can."""
    path = tmp_path_factory.mktemp("genconfig") / "m"
    make_tiny_model(path, "qwen3")
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return str(path)


def argmax_decode(lm, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain greedy decoding, one unpadded prompt, a full forward per token, no cache."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = []
    for _ in range(max_new_tokens):
        token = lm(input_ids=ids).logits[0, -1].argmax().item()
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_is_plain_argmax_whatever_the_generation_config_says(opinionated_model):
    policy = load_policy(opinionated_model, layer=1, device="cpu")
    lm, tok = policy.split.lm, policy.tokenizer
    assert lm.generation_config.repetition_penalty == 1.5      # the checkpoint's config is live
    rollout = generate_completions(lm, tok, PROMPTS, SamplingParams(12, greedy=True))
    expected = [argmax_decode(lm, tok, p, 12) for p in PROMPTS]
    ours = [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids,
                                                           rollout.completion_mask)]
    assert ours == expected
    # The control: Hugging Face's greedy generate applies the checkpoint's penalties.
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    hf = lm.generate(**enc, max_new_tokens=12, do_sample=False)[:, enc.input_ids.shape[1]:]
    assert sum(hf[i, :len(e)].tolist() != e for i, e in enumerate(expected)) >= 4


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])   # mistral: a sliding window of 8
def test_sampler_logprobs_are_the_engines_and_the_first_ratio_is_one(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch)
    (tmp_path / arch / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    cfg = build_config({"model": path, "temperature": 0.7, "epochs": 2, "minibatch": 8,
                        "max_new_tokens": 10, "lr": 1e-2})
    policy = load_policy(path, layer=1, device="cpu")
    objective = build_objective(cfg, policy.device)
    generator = torch.Generator().manual_seed(0)
    rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS,
                                   SamplingParams(10, temperature=0.7), repeat=2,
                                   generator=generator)
    assert (rollout.attention_mask[:, 0] == 0).any()                       # left padding
    ctx = policy.split.context(rollout.attention_mask, policy.compute_dtype)
    old = frozen_logprobs(policy, policy.split.prefix(rollout.sequences, ctx), rollout,
                          objective, params=None)
    mask = rollout.completion_mask.bool()
    assert torch.equal(rollout.logprobs[~mask], torch.zeros_like(rollout.logprobs[~mask]))
    torch.testing.assert_close(rollout.logprobs[mask], old[mask], rtol=0, atol=2e-5)

    advantages = torch.linspace(-1, 1, len(PROMPTS) * 2)[:, None].expand_as(mask)
    stats = optimize(policy, torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr), rollout,
                     advantages, schedule(cfg), objective, generator)
    assert len(stats) == 4                                 # 2 epochs x 2 minibatches
    assert stats[0]["ratio_mean"] == 1.0 and stats[0]["clip_ratio"] == 0.0
    assert stats[-1]["ratio_mean"] != 1.0                  # the control: the layer did move


MISMATCH = {"sampler_logprob_gap", "sampler_kl"}


def one_step(model: str, **options) -> dict:
    """The metrics of one GRPO step on the arithmetic task (sampled at temperature 0.7)."""
    cfg = build_config({"model": model, "temperature": 0.7, "group_size": 4,
                        "prompts_per_step": 2, "max_new_tokens": 8, "lr": 1e-2, **options})
    policy = load_policy(model, layer=1, device="cpu")
    task = arithmetic_task(n_train=4, n_test=1)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    return rl_step(policy, optimizer, task, task.train[:2], cfg,
                   build_objective(cfg, policy.device), generator=torch.Generator().manual_seed(0))


def test_step_reports_the_samplers_distance_from_the_trainer(tiny_models):
    """fp32 on CPU: the decoder and the engine compute the same log-probs, so the gap and the
    KL are float rounding."""
    metrics = one_step(tiny_models["qwen3"])
    assert 0 <= metrics["sampler_logprob_gap"] < 1e-4 and 0 <= metrics["sampler_kl"] < 1e-4


def test_mismatch_measures_the_samplers_logprobs_on_the_trained_tokens(tiny_models):
    """The control: sampler log-probs shifted by 0.25 on the completion tokens (not on the
    padding, which a mean over every entry would dilute) give a gap of 0.25 and the k3 KL of
    d = -0.25 in every optimizer step."""
    cfg = build_config({"model": tiny_models["qwen3"], "temperature": 0.7, "epochs": 2,
                        "minibatch": 4, "lr": 1e-2})
    policy = load_policy(cfg.model, layer=1, device="cpu")
    rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS[:4],
                                   SamplingParams(8, temperature=0.7), repeat=2,
                                   generator=torch.Generator().manual_seed(0))
    mask = rollout.completion_mask
    assert not mask.all()                                   # there is padding to leave alone
    shifted = dataclasses.replace(rollout, logprobs=rollout.logprobs + 0.25 * mask)
    stats = optimize(policy, torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr), shifted,
                     torch.zeros(mask.shape), schedule(cfg), build_objective(cfg, policy.device))
    k3 = math.exp(-0.25) + 0.25 - 1
    for step in stats:
        assert step["sampler_logprob_gap"] == pytest.approx(0.25, abs=1e-4)
        assert step["sampler_kl"] == pytest.approx(k3, abs=1e-4)


def test_tis_weighs_each_tokens_advantage_by_the_capped_ratio(tiny_models):
    """--tis-cap 2 with sampler log-probs 0.5 below the trainer's on even rows (weight e^0.5)
    and 1.0 below on odd rows (e^1 > 2: capped): the update is the one without TIS on
    advantages scaled by those weights, and another than the unweighted one."""
    def run(tis_cap: float, scale: torch.Tensor | None):
        cfg = build_config({"model": tiny_models["qwen3"], "temperature": 0.7, "lr": 0.5,
                            "tis_cap": tis_cap})
        policy = load_policy(cfg.model, layer=1, device="cpu")
        rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS[:4],
                                       SamplingParams(8, temperature=0.7), repeat=2,
                                       generator=torch.Generator().manual_seed(0))
        mask = rollout.completion_mask
        odd = (torch.arange(mask.shape[0]) % 2 == 1)[:, None]
        shifted = dataclasses.replace(rollout, logprobs=rollout.logprobs - torch.where(
            odd, 1.0, 0.5) * mask)
        advantages = torch.linspace(-1, 1, mask.shape[0])[:, None].expand_as(mask)
        if scale is not None:
            advantages = advantages * torch.where(odd, 2.0, math.exp(0.5))
        # SGD: a step proportional to the gradient, so a weight shows in the weights.
        (stats,) = optimize(policy, torch.optim.SGD(policy.layer.parameters(), lr=cfg.lr),
                            shifted, advantages, schedule(cfg), build_objective(cfg, policy.device))
        tokens = mask.bool()
        expected_capped = (odd.expand_as(tokens) & tokens).sum().item() / tokens.sum().item()
        return stats, {k: v.clone() for k, v in policy.layer.state_dict().items()}, expected_capped

    weighted, after, capped = run(2.0, None)
    assert weighted["tis_capped"] == pytest.approx(capped)
    assert weighted["tis_weight_mean"] == pytest.approx(2 * capped + math.exp(0.5) * (1 - capped),
                                                        rel=1e-4)
    scaled, scaled_after, _ = run(0.0, torch.ones(1))
    assert "tis_weight_mean" not in scaled
    assert weighted["loss"] == pytest.approx(scaled["loss"], rel=1e-4)
    for name in after:
        torch.testing.assert_close(after[name], scaled_after[name], rtol=1e-4, atol=1e-6)
    _, plain_after, _ = run(0.0, None)
    assert any(not torch.allclose(after[n], plain_after[n], rtol=1e-4, atol=1e-6) for n in after)


def test_a_gspo_step_is_grpos_on_policy():
    """--importance-level sequence through a whole step of the demo (rewards that differ): the
    only minibatch is on-policy, every sequence ratio is exactly 1, and s_i * grad log pi
    equals the token ratio's gradient there: the same gradient as GRPO's."""
    gspo, grpo = one_step("demo", importance_level="sequence"), one_step("demo")
    assert gspo["ratio_mean"] == 1.0 and gspo["clip_ratio"] == 0.0 and gspo["reward_std"] > 0
    assert gspo["grad_norm"] == pytest.approx(grpo["grad_norm"], rel=1e-6) and grpo["grad_norm"] > 0


def test_overlong_penalty_is_dapos_soft_punishment():
    """max 10 new tokens, buffer 4: nothing up to 6 tokens, then -1/4 a token down to -1."""
    from onelayer.rollout import Rollout
    from onelayer.single_turn import overlong_penalty

    lengths = torch.tensor([3, 6, 7, 8, 10])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    rollout = Rollout(torch.zeros(5, 12, dtype=torch.long), torch.ones(5, 12), mask, 2,
                      [""] * 5)
    assert overlong_penalty(rollout, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]


def test_overlong_buffer_lowers_the_rewards_of_the_same_samples():
    """--overlong-buffer 8 at --max-new-tokens 8: every completion pays length / 8, on the very
    samples the run without it draws (the penalty comes after sampling)."""
    plain, punished = one_step("demo"), one_step("demo", overlong_buffer=8)
    assert "overlong_penalty" not in plain
    assert punished["overlong_penalty"] == pytest.approx(-plain["completion_len"] / 8)
    assert punished["reward_mean"] == pytest.approx(plain["reward_mean"]
                                                    + punished["overlong_penalty"])


@pytest.mark.parametrize("options", [{"top_k": 5}, {"top_p": 0.9}], ids=["top_k", "top_p"])
def test_filtered_sampling_reports_no_mismatch(tiny_models, options):
    """With top-k or top-p the sampler's log-probs are of another distribution than the
    loss's: nothing to compare, so no such metrics (the step is otherwise whole)."""
    metrics = one_step(tiny_models["qwen3"], **options)
    assert not MISMATCH & set(metrics) and {"loss", "kl", "grad_norm"} <= set(metrics)


def test_top_k_and_top_p_keep_the_smallest_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda k, p: torch.isfinite(restrict(scores, k, p))[0].tolist()  # noqa: E731
    assert kept(0, 1.0) == [True] * 5
    assert kept(2, 1.0) == [True, True, False, False, False]
    assert kept(0, 0.5) == [True, False, False, False, False]     # 0.5 alone reaches 0.5
    assert kept(0, 0.8) == [True, True, True, False, False]       # 0.7 < 0.8 <= 0.85
    assert kept(4, 0.99) == [True, True, True, True, False]       # top-k first, then top-p
    assert kept(0, 1e-9) == [True, False, False, False, False]    # the top token always stays


def test_filtered_sampling_draws_only_inside_the_nucleus(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    params = SamplingParams(6, temperature=1.5, top_k=3)
    rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS[:4], params,
                                   repeat=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = policy.split.lm(input_ids=rollout.sequences,
                                 attention_mask=rollout.attention_mask,
                                 position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
                                 ).logits[:, rollout.prompt_len - 1:-1]
    mask = rollout.completion_mask.bool()
    rank = (logits > logits.gather(-1, rollout.completion_ids[..., None])).sum(-1)
    assert (rank[mask] < 3).all()
    # The sampler's log-probs are of the renormalised top-3 distribution.
    top3 = restrict(logits.float() / 1.5, 3, 1.0).log_softmax(-1)
    expected = top3.gather(-1, rollout.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(rollout.logprobs[mask], expected[mask], rtol=0, atol=2e-5)


def test_generate_groups_padding_and_masks(tiny_models):
    policy = load_policy(tiny_models["llama"], layer=1, device="cpu")
    prompts = ["1+1=", "123-45="]
    rollout = generate_completions(policy.split.lm, policy.tokenizer, prompts,
                                   SamplingParams(max_new_tokens=6), repeat=3,
                                   generator=torch.Generator().manual_seed(0))
    B, width = rollout.sequences.shape
    assert B == 6 and width == rollout.prompt_len + rollout.completion_mask.shape[1]
    assert rollout.completion_mask.shape[1] <= 6
    # Prompts are left-padded and repeated consecutively (one group per prompt).
    prompt_ids = rollout.sequences[:, :rollout.prompt_len]
    assert torch.equal(prompt_ids[0], prompt_ids[2])
    assert not torch.equal(prompt_ids[2], prompt_ids[3])
    assert rollout.attention_mask[0, :3].sum() == 0
    assert rollout.attention_mask[3].bool()[:rollout.prompt_len].all()
    # The attention mask is the prompt mask followed by the completion mask.
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_len:], rollout.completion_mask)
    # Decoded text is the masked completion.
    for row, text in zip(range(B), rollout.texts):
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        assert text == policy.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_is_deterministic_and_sampling_follows_its_generator(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    args = (policy.split.lm, policy.tokenizer, ["9+9=", "1-2="])
    greedy = SamplingParams(max_new_tokens=5, greedy=True)
    assert generate_completions(*args, greedy).texts == generate_completions(*args, greedy).texts
    sampled = SamplingParams(max_new_tokens=5, temperature=1.3)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate_completions(*args, sampled, repeat=4, generator=gen).sequences

    global_state = torch.get_rng_state()
    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), global_state)   # torch's own stream is untouched


def test_each_row_stops_at_its_first_stop_token_and_nothing_after_carries_loss(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    lm, tok = policy.split.lm, policy.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    free = sample(lm, enc.input_ids, enc.attention_mask, SamplingParams(10, greedy=True),
                  stop_ids=[], stop_strings=StopStrings(tok, ()), pad_id=0)
    assert free.truncated.all() and free.mask.all()
    stop = free.tokens[0, 3].item()       # the 4th greedy token of row 0 is now a stop token
    out = sample(lm, enc.input_ids, enc.attention_mask, SamplingParams(10, greedy=True),
                 stop_ids=[stop], stop_strings=StopStrings(tok, ()), pad_id=0)
    for row in range(len(PROMPTS)):
        hits = (free.tokens[row] == stop).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else free.tokens.shape[1]
        assert out.mask[row].tolist() == [1] * n + [0] * (out.mask.shape[1] - n)
        assert out.tokens[row, :n].tolist() == free.tokens[row, :n].tolist()
        assert (out.tokens[row, n:] == 0).all() and (out.logprobs[row, n:] == 0).all()
        assert bool(out.truncated[row]) == (not hits)
    assert not out.truncated[0] and out.mask[0].sum() == 4


def test_stop_strings_end_the_completion_and_its_text(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    lm, tok = policy.split.lm, policy.tokenizer
    free = generate_completions(lm, tok, PROMPTS, SamplingParams(12, greedy=True))
    text = free.texts[2]
    stop = text[3:5]                      # two characters from the middle of row 2's output
    stopped = generate_completions(lm, tok, PROMPTS, SamplingParams(12, greedy=True, stop=(stop,)))
    for row, (before, after) in enumerate(zip(free.texts, stopped.texts)):
        if stop in before:
            assert after == before[:before.index(stop) + len(stop)]
            assert not stopped.truncated[row]
        else:
            assert after == before
        n = int(stopped.completion_mask[row].sum())
        assert tok.decode(stopped.completion_ids[row, :n], skip_special_tokens=True) == after
    assert stopped.texts[2].endswith(stop) and len(stopped.texts[2]) <= 5


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=words[0])


def test_a_stop_string_across_several_tokens_is_found_at_the_token_that_completes_it():
    words = ["<pad>", "The", " answer", " is", " 4", ".\n", "\nQuest", "ion", ":", " x"]
    tok = word_tokenizer(words)
    sequence = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])     # "The answer is 4.\n\nQuestion: x"
    hits = StopStrings(tok, ("\n\nQuestion:",))
    found = [bool(hits(sequence[:, :t], torch.tensor([True]))) for t in range(1, 10)]
    assert found == [False] * 7 + [True, True]                # first at ":" (the 8th token)
    assert not hits(sequence[:, :8], torch.tensor([False]))    # finished rows are not decoded


def test_the_chat_templates_end_of_turn_token_stops(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    tok = policy.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id and end_of_turn_id(tok) == end
    assert stop_token_ids(tok, policy.split.lm) == [tok.eos_token_id, end]
    tok.chat_template = None
    assert end_of_turn_id(tok) is None


def test_concat_rollouts_repads_and_keeps_every_token(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    gen = torch.Generator().manual_seed(1)
    a = generate_completions(policy.split.lm, policy.tokenizer, ["1+1=", "22+333="],
                             SamplingParams(max_new_tokens=3), repeat=2, generator=gen)
    b = generate_completions(policy.split.lm, policy.tokenizer, ["123456789+1="],
                             SamplingParams(max_new_tokens=6), repeat=2, generator=gen)
    both = concat_rollouts([select_rollout(a, torch.tensor([0, 3])), b],
                           policy.tokenizer.pad_token_id)
    assert both.prompt_len == max(a.prompt_len, b.prompt_len)
    assert both.texts == [a.texts[0], a.texts[3], *b.texts]
    assert both.truncated.tolist() == [*a.truncated[[0, 3]].tolist(), *b.truncated.tolist()]
    for row, (src, i) in enumerate([(a, 0), (a, 3), (b, 0), (b, 1)]):
        real = both.sequences[row][both.attention_mask[row].bool()]
        assert torch.equal(real, src.sequences[i][src.attention_mask[i].bool()])
        n = src.completion_mask.shape[1]
        assert torch.equal(both.completion_mask[row, :n], src.completion_mask[i])
        assert torch.equal(both.logprobs[row, :n], src.logprobs[i])
        assert both.completion_mask[row, n:].sum() == 0 and both.logprobs[row, n:].sum() == 0
