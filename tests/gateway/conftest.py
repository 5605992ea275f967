"""One swarm of the demo model and one `swarm serve` gateway over it (a real process on 127.0.0.1, with an API
key), shared by every gateway test; plus the same model loaded locally, for the text the gateway must return."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarm.process import SwarmProcess
from swarm.testing import LocalSwarm

MODEL_NAME = "demo"  # --served-model-name: the id clients send
API_KEY = "test-key"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
READY_LINE = r"^Gateway for \S+ at (http://127\.0\.0\.1:\d+)"
START_TIMEOUT = 120.0  # imports and the client's DHT process, on a busy 2-core machine
REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Gateway:
    url: str  # http://127.0.0.1:PORT
    process: SwarmProcess
    client: openai.OpenAI  # with the right API key; closed with the gateway

    def new_client(self, api_key: str = API_KEY) -> openai.OpenAI:
        """A client of its own (for another key, or another thread); close it, e.g. with `with`."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT)


@contextlib.contextmanager
def running_gateway(model: Path, initial_peers: Sequence[str], *flags: str) -> Iterator[Gateway]:
    """`swarm serve MODEL` on a free port of 127.0.0.1, ready once it printed its address; stopped by PID."""
    args = [
        sys.executable, "-m", "swarm.cli", "serve", str(model), "--initial-peers", *initial_peers,
        "--host", "127.0.0.1", "--port", "0", "--served-model-name", MODEL_NAME, "--api-key", API_KEY, *flags,
    ]  # fmt: skip
    with SwarmProcess(args, env=ENV, name="swarm-serve") as process:
        url = process.wait_for_line(READY_LINE, START_TIMEOUT, stream="stdout").group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT)
        with client:
            yield Gateway(url, process, client)


@dataclass(frozen=True, slots=True)
class Expected:
    """What greedy generation of the local model gives for one prompt."""

    new_ids: list[int]
    text: str
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        return len(self.new_ids)


@dataclass(frozen=True, slots=True)
class LocalModel:
    """The demo model run locally with transformers: the reference for the gateway's output."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> Expected:
        input_ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, do_sample=False
            )
        new_ids = output[0, len(prompt_ids) :].tolist()
        ended_by_eos = bool(new_ids) and new_ids[-1] == self.model.generation_config.eos_token_id
        return Expected(new_ids, self.decode(new_ids), "stop" if ended_by_eos else "length")

    def greedy_until(self, prompt_ids: list[int], max_tokens: int, stop: str) -> Expected:
        """Greedy generation that ends at the first token whose text completes `stop`, the stop text cut off."""
        full = self.greedy(prompt_ids, max_tokens)
        for count in range(1, len(full.new_ids) + 1):
            text = self.decode(full.new_ids[:count])
            if stop in text:
                return Expected(full.new_ids[:count], text[: text.index(stop)], "stop")
        return full


@pytest.fixture(scope="package")
def gateway_swarm(demo_model: Path) -> Iterator[LocalSwarm]:
    with LocalSwarm(demo_model, [(0, 3), (3, 6)]) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="package")
def gateway(demo_model: Path, gateway_swarm: LocalSwarm) -> Iterator[Gateway]:
    with running_gateway(demo_model, gateway_swarm.initial_peers) as running:
        yield running


@pytest.fixture(scope="package")
def local_model(demo_model: Path) -> LocalModel:
    return LocalModel(
        AutoTokenizer.from_pretrained(demo_model), AutoModelForCausalLM.from_pretrained(demo_model).eval()
    )
