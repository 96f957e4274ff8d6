"""Make the packaged agent demo model (onelayer/demo_agent/): a tiny Qwen3 with a byte-level BPE
tokenizer, taught by imitation (SFT) to play the three built-in environments, with a habit
that single-layer GiGPO has to unlearn, so that `onelayer train --env NAME` (no --model) has
room to raise its success rate on CPU in minutes.

Commands (from the repository root, 2 CPU threads; the shipped model was made by these two):

    python scripts/make_agent_demo.py --max-steps 1350 --out /tmp/agent-demo-1
    python scripts/make_agent_demo.py --init /tmp/agent-demo-1 --seed 1235 \
        --mix gridworld=0.2,sokoban=0.3,household=0.5        # writes onelayer/demo_agent/

The first builds the tokenizer and the model and teaches all three environments in equal
measure; the second goes on with half the episodes from household, the slowest to learn,
until the stopping rule below.

What it does
- Decisions, not episodes: the demo trains with `--history-turns 0`, so each action is taken
  from the system prompt and the current observation alone, in the plain-text format of
  `onelayer.rollout.multiturn` (no chat template): "{system}\n\n{obs}\n> " {action}<eos>.
  Teacher episodes are cut into such decisions.
- Teachers that solve every task from the observation alone: on gridworld and sokoban the
  first move of a shortest solution (breadth-first search); on household a sweep of the
  receptacles in the order the observation lists them (opening closed ones), taking the
  first object of the goal's kind, bringing it to the sink, microwave or fridge if the goal
  asks for a state, then to the target (100% of tasks within 20 turns, 11 on average).
  The episodes wander off the teacher's path (a random valid action with probability
  1 - ON_PLAN a turn), so the decisions also cover states a sampling model will reach.
- A habit to unlearn: the teacher writes a move as a compass word ("north" for "up") and a
  "go to X" as "walk to X" with probability HABIT. The environments reject those as invalid
  actions, so the imitating model knows what to do but its most likely answer is a word that
  does nothing: its greedy success starts near zero, and GiGPO has a clear signal (every
  habit word costs an invalid-action penalty and a turn) to learn from in minutes.
- Tokenizer: byte-level BPE (every byte is a token, so any text encodes; no unknown token)
  trained on teacher transcripts, VOCAB tokens with "<pad>" (0) and "<eos>" (1); no BOS, no
  chat template.
- Model: Qwen3ForCausalLM, LAYERS layers, hidden 128, 4 heads / 2 KV heads, head_dim 32,
  intermediate 384, untied embeddings, max_position_embeddings CONTEXT, float32.
- Training: next-token prediction on the action tokens and their <eos> only, BATCH decisions
  a step drawn from fresh teacher episodes, AdamW, fixed seeds.
- Stopping: every EVAL_EVERY steps each environment's greedy skill on EVAL_TASKS held-out
  tasks (the seeds `onelayer train` scores, played as it plays them, in an environment that
  also takes the habit's words) is measured; training stops at the first evaluation where
  every environment reaches its TARGET (or after --max-steps), and that model is saved.
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
from onelayer.model.load import demo_env_preset  # noqa: E402
from onelayer.rollout import SamplingParams  # noqa: E402
from onelayer.rollout.multiturn import TurnFormat, hf_actor, run_episodes  # noqa: E402
from onelayer.tasks.envs import load_env, normalize_action  # noqa: E402
from onelayer.tasks.envs.gridworld import MOVES, shift  # noqa: E402
from onelayer.tasks.envs.household import TOOL_OF, VERB_OF  # noqa: E402
from onelayer.tasks.envs.sokoban import push  # noqa: E402

PAD, EOS = "<pad>", "<eos>"
SEED = 1234
VOCAB = 1024
LAYERS = 4
CONTEXT = 1024         # a decision takes 60-250 tokens; room for --history-turns 1 or 2
ON_PLAN = 0.6          # teacher episodes follow the teacher with this probability a turn
MIX = {"gridworld": 0.35, "sokoban": 0.35, "household": 0.3}  # episodes drawn from each
BATCH = 64             # decisions per imitation step
# Stop (and save) at the first evaluation where every environment's greedy skill, habit words
# allowed, reaches these.
TARGET = {"gridworld": 0.45, "sokoban": 0.3, "household": 0.3}
EVAL_EVERY = 50
EVAL_TASKS = 32        # the preset's --eval-samples: the held-out tasks `onelayer train` scores
SEARCH_STATES = 20000  # sokoban teacher: no move beyond this many states searched
# The habit GiGPO is to unlearn: the teacher writes a move as a compass word and a "go to" as
# "walk to" (which the environments reject as invalid actions) this often, so that the
# imitating model's most likely answer is one and its greedy success starts near zero.
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


def household_action(env) -> str:
    """A household plan that needs nothing the observation does not show: sweep the receptacles
    in the order the observation lists them (opening closed ones), take the first object of the
    goal's kind found, bring it to the tool the goal's state needs, then to the target."""
    goal, here, held = env.goal, env.location, env.holding
    order = env.receptacles
    if held is not None and env.kind_of[held] != goal.kind:  # not the teacher's own doing
        return f"open {here.name}" if not env._accessible(here) else f"put {held} {here.prep} {here.name}"
    if held is not None:
        if goal.state and goal.state not in env.states[held]:
            if here is not None and here.kind == TOOL_OF[goal.state]:
                return f"{VERB_OF[here.kind][0]} {held} with {here.name}"
            return "go to " + next(r.name for r in order if r.kind == TOOL_OF[goal.state])
        if here != goal.target:
            return f"go to {goal.target.name}"
        return f"open {here.name}" if not env._accessible(here) else f"put {held} {here.prep} {here.name}"
    if here is not None and here != goal.target:
        if not env._accessible(here):
            return f"open {here.name}"
        wanted = [obj for obj in env._contents(here) if env.kind_of[obj] == goal.kind]
        if wanted:
            return f"take {wanted[0]} from {here.name}"
    at = -1 if here is None else order.index(here)
    following = [order[(at + k) % len(order)] for k in range(1, len(order) + 1)]
    return "go to " + next(r.name for r in following if r not in (here, goal.target))


def teacher_action(env) -> str | None:
    """The teacher's move in this state; None where it has none (a deadlocked sokoban room)."""
    if env.name == "household":
        return household_action(env)
    moves = first_moves(env)
    return moves[0] if moves else None


