"""Make the packaged agent demo model (onelayer/demo_agent/): a tiny Qwen3 with a byte-level BPE
tokenizer, taught by imitation (SFT), on purpose only part of the way, to play the built-in
environments, so that `onelayer train --env gridworld` (single-layer GiGPO, no --model) has
room to raise its success rate on CPU in minutes.

Command (from the repository root, 2 CPU threads):

    python scripts/make_agent_demo.py            # writes onelayer/demo_agent/

What it does
- Transcripts: episodes of gridworld, sokoban and household played by a scripted teacher in
  the exact plain-text format of `onelayer.rollout.multiturn` (no chat template):
      "{system}\\n\\n{obs_0}\\n> " {action}<eos> "\\n{feedback}\\n{obs_1}\\n> " {action}<eos> ...
  The gridworld teacher takes a shortest-path move with probability OPTIMAL and a random valid
  move otherwise; on sokoban and household it takes a random valid action (the model learns
  to answer with a valid action there, not to solve them).
- Tokenizer: byte-level BPE (every byte is a token, so any text encodes; no unknown token)
  trained on those transcripts, VOCAB tokens with "<pad>" (0) and "<eos>" (1); no BOS, no
  chat template.
- Model: Qwen3ForCausalLM, LAYERS layers, hidden 128, 4 heads / 2 KV heads, head_dim 32,
  intermediate 384, untied embeddings, max_position_embeddings CONTEXT, float32.
- Training: next-token prediction on the teacher's action tokens (and their <eos>) only, the
  episodes built by `run_episodes` itself (the same token ids and positions the trainer
  sees); AdamW, a fresh batch of episodes every step, fixed seeds.
- Stopping: every EVAL_EVERY steps the greedy success rate on EVAL_TASKS held-out gridworld
  tasks (the seeds `onelayer train` scores) is measured; training stops once it passes
  STOP_AT and the checkpoint closest to TARGET is saved.

Cost, measured (torch 2.13 CPU, 2 threads): one step of 16 four-turn episodes (628-737 tokens)
takes 8.1 s of CPU time; the model has not been built to the end yet (docs/agentic-demo.md says
what would make a step cheaper).
"""
from __future__ import annotations

import argparse
import copy
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
from onelayer.rollout import SamplingParams  # noqa: E402
from onelayer.rollout.multiturn import TurnFormat, hf_actor, run_episodes  # noqa: E402
from onelayer.tasks.envs import load_env  # noqa: E402
from onelayer.tasks.envs.gridworld import MOVES, shift  # noqa: E402

PAD, EOS = "<pad>", "<eos>"
SEED = 1234
VOCAB = 512
LAYERS = 4
CONTEXT = 2048
OPTIMAL = 0.6          # gridworld teacher: shortest-path move with this probability
MIX = {"gridworld": 0.8, "sokoban": 0.1, "household": 0.1}
TARGET = 0.35          # greedy gridworld success we want the saved checkpoint to have
STOP_AT = 0.6
EVAL_EVERY = 50
EVAL_TASKS = 16
MAX_TURNS = 12         # the demo preset's --max-turns (episodes the trainer plays)
MAX_NEW_TOKENS = 8
# Teacher episodes are cut after this many turns: the decision rests on the last observation,
# and short histories make a step cheap on 2 CPU cores.
SFT_TURNS = 4


def gridworld_move(env, rng: random.Random) -> str:
    """A shortest-path move (probability OPTIMAL), else a random valid one."""
    valid = env.valid_actions()
    if rng.random() >= OPTIMAL:
        return rng.choice(valid)
    # BFS back from the goal: a move is optimal when it lowers the distance to it.
    free = {(r, c) for r in range(env.size) for c in range(env.size)} - set(env.walls)
    dist, queue = {env.goal: 0}, deque([env.goal])
    while queue:
        cell = queue.popleft()
        for m in MOVES:
            nxt = shift(cell, m)
            if nxt in free and nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    best = [m for m in valid if dist.get(shift(env.pos, m), 1e9) < dist.get(env.pos, 1e9)]
    return rng.choice(best or valid)


def teacher_action(env, rng: random.Random) -> str:
    if env.name == "gridworld":
        return gridworld_move(env, rng)
    return rng.choice(env.valid_actions())


