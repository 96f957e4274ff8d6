"""Make the packaged agent demo model (onelayer/demo_agent/): a tiny Qwen3 with a byte-level BPE
tokenizer, taught by imitation (SFT), on purpose only part of the way, to play the built-in
environments, so that `onelayer train --env gridworld` (single-layer GiGPO, no --model) has
room to raise its success rate on CPU in minutes.

Command (from the repository root, 2 CPU threads):

    python scripts/make_agent_demo.py            # writes onelayer/demo_agent/

What it does
- Decisions, not episodes: the demo trains with `--history-turns 0`, so each action is taken
  from the system prompt and the current observation alone, in the plain-text format of
  `onelayer.rollout.multiturn` (no chat template): "{system}\n\n{obs}\n> " {action}<eos>.
  The scripted teacher's episodes are cut into such decisions.
- Teacher: on gridworld and sokoban a shortest-solution move (breadth-first search) with
  probability OPTIMAL and a random valid move otherwise; on household a random valid action
  (its observation does not show what closed receptacles hold, so the model learns to answer
  with a valid action there, not to solve it).
- A habit to unlearn: the teacher writes a move as a compass word ("north" for "up", ...)
  with probability HABIT. The environments reject those as invalid actions, so the imitating
  model knows where to go but its most likely answer is a word that does not move it: its
  greedy success starts near zero, and GiGPO has a clear signal (every compass word costs
  an invalid-action penalty and a turn) to learn from in minutes.
- Tokenizer: byte-level BPE (every byte is a token, so any text encodes; no unknown token)
  trained on teacher transcripts, VOCAB tokens with "<pad>" (0) and "<eos>" (1); no BOS, no
  chat template.
- Model: Qwen3ForCausalLM, LAYERS layers, hidden 128, 4 heads / 2 KV heads, head_dim 32,
  intermediate 384, untied embeddings, max_position_embeddings CONTEXT, float32.
- Training: next-token prediction on the action tokens and their <eos> only, BATCH decisions
  a step drawn from fresh teacher episodes, AdamW, fixed seeds.
- Stopping: every EVAL_EVERY steps the greedy gridworld skill on EVAL_TASKS held-out tasks
  (the seeds `onelayer train` scores, played as it plays them, in a gridworld that also takes
  compass words) is measured; training stops at the first evaluation that reaches TARGET, and
  that model is saved.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import deque
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Do not put ROOT on sys.path (its kernels/ stub shadows a PyPI package transformers probes).

from onelayer.agentic import HELD_OUT_SEED  # noqa: E402
from onelayer.model.load import DEMO_ENV_PRESET  # noqa: E402
from onelayer.rollout import SamplingParams  # noqa: E402
from onelayer.rollout.multiturn import TurnFormat, hf_actor, run_episodes  # noqa: E402
from onelayer.tasks.envs import load_env  # noqa: E402
from onelayer.tasks.envs.gridworld import MOVES, GridWorld, shift  # noqa: E402
from onelayer.tasks.envs.sokoban import push  # noqa: E402

PAD, EOS = "<pad>", "<eos>"
SEED = 1234
VOCAB = 1024
LAYERS = 4
CONTEXT = 1024         # a decision takes 60-250 tokens; room for --history-turns 1 or 2
OPTIMAL = 0.6          # teacher: a shortest-solution move with this probability
MIX = {"gridworld": 0.6, "sokoban": 0.2, "household": 0.2}
BATCH = 64             # decisions per imitation step
TARGET = 0.45          # stop (and save) at the first evaluation with this greedy skill
EVAL_EVERY = 25
EVAL_TASKS = 32        # the preset's --eval-samples: the held-out tasks `onelayer train` scores
MAX_TURNS = DEMO_ENV_PRESET["max_turns"]
HISTORY = DEMO_ENV_PRESET["history_turns"]
MAX_NEW_TOKENS = DEMO_ENV_PRESET["max_new_tokens"]
SEARCH_STATES = 20000  # sokoban teacher: give up (random move) beyond this many states
# The habit GiGPO is to unlearn: the teacher writes a move as a compass word (which the
# environments reject as an invalid action) this often, so that the imitating model's most
# likely answer is one and its greedy success starts near zero.
HABIT = 0.55
COMPASS = {"up": "north", "down": "south", "left": "west", "right": "east"}


def first_moves(env) -> list[str]:
    """The valid moves that start a shortest solution of a gridworld or sokoban state."""
    if env.name == "gridworld":
        free = {(r, c) for r in range(env.size) for c in range(env.size)} - set(env.walls)
        start, done = env.pos, lambda state: state == env.goal
        step = lambda state, m: shift(state, m) if shift(state, m) in free else None  # noqa: E731
    else:
        start, done = (env.pos, env.boxes), lambda state: state[1] == env.targets
        step = lambda state, m: push(*state, m, env.free)  # noqa: E731
    first, queue = {start: None}, deque([start])
    while queue and len(first) < SEARCH_STATES:
        state = queue.popleft()
        if done(state):
            return [first[state]]
        for m in MOVES:
            nxt = step(state, m)
            if nxt is not None and nxt not in first:
                first[nxt] = first[state] or m
                queue.append(nxt)
    return []


def teacher_action(env, rng: random.Random) -> str:
    valid = env.valid_actions()
    if env.name != "household" and rng.random() < OPTIMAL:
        return (first_moves(env) or valid)[0] if valid else "up"
    return rng.choice(valid)


def written(action: str, rng: random.Random) -> str:
    """The teacher's habit: a move written as a compass word with probability HABIT."""
    return COMPASS[action] if action in COMPASS and rng.random() < HABIT else action


