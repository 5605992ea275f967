"""`swarm-peer MODEL --blocks START:END`: serve a range of a model's blocks to the swarm."""

from __future__ import annotations

import logging
import sys

import configargparse
import torch

from peer.config import PeerConfig, parse_blocks, parse_size
from peer.server import run_peer
from swarm.command_line import command_parser
from swarm.errors import SwarmError
from swarm.logs import setup_logging

logger = logging.getLogger("peer")


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def build_parser() -> configargparse.ArgumentParser:
    parser = command_parser("swarm-peer", "Serve a range of a model's decoder blocks to a blockswarm swarm.")
    defaults = PeerConfig(model="", new_swarm=True)
    add = parser.add_argument
    add("model", help="model directory or Hugging Face id (loaded through the Hugging Face cache)")
    add("--blocks", help="half-open range of blocks to serve, like a Python slice: 0:12 "
        "(default: as many as fit, where the swarm is weakest, moving when that helps the swarm)")  # fmt: skip
    add("--num-blocks", "--num_blocks", type=int, default=None,
        help="without --blocks: how many blocks to host (default: as many as --memory-budget holds)")  # fmt: skip
    add("--memory-budget", "--memory_budget", default=None,
        help="without --blocks: memory for weights and KV cache, e.g. 8GiB "
        "(default: free memory less a margin)")  # fmt: skip
    add("--start-jitter", "--start_jitter", type=float, default=defaults.start_jitter,
        help="without --blocks: wait up to this many seconds (random) before choosing, so peers started "
        "together choose apart")  # fmt: skip
    add("--balance-period", "--balance_period", type=float, default=defaults.balance_period,
        help="without --blocks: mean seconds between checks whether moving would help the swarm "
        "(randomised; 0: never move)")  # fmt: skip
    add("--balance-min-improvement", "--balance_min_improvement", type=float,
        default=defaults.balance_min_improvement,
        help="move only if the swarm's weakest block gets this much faster (0.2: 20%%), "
        "or to cover missing blocks")  # fmt: skip
    add("--network-bandwidth", "--network_bandwidth", type=float, default=defaults.network_bandwidth,
        help="Mbit/s this peer's link carries; caps the throughput it announces")  # fmt: skip
    add(
        "--initial-peers",
        "--initial_peers",
        action="append",
        default=[],
        help="multiaddr of a swarm member; repeatable",
    )
    add("--new-swarm", "--new_swarm", action="store_true", help="start a new swarm instead of joining one")
    add("--host-maddrs", "--host_maddrs", nargs="+", default=list(defaults.host_maddrs), help="multiaddrs to listen on")
    add("--announce-maddrs", "--announce_maddrs", nargs="+", default=[], help="multiaddrs others should dial")
    add("--identity-path", "--identity_path", help="private key file; keeps the peer id across restarts")
    add("--swarm-key", "--swarm_key", metavar="FILE", help="join the private swarm of this key file (`swarm new-key`)")
    add("--device", default=_default_device(), help="cpu, cuda, cuda:N or mps")
    add("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto is bfloat16 on GPUs, float32 on CPU")  # fmt: skip
    add("--cache-tokens", "--cache_tokens", type=int, default=defaults.cache_tokens,
        help="KV-cache budget: token positions over all sessions and batch rows")  # fmt: skip
    add("--max-batch-size", "--max_batch_size", type=int, default=defaults.max_batch_size)
    add("--inference-max-length", "--inference_max_length", type=int, default=defaults.inference_max_length,
        help="most tokens one inference session may reach")  # fmt: skip
    add("--prefill-chunk-tokens", "--prefill_chunk_tokens", type=int, default=defaults.prefill_chunk_tokens,
        help="a longer prompt step runs in parts of this many tokens, so that other sessions' decode steps go "
        "in between instead of waiting for the whole prompt (default: %(default)s)")  # fmt: skip
    add("--decode-gather-ms", "--decode_gather_ms", type=float, default=defaults.decode_gather_ms,
        help="a decode step waits up to this long (and no longer than the last batch took) for the steps of the "
        "other sessions decoding here, to run them in one batch (0: never waits; default: %(default)s)")  # fmt: skip
    add("--session-idle-timeout", "--session_idle_timeout", type=float, default=defaults.session_idle_timeout,
        help="seconds an inference session may wait between steps")  # fmt: skip
    add("--max-sessions-per-client", "--max_sessions_per_client", type=int,
        default=defaults.max_sessions_per_client,
        help="inference sessions one client (remote peer id) may hold open here at once, so that no client takes "
        "them all; a client over it is told so and tries other peers (64 covers the concurrent generations of "
        "one `swarm serve` gateway)")  # fmt: skip
    add("--max-requests-per-client", "--max_requests_per_client", type=int,
        default=defaults.max_requests_per_client,
        help="forward/backward (training) calls one client may have in flight here; one more is refused "
        "(64 covers a large batch sent as parallel parts)")  # fmt: skip
    add("--max-message-bytes", "--max_message_bytes", default=None,
        help="refuse any request message, and any chunked stream in total, larger than this (e.g. 512MiB) "
        "before decoding it (default: twice a backward call at --max-batch-size x --inference-max-length "
        "in float32, the other half for adapters; at least 64MiB); below 4MiB it refuses ordinary requests "
        "too")  # fmt: skip
    add("--public-name", "--public_name", default="", help="a name shown in swarm status and monitors")
    add("--model-prefix", "--model_prefix", default="", help="DHT key prefix (default: derived from the model name)")
    add("--update-period", "--update_period", type=float, default=defaults.update_period,
        help="seconds between DHT announcements")  # fmt: skip
    add("--drain-timeout", "--drain_timeout", type=float, default=defaults.drain_timeout,
        help="on SIGTERM, seconds open sessions may finish before the peer leaves (0: leave at once)")  # fmt: skip
    add("--num-threads", "--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--revision", default=None, help="model revision on the Hugging Face hub")
    add("--metrics-port", "--metrics_port", type=int, default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (0: any free port; default: none)")  # fmt: skip
    add("--metrics-addr", "--metrics_addr", default=defaults.metrics_addr,
        help="address the metrics server listens on")  # fmt: skip
    # tests of the clients' spot checks only: a faulty peer that adds this much noise to its outputs
    add("--debug-output-noise", "--debug_output_noise", type=float, default=0.0, help=configargparse.SUPPRESS)
    # tests of the clients' checks of forwarded steps only: a peer that adds this much noise to the outputs it
    # forwards to the next span's peer, but not to those it answers
    add("--debug-forward-noise", "--debug_forward_noise", type=float, default=0.0, help=configargparse.SUPPRESS)
    # benchmarks only, where no network emulation is available: the round trip (milliseconds) of every inference
    # step with the client, and of every step forwarded from another peer
    add("--debug-added-latency-ms", "--debug_added_latency_ms", type=float, default=0.0, help=configargparse.SUPPRESS)
    add(
        "--debug-added-peer-latency-ms",
        "--debug_added_peer_latency_ms",
        type=float,
        default=0.0,
        help=configargparse.SUPPRESS,
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        start, end = parse_blocks(args.blocks)
        config = PeerConfig(
            model=args.model,
            start=start,
            end=end,
            initial_peers=tuple(args.initial_peers),
            new_swarm=args.new_swarm,
            host_maddrs=tuple(args.host_maddrs),
            announce_maddrs=tuple(args.announce_maddrs),
            identity_path=args.identity_path,
            swarm_key=args.swarm_key,
            device=args.device,
            dtype=args.dtype,
            cache_tokens=args.cache_tokens,
            max_batch_size=args.max_batch_size,
            inference_max_length=args.inference_max_length,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            decode_gather_ms=args.decode_gather_ms,
            session_idle_timeout=args.session_idle_timeout,
            max_sessions_per_client=args.max_sessions_per_client,
            max_requests_per_client=args.max_requests_per_client,
            max_message_bytes=parse_size(args.max_message_bytes, "--max-message-bytes"),
            public_name=args.public_name,
            model_prefix=args.model_prefix,
            update_period=args.update_period,
            drain_timeout=args.drain_timeout,
            num_threads=args.num_threads,
            revision=args.revision,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            num_blocks=args.num_blocks,
            memory_budget=parse_size(args.memory_budget),
            start_jitter=args.start_jitter,
            balance_period=args.balance_period,
            balance_min_improvement=args.balance_min_improvement,
            network_bandwidth=args.network_bandwidth,
            output_noise=args.debug_output_noise,
            forward_noise=args.debug_forward_noise,
            added_latency=args.debug_added_latency_ms / 1000,
            added_peer_latency=args.debug_added_peer_latency_ms / 1000,
        )
        logger.info("Starting with:\n%s", parser.format_values().rstrip())
        run_peer(config)
    except SwarmError as e:
        logger.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
