"""Multi-turn rollout and single-layer GiGPO: masks, per-step records, advantages, learning."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import char_tokenizer, make_tiny_model
from onelayer.agentic import (HELD_OUT_SEED, gigpo_step, make_envs, parse_env_spec, success_rate,
                              token_advantages)
from onelayer.algos import gigpo_advantages_reference
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.rollout import SamplingParams
from onelayer.rollout.multiturn import TurnFormat, hf_actor, run_episodes
from onelayer.tasks.envs import TextEnv
from onelayer.tasks.envs.base import normalize_action
from onelayer.tasks.envs.gridworld import GridWorld
from onelayer.update import build_objective, frozen_logprobs, prefix_cache


def grid_tokenizer():
    """The test character tokenizer, decoding without spaces between characters."""
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


class SmallGrid(GridWorld):
    """The gridworld's rules, with a state text the character tokenizer can read in few tokens
    ('#', '.', capitals are unknown to it): "at 31 goal 13" + the valid-actions line."""
    instructions = "reach g"

    def __init__(self, *, size: int = 3, wall_prob: float = 0.0, **kwargs):
        super().__init__(size=size, wall_prob=wall_prob, **kwargs)

    def _describe(self) -> str:
        (r, c), (gr, gc) = self.pos, self.goal
        return f"at {r + 1}{c + 1} goal {gr + 1}{gc + 1}"


class Line(TextEnv):
    """Walk from 0 to 2: "a" steps forward, "b" stays. Reward 1 at 2. States repeat."""
    name = "line"
    max_turns = 3
    instructions = "walk"

    def _new_task(self, seed):
        self.pos = 0

    def _describe(self):
        return f"at {self.pos}"

    def valid_actions(self):
        return ["a", "b"]

    def _apply(self, action):
        self.pos += action == "a"
        return (1.0, True) if self.pos == 2 else (0.0, False)


def scripted(tok, choose):
    """An actor that answers choose(row, turn) + EOS for each live row, and records it."""
    calls = []

    def act(histories, rows, budgets):
        out = [tok(choose(b, len([c for c in calls if c[0] == b])), add_special_tokens=False)
               .input_ids + [tok.eos_token_id] for b in rows]
        calls.extend((b, ids, h) for b, ids, h in zip(rows, out, histories))
        return out

    act.calls = calls
    return act


class Recording:
    """Wraps an env and records the action texts it receives."""

    def __init__(self, env):
        self.env, self.received = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.received.append(action)
        return self.env.step(action)


def check_tokens(ep, calls, envs, fmt):
    """Every row = first prompt + (env delta, action)*; mask 1 exactly on the action tokens."""
    r = ep.rollout
    for b, env in enumerate(envs):
        mine = [c for c in calls if c[0] == b]
        row = r.sequences[b][r.attention_mask[b].bool()].tolist()
        prompt = row[:len(row) - int(r.attention_mask[b, r.prompt_len:].sum())]
        comp, mask = r.completion_ids[b].tolist(), r.completion_mask[b].tolist()
        steps = [s for s in range(len(ep.actions)) if ep.traj_ids[s] == b]
        assert len(mine) == len(steps) == len(env.received)
        expected_mask = [0] * len(comp)
        for s, (_, ids, history), text in zip(steps, mine, env.received):
            start, end = ep.spans[s].tolist()
            assert comp[start:end] == ids                      # as generated, not re-tokenized
            assert fmt.tokenizer.decode(comp[start:end], skip_special_tokens=True) == text
            assert ep.actions[s] == text
            assert history == prompt + comp[:start]             # the exact token history
            expected_mask[start:end] = [1] * (end - start)
        assert mask == expected_mask                            # env tokens never carry loss
        assert prompt == fmt.first(env.system_prompt, ep.observations[steps[0]])


def test_masks_and_token_history_with_a_random_model(tmp_path):
    tok = grid_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", "qwen3",
                                                              max_position_embeddings=512))
    calls = []
    inner = hf_actor(lm, tok, SamplingParams(6, temperature=1.0))

    def actor(histories, rows, budgets):  # the real sampler, recorded
        out = inner(histories, rows, budgets)
        calls.extend(zip(rows, out.ids, histories))
        return out

    torch.manual_seed(0)
    envs = [Recording(SmallGrid(max_turns=4)) for _ in range(6)]
    ep = run_episodes(actor, tok, envs, [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1],
                      max_new_tokens=6, max_turns=4, max_len=512)
    # A random model writes nonsense: invalid actions, feedback lines, some rows without EOS.
    assert not ep.valid.all() and len(ep.actions) == 24
    check_tokens(ep, calls, envs, TurnFormat(tok))


@pytest.mark.parametrize("history", [None, 0], ids=["whole", "windowed"])
def test_rollout_holds_the_samplers_logprobs_of_action_tokens(tmp_path, history):
    """hf_actor's log-probs land on the action tokens of either layout, and they are the ones
    the engine recomputes (fp32 on CPU: the same math); every other token holds 0."""
    path = make_tiny_model(tmp_path / "m", "qwen3", max_position_embeddings=512)
    cfg = build_config(dict(model=path, temperature=0.7))
    policy = load_policy(path, layer=1, device="cpu")
    actor = hf_actor(policy.split.lm, policy.tokenizer, SamplingParams(6, temperature=0.7),
                     torch.Generator().manual_seed(0))
    envs = [SmallGrid(max_turns=3) for _ in range(4)]
    ep = run_episodes(actor, policy.tokenizer, envs, [0, 0, 1, 1], [0, 0, 1, 1],
                      max_new_tokens=6, max_turns=3, max_len=512, history=history)
    r = ep.rollout
    assert ep.turns.max() > 1                          # later actions follow environment turns
    old = frozen_logprobs(policy, prefix_cache(policy, r, 0), r,
                          build_objective(cfg, policy.device), None)
    mask = r.completion_mask.bool()
    assert r.logprobs.shape == mask.shape and (r.logprobs[mask] < 0).all()
    assert torch.equal(r.logprobs[~mask], torch.zeros_like(r.logprobs[~mask]))
    torch.testing.assert_close(r.logprobs[mask], old[mask], rtol=0, atol=2e-5)


def test_out_of_memory_halves_the_rows_acting_at_once(tmp_path, monkeypatch):
    """A sampling call of more than 2 rows runs out of memory: the live episodes act in chunks
    of 2 from then on (the size stays halved), and greedy episodes are what they were."""
    from onelayer.resilience import HalveOnOOM
    from onelayer.rollout import multiturn

    path = make_tiny_model(tmp_path / "m", "qwen3", max_position_embeddings=512)
    policy = load_policy(path, layer=1, device="cpu")

    def episodes(batch):
        actor = hf_actor(policy.split.lm, policy.tokenizer, SamplingParams(6, greedy=True),
                         batch=batch)
        return run_episodes(actor, policy.tokenizer, [SmallGrid(max_turns=3) for _ in range(5)],
                            [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], max_new_tokens=6, max_turns=3,
                            max_len=512)

    whole = episodes(None)
    real, calls, lines = multiturn.sample, [], []

    def short_of_memory(lm, input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(lm, input_ids, *args, **kwargs)

    monkeypatch.setattr(multiturn, "sample", short_of_memory)
    batch = HalveOnOOM("--generation-batch", 0, echo=lines.append)
    chunked = episodes(batch)
    assert lines == ["out of memory: --generation-batch 5 -> 2, retrying"] and batch.size == 2
    assert calls[:4] == [5, 2, 2, 1] and max(calls[4:]) == 2
    assert chunked.actions == whole.actions and torch.equal(chunked.turns, whole.turns)
    assert torch.equal(chunked.rollout.sequences, whole.rollout.sequences)
    torch.testing.assert_close(chunked.rollout.logprobs, whole.rollout.logprobs)


def test_progress_counts_episodes_as_they_end():
    """Row 0 walks "a a" (ends at turn 2), row 1 "b a a" (turn 3), row 2 always "b" (still
    going when max_turns = 3 ends it): the bar moves 0, 1, 1, then the last one at the end."""
    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    tok = grid_tokenizer()
    plans = ["aa", "baa", "bbb"]
    act = scripted(tok, lambda b, t: plans[b][t])
    bar = Bar()
    ep = run_episodes(act, tok, [Line(max_turns=9) for _ in range(3)], [0, 0, 0], [0, 1, 2],
                      max_new_tokens=4, max_turns=3, max_len=200, progress=bar)
    assert ep.turns.tolist() == [2, 3, 3] and ep.success.tolist() == [True, True, False]
    assert bar.updates == [0, 1, 1, 1]


def test_chat_template_history_matches_a_full_render():
    tok = grid_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }}<eos>"
                         "{% endfor %}{% if add_generation_prompt %}a={% endif %}")
    envs = [Recording(Line()) for _ in range(2)]
    act = scripted(tok, lambda b, t: "ab"[(b + t) % 2] if t < 2 else "zz")
    ep = run_episodes(act, tok, envs, [0, 0], [0, 0], max_new_tokens=4, max_turns=3, max_len=200)
    check_tokens(ep, act.calls, envs, TurnFormat(tok))
    for b, env in enumerate(envs):
        messages = [{"role": "system", "content": "walk"}]
        replay = Line()
        obs = replay.reset(0)
        for action in env.received:
            messages += [{"role": "user", "content": obs}, {"role": "assistant", "content": action}]
            obs, _, _, info = replay.step(action)
            if info["feedback"]:
                obs = f"{info['feedback']}\n\n{obs}"
        full = tok.apply_chat_template(messages, tokenize=False)
        row = ep.rollout.sequences[b][ep.rollout.attention_mask[b].bool()].tolist()
        assert row == tok(full, add_special_tokens=False).input_ids


def line_episodes():
    """Three scripted episodes of one Line task (hand-checkable, gamma = 0.5 below)."""
    tok = grid_tokenizer()
    script = {0: "aa", 1: "baa", 2: "bbb"}
    envs = [Recording(Line()) for _ in range(3)]
    act = scripted(tok, lambda b, t: script[b][t])
    ep = run_episodes(act, tok, envs, [7, 7, 7], [0, 0, 0], max_new_tokens=4, max_turns=3,
                      max_len=200)
    return ep, act, envs, tok


def test_step_records_and_gigpo_advantages_by_hand():
    ep, act, envs, tok = line_episodes()
    check_tokens(ep, act.calls, envs, TurnFormat(tok))
    assert ep.traj_ids.tolist() == [0, 1, 2, 0, 1, 2, 1, 2]       # turn by turn, live rows
    assert ep.step_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ep.episode_group_ids.tolist() == [0] * 8
    states = [o.split("\n")[0] for o in ep.observations]
    assert states == ["at 0", "at 0", "at 0", "at 1", "at 0", "at 0", "at 1", "at 0"]
    assert ep.step_rewards.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert ep.success.tolist() == [True, True, False] and ep.turns.tolist() == [2, 3, 3]
    assert ep.returns.tolist() == [1, 1, 0]

    adv = gigpo_advantages_reference(ep.step_rewards, ep.traj_ids, ep.step_index,
                                     ep.episode_group_ids, ep.anchor_ids, gamma=0.5, omega=1.0)
    # Episode level: returns 1, 1, 0 -> mean 2/3, std sqrt(1/3).
    a_ep = [(1 / 3) / 3 ** -0.5, (1 / 3) / 3 ** -0.5, (-2 / 3) / 3 ** -0.5]
    # Step level: discounted returns at "at 0": traj0 t0 0.5; traj1 t0 0.25, t1 0.5;
    # traj2 0, 0, 0 (six members, one state met twice in traj1 and three times in traj2).
    # "at 1": traj0 t1 1, traj1 t2 1: all equal -> 0.
    at0 = torch.tensor([0.5, 0.25, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    a_at0 = ((at0 - at0.mean()) / (at0.std() + 1e-6)).tolist()
    expected = [a_ep[0] + a_at0[0], a_ep[1] + a_at0[1], a_ep[2] + a_at0[2], a_ep[0],
                a_ep[1] + a_at0[3], a_ep[2] + a_at0[4], a_ep[1], a_ep[2] + a_at0[5]]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_token_advantages_sit_on_action_tokens_only():
    ep, *_ = line_episodes()
    adv = torch.arange(1, len(ep.actions) + 1, dtype=torch.float32)   # distinct, nonzero
    tokens = token_advantages(ep, adv)
    expected = torch.zeros_like(tokens)
    for s, (b, (start, end)) in enumerate(zip(ep.traj_ids.tolist(), ep.spans.tolist())):
        assert end - start == 2                                       # "a" + EOS
        expected[b, start:end] = adv[s]
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens != 0, ep.rollout.completion_mask.bool())


@pytest.mark.parametrize("history", [0, 1])
def test_windowed_history_one_row_per_decision(history):
    """--history-turns K: each decision is a row whose prompt is exactly what the actor saw,
    the first-prompt form of obs_(t-K) and the later turns' token ids, and whose completion is
    the action as generated; the whole-episode view (texts, returns) is unchanged."""
    tok, fmt = grid_tokenizer(), TurnFormat(grid_tokenizer())
    script = {0: "aa", 1: "baa", 2: "bzb"}   # "z": an invalid action, so a feedback line
    envs = [Recording(Line()) for _ in range(3)]
    act = scripted(tok, lambda b, t: script[b][t])
    ep = run_episodes(act, tok, envs, [7, 7, 7], [0, 0, 0], max_new_tokens=4, max_turns=3,
                      max_len=200, history=history)
    whole, *_ = line_episodes()
    assert ep.texts[:2] == whole.texts[:2] and ep.returns.tolist() == pytest.approx([1, 1, -0.1])
    r = ep.rollout
    assert r.sequences.shape[0] == len(ep.actions) == 8 and ep.rows.tolist() == list(range(8))
    assert r.logprobs is None                          # a scripted actor gives ids alone
    calls = iter(act.calls)
    for s in range(8):   # steps are turn-major, like the actor's calls
        b, ids, context = next(calls)
        assert ep.traj_ids[s] == b
        row = r.sequences[s][r.attention_mask[s].bool()].tolist()
        assert row == context + ids and r.completion_mask[s].sum() == len(ids)
        assert ep.spans[s].tolist() == [0, len(ids)]
        t = int(ep.step_index[s])
        earlier = [c for c in act.calls if c[0] == b][:t]
        start = max(0, t - history)
        expected = fmt.first("walk", ep.observations[[i for i in range(8) if ep.traj_ids[i] == b][start]])
        for k in range(start, t):
            info_obs = [o for i, o in enumerate(ep.observations) if ep.traj_ids[i] == b][k + 1]
            feedback = "Invalid action: 'z'. Valid actions: a, b" if envs[b].received[k] == "z" else ""
            expected += earlier[k][1] + fmt.next(feedback, info_obs, earlier[k][1])
        assert context == expected
    tokens = token_advantages(ep, torch.arange(1, 9, dtype=torch.float32))
    assert torch.equal(tokens != 0, r.completion_mask.bool())
    assert tokens.sum(1).tolist() == [float(2 * (s + 1)) for s in range(8)]  # 2 tokens each


def test_length_cap_ends_episodes():
    tok = grid_tokenizer()
    envs = [Line(max_turns=50) for _ in range(2)]
    act = scripted(tok, lambda b, t: "b")
    ep = run_episodes(act, tok, envs, [0, 0], [0, 0], max_new_tokens=4, max_turns=50, max_len=60)
    lengths = ep.rollout.attention_mask.sum(1)
    assert (lengths <= 60).all() and 0 < ep.turns[0] < 50
    assert not ep.success.any()


def test_env_spec_options():
    assert parse_env_spec("gridworld?size=3, wall_prob=0") == ("gridworld",
                                                                {"size": 3, "wall_prob": 0})
    assert parse_env_spec("pkg.mod:Env") == ("pkg.mod:Env", {})
    cfg = build_config({"model": "x", "algo": "gigpo", "env": "gridworld?size=4", "max_turns": 7})
    envs = make_envs(cfg, 2)
    assert envs[0] is not envs[1] and envs[0].size == 4 and envs[0].max_turns == 7


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------

def random_valid_actor(envs, tok, rng):
    def act(histories, rows, budgets):
        return [tok(rng.choice(envs[b].valid_actions()), add_special_tokens=False).input_ids
                + [tok.eos_token_id] for b in rows]
    return act


def pretrain_random_mover(path, *, steps: int, max_turns: int, batch: int = 32, seed: int = 0):
    """A tiny model taught (full-model cross-entropy on the action tokens of scripted episodes,
    the same multi-turn format as the rollout) to answer a random valid move. It ends up
    answering a valid move about 2 times in 3, and never heads for the goal on purpose."""
    tok = grid_tokenizer()
    make_tiny_model(path, "qwen3", seed=seed, max_position_embeddings=512)
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(seed)
    for _ in range(steps):
        envs = [SmallGrid(max_turns=max_turns) for _ in range(batch)]
        ep = run_episodes(random_valid_actor(envs, tok, rng), tok, envs,
                          [rng.randrange(10**6) for _ in envs], list(range(batch)),
                          max_new_tokens=8, max_turns=max_turns, max_len=512)
        r = ep.rollout
        logits = model(input_ids=r.sequences, attention_mask=r.attention_mask).logits
        mask = r.completion_mask.bool()
        loss = torch.nn.functional.cross_entropy(logits[:, r.prompt_len - 1:-1][mask],
                                                 r.completion_ids[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return str(path)


def mover_gigpo_run(path):
    """The random mover (seeded), set up for GiGPO on layer 3 of 4 with the settings of the
    measured run: (cfg, policy, objective, optimizer)."""
    torch.manual_seed(0)
    model = pretrain_random_mover(path, steps=60, max_turns=5)
    cfg = build_config(dict(model=model, layer="3", algo="gigpo", env="test_multiturn:SmallGrid",
                            max_turns=5, group_size=8, prompts_per_step=4, lr=3e-3, epochs=2,
                            minibatch=16, max_new_tokens=8, device="cpu", loss_impl="torch"))
    policy = load_policy(model, layer=cfg.layer, device="cpu")
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    return cfg, policy, build_objective(cfg, policy.device), optimizer


def test_gigpo_raises_gridworld_success(tmp_path):
    # 3x3 gridworld, tasks (seeds) 0 and 3: goal 4 and 2 moves away, up and to the right; at
    # most 5 turns. Measured on 2 cores (~25 s): sampled success 12.5% -> 48.4% after 15 steps
    # (with seeds 1 and 2 for pretraining and sampling: 9.4% -> 31.3%, 26.6% -> 65.6%).
    cfg, policy, objective, optimizer = mover_gigpo_run(tmp_path / "mover")
    tasks = [0, 3]
    before = success_rate(policy, cfg, tasks * 32, greedy=False)
    rows = [gigpo_step(policy, optimizer, cfg, objective, tasks * 2) for _ in range(15)]
    after = success_rate(policy, cfg, tasks * 32, greedy=False)
    assert after >= before + 0.15, (before, after, [r["success_rate"] for r in rows])
    assert METRICS <= set(rows[0]) and rows[0]["episode_len"] <= 5


METRICS = {"reward_mean", "success_rate", "episode_len", "valid_actions", "loss", "kl",
           "sampler_logprob_gap", "sampler_kl", "step_s", "gen_s", "update_s", "tokens_per_s"}


class Length(TextEnv):
    """Any reply is an action; it succeeds when its length in characters and the task number
    leave the same remainder mod 3. Success depends on the model's reply and on the task, so
    even a random model solves some tasks and not others."""
    name = "length"
    instructions = "say"

    def _new_task(self, seed):
        self.n = seed % 10

    def _describe(self):
        return f"task {self.n}"

    def valid_actions(self):
        return ["any"]

    def parse_action(self, text):
        return normalize_action(text)

    def _apply(self, action):
        return (1.0, True) if len(action) % 3 == self.n % 3 else (0.0, False)


def greedy_success(model_dir, layer_dir, seeds, *, max_turns, max_new_tokens):
    """Share of the tasks `seeds` that greedy episodes solve, played here one at a time with the
    Hugging Face model and `generate` (no batching, no padding, no onelayer rollout or policy
    code); `layer_dir`: a saved layer to put into the model first."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if layer_dir is not None:
        saved = load_file(str(layer_dir / "layer.safetensors"))
        assert not lm.load_state_dict(saved, strict=False).unexpected_keys
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    fmt, solved = TurnFormat(tok), 0
    for seed in seeds:
        env = Length(max_turns=max_turns)
        obs = env.reset(seed)
        history = fmt.first(env.system_prompt, obs)
        for _ in range(max_turns):
            ids = torch.tensor([history])
            # An explicit mask: the test tokenizer maps unknown characters to the pad id, which
            # generate would otherwise take for padding and hide.
            with torch.no_grad():
                out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  generation_config=config)
            action = out[0, len(history):].tolist()
            if tok.eos_token_id in action:
                action = action[:action.index(tok.eos_token_id) + 1]
            obs, _, done, info = env.step(tok.decode(action, skip_special_tokens=True))
            if done:
                solved += info["success"]
                break
            history += action + fmt.next(info["feedback"], obs, action)
    return solved / len(seeds)


