"""How a task row becomes the text the model continues: plain, or wrapped in its chat template.

Shared by training and evaluation, so that a layer is scored on prompts written as it was
trained on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError
from .tasks import Row, Task


@dataclass(frozen=True)
class PromptStyle:
    """chat: True always uses the chat template, False never (plain text); None leaves it to
    the task (the template for instruct-style tasks, when the tokenizer has one).
    template_kwargs: variables for the template, e.g. {"enable_thinking": False} for Qwen3."""
    chat: bool | None = None
    template_kwargs: dict = field(default_factory=dict)

    def uses_template(self, tokenizer, task: Task) -> bool:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        return has_template and (task.chat if self.chat is None else self.chat)


def check_style(tokenizer, style: PromptStyle, model: str) -> None:
    """--chat on a model without a chat template is a UserError (before anything runs)."""
    if style.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--chat: the tokenizer of {model} has no chat template (use --no-chat)")


def render_prompt(tokenizer, task: Task, row: Row, style: PromptStyle = PromptStyle()) -> str:
    """The task's prompt text, in the model's chat template when `style` says so. A row with
    a conversation of its own ("prompt_messages", TRL's conversational prompts) is rendered
    from its messages (the task's system prompt first when they have none); as plain text,
    their contents one after another."""
    given = row.get("prompt_messages")
    if not style.uses_template(tokenizer, task):
        return "\n\n".join(m["content"] for m in given) if given else task.prompt(row)
    messages = list(given) if given else [{"role": "user", "content": task.prompt(row)}]
    if task.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": task.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **style.template_kwargs)


def prompt_fits(tokenizer, task: Task, style: PromptStyle,
                max_tokens: int | None) -> Callable[[Row], bool]:
    """row -> whether its rendered prompt has at most max_tokens tokens (None: no limit).

    Longer prompts are dropped, never cut: a problem cut in the middle is a different problem
    whose answer the reward still expects."""
    if not max_tokens:
        return lambda row: True

    def fits(row: Row) -> bool:
        text = render_prompt(tokenizer, task, row, style)
        return len(tokenizer(text, add_special_tokens=False).input_ids) <= max_tokens

    return fits
