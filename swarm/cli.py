"""`swarm`: the client's command line.

    swarm generate MODEL --initial-peers MADDR --prompt "..."   stream text generated through the swarm
    swarm status MODEL --initial-peers MADDR [--json]          which peers serve which blocks
    swarm serve MODEL --initial-peers MADDR [--port 8000]      an OpenAI-compatible HTTP API (see swarm/gateway/)
    swarm demo                                                 a whole swarm on this machine (see swarm/demo.py)
    swarm finetune MODEL --initial-peers MADDR --data FILE --run-id NAME --output DIR
                                                               train prompts or LoRA with other trainers
    swarm new-key FILE                                         a key for a private swarm (--swarm-key FILE)
    swarm bench [MODEL] [--initial-peers MADDR]                speed through the swarm vs the local model

Generated text goes to stdout as it is produced; the route, statistics and errors go to stderr, so
`swarm generate ... > out.txt` keeps only the text. A `SwarmError` ends the command with a one-line message and
exit code 1 (a traceback would suggest a bug where there is only a missing peer or a wrong flag); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import transformers
from hivemind.utils.multiaddr import Multiaddr
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

import swarm
from swarm.client._sync import run_sync
from swarm.config import DEFAULT_VERIFY_RATE, ClientConfig
from swarm.dht import start_dht
from swarm.directory import SwarmView, read_models, read_swarm_view
from swarm.errors import ConfigError, ModelError, SwarmError
from swarm.logs import setup_logging, short_id
from swarm.models import ModelSource
from swarm.protocol import WIRE_COMPRESSIONS, model_prefix_for
from swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
API_KEY_ENV = "BLOCKSWARM_API_KEY"  # `swarm serve`'s key, where a flag would show in `ps`


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """One streamed generation: all token ids (prompt included) and how long it took."""

    token_ids: torch.Tensor  # [1, prompt + new tokens]
    new_tokens: int
    seconds: float
    first_token_seconds: float  # from the call to the first generated token: prefill plus one step
    route: str

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s), "
            f"time to first token {self.first_token_seconds:.2f} s"
        )


class _TimedStreamer(TextStreamer):
    """Prints generated text as it comes (TextStreamer) and calls `on_first_token` just before the first token,
    when the route is known but nothing is printed yet, so route and text never interleave mid-line."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_first_token: Callable[[], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.first_token_at: float | None = None
        self._on_first_token = on_first_token

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self._on_first_token()
        super().put(value)


