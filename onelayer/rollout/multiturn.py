"""Multi-turn rollouts: N episodes per task, run in parallel batches, one token history each.

Every episode keeps the exact token ids of its conversation. The environment's text is
tokenized once, as a delta appended to the history; the policy's action tokens are kept as
generated (never decoded and re-tokenized), so the log-probs the trainer computes later are
those of the tokens that were sampled. An actor that samples (`hf_actor`) also gives the
sampler's log-prob of each action token; the Rollout carries them (0 on environment tokens),
for the trainer to compare with its own.

Text format of one episode:
- With a chat template: [system: env.system_prompt, user: obs_0] + generation prompt; each
  later turn appends the template's rendering of the user message "feedback\\n\\nobs_t"
  (just "obs_t" without feedback) and the next generation prompt, after the action's
  end-of-turn token. The delta is cut from a render around a sentinel assistant message, so
  the history equals what the template renders for the whole conversation (templates that
  rewrite earlier turns, e.g. dropping old <think> blocks, are kept as they were generated).
- Without one (plain text):
      "{system}\\n\\n{obs_0}\\n> " {action} "\\n{feedback}\\n{obs_1}\\n> " {action} ...
  (the feedback line only when there is feedback; the action's EOS stays in the history).

Two layouts of the Rollout the trainer learns from (`history`):
- whole episodes (history None): one trajectory = one row, the first prompt left-padded as the
  prompt part, then the action and environment tokens, right-padded; completion_mask is 1 on
  action tokens only (with their stop token), attention_mask on every real token. Every action
  sees the whole episode before it, and the context grows with every turn.
- a window of K turns (history K >= 0): one decision = one row. Its prompt is the first-prompt
  form of the observation K turns back (system prompt included) followed by the later turns'
  actions and environment text, as the same token ids; its completion is the action. Every
  context is bounded, and with K = 0 a decision sees the system prompt and the current
  observation only (the observation is the whole state, base.py), as verl-agent's GiGPO runs
  with a short history.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..algos.advantages import anchor_ids as hash_anchors
from ..resilience import HalveOnOOM
from .generate import Rollout, SamplingParams, StopStrings, cut_at_stop, sample, stop_token_ids


class Sampled(NamedTuple):
    """Actions as a sampler returns them: the ids, and the log-prob of each id under the
    distribution it was drawn from."""
    ids: list[list[int]]
    logprobs: list[list[float]]


# (histories, episode rows, token budgets) -> action ids per history, each at most its budget
# and cut after its first stop token; or `Sampled`, those ids with their log-probs. Rows let a
# scripted actor (tests) look at its env; it returns ids alone (no log-probs to report).
Actor = Callable[[list[list[int]], list[int], list[int]], list[list[int]] | Sampled]

SENTINEL = "<<onelayer-action-sentinel>>"


@dataclass
class Episodes:
    """A batch of finished episodes: B trajectories with S steps between them in all."""
    rollout: Rollout              # one row per trajectory
    traj_ids: Tensor              # [S] int64  row of the step's trajectory in the rollout
    step_index: Tensor            # [S] int64  t inside the trajectory
    episode_group_ids: Tensor     # [S] int64  task (seed) index: one GiGPO episode group
    observations: list[str]       # [S] s_t, the observation the action was taken in
    anchor_ids: Tensor            # [S] int64  hash of s_t (`hash_observation`)
    step_rewards: Tensor          # [S] float32 r_t
    spans: Tensor                 # [S, 2] int64 [start, end) of a_t's tokens in the completion part
    actions: list[str]            # [S] decoded action text, as passed to env.step
    valid: Tensor                 # [S] bool   info["valid"] (True when the env does not say)
    success: Tensor               # [B] bool
    turns: Tensor                 # [B] int64  steps taken
    returns: Tensor               # [B] float32 undiscounted episode return
    rows: Tensor                  # [S] int64  the rollout row holding a_t (traj_ids, or one row per step)
    texts: list[str]              # [B] what was played after the first prompt: actions, env turns


class TurnFormat:
    """Token ids the environment adds to a history (the first prompt and each later turn), and
    the text an action's ids stand for.

    chat: None uses the chat template when the tokenizer has one; template_kwargs go to the
    template (e.g. enable_thinking=False); an action's text ends at its first stop string."""

    def __init__(self, tokenizer, *, chat: bool | None = None, template_kwargs: dict | None = None,
                 stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.template_kwargs = template_kwargs or {}
        self.stop = stop

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False, **self.template_kwargs)

    def action_text(self, ids: list[int]) -> str:
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)

    def user_text(self, feedback: str, obs: str) -> str:
        return f"{feedback}\n\n{obs}" if feedback else obs

    def first(self, system: str, obs: str) -> list[int]:
        if not self.chat:
            return self.encode(f"{system}\n\n{obs}\n> ")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": obs}]
        return self.encode(self.render(messages))

    def next(self, feedback: str, obs: str, last_action: list[int]) -> list[int]:
        if not self.chat:
            line = f"{feedback}\n" if feedback else ""
            return self.encode(f"\n{line}{obs}\n> ")
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL},
                    {"role": "user", "content": self.user_text(feedback, obs)}]
        full = self.render(messages)
        delta = full[full.index(SENTINEL) + len(SENTINEL):]
        # The action's own stop token (e.g. <|im_end|>) is already in the history.
        stop = self.tokenizer.decode(last_action[-1:]) if last_action else ""
        if stop and delta.startswith(stop):
            delta = delta[len(stop):]
        return self.encode(delta)


