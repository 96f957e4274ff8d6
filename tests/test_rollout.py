"""Sampling: per-sequence EOS stop, padding, and the completion mask."""
import torch

from onelayer.model import load_policy
from onelayer.rollout import SamplingParams, completion_mask, generate_completions


def test_completion_mask_stops_after_first_eos():
    eos = 1
    completions = torch.tensor([[5, 6, 1, 0, 0],     # EOS then padding
                                [5, 1, 1, 1, 1],     # padding equal to EOS
                                [5, 6, 7, 8, 9],     # ran to max_new_tokens
                                [1, 0, 0, 0, 0]])    # EOS at once
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(completion_mask(completions, [eos]), expected)
    assert torch.equal(completion_mask(completions, [7, eos])[2], torch.tensor([1, 1, 1, 0, 0]))


def test_generate_groups_padding_and_masks(tiny_models):
    policy = load_policy(tiny_models["llama"], layer=1, device="cpu")
    prompts = ["1+1=", "123-45="]
    torch.manual_seed(0)
    rollout = generate_completions(policy.split.lm, policy.tokenizer, prompts,
                                   SamplingParams(max_new_tokens=6), repeat=3)
    B, width = rollout.sequences.shape
    assert B == 6 and width == rollout.prompt_len + rollout.completion_mask.shape[1]
    assert rollout.completion_mask.shape[1] <= 6
    # Prompts are left-padded and repeated consecutively (one group per prompt).
    prompt_ids = rollout.sequences[:, :rollout.prompt_len]
    assert torch.equal(prompt_ids[0], prompt_ids[2]) and not torch.equal(prompt_ids[2], prompt_ids[3])
    assert rollout.attention_mask[0, :3].sum() == 0 and rollout.attention_mask[3].bool()[:rollout.prompt_len].all()
    # The attention mask is the prompt mask followed by the completion mask.
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_len:], rollout.completion_mask)
    # Decoded text is the masked completion.
    for row, text in zip(range(B), rollout.texts):
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        assert text == policy.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_is_deterministic_and_sampling_is_seeded(tiny_models):
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    args = (policy.split.lm, policy.tokenizer, ["9+9=", "1-2="])
    greedy = SamplingParams(max_new_tokens=5, greedy=True)
    assert generate_completions(*args, greedy).texts == generate_completions(*args, greedy).texts
    sampled = SamplingParams(max_new_tokens=5, temperature=1.3)
    torch.manual_seed(3)
    a = generate_completions(*args, sampled, repeat=4).sequences
    torch.manual_seed(3)
    b = generate_completions(*args, sampled, repeat=4).sequences
    assert torch.equal(a, b)


def test_concat_rollouts_repads_and_keeps_every_token(tiny_models):
    from onelayer.rollout import concat_rollouts, select_rollout
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    torch.manual_seed(1)
    a = generate_completions(policy.split.lm, policy.tokenizer, ["1+1=", "22+333="],
                             SamplingParams(max_new_tokens=3), repeat=2)
    b = generate_completions(policy.split.lm, policy.tokenizer, ["123456789+1="],
                             SamplingParams(max_new_tokens=6), repeat=2)
    both = concat_rollouts([select_rollout(a, torch.tensor([0, 3])), b], policy.tokenizer.pad_token_id)
    assert both.prompt_len == max(a.prompt_len, b.prompt_len)
    assert both.texts == [a.texts[0], a.texts[3], *b.texts]
    for row, (src, i) in enumerate([(a, 0), (a, 3), (b, 0), (b, 1)]):
        real = both.sequences[row][both.attention_mask[row].bool()]
        assert torch.equal(real, src.sequences[i][src.attention_mask[i].bool()])
        n = src.completion_mask.shape[1]
        assert torch.equal(both.completion_mask[row, :n], src.completion_mask[i])
        assert both.completion_mask[row, n:].sum() == 0