def written(action: str, rng: random.Random) -> str:
    """The teacher's habit: with probability HABIT, a move written as a compass word or a
    "go to" written as "walk to"."""
    return habit_form(action) if rng.random() < HABIT else action


def habit_form(action: str) -> str:
    if action in COMPASS:
        return COMPASS[action]
    return "walk to " + action.removeprefix("go to ") if action.startswith("go to ") else action


def habit_tolerant(name: str, **options):
    """A `name` environment that also takes the habit's words: scores what the model knows of
    a task whatever words it writes (the skill that unlearning the habit can unlock)."""
    base = type(load_env(name, **options))

    class HabitTolerant(base):
        def _aliases(self) -> dict[str, str]:
            aliases = super()._aliases()
            for action in self.valid_actions():
                aliases.setdefault(normalize_action(habit_form(action)), action)
            return aliases

    return HabitTolerant(**options)


def teacher_decisions(rng: random.Random, n: int, mix: dict[str, float] = MIX
                      ) -> list[tuple[str, str, str]]:
    """n (system prompt, observation, teacher action as written) triples from fresh episodes.

    The episodes wander: each turn follows the teacher with probability ON_PLAN, else a random
    valid action, so the decisions cover states off the teacher's own path (where a sampling
    model will be). Each decision is kept with probability 1/2, so that one episode does not
    fill a batch; states where the teacher has no move are skipped."""
    out = []
    while len(out) < n:
        name = rng.choices(list(mix), weights=list(mix.values()))[0]
        env = load_env(name, max_turns=demo_env_preset(name)["max_turns"])
        obs, done = env.reset(rng.randrange(HELD_OUT_SEED)), False
        while not done and len(out) < n:
            action = teacher_action(env)
            if action is not None and rng.random() < 0.5:
                out.append((env.system_prompt, obs, written(action, rng)))
            if action is None or rng.random() >= ON_PLAN:
                action = rng.choice(env.valid_actions())
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


