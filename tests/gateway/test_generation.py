"""The pure parts of the generation bridge: `TextStream` sends text as soon as it is safe (never half a character,
never the start of a stop sequence) and cuts the stop sequence; the per-request sampler; request limits."""

from __future__ import annotations

import pytest
import torch

from swarm.gateway.generation import ContextLengthExceeded, SamplingParams, TextStream, _Sampler

# A toy "tokenizer": token i decodes to PIECES[i]; byte tokens 5 and 6 form "é" only together.
PIECES = {0: "Hello", 1: ",", 2: " world", 3: "\n", 4: "User", 5: b"\xc3", 6: b"\xa9", 7: ":", 8: "!"}


def decode(token_ids: list[int]) -> str:
    data = b"".join(p if isinstance(p, bytes) else p.encode() for p in (PIECES[i] for i in token_ids))
    return data.decode("utf-8", errors="replace")


def pushed(stream: TextStream, token_ids: list[int]) -> list[str]:
    return [stream.push(token_id) for token_id in token_ids]


def test_text_goes_out_token_by_token_without_stops() -> None:
    stream = TextStream(decode)

    assert pushed(stream, [0, 1, 2]) == ["Hello", ",", " world"]
    assert stream.finish() == "" and stream.text == "Hello, world" and not stream.stopped


def test_half_a_character_waits_for_its_other_half() -> None:
    stream = TextStream(decode)

    assert pushed(stream, [0, 5, 6, 8]) == ["Hello", "", "é", "!"]


def test_a_possible_stop_start_waits_and_a_stop_is_cut() -> None:
    stream = TextStream(decode, stop=["\nUser:"])

    assert pushed(stream, [0, 3, 4]) == ["Hello", "", ""]  # "\nUser" may become the stop sequence
    assert stream.push(7) == ""
    assert stream.stopped and stream.text == "Hello"
    assert stream.push(8) == "" and stream.finish() == ""


def test_held_back_text_that_did_not_become_a_stop_goes_out() -> None:
    stream = TextStream(decode, stop=["\nUser:"])

    assert pushed(stream, [0, 3, 4, 8]) == ["Hello", "", "", "\nUser!"]
    assert not stream.stopped


def test_held_back_text_goes_out_when_generation_ends() -> None:
    stream = TextStream(decode, stop=["\nUser:"])

    assert pushed(stream, [0, 3]) == ["Hello", ""]
    assert stream.finish() == "\n" and stream.text == "Hello\n"


def test_the_earliest_of_several_stops_wins() -> None:
    stream = TextStream(decode, stop=["world", ","])

    assert pushed(stream, [0, 1]) == ["Hello", ""]
    assert stream.stopped and stream.text == "Hello"


@pytest.mark.parametrize(
    "fields",
    [
        dict(max_tokens=0),
        dict(max_tokens=1, temperature=-1),
        dict(max_tokens=1, top_p=0),
        dict(max_tokens=1, stop=("",)),
    ],
)
def test_sampling_params_refuse_impossible_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**fields)  # type: ignore[arg-type]


def test_context_length_message_says_what_was_asked() -> None:
    error = ContextLengthExceeded(prompt_tokens=10, max_tokens=250, context_length=256)

    assert "maximum context length is 256 tokens" in str(error)
    assert "you requested 260 tokens (10 in the prompt, 250 in the completion)" in str(error)


def test_sampler_leaves_only_the_token_it_drew_and_repeats_with_its_seed() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()  # the last token is impossible

    def draw(seed: int, top_p: float = 1.0) -> torch.Tensor:
        return _Sampler(1.0, top_p, torch.Generator().manual_seed(seed))(torch.zeros(1, 1, dtype=torch.long), scores)

    drawn = draw(3)
    assert int((drawn == 0).sum()) == 1 and int(drawn.isinf().sum()) == 3
    assert torch.equal(draw(3), drawn)
    assert {int(draw(seed).argmax()) for seed in range(50)} == {0, 1, 2}
    assert {int(draw(seed, top_p=0.4).argmax()) for seed in range(50)} == {0}  # the nucleus holds one token
