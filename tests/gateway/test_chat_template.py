"""Chat messages become a prompt: the tokenizer's own template when it has one, else the documented plain one."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from swarm.demo_model import ensure_demo_model
from swarm.gateway.chat_template import PLAIN_STOP, ChatTemplateError, render_chat

MESSAGES = [("developer", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye\nnow")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ensure_demo_model(tmp_path_factory.mktemp("template") / "demo-model"))


def test_plain_template_writes_one_line_per_message_and_opens_the_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    assert not tokenizer.chat_template  # the demo tokenizer has none

    prompt = render_chat(tokenizer, MESSAGES)

    assert prompt.text == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nnow\nAssistant:"
    assert prompt.add_special and prompt.stop == (PLAIN_STOP,) == ("\nUser:",)


def test_the_tokenizers_own_template_is_used_when_it_has_one(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(tmp_path)
    templated = AutoTokenizer.from_pretrained(tmp_path)
    templated.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )

    prompt = render_chat(templated, MESSAGES[:2])

    assert prompt.text == "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"  # developer is passed as system
    assert not prompt.add_special and prompt.stop == ()


def test_messages_the_template_refuses_are_a_chat_template_error(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(tmp_path)
    strict = AutoTokenizer.from_pretrained(tmp_path)
    strict.chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('start with a user') }}{% endif %}"

    with pytest.raises(ChatTemplateError, match="start with a user"):
        render_chat(strict, [("assistant", "Hi")])