class CompassGridWorld(GridWorld):
    """Gridworld that also accepts compass words: scores what the model knows of mazes
    whatever words it moves with (the skill that unlearning the habit can unlock)."""

    def _aliases(self) -> dict[str, str]:
        return {word: move for move, word in COMPASS.items() if move in self.valid_actions()}


def draw_envs(rng: random.Random, n: int) -> list[str]:
    return rng.choices(list(MIX), weights=list(MIX.values()), k=n)


def teacher_decisions(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n (system prompt, observation, teacher action) triples from fresh teacher episodes,
    each decision kept with probability 1/2 so that one episode does not fill a batch."""
    out = []
    while len(out) < n:
        env = load_env(draw_envs(rng, 1)[0], max_turns=MAX_TURNS)
        obs, done = env.reset(rng.randrange(HELD_OUT_SEED)), False
        while not done and len(out) < n:
            action = teacher_action(env, rng)
            if rng.random() < 0.5:
                out.append((env.system_prompt, obs, written(action, rng)))
            obs, _, done, _ = env.step(action)
    return out


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, eos_token=EOS,
                                   padding_side="left", clean_up_tokenization_spaces=False,
                                   model_max_length=CONTEXT)


def build_model(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=CONTEXT, tie_word_embeddings=False, rope_theta=10000.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        dtype="float32")
    return Qwen3ForCausalLM(cfg)


def sft_batch(tok, fmt: TurnFormat, rng: random.Random, n: int):
    """n teacher decisions as right-padded (ids, attention mask, labels on the action + <eos>)."""
    rows, labels = [], []
    for system, obs, action in teacher_decisions(rng, n):
        prompt = fmt.first(system, obs)
        answer = fmt.encode(action) + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((n, width), tok.pad_token_id)
    mask = torch.zeros((n, width), dtype=torch.long)
    target = torch.full((n, width), -100)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        target[i, :len(label)] = torch.tensor(label)
    return ids, mask, target


@torch.no_grad()
def success(model, tok, env_name: str, seeds: list[int], *, compass: bool = False) -> float:
    """Greedy success over the tasks `seeds`, played as `onelayer train` plays them (with
    `compass`, in a gridworld that also takes compass words)."""
    model.eval()
    envs = [CompassGridWorld(max_turns=MAX_TURNS) if compass else load_env(env_name, max_turns=MAX_TURNS)
            for _ in seeds]
    actor = hf_actor(model, tok, SamplingParams(MAX_NEW_TOKENS, greedy=True))
    eps = run_episodes(actor, tok, envs, seeds, list(range(len(seeds))),
                       max_new_tokens=MAX_NEW_TOKENS, max_turns=MAX_TURNS, max_len=CONTEXT,
                       fmt=TurnFormat(tok, chat=False), history=HISTORY)
    return eps.success.float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "onelayer" / "demo_agent"))
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()

    torch.set_num_threads(2)
    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()
    rng = random.Random(SEED)
    corpus = [f"{system}\n\n{obs}\n> {action}" for system, obs, action in teacher_decisions(rng, 3000)]
    tok = build_tokenizer(corpus)
    fmt = TurnFormat(tok, chat=False)
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  vocab {len(tok)}", flush=True)

    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + EVAL_TASKS))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    history, acc = [], 0.0
    for step in range(1, args.max_steps + 1):
        model.train()
        ids, mask, labels = sft_batch(tok, fmt, rng, BATCH)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0:
            acc = success(model, tok, "gridworld", held_out, compass=True)
            history.append((step, round(loss.item(), 4), acc))
            print(f"step {step} loss {loss.item():.4f} greedy gridworld skill (compass words "
                  f"allowed) {acc:.3f} t {time.time() - t0:.0f}s", flush=True)
            if acc >= TARGET:
                break

    wide = list(range(HELD_OUT_SEED, HELD_OUT_SEED + 64))
    scores = {name: success(model, tok, name, wide) for name in MIX}
    scores["gridworld, compass words allowed"] = success(model, tok, "gridworld", wide, compass=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for f in out.iterdir():
        os.chmod(f, 0o644)
    print(json.dumps(dict(params=n_params, vocab=len(tok), step=step, greedy_at_save=acc,
                          greedy_success_64=scores, wall_s=round(time.time() - t0, 1),
                          history=history)), flush=True)


if __name__ == "__main__":
    main()
