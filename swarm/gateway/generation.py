"""From one API request to the distributed model: its own inference session, text streamed as it is generated.

`TextGenerator.stream(prompt_ids, params)` runs transformers' `generate` in a worker thread (it blocks on torch
and on the swarm), so the HTTP event loop stays free, and yields text pieces as they are generated, then one
`GenerationResult` (finish_reason, token counts, token times).

Three decisions live here:

  * Each request gets a model of its own, sharing the loaded modules and the swarm client: a
    `DistributedModelForCausalLM` holds at most one open inference session, so concurrent `generate` calls on one
    model object would share (and break) it. Building the extra model costs well under a millisecond.
  * New tokens are watched by a stopping criterion, which generate calls right after appending each token and
    before the next step: the text is decoded there, stop sequences end generation at that very token, and a
    request whose caller has gone stops at its next token.
  * Sampling uses a `torch.Generator` per request (seeded with `seed` when given) instead of torch's global
    generator, which concurrent requests would share: the same seed gives the same text whatever else runs.
    Generate itself runs greedy search; the request's sampler leaves only the token it drew possible.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from swarm.client._sync import client_loop
from swarm.client.remote_model import DistributedModelForCausalLM

FinishReason = Literal["stop", "length"]
DEFAULT_MAX_TOKENS_WITHOUT_CONTEXT = 256  # when a request names no max_tokens and the model states no context size
MAX_CONCURRENT_GENERATIONS = 64  # worker threads; more requests wait for one (each also holds a session on the peers)
_T = TypeVar("_T")


class ContextLengthExceeded(ValueError):
    """The prompt plus the requested completion do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or of the completion (max_tokens)."
        )


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request generates: at most `max_tokens` new tokens; `temperature` 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if any(not stop for stop in self.stop):
            raise ValueError("stop sequences must not be empty")


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The end of one generation: the whole text (stop sequence cut), why it ended, token counts and times."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    started_at: float  # time.monotonic() when the generation was handed to its worker thread
    token_times: tuple[float, ...]  # time.monotonic() of each new token

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.started_at if self.token_times else None

    def inter_token_seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:], strict=False)]


class TextStream:
    """Generated token ids in, text out that is safe to send as it comes.

    * Never half a character: text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token.
    * Never the start of a stop sequence: text that could begin one waits until it cannot.
    * At the first stop sequence, `stopped` becomes true and the text ends just before it.

    Each push decodes all tokens so far (decoding a token alone loses the spaces and bytes it shares with its
    neighbours); that is linear in the length per token, and small next to a step through the swarm.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0  # characters of the text handed out so far
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far, including what is held back."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to send (often empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        stops = [index for stop in self._stop if (index := text.find(stop, self._sent)) >= 0]
        if stops:
            self.stopped = True
            self._text = text[: min(stops)]
            return self._release(len(self._text))
        self._text = text
        ready = len(text.rstrip("\ufffd"))
        return self._release(ready - self._stop_prefix_length(text[:ready]))

    def finish(self) -> str:
        """Generation is over: whatever was held back is text after all."""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece, self._sent = self._text[self._sent : end], end
        return piece

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop sequence."""
        return max(
            (size for stop in self._stop for size in range(min(len(stop) - 1, len(text)), 0, -1)
             if text.endswith(stop[:size])),
            default=0,
        )  # fmt: skip


class _TokenWatcher(StoppingCriteria):
    """Called by generate right after it appends each new token: turns the token into text for the stream, notes
    its time, and ends generation at a stop sequence or once `cancelled()` (the caller has gone, the gateway
    is stopping)."""

    def __init__(self, text: TextStream, emit: Callable[[str], None], cancelled: Callable[[], bool]):
        self.text = text
        self.emit = emit
        self.cancelled = cancelled
        self.token_times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.token_times.append(time.monotonic())
        piece = self.text.push(int(input_ids[0, -1]))
        if piece:
            self.emit(piece)
        done = self.text.stopped or self.cancelled()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Sampler(LogitsProcessor):
    """Draws the next token with the request's own generator (temperature, then top-p) and leaves only that
    token possible, so the greedy search that generate runs picks it."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest set of likeliest tokens whose probabilities add up to top_p (at least one token)
            sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, choice, 0.0)


class _Done:
    """Marks the end of a worker's text pieces in the queue."""