def test_train_runs_gigpo_end_to_end(tmp_path):
    """`onelayer train --algo gigpo --env ...`: the run, its held-out success and its files."""
    from onelayer.train import train
    path = tmp_path / "model"
    make_tiny_model(path, "qwen3", max_position_embeddings=512)
    grid_tokenizer().save_pretrained(path)
    cfg = build_config(dict(model=str(path), algo="gigpo", env="test_multiturn:Length",
                            max_turns=3, steps=2, prompts_per_step=2, group_size=3, lr=1e-2,
                            max_new_tokens=6, eval_samples=8, output=str(tmp_path / "run")))
    lines = []
    result = train(cfg, progress=False, echo=lines.append)
    # Held-out success before and after = greedy episodes replayed independently on the
    # held-out tasks, with the base model and with the saved layer.
    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + 8))
    before = greedy_success(path, None, held_out, max_turns=3, max_new_tokens=6)
    after = greedy_success(path, tmp_path / "run", held_out, max_turns=3, max_new_tokens=6)
    assert (result.accuracy_before, result.accuracy_after) == (before, after)
    saved = load_file(str(tmp_path / "run" / "layer.safetensors"))
    base = load_file(str(path / "model.safetensors"))
    assert any(not torch.equal(t, base[name]) for name, t in saved.items())   # "after" is trained
    # Measured: 5 of the 8 held-out tasks before training, a value that the wrong policy or
    # the wrong tasks would change.
    assert 0 < before < 1, before
    assert any(line.startswith(f"held-out success rate before: {before:.1%}") for line in lines)
    assert any(line.startswith(f"held-out success rate after:  {after:.1%}") for line in lines)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(METRICS <= set(r) and 1 <= r["episode_len"] <= 3 for r in rows)
    assert (tmp_path / "run" / "layer.safetensors").is_file()