def stream_generate(
    model: swarm.DistributedModelForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    *,
    route_file: TextIO = sys.stderr,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Generate through the swarm, printing the route (to `route_file`), then the prompt and each new token (stdout).

    Streams from one session opened here, so the route printed is the one the tokens take.
    """
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:

        def show_route() -> None:
            print(f"Route: {session.route.describe() if session.route else '?'}", file=route_file, flush=True)
            print(prompt, end="", flush=True)

        streamer = _TimedStreamer(tokenizer, show_route)
        started = time.monotonic()
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=streamer, **generate_kwargs)
        seconds = time.monotonic() - started
        route = session.route.describe() if session.route else ""
        if session.reroutes:
            print(f"\nRerouted around failed peers {session.reroutes} time(s); route now: {route}", file=route_file)
    first_token_at = streamer.first_token_at if streamer.first_token_at is not None else started + seconds
    return GenerationResult(output, output.shape[1] - input_ids.shape[1], seconds, first_token_at - started, route)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, or a ConfigError saying why there is none (before any swarm is contacted)."""
    if Path(model).is_dir() and not any((Path(model) / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(f"{model} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one next to it")
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {model}: {str(e).strip().splitlines()[0]}") from e


def run_generate(args: argparse.Namespace) -> int:
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = {name: value for name in ("temperature", "top_k", "top_p") if (value := getattr(args, name)) is not None}
    if args.greedy and sampling:
        raise ConfigError(f"--greedy picks the likeliest token; it cannot be combined with {', '.join(sampling)}")
    if args.repetition_penalty is not None:
        sampling["repetition_penalty"] = args.repetition_penalty
    tokenizer = load_tokenizer(args.model)
    model = _connect(args)
    try:
        result = stream_generate(
            model, tokenizer, args.prompt, args.max_new_tokens, do_sample=not args.greedy, **sampling
        )
    finally:
        model.close()
    print(result.describe(), file=sys.stderr)
    return 0


def run_status(args: argparse.Namespace) -> int:
    prefix = args.model_prefix or model_prefix_for(args.model)
    config = ClientConfig(initial_peers=tuple(args.initial_peers))
    swarm_key = None if args.swarm_key is None else SwarmKey.load(args.swarm_key)
    dht = start_dht(config.initial_peers, client_mode=True, host_maddrs=list(config.host_maddrs), swarm_key=swarm_key)
    try:
        models = run_sync(read_models(dht))
        num_blocks = models[prefix].num_blocks if prefix in models else _local_num_blocks(args.model, prefix, models)
        view = run_sync(read_swarm_view(dht, prefix, num_blocks))
    finally:
        dht.shutdown()
    if args.json:
        print(json.dumps(status_document(args.model, view), indent=2))
    else:
        print_status(args.model, view)
    return 0


def _local_num_blocks(model: str, prefix: str, announced: dict[str, Any]) -> int:
    """No peer announces the model: its block count can still come from the checkpoint itself."""
    try:
        return ModelSource.open(model).layout.num_blocks
    except ModelError as e:
        known = ", ".join(sorted(announced)) or "none"
        raise ConfigError(f"no peer announces model prefix {prefix!r} (announced: {known}), and {e}") from e


def status_document(model: str, view: SwarmView) -> dict[str, Any]:
    """The status as one JSON-ready document: full peer ids and records, per-block peers, missing blocks."""
    throughputs = view.block_throughputs()
    return {
        "model": model,
        "model_prefix": view.model_prefix,
        "num_blocks": view.num_blocks,
        "peers": [{"peer_id": span.peer_id, **span.info.to_wire()} for span in view.spans],
        "blocks": [
            {"index": i, "peer_ids": [span.peer_id for span in view.peers_for_block(i)], "throughput": throughput}
            for i, throughput in enumerate(throughputs)
        ],
        "missing_blocks": view.missing_blocks(),
        "weakest_block": _weakest_block(throughputs),
    }


def print_status(model: str, view: SwarmView) -> None:
    """Runs of blocks with the same peers, one line per peer, then the summary (missing = no online peer)."""
    print(f"{model} (prefix {view.model_prefix}): {view.num_blocks} blocks, {len(view.spans)} peers")
    start = 0
    for end in range(1, view.num_blocks + 1):
        if end < view.num_blocks and view.peers_for_block(end) == view.peers_for_block(start):
            continue
        spans = view.peers_for_block(start)
        print(f"blocks {start}:{end}" + ("" if spans else "  no peer"))
        for span in spans:
            info = span.info
            name = f"  {info.public_name!r}" if info.public_name else ""
            print(
                f"  {short_id(span.peer_id)}  {info.state.value:<8} serves {info.start}:{info.end}  "
                f"{info.throughput:.1f} tokens/s  {info.cache_tokens_left} cache tokens left{name}"
            )
        start = end
    missing = view.missing_blocks()
    covered = view.num_blocks - len(missing)
    throughputs = view.block_throughputs()
    weakest = _weakest_block(throughputs)
    print(f"weakest block: {weakest} ({throughputs[weakest]:.1f} tokens/s from its peers)")
    if missing:
        print(f"{covered}/{view.num_blocks} blocks covered; MISSING blocks {_ranges(missing)} (no online peer)")
    else:
        print(f"{covered}/{view.num_blocks} blocks covered: the model is fully served")


def _weakest_block(throughputs: list[float]) -> int:
    """The block with the least throughput from online and joining peers (`SwarmView.block_throughputs`): where a
    new peer helps most."""
    return min(range(len(throughputs)), key=throughputs.__getitem__)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6': half-open, as --blocks takes them."""
    runs = [list(run) for _, run in itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0])]
    return ", ".join(f"{run[0][1]}:{run[-1][1] + 1}" for run in runs)


def _connect(args: argparse.Namespace) -> swarm.DistributedModelForCausalLM:
    """The distributed model of `swarm generate` and `swarm serve`, from their common flags."""
    config = ClientConfig(
        initial_peers=tuple(args.initial_peers),
        model_prefix=args.model_prefix or "",
        connect_timeout=args.connect_timeout,
        verify_rate=args.verify_rate,
        swarm_key=args.swarm_key,
        trusted_peers=tuple(args.trusted_peers),
        wire_compression=args.wire_compression,
    )
    return swarm.AutoDistributedModelForCausalLM.from_pretrained(args.model, config=config, adapter=args.adapter)


def run_serve(args: argparse.Namespace) -> int:
    from swarm.gateway import TextGenerator, build_app, serve  # imported here: FastAPI and uvicorn only for this

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    tokenizer = load_tokenizer(args.model)
    model = _connect(args)
    generator = TextGenerator(model, tokenizer)
    try:
        model_name = args.served_model_name or args.model
        app = build_app(generator, model_name=model_name, api_key=api_key)
        serve(app, host=args.host, port=args.port, model_name=model_name)
    finally:
        generator.close()
        model.close()
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    import prometheus_client

    from monitoring.peer_metrics import serving_metrics
    from swarm.client.tuning import TuningConfig
    from swarm.training.averaging import CollaborationConfig
    from swarm.training.trainer import FinetuneConfig, finetune

    logging.getLogger("hivemind.optim").setLevel(args.log_level.upper())  # rounds: averaged, alone, out of sync
    tokenizer = load_tokenizer(args.model)
    config = FinetuneConfig(
        model=args.model,
        client=ClientConfig(
            initial_peers=tuple(args.initial_peers),
            model_prefix=args.model_prefix or "",
            host_maddrs=tuple(args.host_maddrs),
            verify_rate=args.verify_rate,
            swarm_key=args.swarm_key,
            trusted_peers=tuple(args.trusted_peers),
            wire_compression=args.wire_compression,
        ),
        collaboration=CollaborationConfig(
            run_id=args.run_id,
            target_batch_size=args.target_batch_size,
            batch_size_per_step=args.batch_size,
            matchmaking_time=args.matchmaking_time,
            averaging_timeout=args.averaging_timeout,
            compression=args.compression,
            local_steps=args.local_steps,
            outer_lr=args.outer_lr,
        ),
        tuning=TuningConfig(mode=args.method, pre_seq_len=args.pre_seq_len, lora_rank=args.lora_rank),
        data=Path(args.data),
        output=Path(args.output),
        max_steps=args.max_steps,
        lr=args.lr,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    with serving_metrics(prometheus_client.REGISTRY, args.metrics_port):  # training and swarm-client metrics
        finetune(config, tokenizer)
    return 0


def run_new_key(args: argparse.Namespace) -> int:
    SwarmKey.write_new(args.file)
    print(f"Wrote a new swarm key to {args.file}. Give it to every member (--swarm-key {args.file}); keep it secret.")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from swarm.demo import DemoOptions, run_demo  # imported here: swarm.demo builds on this module's helpers

    options = DemoOptions(
        model=args.model,
        num_peers=args.peers,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        num_threads=args.num_threads,
    )
    return run_demo(options)


def run_bench(args: argparse.Namespace) -> int:
    from swarm.bench import BenchOptions, print_result, run_bench, stderr_progress  # it starts swarms of its own
    from swarm.demo_model import ensure_demo_model

    options = BenchOptions(
        model=Path(args.model) if args.model else ensure_demo_model(),
        initial_peers=tuple(args.initial_peers),
        peers=args.peers,
        new_tokens=args.new_tokens,
        clients=args.clients,
        repeats=args.repeats,
        num_threads=args.num_threads,
        draft=Path(args.draft) if args.draft else None,
        draft_tokens=args.draft_tokens,
        long_prompt=args.long_prompt,
        prefill_chunk=args.prefill_chunk,
        added_latency_ms=args.added_latency_ms,
        peer_latency_ms=args.added_latency_ms if args.peer_latency_ms is None else args.peer_latency_ms,
        device=args.device,
        dtype=args.dtype,
    )
    return print_result(run_bench(options, stderr_progress()), Path(args.json) if args.json else None)


def _multiaddr(text: str) -> str:
    try:
        Multiaddr(text)
    except Exception as e:  # multiaddr raises several unrelated types for malformed input
        raise argparse.ArgumentTypeError(f"not a multiaddr: {text!r} ({e})") from e
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _decoded_tokens(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2: the decode rate is timed after the first, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"not a rate between 0 and 1: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", "--log_level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    swarm_flags = argparse.ArgumentParser(add_help=False)
    swarm_flags.add_argument("model", help="model directory or Hugging Face id")
    swarm_flags.add_argument(
        "--initial-peers",
        "--initial_peers",
        nargs="+",
        action="extend",
        required=True,
        type=_multiaddr,
        metavar="MADDR",
        help="multiaddr of any swarm member (a bootstrap node or a peer); repeatable",
    )
    swarm_flags.add_argument("--model-prefix", "--model_prefix", help="DHT key prefix (default: from the model name)")
    swarm_flags.add_argument(
        "--swarm-key", "--swarm_key", metavar="FILE", help="key file of a private swarm (`swarm new-key FILE`)"
    )
    client_flags = argparse.ArgumentParser(add_help=False)
    client_flags.add_argument(
        "--trusted-peers",
        "--trusted_peers",
        nargs="+",
        default=[],
        metavar="PEER_ID",
        help="only these peers may run the first and the last block, which see what is closest to your text",
    )
    client_flags.add_argument(
        "--verify-rate",
        "--verify_rate",
        type=_rate,
        default=DEFAULT_VERIFY_RATE,
        help="share of each peer's steps an independent peer recomputes, to catch wrong outputs "
        "(default: %(default)s; 0: trust every peer)",
    )
    client_flags.add_argument(
        "--wire-compression",
        "--wire_compression",
        choices=WIRE_COMPRESSIONS,
        default="none",
        help="how hidden states travel to and from peers: none (exact, default), fp16 (half of float32) or 8bit "
        "(about a quarter; ~0.6%% error per value), for slow links",
    )

    parser = argparse.ArgumentParser(prog="swarm", description="Run language models over a blockswarm swarm.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {swarm.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate", parents=[common, swarm_flags, client_flags], help="generate text, streamed as it comes"
    )
    add = generate.add_argument
    add("--prompt", required=True)
    add("--max-new-tokens", "--max_new_tokens", type=_positive_int, default=32, help="default: %(default)s")
    add("--connect-timeout", "--connect_timeout", type=float, default=10.0,
        help="seconds to wait for peers covering every block (default: %(default)s)")  # fmt: skip
    add("--adapter", metavar="DIR",
        help="apply a trained adapter: a PEFT LoRA directory or soft prompts (`swarm finetune --output`)")  # fmt: skip
    add("--greedy", action="store_true", help="always take the likeliest token (deterministic); default: sample")
    add("--temperature", type=float, help="sampling temperature (default: the model's generation config)")
    add("--top-k", "--top_k", type=int, help="sample among the k likeliest tokens")
    add("--top-p", "--top_p", type=float, help="sample among the likeliest tokens holding this probability")
    add("--repetition-penalty", "--repetition_penalty", type=float, help="above 1 discourages repeating tokens")
    add("--seed", type=int, help="seed the sampler, for repeatable samples")
    generate.set_defaults(run=run_generate)

    status = commands.add_parser("status", parents=[common, swarm_flags], help="show which peers serve which blocks")
    status.add_argument("--json", action="store_true", help="print one JSON document, for scripts")
    status.set_defaults(run=run_status)

    serve = commands.add_parser(
        "serve",
        parents=[common, swarm_flags, client_flags],
        help="serve the model over an OpenAI-compatible API and a chat page",
    )
    add = serve.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: the network)")
    add("--port", type=_port, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)")
    add("--api-key", "--api_key", help=f"require `Authorization: Bearer KEY` on /v1 requests (default: ${API_KEY_ENV})")
    add("--served-model-name", "--served_model_name", help="the model id clients send (default: MODEL as given)")
    add("--connect-timeout", "--connect_timeout", type=float, default=10.0,
        help="seconds a request waits for peers covering every block before a 503 (default: %(default)s)")  # fmt: skip
    add("--adapter", metavar="DIR",
        help="apply a trained adapter: a PEFT LoRA directory or soft prompts (`swarm finetune --output`)")  # fmt: skip
    serve.set_defaults(run=run_serve)

    finetune = commands.add_parser(
        "finetune",
        parents=[common, swarm_flags, client_flags],
        help="train prompts or LoRA adapters together with other trainers",
    )
    add = finetune.add_argument
    add("--data", required=True, help='.txt (one example per line) or .jsonl (a "text" field per line)')
    add("--run-id", "--run_id", required=True, help="trainers with the same run id average their gradients")
    add("--method", choices=["ptune", "deep-ptune", "lora"], default="lora", help="default: %(default)s")
    add("--target-batch-size", "--target_batch_size", type=_positive_int, required=True,
        help="samples the whole run processes per averaged optimizer step (an epoch)")  # fmt: skip
    add("--batch-size", "--batch_size", type=_positive_int, default=4,
        help="samples per local step of this trainer (default: %(default)s)")  # fmt: skip
    add("--max-steps", "--max_steps", type=_positive_int, required=True,
        help="stop when the run's epoch (averaged optimizer steps) reaches this")  # fmt: skip
    add("--output", required=True, help="directory for the trained adapter (PEFT format) or prompts")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    add("--local-steps", "--local_steps", type=_positive_int, default=1, metavar="H",
        help="AdamW steps each trainer takes alone between averaging rounds; above 1 (DiLoCo), the rounds average "
        "the change in the parameters and apply it with Nesterov SGD, so a trainer communicates H times less often; "
        "then set --target-batch-size to about trainers x H x --batch-size (default: %(default)s)")  # fmt: skip
    add("--outer-lr", "--outer_lr", type=float, default=0.7,
        help="with --local-steps above 1: the outer Nesterov SGD's learning rate (default: %(default)s)")  # fmt: skip
    add("--seq-len", "--seq_len", type=_positive_int, default=64, help="tokens per example (default: %(default)s)")
    add(
        "--pre-seq-len",
        "--pre_seq_len",
        type=_positive_int,
        default=16,
        help="ptune prompt length (default: %(default)s)",
    )
    add("--lora-rank", "--lora_rank", type=_positive_int, default=8, help="default: %(default)s")
    add("--compression", choices=["none", "fp16", "8bit"], default="none",
        help="codec for averaging traffic (default: %(default)s)")  # fmt: skip
    add("--matchmaking-time", "--matchmaking_time", type=float, default=3.0,
        help="seconds to gather trainers for each averaging round (default: %(default)s)")  # fmt: skip
    add("--averaging-timeout", "--averaging_timeout", type=float, default=30.0,
        help="seconds before a round without a group proceeds alone (default: %(default)s)")  # fmt: skip
    add("--host-maddrs", "--host_maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR",
        help="where other trainers reach this one (default: %(default)s; across hosts /ip4/0.0.0.0/tcp/0)")  # fmt: skip
    add("--seed", type=int, help="data order of this trainer (default: random)")
    add("--metrics-port", "--metrics_port", type=int, default=None,
        help="serve Prometheus metrics (loss, epoch, trainers in the run) at http://127.0.0.1:PORT/metrics "
        "(0: any free port)")  # fmt: skip
    finetune.set_defaults(run=run_finetune)

    new_key = commands.add_parser(
        "new-key", parents=[common], help="write a key file for a private swarm (--swarm-key on every member)"
    )
    new_key.add_argument("file", help="where to write it (never overwritten; readable by you only)")
    new_key.set_defaults(run=run_new_key)

    demo = commands.add_parser("demo", parents=[common], help="run a swarm here and check it against the local model")
    add = demo.add_argument
    add("--model", help="model directory (default: the demo model shipped with blockswarm)")
    add("--peers", type=int, choices=[2, 3], default=2, help="how many peers split the blocks (default: %(default)s)")
    add("--prompt", default="It was the best of times,", help="default: %(default)r")
    add("--max-new-tokens", "--max_new_tokens", type=_positive_int, default=32, help="default: %(default)s")
    add("--num-threads", "--num_threads", type=_positive_int, default=1,
        help="torch threads in each process (default: %(default)s)")  # fmt: skip
    demo.set_defaults(run=run_demo)

    bench = commands.add_parser(
        "bench", parents=[common], help="measure a swarm's speed against the same model run locally"
    )
    add = bench.add_argument
    add("model", nargs="?", help="model directory (default: the demo model shipped with blockswarm)")
    add("--initial-peers", "--initial_peers", nargs="+", default=[], type=_multiaddr, metavar="MADDR",
        help="measure this swarm (default: start a loopback swarm here)")  # fmt: skip
    add("--peers", type=_positive_int, default=2, help="peers of the loopback swarm (default: %(default)s)")
    add("--new-tokens", "--new_tokens", type=_decoded_tokens, default=32, help="default: %(default)s")
    add("--clients", type=_positive_int, default=8, help="concurrent sessions (default: %(default)s)")
    add("--repeats", type=_positive_int, default=3, help="runs per figure; medians are reported (default: %(default)s)")
    add("--num-threads", "--num_threads", type=_positive_int, default=1,
        help="torch threads in each process (default: %(default)s)")  # fmt: skip
    add("--draft", help="draft model for speculative decoding (default: the model itself, run locally)")
    add("--draft-tokens", "--draft_tokens", type=_positive_int, default=4,
        help="guesses per step (default: %(default)s)")  # fmt: skip
    add("--long-prompt", "--long_prompt", type=_positive_int, default=512,
        help="prompt tokens of the prefill timing (default: %(default)s)")  # fmt: skip
    add("--prefill-chunk", "--prefill_chunk", type=_positive_int, default=128,
        help="chunk of the pipelined prefill (default: %(default)s)")  # fmt: skip
    add("--added-latency-ms", "--added_latency_ms", type=float, default=0.0,
        help="round trip between the client and each loopback peer, added to every inference message, as a "
             "network would (default: %(default)s)")  # fmt: skip
    add("--peer-latency-ms", "--peer_latency_ms", type=float, default=None,
        help="round trip between two loopback peers, added to every step one forwards to the other "
             "(default: --added-latency-ms)")  # fmt: skip
    add("--device", default="cpu", help="of the local model, the client and the loopback peers (default: %(default)s)")
    add(
        "--dtype", default="auto", help="likewise: auto (bfloat16 on GPUs, float32 on CPUs), bfloat16, float16, float32"
    )
    add("--json", metavar="FILE", help="also write the figures as JSON")
    bench.set_defaults(run=run_bench)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so it unwinds exactly like Ctrl-C."""


def _unwind_on_sigterm() -> None:
    """SIGTERM (a service manager, a test's timeout) unwinds like Ctrl-C, so `finally` blocks stop the peers we
    started: they run in their own sessions and would otherwise outlive us.

    hivemind forks its DHT process from this one, and a fork inherits the handler; there it does what SIGTERM
    does by default, because hivemind stops a stuck DHT process with SIGTERM.
    """
    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated

    signal.signal(signal.SIGTERM, handle)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    transformers.utils.logging.disable_progress_bar()  # weight loading bars would break the streamed text
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the client forks its DHT process after tokenizing
    _unwind_on_sigterm()
    try:
        code = args.run(args)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"\nswarm {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except SwarmError as e:
        print(f"swarm {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_ERROR
    except BrokenPipeError:  # `swarm ... | head`: the reader left; say nothing more (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    main()
