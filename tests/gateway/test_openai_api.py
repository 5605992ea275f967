"""The official `openai` client against `swarm serve` over a real loopback swarm: the text equals the same model's
local greedy generation, streamed or not; stop sequences, usage, seeds, concurrency and metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import API_KEY, MODEL_NAME, Gateway, LocalModel
from tests.prometheus_tools import promtool

pytestmark = pytest.mark.slow

PROMPT = "The quality of mercy"
MAX_TOKENS = 12
MESSAGES = [
    {"role": "system", "content": "You speak in verse."},
    {"role": "user", "content": "What is the sea?"},
]
# The demo tokenizer has no chat template, so the gateway writes the documented plain one (README) and stops at
# "\nUser:" besides the request's own stop sequences.
PLAIN_PROMPT = "System: You speak in verse.\nUser: What is the sea?\nAssistant:"


def test_models_lists_the_served_model(gateway: Gateway) -> None:
    models = gateway.client.models.list()

    assert [model.id for model in models.data] == [MODEL_NAME]
    assert models.data[0].owned_by == "blockswarm" and models.data[0].created > 1_600_000_000


def test_completion_equals_local_greedy(gateway: Gateway, local_model: LocalModel) -> None:
    prompt_ids = local_model.encode(PROMPT)
    expected = local_model.greedy(prompt_ids, MAX_TOKENS)

    completion = gateway.client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )

    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == MODEL_NAME and abs(completion.created - time.time()) < 120
    [choice] = completion.choices
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == expected.completion_tokens
    assert completion.usage.total_tokens == len(prompt_ids) + expected.completion_tokens


def test_streamed_completion_equals_local_greedy(gateway: Gateway, local_model: LocalModel) -> None:
    prompt_ids = local_model.encode(PROMPT)
    expected = local_model.greedy(prompt_ids, MAX_TOKENS)

    chunks = list(
        gateway.client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip

    *text_chunks, finish_chunk, usage_chunk = chunks
    assert len(text_chunks) > 1  # streamed, not sent at once
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks)
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == expected.text
    assert finish_chunk.choices[0].finish_reason == expected.finish_reason and finish_chunk.choices[0].text == ""
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == len(prompt_ids)
    assert usage_chunk.usage.completion_tokens == expected.completion_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_completion_accepts_token_ids(gateway: Gateway, local_model: LocalModel) -> None:
    prompt_ids = local_model.encode(PROMPT)

    completion = gateway.client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=4, temperature=0)

    assert completion.choices[0].text == local_model.greedy(prompt_ids, 4).text


def test_chat_completion_equals_local_greedy_over_the_plain_template(gateway: Gateway, local_model: LocalModel) -> None:
    prompt_ids = local_model.encode(PLAIN_PROMPT)
    expected = local_model.greedy_until(prompt_ids, MAX_TOKENS, "\nUser:")

    chat = gateway.client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )

    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt_ids), expected.completion_tokens)


def test_streamed_chat_sends_role_then_text_then_finish_reason(gateway: Gateway, local_model: LocalModel) -> None:
    expected = local_model.greedy_until(local_model.encode(PLAIN_PROMPT), MAX_TOKENS, "\nUser:")

    chunks = list(
        gateway.client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )

    first, *text_chunks, last = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert len(text_chunks) > 1
    assert "".join(chunk.choices[0].delta.content or "" for chunk in text_chunks) == expected.text
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks)
    assert last.choices[0].finish_reason == expected.finish_reason and last.choices[0].delta.content is None
    assert all(chunk.usage is None for chunk in chunks)  # no usage chunk unless stream_options asks for one


def test_stop_sequence_ends_the_text_before_it(gateway: Gateway, local_model: LocalModel) -> None:
    prompt_ids = local_model.encode(PROMPT)
    full = local_model.greedy(prompt_ids, MAX_TOKENS).text
    assert len(full) >= 8, f"the model's greedy text is too short to pick a stop sequence from: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # some text from the middle of the greedy output
    expected = local_model.greedy_until(prompt_ids, MAX_TOKENS, stop)
    assert expected.finish_reason == "stop" and len(expected.text) < len(full)
    client = gateway.client

    completion = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop, "never appears"]
    )
    streamed = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True
        )
    )

    assert completion.choices[0].text == expected.text
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == expected.completion_tokens
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats_itself(gateway: Gateway) -> None:
    client = gateway.client

    def sample(seed: int) -> str:
        completion = client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
        )
        return completion.choices[0].text

    first, again = sample(7), sample(7)

    assert first == again and first


def test_two_streams_are_served_at_the_same_time(gateway: Gateway, local_model: LocalModel) -> None:
    prompts = [PROMPT, "To be, or not to be"]
    expected = [local_model.greedy(local_model.encode(prompt), 24) for prompt in prompts]

    def stream(prompt: str) -> list[tuple[float, str]]:
        with gateway.new_client() as client:  # one client per thread
            chunks = client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
            return [(time.monotonic(), chunk.choices[0].text) for chunk in chunks]

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(stream, prompts)

    assert "".join(text for _, text in first) == expected[0].text
    assert "".join(text for _, text in second) == expected[1].text
    # each stream had started before the other one ended: served side by side, not one after the other
    assert first[0][0] < second[-1][0] and second[0][0] < first[-1][0]


def test_health_says_every_block_is_served(gateway: Gateway) -> None:
    with urllib.request.urlopen(f"{gateway.url}/health", timeout=30) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok", "model": MODEL_NAME, "missing_blocks": []}


def _metrics(gateway: Gateway) -> dict[str, float]:
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_time_tokens(gateway: Gateway) -> None:
    ok = 'blockswarm_gateway_requests_total{"endpoint": "chat_completions", "status": "200"}'
    unauthorized = 'blockswarm_gateway_requests_total{"endpoint": "models", "status": "401"}'
    first_token = "blockswarm_gateway_time_to_first_token_seconds_count{}"
    inter_token = "blockswarm_gateway_inter_token_seconds_count{}"
    generated = "blockswarm_gateway_completion_tokens_total{}"
    before = _metrics(gateway)

    chunks = list(
        gateway.client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    with gateway.new_client(api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    after = _metrics(gateway)

    usage = chunks[-1].usage
    assert usage is not None
    assert 'blockswarm_gateway_requests_total{"endpoint": "completions", "status": "503"}' in before  # pre-created
    assert after[ok] - before[ok] == 1
    assert after[unauthorized] - before[unauthorized] == 1
    assert after[first_token] - before[first_token] == 1
    assert after[inter_token] - before[inter_token] == usage.completion_tokens - 1
    assert after[generated] - before[generated] == usage.completion_tokens
    assert API_KEY not in json.dumps(after)


def test_metrics_pass_promtool_and_include_the_client_side(gateway: Gateway) -> None:
    gateway.client.completions.create(model=MODEL_NAME, prompt="To be", max_tokens=3, temperature=0)
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = _metrics(gateway)
    assert samples["blockswarm_client_time_to_first_token_seconds_count{}"] >= 1  # the swarm client's own view
    assert samples["blockswarm_client_inter_token_seconds_count{}"] >= 2
