"""The text-environment interface the multi-turn rollout drives (gymnasium-like, text in and out).

    obs = env.reset(seed)                        # the seed fixes the task: same seed, same task
    obs, reward, done, info = env.step(action)   # info: valid, success, truncated, feedback, ...

The observation is the GiGPO anchor state, so it is a pure function of the environment state:
the same state gives byte-identical text whatever path led to it, and different states give
different text. It therefore never carries a turn counter, history, or a note about the last
action. What the model should hear about its last action (e.g. "that action was invalid") is in
``info["feedback"]``; the rollout shows it in the next user turn, before the observation, and
hashes the observation alone. The observation always ends with the line "Valid actions: ...",
which is part of the state too.

Subclasses implement four hooks: ``_new_task(seed)`` (build the task and the initial state),
``_describe()`` (the canonical state text, without the valid-actions line), ``valid_actions()``
(canonical action strings for the current state) and ``_apply(action)`` (apply one valid action,
return (reward, success)). Everything else (turn limit, invalid actions, done) lives here.
"""
from __future__ import annotations

from ...errors import UserError


def normalize_action(text: str) -> str:
    """Forgiving about form, strict about content: case, runs of whitespace, a trailing period."""
    return " ".join(text.lower().split()).removesuffix(".").rstrip()


class TextEnv:
    """One episode at a time; make one instance per parallel episode (construction is cheap).

    Class attributes are the defaults; ``max_turns`` and ``invalid_action_penalty`` can be given
    to the constructor. An invalid action costs ``invalid_action_penalty`` (reward), uses up a
    turn, leaves the state unchanged and does not end the episode. The episode ends on success
    (done, info["success"] True) or after ``max_turns`` steps (done, info["truncated"] True).
    """

    name: str = "env"
    max_turns: int = 20
    invalid_action_penalty: float = -0.1
    instructions: str = "Reply with exactly one of the valid actions listed in the observation."

    def __init__(self, *, max_turns: int | None = None,
                 invalid_action_penalty: float | None = None):
        if max_turns is not None:
            if int(max_turns) < 1:
                raise UserError(f"{self.name}: max_turns must be at least 1, got {max_turns}")
            self.max_turns = int(max_turns)
        if invalid_action_penalty is not None:
            self.invalid_action_penalty = float(invalid_action_penalty)
        self._seed: int | None = None
        self._turn = 0
        self._done = False

    # -- hooks ---------------------------------------------------------------------------------
    def _new_task(self, seed: int) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def valid_actions(self) -> list[str]:
        """The canonical valid actions in the current state, in a fixed order."""
        raise NotImplementedError

    def _apply(self, action: str) -> tuple[float, bool]:
        raise NotImplementedError

    def _aliases(self) -> dict[str, str]:
        """Extra accepted spellings (normalized) -> canonical action. None by default."""
        return {}

    def _task_key(self) -> str:
        """The config that, with the seed, fixes the task (e.g. '5x5'); part of task_id."""
        return ""

    # -- interface -----------------------------------------------------------------------------
    @property
    def system_prompt(self) -> str:
        """The system message for this environment: what the task is and the action format."""
        return self.instructions

    @property
    def task_id(self) -> str:
        """Identifies the task instance (name, config, seed): one id = one GiGPO episode group."""
        if self._seed is None:
            raise RuntimeError(f"{self.name}: task_id is defined after reset(seed)")
        key = self._task_key()
        return f"{self.name}{'/' + key if key else ''}/seed={self._seed}"

    @property
    def turn(self) -> int:
        return self._turn

    @property
    def done(self) -> bool:
        return self._done

    def observation(self) -> str:
        """The canonical text of the current state (what reset/step return)."""
        return f"{self._describe()}\nValid actions: {', '.join(self.valid_actions())}"

    def parse_action(self, text: str) -> str | None:
        """The canonical action that ``text`` names in the current state, or None if invalid."""
        key = normalize_action(text)
        for action in self.valid_actions():
            if normalize_action(action) == key:
                return action
        return self._aliases().get(key)

    def reset(self, seed: int) -> str:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{self.name}: reset(seed) needs an int seed, got {seed!r}")
        self._new_task(seed)
        self._seed, self._turn, self._done = seed, 0, False
        return self.observation()

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._seed is None:
            raise RuntimeError(f"{self.name}: call reset(seed) before step()")
        if self._done:
            raise RuntimeError(f"{self.name}: step() after the episode ended "
                               f"(turn {self._turn}); call reset(seed) to start a new one")
        self._turn += 1
        canonical = self.parse_action(action)
        if canonical is None:
            reward, success = self.invalid_action_penalty, False
            feedback = (f"Invalid action: {action.strip()!r}. "
                        f"Valid actions: {', '.join(self.valid_actions())}")
        else:
            reward, success = self._apply(canonical)
            feedback = ""
        truncated = not success and self._turn >= self.max_turns
        self._done = success or truncated
        info = {"valid": canonical is not None, "success": success, "truncated": truncated,
                "action": canonical, "feedback": feedback, "turn": self._turn}
        return self.observation(), float(reward), self._done, info