_DONE = _Done()


class TextGenerator:
    """The served model and its tokenizer; each `stream` call is one request with its own inference session.

    Generations run in a thread pool of their own, so long ones never hold up the short jobs (tokenizing) that
    the event loop hands to its default executor."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        max_concurrent: int = MAX_CONCURRENT_GENERATIONS,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = _context_length(model.config)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        # Fast tokenizers may fail with "Already borrowed" when one object is used from several threads at once.
        self._tokenizer_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="gateway-generation")
        self._closing = threading.Event()

    def close(self) -> None:
        """Take no more generations, and end running ones at their next token."""
        self._closing.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def plan_max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None) -> int:
        """New tokens to allow: `requested`, else `default`, else all the context leaves after the prompt.

        Raises `ContextLengthExceeded` when prompt and completion do not fit the model's context."""
        limit = self.context_length
        if requested is None:
            if default is not None:
                requested = default
            elif limit is not None:
                requested = max(limit - prompt_tokens, 1)  # at least 1, so a prompt filling the context fails below
            else:
                requested = DEFAULT_MAX_TOKENS_WITHOUT_CONTEXT
        if limit is not None and prompt_tokens + requested > limit:
            raise ContextLengthExceeded(prompt_tokens, requested, limit)
        return requested

    async def missing_blocks(self) -> list[int]:
        """Blocks with no online peer in the records this client knows (read from the DHT on the first call)."""
        view = await _on_client_loop(self.model.swarm.known_view())
        return view.missing_blocks()

    async def stream(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text pieces as they become safe to send, then one `GenerationResult`.

        Swarm errors (`MissingBlocksError` when some blocks have no peer, ...) are raised here. Leaving the loop
        early (the HTTP client went away) stops the worker at its next token."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | _Done] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: str | _Done) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        def work() -> GenerationResult:
            try:
                return self._generate(prompt_ids, params, emit, cancelled)
            finally:
                emit(_DONE)

        worker = loop.run_in_executor(self._executor, work)
        worker.add_done_callback(_retrieve_exception)  # a caller that left early never awaits it
        try:
            while not isinstance(piece := await pieces.get(), _Done):
                yield piece
            yield await worker
        finally:
            cancelled.set()

    def _generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[str], None],
        cancelled: threading.Event,
    ) -> GenerationResult:
        """One whole generation, in a worker thread."""
        started_at = time.monotonic()
        text = TextStream(self.decode, params.stop)
        watcher = _TokenWatcher(text, emit, lambda: cancelled.is_set() or self._closing.is_set())
        processors = LogitsProcessorList()
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            processors.append(_Sampler(params.temperature, params.top_p, torch.Generator().manual_seed(seed)))
        model = self._request_model(params)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        with model.inference_session(max_length=len(prompt_ids) + params.max_tokens):
            output = model.generate(
                input_ids, stopping_criteria=StoppingCriteriaList([watcher]), logits_processor=processors
            )
        new_ids = output[0, len(prompt_ids) :].tolist()
        tail = text.finish()
        if tail:
            emit(tail)
        ended_by_eos = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        return GenerationResult(
            text=text.text,
            finish_reason="stop" if text.stopped or ended_by_eos else "length",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids),
            started_at=started_at,
            token_times=tuple(watcher.token_times),
        )

    def _request_model(self, params: SamplingParams) -> DistributedModelForCausalLM:
        """A model of this request's own (see the module docstring): same modules, same swarm client, and the
        request's generation config (generate fills what a passed config leaves unset from the model's own)."""
        model = DistributedModelForCausalLM(self.model.config, self.model.client_modules, self.model.swarm)
        model.generation_config = self._generation_config(params)
        return model.eval()

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        """The model's generation config (EOS, suppressed tokens, penalties) with the request's length; sampling
        settings of the model are replaced by the request's (see `_Sampler`)."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            max_new_tokens=params.max_tokens,
            max_length=None,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            num_beams=1,
            num_return_sequences=1,
        )
        return config


def _context_length(config: PretrainedConfig) -> int | None:
    """Positions the model was built for, where the config states them (ALiBi models such as bloom do not)."""
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


async def _on_client_loop(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Await a swarm-client coroutine from any loop: the client's objects belong to the client loop."""
    loop = client_loop()
    if asyncio.get_running_loop() is loop:
        return await coroutine
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
