"""Wire records round-trip, tolerate newer peers' extra fields, and reject malformed values with ProtocolError."""

from __future__ import annotations

import pytest

from swarm.errors import ProtocolError
from swarm.protocol import (
    MAX_FORWARD_TARGETS,
    ErrorKind,
    ErrorReply,
    ForwardedStep,
    ForwardTarget,
    InferenceOpen,
    InferenceStep,
    ModelRecord,
    ServerInfo,
    ServerState,
    SpanRequest,
    block_key,
    model_prefix_for,
)

INFO = ServerInfo(
    state=ServerState.ONLINE, start=2, end=6, throughput=123.5, cache_tokens_left=4096, dtype="float32", version="0.1.0"
)


def test_server_info_round_trips_through_the_wire() -> None:
    assert ServerInfo.from_wire(INFO.to_wire()) == INFO
    assert INFO.to_wire()["state"] == "online"


def test_unknown_fields_from_newer_peers_are_ignored() -> None:
    assert ServerInfo.from_wire({**INFO.to_wire(), "shiny_new_field": [1, 2]}) == INFO


def test_optional_fields_may_be_missing() -> None:
    wire = INFO.to_wire()
    del wire["public_name"]
    assert ServerInfo.from_wire(wire).public_name == ""


@pytest.mark.parametrize(
    "change",
    [
        {"state": "sleeping"},
        {"start": "2"},
        {"start": 6, "end": 2},
        {"throughput": -1.0},
        {"cache_tokens_left": True},
        {"dtype": None},
    ],
)
def test_malformed_server_info_is_rejected(change: dict) -> None:
    with pytest.raises(ProtocolError):
        ServerInfo.from_wire({**INFO.to_wire(), **change})


@pytest.mark.parametrize("value", [None, [], "online", 3])
def test_a_record_that_is_not_a_map_is_rejected(value: object) -> None:
    with pytest.raises(ProtocolError, match="must be a map"):
        ServerInfo.from_wire(value)


def test_missing_required_field_is_named() -> None:
    wire = INFO.to_wire()
    del wire["end"]
    with pytest.raises(ProtocolError, match="'end'"):
        ServerInfo.from_wire(wire)


def test_request_metadata_round_trips_and_validates() -> None:
    session_open = InferenceOpen(start=0, end=4, max_length=128, batch_size=2)
    assert InferenceOpen.from_wire(session_open.to_wire()) == session_open
    assert session_open.cache_tokens == 256
    assert InferenceStep.from_wire({"position": 7}).position == 7
    assert SpanRequest.from_wire({"start": 1, "end": 3}) == SpanRequest(1, 3)
    assert ModelRecord.from_wire(ModelRecord("org/model", 24).to_wire()).num_blocks == 24
    for bad in ({"position": -1}, {"position": 1.5}, {}):
        with pytest.raises(ProtocolError):
            InferenceStep.from_wire(bad)
    with pytest.raises(ProtocolError):
        InferenceOpen.from_wire({"start": 0, "end": 4, "max_length": 0, "batch_size": 1})


def test_forwarding_metadata_round_trips_and_validates() -> None:
    target = ForwardTarget("QmPeer", "ab12", step=3, timeout=1.5, dtype="bfloat16")
    step = InferenceStep(position=9, step=4, forward_to=(target, target))
    assert InferenceStep.from_wire(step.to_wire()) == step
    assert InferenceStep(position=9).to_wire() == {"position": 9, "step": -1}  # no targets: nothing on the wire
    pushed = ForwardedStep("ab12", position=9, step=3, forward_to=(target,))
    assert ForwardedStep.from_wire(pushed.to_wire()) == pushed
    assert InferenceStep.from_wire(pushed.to_wire()) == InferenceStep(9, 3, (target,))  # the session reads it so
    for bad in (
        {"position": 1, "forward_to": {"peer_id": "p"}},  # not a list
        {"position": 1, "forward_to": [{"peer_id": "p", "session": "", "step": 0, "timeout": 1.0}]},  # no session
        {"position": 1, "forward_to": [{"peer_id": "p", "session": "s", "step": 0, "timeout": 0}]},  # no time
        {"position": 1, "forward_to": [{"peer_id": "p", "session": "s", "step": -1, "timeout": 1.0}]},
        {"position": 1, "forward_to": [target.to_wire()] * (MAX_FORWARD_TARGETS + 1)},
    ):
        with pytest.raises(ProtocolError):
            InferenceStep.from_wire(bad)
    with pytest.raises(ProtocolError):
        InferenceOpen.from_wire({"start": 0, "end": 4, "max_length": 8, "batch_size": 1, "session": "x" * 65})
    with pytest.raises(ProtocolError):
        ForwardedStep.from_wire({"session": "", "position": 0, "step": 0})


def test_error_reply_kinds_are_closed() -> None:
    assert ErrorReply.from_wire({"kind": "cache_full", "message": "x"}).kind is ErrorKind.CACHE_FULL
    with pytest.raises(ProtocolError):
        ErrorReply.from_wire({"kind": "whatever", "message": "x"})


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("meta-llama/Llama-3.2-1B", "llama-3-2-1b"),
        ("/models/tiny-llama/", "tiny-llama"),
        ("bigscience/bloom-560m", "bloom-560m"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2-5-0-5b-instruct"),
    ],
)
def test_model_prefix_is_the_name_without_dots(name: str, prefix: str) -> None:
    assert model_prefix_for(name) == prefix
    assert "." not in block_key(model_prefix_for(name), 3)[: -len(".3")]
