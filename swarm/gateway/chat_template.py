"""From chat messages to a prompt: the tokenizer's own chat template when it has one, else a plain one.

The plain template, for base models and tokenizers without a template, writes one line per message and leaves
the assistant's turn open:

    System: You are terse.
    User: Hello!
    Assistant: Hi.
    User: Name a colour.
    Assistant:

(`developer` messages are written as `System`; a message's lines are kept as they are.) The model's reply is
what it writes after the final `Assistant:`; since a base model tends to go on with the user's next line, the
gateway also stops at `\\nUser:` with this template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

PLAIN_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused the conversation (many insist that user and assistant alternate)."""


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation, and how to tokenize and end it."""

    text: str
    add_special: bool  # add the tokenizer's special tokens (BOS); False where the template writes them itself
    stop: tuple[str, ...]  # stop sequences the template implies, added to the request's own


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]]) -> ChatPrompt:
    """`messages` are (role, text) pairs; roles are system, developer, user or assistant."""
    if getattr(tokenizer, "chat_template", None):
        # Many templates know no `developer` role; it is the system message of newer APIs.
        conversation = [{"role": "system" if role == "developer" else role, "content": text} for role, text in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused these messages: {e}") from e
        return ChatPrompt(str(text), add_special=False, stop=())
    return ChatPrompt(plain_chat(messages), add_special=True, stop=(PLAIN_STOP,))


def plain_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The plain template (see the module docstring)."""
    lines = [f"{PLAIN_ROLE_NAMES[role]}: {text}" for role, text in messages]
    return "\n".join([*lines, "Assistant:"])