def hf_actor(lm, tokenizer, params: SamplingParams, generator: torch.Generator | None = None,
             batch: HalveOnOOM | None = None) -> Actor:
    """onelayer's sampler over left-padded histories of a Hugging Face model; an action stops
    at EOS, the end-of-turn token or a stop string of `params`, or at its row's budget. Gives
    `Sampled` actions: the ids and the sampler's log-probs. batch: the rows sampled at once
    (None: every live episode), halved when the device runs out of memory."""
    device = next(lm.parameters()).device
    stop_ids = stop_token_ids(tokenizer, lm)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stop_strings = StopStrings(tokenizer, params.stop)
    batch = batch or HalveOnOOM("--generation-batch", 0)

    def act_on(histories: list[list[int]], budgets: list[int]) -> Sampled:
        ids, mask = left_pad(histories, pad)
        out = sample(lm, ids.to(device), mask.to(device),
                     dataclasses.replace(params, max_new_tokens=max(budgets)), stop_ids=stop_ids,
                     stop_strings=stop_strings, pad_id=pad, generator=generator)
        keep = [min(k, b) for k, b in zip(out.mask.sum(1).tolist(), budgets)]
        return Sampled([out.tokens[i, :n].tolist() for i, n in enumerate(keep)],
                       [out.logprobs[i, :n].tolist() for i, n in enumerate(keep)])

    def act(histories: list[list[int]], rows: list[int], budgets: list[int]) -> Sampled:
        done = Sampled([], [])
        while len(done.ids) < len(histories):
            start = len(done.ids)
            part = batch.run(lambda size: act_on(histories[start:start + size],
                                                 budgets[start:start + size]),
                             len(histories) - start)
            done = Sampled(done.ids + part.ids, done.logprobs + part.logprobs)
        return done

    return act


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class _Trajectory:
    prompt: list[int]
    tokens: list[int]             # completion part: actions and environment text
    is_action: list[int]
    pending: list[int]            # environment tokens to add before the next action
    heads: list[list[int]]        # per turn t: the first-prompt form of obs_t (windowed contexts)
    action_starts: list[int] = field(default_factory=list)   # per turn t: where a_t starts in tokens
    logprobs: list[float] = field(default_factory=list)      # the sampler's per token, 0 off actions
    live: bool = True
    success: bool = False
    turns: int = 0

    def context(self, history: int | None) -> list[int]:
        """What the next action is conditioned on (the pending environment turn included): the
        whole episode, or its last `history` turns after the first-prompt form of the
        observation they start from."""
        if history is None or self.turns <= history:
            return self.prompt + self.tokens + self.pending
        start = self.turns - history
        if start == self.turns:   # the observation alone: the pending turn repeats it
            return self.heads[start]
        return self.heads[start] + self.tokens[self.action_starts[start]:] + self.pending


def run_episodes(actor: Actor, tokenizer, envs: Sequence, seeds: Sequence[int],
                 group_ids: Sequence[int], *, max_new_tokens: int, max_turns: int,
                 max_len: int, fmt: TurnFormat | None = None,
                 history: int | None = None, progress=None) -> Episodes:
    """Play one episode in each env (env b reset with seeds[b]) until all are done.

    group_ids[b] is the episode group of trajectory b (equal for equal tasks). Each turn, the
    live episodes act in one batch. max_len caps the tokens an action is conditioned on plus
    the action (a whole trajectory, or one windowed context): an episode whose next context
    would leave no room for one action token ends there. fmt: the text format (default:
    TurnFormat(tokenizer)). history: None for whole-episode rows, K for one row per decision
    seeing the last K turns (the module docstring). progress: a bar (tqdm) that counts the
    episodes as they end.
    """
    fmt = fmt or TurnFormat(tokenizer)
    obs = [env.reset(seed) for env, seed in zip(envs, seeds)]
    scored = True   # every action came with the sampler's log-probs
    trajs = []
    for env, o in zip(envs, obs):
        first = fmt.first(env.system_prompt, o)
        trajs.append(_Trajectory(first, [], [], [], [first]))
    steps: list[tuple] = []  # (row, t, observation, reward, start, end, action, valid, context)
    ended = 0                # episodes counted on the progress bar
    for t in range(max_turns):
        rows, budgets, contexts = [], [], []
        for b, tr in enumerate(trajs):
            context = tr.context(history) if tr.live else []
            tr.live = tr.live and len(context) < max_len
            if tr.live:
                tr.tokens += tr.pending
                tr.is_action += [0] * len(tr.pending)
                tr.logprobs += [0.0] * len(tr.pending)
                tr.pending = []
                rows.append(b)
                budgets.append(min(max_new_tokens, max_len - len(context)))
                contexts.append(context)
        if not rows:
            break
        actions, logprobs = _unpack(actor(contexts, rows, budgets))
        scored = scored and logprobs is not None
        for b, ids, scores, context in zip(rows, actions, logprobs or [None] * len(rows), contexts):
            step = _play(trajs[b], envs[b], obs, b, t, ids, scores, fmt,
                         windowed=history is not None)
            steps.append((*step, context))
        ended = _report(progress, sum(not tr.live for tr in trajs), ended)
    _report(progress, len(trajs), ended)   # episodes still going at max_turns end here
    return _collect(trajs, steps, group_ids, tokenizer, windowed=history is not None,
                    scored=scored)


