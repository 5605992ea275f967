"""Every documented error of the gateway: its HTTP status and OpenAI's error object, over raw HTTP and through the
`openai` client (which raises its own exception types for them)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from swarm.testing import LocalSwarm
from tests.gateway.conftest import API_KEY, MODEL_NAME, Gateway, LocalModel, running_gateway

pytestmark = pytest.mark.slow

HALF_PREFIX = "demo-half"  # a second copy of the model in the swarm, whose blocks 3:6 nobody serves


def post(url: str, body: bytes | dict[str, Any], api_key: str | None = API_KEY) -> tuple[int, dict[str, Any]]:
    """POST `body` (bytes as they are, a dict as JSON) and return the status and the JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    """The error object, checked to have exactly OpenAI's fields."""
    assert set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    return answer["error"]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def half_served_gateway(demo_model: Path, gateway_swarm: LocalSwarm) -> Iterator[Gateway]:
    """A gateway for a model prefix whose blocks 0:3 have a peer and 3:6 have none."""
    gateway_swarm.add_peer(0, 3, "--model-prefix", HALF_PREFIX)
    flags = ["--model-prefix", HALF_PREFIX, "--connect-timeout", "1"]
    with running_gateway(demo_model, gateway_swarm.initial_peers, *flags) as running:
        yield running


def test_body_that_is_not_json_is_a_400(gateway: Gateway) -> None:
    status, answer = post(f"{gateway.url}/v1/chat/completions", b'{"model": "demo", "messages": [')

    assert status == 400
    assert error_of(answer)["code"] == "invalid_json"
    assert error_of(answer)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL_NAME}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ("/v1/completions", {"model": MODEL_NAME}, "prompt"),
    ],
    ids=["chat-without-messages", "chat-without-model", "completion-without-prompt"],
)
def test_missing_field_is_a_400_naming_it(gateway: Gateway, path: str, body: dict[str, Any], param: str) -> None:
    status, answer = post(gateway.url + path, body)

    assert status == 400
    error = error_of(answer)
    assert (error["code"], error["param"]) == ("invalid_value", param)
    assert param in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"max_tokens": "lots"}, "max_tokens", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ],
)
def test_bad_or_unsupported_value_is_a_400_naming_it(
    gateway: Gateway, fields: dict[str, Any], param: str, code: str
) -> None:
    status, answer = post(f"{gateway.url}/v1/chat/completions", chat(**fields))

    assert status == 400
    assert (error_of(answer)["param"], error_of(answer)["code"]) == (param, code)


def test_unknown_model_is_a_404(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        gateway.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])

    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert "gpt-9" in raised.value.message and MODEL_NAME in raised.value.message


def test_prompt_and_max_tokens_beyond_the_context_are_a_400(gateway: Gateway, local_model: LocalModel) -> None:
    context = local_model.context_length
    prompt = "The quality of mercy"
    prompt_tokens = len(local_model.encode(prompt))

    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=context - prompt_tokens + 1)
    fits = gateway.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1)

    assert raised.value.status_code == 400 and raised.value.code == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in raised.value.message
    assert f"you requested {context + 1} tokens ({prompt_tokens} in the prompt" in raised.value.message
    assert fits.usage is not None and fits.usage.completion_tokens == 1


def test_prompt_that_fills_the_context_is_a_400_for_chat_without_max_tokens(
    gateway: Gateway, local_model: LocalModel
) -> None:
    long_text = " ".join(["mercy"] * local_model.context_length)

    status, answer = post(
        f"{gateway.url}/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": long_text}]},
    )

    assert status == 400 and error_of(answer)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("api_key", ["wrong-key", None], ids=["wrong", "missing"])
def test_wrong_or_missing_api_key_is_a_401_whatever_the_body(gateway: Gateway, api_key: str | None) -> None:
    status, answer = post(f"{gateway.url}/v1/chat/completions", b"not json at all", api_key=api_key)

    assert status == 401
    assert error_of(answer)["code"] == "invalid_api_key"
    with gateway.new_client(api_key="wrong-key") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_page_health_and_metrics_need_no_key(gateway: Gateway) -> None:
    for path in ("/", "/health", "/metrics"):
        with urllib.request.urlopen(gateway.url + path, timeout=30) as response:
            assert response.status == 200, path


def test_unknown_path_is_a_404_error_object(gateway: Gateway) -> None:
    status, answer = post(f"{gateway.url}/v1/embeddings", {"model": MODEL_NAME, "input": "hi"})

    assert status == 404 and error_of(answer)["type"] == "invalid_request_error"


def test_no_route_through_the_swarm_is_a_503_naming_the_missing_blocks(half_served_gateway: Gateway) -> None:
    began = time.monotonic()
    status, answer = post(f"{half_served_gateway.url}/v1/chat/completions", chat())
    with pytest.raises(openai.APIStatusError) as streamed:
        list(half_served_gateway.client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, stream=True))

    assert status == 503
    error = error_of(answer)
    assert (error["type"], error["code"]) == ("service_unavailable", "missing_blocks")
    assert error["message"].startswith(f"blocks 3:6 of {HALF_PREFIX} have no live peer")
    assert streamed.value.status_code == 503 and "blocks 3:6" in streamed.value.message
    assert time.monotonic() - began < 30  # --connect-timeout 1: each request gives up after about a second


def test_health_names_the_missing_blocks(half_served_gateway: Gateway) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{half_served_gateway.url}/health", timeout=30)

    with raised.value as response:
        assert response.code == 503
        assert json.loads(response.read()) == {
            "status": "unavailable",
            "model": MODEL_NAME,
            "missing_blocks": [3, 4, 5],
        }