def test_history_turns_is_checked():
    from onelayer.errors import UserError
    with pytest.raises(UserError, match="--history-turns must be >= 0"):
        build_config({"model": "x", "algo": "gigpo", "env": "gridworld", "history_turns": -1})
    with pytest.raises(UserError, match="--history-turns applies to an --env"):
        build_config({"model": "x", "history_turns": 0})
    assert build_config({"model": "x", "algo": "gigpo", "env": "gridworld",
                         "history_turns": "2"}).history_turns == 2


def test_gigpo_step_trains_on_one_row_per_decision(tmp_path, monkeypatch):
    import onelayer.agentic as agentic
    model = pretrain_random_mover(tmp_path / "m", steps=0, max_turns=3)
    cfg = build_config(dict(model=model, layer="2", algo="gigpo", env="test_multiturn:SmallGrid",
                            max_turns=3, history_turns=0, group_size=4, prompts_per_step=2,
                            lr=1e-2, max_new_tokens=4, device="cpu", loss_impl="torch"))
    policy = load_policy(model, layer=cfg.layer, device="cpu")
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    seen = []
    real_optimize = agentic.optimize
    monkeypatch.setattr(agentic, "optimize", lambda policy, opt, rollout, adv, *a: (
        seen.append((rollout, adv)), real_optimize(policy, opt, rollout, adv, *a))[1])
    before = [p.detach().clone() for p in policy.layer.parameters()]
    row = gigpo_step(policy, optimizer, cfg, build_objective(cfg, policy.device), [0, 3])
    (rollout, adv), = seen
    assert rollout.sequences.shape[0] == round(row["episode_len"] * 8)   # one row per decision
    assert torch.equal(adv != 0, rollout.completion_mask.bool() & (adv != 0))
    assert max(rollout.attention_mask.sum(1)) <= rollout.prompt_len + 4  # bounded contexts
    # The windowed rows carry the sampler's log-probs to the update, where they match (fp32).
    assert rollout.logprobs is not None and 0 <= row["sampler_logprob_gap"] < 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.layer.parameters()))