def _report(progress, ended: int, reported: int) -> int:
    if progress is not None:
        progress.update(ended - reported)
    return ended


def _unpack(actions: list[list[int]] | Sampled) -> tuple[list[list[int]], list[list[float]] | None]:
    """(ids, log-probs or None) of what an actor returned."""
    return (actions.ids, actions.logprobs) if isinstance(actions, Sampled) else (actions, None)


def _play(tr: _Trajectory, env, obs: list[str], b: int, t: int, ids: list[int],
          logprobs: list[float] | None, fmt: TurnFormat, windowed: bool) -> tuple:
    """Append action `ids` (and their log-probs, None: unknown) to trajectory b, step its env,
    queue the next user turn."""
    if logprobs is not None and len(logprobs) != len(ids):
        raise ValueError(f"the actor gave {len(logprobs)} log-probs for {len(ids)} action ids")
    start = len(tr.tokens)
    tr.action_starts.append(start)
    tr.tokens += ids
    tr.is_action += [1] * len(ids)
    tr.logprobs += [0.0] * len(ids) if logprobs is None else logprobs
    text = fmt.action_text(ids)
    state = obs[b]
    obs[b], reward, done, info = env.step(text)
    tr.turns += 1
    tr.success = bool(info.get("success", False))
    tr.live = not done
    if not done:
        tr.pending = fmt.next(info.get("feedback", ""), obs[b], ids)
        if windowed:
            tr.heads.append(fmt.first(env.system_prompt, obs[b]))
    return b, t, state, reward, start, len(tr.tokens), text, bool(info.get("valid", True))


def _padded_right(rows: Sequence[list[int]], pad: int, marks: Sequence[list[int]] | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, their attention mask and (`marks`, default all ones) completion mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r, dtype=torch.long)
        attn[b, :n] = 1
        mask[b, :n] = torch.tensor(marks[b] if marks is not None else [1] * n, dtype=torch.long)
    return ids, attn, mask


def _padded_floats(rows: Sequence[list[float]], width: int) -> Tensor:
    """float32 [len(rows), width], each row's values then 0."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _collect(trajs: list[_Trajectory], steps: list[tuple], group_ids: Sequence[int],
             tokenizer, windowed: bool, scored: bool) -> Episodes:
    """The Episodes of finished trajectories; scored: the Rollout gets the sampler's
    log-probs (every action came with them)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = tokenizer.batch_decode([tr.tokens for tr in trajs], skip_special_tokens=True)
    row, t, state, reward, start, end, action, valid, context = (
        (list(c) for c in zip(*steps)) if steps else ([] for _ in range(9)))
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    if windowed:   # one row per decision: its context, then its action
        prompt_ids, prompt_mask = left_pad(context or [[pad]], pad)
        played = [(trajs[b], s, e) for b, s, e in zip(row, start, end)]
        actions = [tr.tokens[s:e] for tr, s, e in played]
        comp, comp_attn, comp_mask = _padded_right(actions or [[]], pad)
        comp_logprobs = [tr.logprobs[s:e] for tr, s, e in played] or [[]]
        rollout_rows, spans = long(range(len(row))), long([(0, e - s) for s, e in zip(start, end)])
        rollout_texts = list(action)
    else:          # one row per trajectory: its first prompt, then everything played
        prompt_ids, prompt_mask = left_pad([tr.prompt for tr in trajs], pad)
        comp, comp_attn, comp_mask = _padded_right([tr.tokens for tr in trajs], pad,
                                                   [tr.is_action for tr in trajs])
        comp_logprobs = [tr.logprobs for tr in trajs]
        rollout_rows, spans, rollout_texts = long(row), long(list(zip(start, end))), texts
    logprobs = _padded_floats(comp_logprobs, comp.shape[1]) if scored else None
    rollout = Rollout(torch.cat([prompt_ids, comp], 1), torch.cat([prompt_mask, comp_attn], 1),
                      comp_mask, prompt_ids.shape[1], rollout_texts, logprobs)
    rewards = torch.tensor(reward, dtype=torch.float32)
    returns = torch.zeros(len(trajs)).index_add_(0, long(row), rewards)
    return Episodes(
        rollout, long(row), long(t), long([group_ids[b] for b in row]), state, hash_anchors(state),
        rewards, spans.reshape(-1, 2), action, torch.tensor(valid, dtype=torch.bool),
        torch.tensor([tr.success for tr in trajs]), long([tr.turns for tr in trajs]), returns,
        rollout_rows, texts)
