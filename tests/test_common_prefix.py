"""Rows that begin alike run their common tokens once (onelayer/model/common_prefix.py): the same
loss, gradient and log-probs as running every row whole."""
import logging

import pytest
import torch

from onelayer.model import load_policy
from onelayer.model import common_prefix
from onelayer.model.arch import check_prefix_sharing
from onelayer.model.split import _PrefixKeys
from onelayer.rollout import Rollout
from onelayer.update import completion_hidden, micro_batch_loss, prefix_cache

LAYER = 1


def agent_rows(vocab: int, *, shared: int = 12, seed: int = 0) -> Rollout:
    """Five decision rows like an agent's: the same `shared` instruction tokens, then an
    observation of 3..9 tokens (prompts left-padded to one width), then an action of 1..4
    tokens (right-padded). Longer than the tiny Mistral's sliding window of 8."""
    g = torch.Generator().manual_seed(seed)
    instructions = torch.randint(2, vocab, (shared,), generator=g)
    observations = [torch.randint(2, vocab, (n,), generator=g) for n in (3, 9, 5, 7, 4)]
    actions = [torch.randint(2, vocab, (n,), generator=g) for n in (2, 1, 4, 3, 2)]
    width = shared + max(len(o) for o in observations)
    ids = torch.zeros(5, width + 4, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros(5, 4, dtype=torch.long)
    for row, (obs, act) in enumerate(zip(observations, actions)):
        prompt = torch.cat([instructions, obs])
        ids[row, width - len(prompt):width] = prompt
        ids[row, width:width + len(act)] = act
        attention[row, width - len(prompt):width + len(act)] = 1
        completion[row, :len(act)] = 1
    return Rollout(ids, attention, completion, width, [""] * 5)


def test_find_packs_rows_and_stops_at_the_first_difference():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 3],
                        [5, 6, 7, 8, 9, 10, 11, 12, 13, 4, 2, 2],
                        [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 4, 9]])
    mask = (ids != 0).long()
    shared = common_prefix.find(ids, mask, limit=20)
    assert shared.length == 9
    h = ids[..., None].float()
    prefix, rest = shared.gather(h)
    assert prefix[0, :, 0].tolist() == list(range(5, 14))
    assert rest[0, :1, 0].tolist() == [3] and rest[1, :3, 0].tolist() == [4, 2, 2]
    assert rest[2, :2, 0].tolist() == [4, 9]
    assert shared.rest_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    # Original column -> column in the rest: row 0's last token, row 2's last two.
    assert shared.rest_column(torch.tensor([0, 1, 2]), torch.tensor([11, 10, 11])).tolist() == [0, 1, 1]
    out = torch.full_like(h, -1.0)
    shared.scatter(prefix, rest, out)   # gather undone at every real column, padding untouched
    assert torch.equal(torch.where(mask.bool()[..., None], out, -1.0), torch.where(mask.bool()[..., None], h, -1.0))
    assert common_prefix.find(ids, mask, limit=8).length == 8
    assert common_prefix.find(ids, mask, limit=7) is None         # below MIN_LENGTH
    assert common_prefix.find(ids[:1], mask[:1], limit=20) is None   # one row
    other = ids.clone()
    other[1, 3] = 30
    assert common_prefix.find(other, mask, limit=20) is None       # 3 tokens in common


@pytest.mark.parametrize("arch, layer", [("qwen3", LAYER), ("qwen2", LAYER), ("llama", LAYER), ("mistral", LAYER),
                                         ("qwen3", "1,3")])   # two trained layers, a frozen one between
