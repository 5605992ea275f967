"""`swarm demo`: a whole swarm on this machine, in one command, proving that it computes what the model computes.

It starts a bootstrap node and 2-3 peers on 127.0.0.1 (real subprocesses, as users would run them), splits the
model's blocks between the peers, streams a greedy generation through them, then generates the same prompt with the
full model locally and compares the two token for token. Greedy decoding makes the comparison exact: any
difference in what the peers compute would change some token. Everything it started is stopped on the way out,
on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from swarm.cli import load_tokenizer, stream_generate
from swarm.client._sync import run_sync
from swarm.client.remote_model import AutoDistributedModelForCausalLM
from swarm.config import ClientConfig
from swarm.demo_model import demo_model_dir, ensure_demo_model, is_complete
from swarm.errors import ConfigError, SwarmError
from swarm.logs import short_id
from swarm.models import ModelSource
from swarm.process import ProcessExitedError, SwarmProcess
from swarm.testing import PEER_ID_LINE, SERVING_LINE, LocalSwarm

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 180.0  # a peer imports torch and loads its blocks; slow on a busy 2-core machine


@dataclass(frozen=True, slots=True)
class DemoOptions:
    model: str | None  # model directory; None: the demo model (`demo_model_dir()`)
    num_peers: int
    prompt: str
    max_new_tokens: int
    num_threads: int  # torch threads in every process: peers, client and the local reference


def run_demo(options: DemoOptions) -> int:
    """0 when the swarm's tokens equal the local model's, 1 when they differ."""
    torch.set_num_threads(options.num_threads)
    if options.model is None and not is_complete(demo_model_dir()):
        say(f"Copying the demo model to {demo_model_dir()} ...")
    model_dir = Path(options.model) if options.model else ensure_demo_model()
    source = ModelSource.open(model_dir)
    tokenizer = load_tokenizer(str(model_dir))  # before starting anything: a model without one cannot be demoed
    spans = even_spans(source.layout.num_blocks, options.num_peers)
    say(f"Model {model_dir}: {source.config.model_type}, {source.layout.num_blocks} blocks")

    local_swarm = LocalSwarm(model_dir, spans=[], num_threads=options.num_threads, start_timeout=START_TIMEOUT_SECONDS)
    # Every callback runs on the way out, even if an earlier one raises (stdout closed: a BrokenPipeError).
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(say, "Stopped.")
        cleanup.callback(_close_uninterrupted, local_swarm)
        cleanup.callback(say, "Stopping the swarm ...")
        say("Starting the bootstrap node (swarm-dht) on 127.0.0.1 ...")
        _started(local_swarm.start, "the bootstrap node")
        say(f"  --initial-peers {' '.join(local_swarm.initial_peers)}")
        say(f"Starting {len(spans)} peers (swarm-peer), one per span: {', '.join(f'{s}:{e}' for s, e in spans)} ...")
        peers = [local_swarm.add_peer(start, end, wait=False) for start, end in spans]
        for peer, (start, end) in zip(peers, spans, strict=True):
            _started(lambda peer=peer: peer.wait_for_line(SERVING_LINE, START_TIMEOUT_SECONDS), peer.name)
            say(f"  peer {_peer_id(peer)} serves blocks {start}:{end}")

        say("Connecting a client (it loads only the embeddings and the LM head) ...")
        config = ClientConfig(initial_peers=tuple(local_swarm.initial_peers), connect_timeout=START_TIMEOUT_SECONDS)
        client = AutoDistributedModelForCausalLM.from_pretrained(model_dir, config=config)
        cleanup.callback(client.close)
        run_sync(client.swarm.wait_blocks_covered(START_TIMEOUT_SECONDS))

        say(f"Generating {options.max_new_tokens} tokens through the swarm (greedy):")
        result = stream_generate(
            client, tokenizer, options.prompt, options.max_new_tokens, route_file=sys.stdout, do_sample=False
        )
        say(f"Swarm: {result.describe()}")

        say("Generating the same prompt with the full model locally ...")
        input_ids = tokenizer(options.prompt, return_tensors="pt").input_ids
        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            expected = local.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
            )
        code = _compare(result.token_ids, expected, input_ids.shape[1])
    return code


def even_spans(num_blocks: int, num_peers: int) -> list[tuple[int, int]]:
    """Half-open spans of nearly equal length: 6 blocks over 3 peers -> [(0, 2), (2, 4), (4, 6)]."""
    if not 0 < num_peers <= num_blocks:
        raise ConfigError(f"cannot split {num_blocks} blocks over {num_peers} peers")
    bounds = [round(i * num_blocks / num_peers) for i in range(num_peers + 1)]
    return list(itertools.pairwise(bounds))


def say(message: str) -> None:
    """A step of the demo, on stdout with the generated text: the demo's story is its output."""
    print(message, flush=True)


def _compare(swarm_ids: torch.Tensor, local_ids: torch.Tensor, prompt_length: int) -> int:
    swarm_new, local_new = swarm_ids[0, prompt_length:].tolist(), local_ids[0, prompt_length:].tolist()
    if swarm_new == local_new:
        say(f"OK: the swarm's output is equal to local output, token for token ({len(swarm_new)} tokens).")
        return 0
    position = next((i for i, (a, b) in enumerate(zip(swarm_new, local_new, strict=False)) if a != b), None)
    position = min(len(swarm_new), len(local_new)) if position is None else position
    say(f"MISMATCH: the swarm's tokens differ from local ones from new token {position} on")
    say(f"  swarm: {swarm_new}\n  local: {local_new}")
    return 1


def _close_uninterrupted(local_swarm: LocalSwarm) -> None:
    """Stop the swarm, ignoring Ctrl-C and SIGTERM meanwhile: the peers run in their own sessions, so an impatient
    second Ctrl-C that cut this short would leave them running."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        local_swarm.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _started(wait: Callable[[], object], what: str) -> None:
    """Run a start-up wait; a process that died or hung becomes a SwarmError that quotes its output."""
    try:
        wait()
    except (ProcessExitedError, TimeoutError) as e:
        raise SwarmError(f"{what} did not start: {e}") from e


def _peer_id(peer: SwarmProcess) -> str:
    try:
        return short_id(peer.wait_for_line(PEER_ID_LINE, timeout=1.0).group(1))
    except (ProcessExitedError, TimeoutError):
        return f"pid {peer.pid}"