def sft_batch(tok, fmt: TurnFormat, rng: random.Random, n: int, mix: dict[str, float]):
    """n teacher decisions as right-padded (ids, attention mask, labels on the action + <eos>)."""
    rows, labels = [], []
    for system, obs, action in teacher_decisions(rng, n, mix):
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
def success(model, tok, env_name: str, seeds: list[int], *, tolerant: bool = False) -> float:
    """Greedy success over the tasks `seeds`, played as `onelayer train --env env_name` plays
    them (with `tolerant`, in an environment that also takes the habit's words)."""
    model.eval()
    preset = demo_env_preset(env_name)
    turns, new_tokens = preset["max_turns"], preset["max_new_tokens"]
    envs = [habit_tolerant(env_name, max_turns=turns) if tolerant
            else load_env(env_name, max_turns=turns) for _ in seeds]
    actor = hf_actor(model, tok, SamplingParams(new_tokens, greedy=True))
    eps = run_episodes(actor, tok, envs, seeds, list(range(len(seeds))),
                       max_new_tokens=new_tokens, max_turns=turns, max_len=CONTEXT,
                       fmt=TurnFormat(tok, chat=False), history=preset["history_turns"])
    return eps.success.float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "onelayer" / "demo_agent"))
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--init", help="go on from this saved model (and its tokenizer), with a new "
                    "optimizer, instead of building a new one")
    ap.add_argument("--mix", help="shares of teacher episodes, e.g. gridworld=0.2,household=0.8 "
                    "[default: MIX]")
    ap.add_argument("--snapshots", help="also save the model at every evaluation, under DIR/stepN")
    args = ap.parse_args()

    mix = {name: float(share) for name, share in
           (item.split("=") for item in args.mix.split(","))} if args.mix else MIX
    torch.set_num_threads(2)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    rng = random.Random(args.seed)
    if args.init:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    else:
        corpus = [f"{system}\n\n{obs}\n> {action}"
                  for system, obs, action in teacher_decisions(rng, 3000)]
        tok = build_tokenizer(corpus)
        model = build_model(tok)
    fmt = TurnFormat(tok, chat=False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  vocab {len(tok)}  mix {mix}", flush=True)

    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + EVAL_TASKS))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    history, skill = [], {}
    for step in range(1, args.max_steps + 1):
        model.train()
        ids, mask, labels = sft_batch(tok, fmt, rng, BATCH, mix)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0:
            skill = {name: success(model, tok, name, held_out, tolerant=True) for name in MIX}
            history.append((step, round(loss.item(), 4), skill))
            print(f"step {step} loss {loss.item():.4f} greedy skill (habit words allowed) "
                  + " ".join(f"{k} {v:.3f}" for k, v in skill.items())
                  + f" t {time.time() - t0:.0f}s", flush=True)
            if args.snapshots:
                save(model, tok, Path(args.snapshots) / f"step{step}")
            if all(skill[name] >= TARGET[name] for name in MIX):
                break

    wide = list(range(HELD_OUT_SEED, HELD_OUT_SEED + 64))
    scores = {name: success(model, tok, name, wide) for name in MIX}
    scores |= {f"{name}, habit words allowed": success(model, tok, name, wide, tolerant=True)
               for name in MIX}
    save(model, tok, Path(args.out))
    print(json.dumps(dict(params=n_params, vocab=len(tok), step=step, skill_at_save=skill,
                          greedy_success_64=scores, wall_s=round(time.time() - t0, 1),
                          history=history)), flush=True)


def save(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # A tokenizer loaded with --init writes how it was loaded; that is not part of it.
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in out.iterdir():
        os.chmod(f, 0o644)


if __name__ == "__main__":
    main()