def test_shared_rows_give_the_whole_rows_loss_and_gradient(tiny_models, arch, layer):
    policy = load_policy(tiny_models[arch], layer=layer, frozen_dtype="fp32", device="cpu")
    assert policy.split.shares_prefixes   # proved at load
    rollout = agent_rows(policy.split.config.vocab_size)
    rows = torch.arange(5)
    h = policy.split.prefix(rollout.sequences, policy.split.context(rollout.attention_mask, torch.float32))
    tokens = int(rollout.completion_mask.sum())
    g = torch.Generator().manual_seed(1)
    old = -3 + 0.3 * torch.randn(rollout.completion_mask.shape, generator=g)
    advantages = torch.randn(5, generator=g)[:, None].expand(-1, 4)

    def loss_and_grads(shared: bool):
        policy.split.shares_prefixes = shared
        params = {n: p.detach().clone().requires_grad_(True) for n, p in policy.layer.policy_params().items()}
        hidden = completion_hidden(policy, h, rollout, rows, params)
        loss, _ = micro_batch_loss(policy, h, rollout, rows, advantages, old, None, objective(),
                                   num_seqs=5, num_tokens=torch.tensor(tokens), params=params)
        loss.backward()
        return hidden.detach(), loss.detach(), {n: p.grad for n, p in params.items()}

    hidden, loss, grads = loss_and_grads(True)
    whole_hidden, whole_loss, whole_grads = loss_and_grads(False)
    assert hidden.shape == (tokens, policy.split.config.hidden_size)
    torch.testing.assert_close(hidden, whole_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, whole_loss, atol=1e-6, rtol=1e-5)
    for name in whole_grads:
        assert whole_grads[name].abs().max() > 0
        torch.testing.assert_close(grads[name], whole_grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_shared_prefix_pass_gives_the_whole_rows_h(tiny_models, arch):
    """The frozen blocks before the trained layer (2 of them here) run the common tokens once
    too: h_L at every real column as from whole rows, in micro-batches of 3 and 2 rows."""
    policy = load_policy(tiny_models[arch], layer=2, frozen_dtype="fp32", device="cpu")
    rollout = agent_rows(policy.split.config.vocab_size)
    real = rollout.attention_mask.bool()
    shared = prefix_cache(policy, rollout, 3)
    policy.split.shares_prefixes = False
    whole = prefix_cache(policy, rollout, 3)
    torch.testing.assert_close(shared[real], whole[real], atol=1e-5, rtol=1e-5)
    assert torch.all(shared[~real] == 0)


def objective():
    from onelayer.config import build_config
    from onelayer.update import build_objective

    return build_objective(build_config({"model": "x", "max_new_tokens": 4, "beta": 0.0}), torch.device("cpu"))


def test_a_block_that_misuses_the_prefix_keys_is_caught_at_load(tiny_models, monkeypatch, caplog):
    """Were a family's attention to drop what its cache returns, or to see other keys than the
    common prefix's, the load-time check would fail or find the log-probs wrong: rows then run
    whole, with a line in the log saying why."""
    policy = load_policy(tiny_models["qwen3"], layer=LAYER, frozen_dtype="fp32", device="cpu")
    assert check_prefix_sharing(policy.split, torch.float32)
    real = _PrefixKeys.update
    ignored = lambda self, key, value, *a, **k: real(self, key, value) if self.prefix is None else (key, value)  # noqa: E731

    def zeroed(self, key, value, *args, **kwargs):
        if self.prefix is not None:
            self.prefix = tuple(torch.zeros_like(t) for t in self.prefix)
        return real(self, key, value)

    for wrong, says in [(ignored, "RuntimeError"), (zeroed, "log-probs differ")]:
        monkeypatch.setattr(_PrefixKeys, "update", wrong)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onelayer"):
            assert not check_prefix_sharing(policy.split, torch.float32)
        assert "qwen3: rows run whole" in caplog.text and says in caplog.text


def test_layers_attached_to_a_loaded_model_share_prefixes_too(tiny_models):
    """The sweeps of `onelayer contribution` and `probe` attach layer after layer to one model."""
    from onelayer.model.shared import attach, load_frozen

    base = load_frozen(tiny_models["mistral"], device="cpu")
    with attach(base, 2) as policy:
        assert policy.split.shares_prefixes