def teacher_actor(tok, envs, rng: random.Random):
    """A scripted `Actor` over `envs`: the teacher's action as token ids, then <eos>."""
    def act(histories, rows, budgets):
        out = []
        for b, budget in zip(rows, budgets):
            ids = tok(teacher_action(envs[b], rng), add_special_tokens=False).input_ids
            out.append((ids + [tok.eos_token_id])[:budget])
        return out
    return act


def env_batch(names: list[str], max_turns: int = MAX_TURNS):
    return [load_env(n, max_turns=max_turns) for n in names]


def draw_envs(rng: random.Random, n: int) -> list[str]:
    return rng.choices(list(MIX), weights=list(MIX.values()), k=n)


def transcripts(rng: random.Random, n: int) -> list[str]:
    """Plain-text episodes for the tokenizer (the teacher's actions, '<eos>' left out)."""
    texts = []
    for name in draw_envs(rng, n):
        env = load_env(name, max_turns=MAX_TURNS)
        obs, parts, done = env.reset(rng.randrange(HELD_OUT_SEED)), [], False
        parts.append(f"{env.system_prompt}\n\n{obs}\n> ")
        while not done:
            action = teacher_action(env, rng)
            obs, _, done, info = env.step(action)
            feedback = info.get("feedback", "")
            parts.append(action + (f"\n{feedback}\n" if feedback else "\n") + f"{obs}\n> ")
        texts.append("".join(parts))
    return texts


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


def sft_batch(tok, rng: random.Random, n: int):
    """n teacher episodes as (ids, attention mask, labels on action tokens, positions)."""
    names = draw_envs(rng, n)
    envs = env_batch(names, SFT_TURNS)
    seeds = [rng.randrange(HELD_OUT_SEED) for _ in names]
    eps = run_episodes(teacher_actor(tok, envs, rng), tok, envs, seeds, list(range(n)),
                       max_new_tokens=MAX_NEW_TOKENS, max_turns=SFT_TURNS, max_len=CONTEXT,
                       fmt=TurnFormat(tok, chat=False))
    r = eps.rollout
    labels = torch.full_like(r.sequences, -100)
    comp = r.sequences[:, r.prompt_len:]
    labels[:, r.prompt_len:] = torch.where(r.completion_mask.bool(), comp, -100)
    positions = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return r.sequences, r.attention_mask, labels, positions


@torch.no_grad()
def success(model, tok, env_name: str, seeds: list[int]) -> float:
    """Greedy success over the tasks `seeds`, as `onelayer train` scores it."""
    model.eval()
    envs = env_batch([env_name] * len(seeds))
    actor = hf_actor(model, tok, SamplingParams(MAX_NEW_TOKENS, greedy=True))
    eps = run_episodes(actor, tok, envs, seeds, list(range(len(seeds))),
                       max_new_tokens=MAX_NEW_TOKENS, max_turns=MAX_TURNS, max_len=CONTEXT,
                       fmt=TurnFormat(tok, chat=False))
    return eps.success.float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "onelayer" / "demo_agent"))
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()

    torch.set_num_threads(2)
    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()
    rng = random.Random(SEED)
    tok = build_tokenizer(transcripts(rng, 600))
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  vocab {len(tok)}", flush=True)

    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + EVAL_TASKS))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    best, history = None, []
    for step in range(1, args.max_steps + 1):
        model.train()
        ids, mask, labels, pos = sft_batch(tok, rng, args.batch)
        loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0:
            acc = success(model, tok, "gridworld", held_out)
            history.append((step, round(loss.item(), 4), acc))
            print(f"step {step} loss {loss.item():.4f} greedy gridworld success {acc:.3f} "
                  f"t {time.time() - t0:.0f}s", flush=True)
            d = abs(acc - TARGET)
            if best is None or d < best[0]:
                best = (d, step, acc, copy.deepcopy(model.state_dict()))
            if acc >= STOP_AT:
                break

    _, best_step, best_acc, sd = best
    model.load_state_dict(sd)
    wide = list(range(HELD_OUT_SEED, HELD_OUT_SEED + 64))
    scores = {name: success(model, tok, name, wide[:16 if name != "gridworld" else 64])
              for name in MIX}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for f in out.iterdir():
        os.chmod(f, 0o644)
    print(json.dumps(dict(params=n_params, vocab=len(tok), step=best_step, greedy_at_save=best_acc,
                          greedy_success=scores, wall_s=round(time.time() - t0, 1),
                          history=history)), flush=True)


if __name__ == "__main__":
    main()
