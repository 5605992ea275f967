"""Time from a peer's death to the next token, over repeated kills of the peer a generation is using.

    .venv/bin/python examples/benchmark_failover.py [--kills 10] [--kill-after 16] [--json results.json]

A loopback swarm serves blocks 0:4 with one peer and 4:8 with two. Each round generates greedily; right after
token `--kill-after` arrives, the peer serving blocks 4:8 for this session is SIGKILLed (its whole process group,
p2pd included), and the time until the next token arrives is recorded: detection, rerouting, replaying the
session's inputs to the replacement, and the step itself. A new peer then replaces the dead one. The normal
inter-token time of the same rounds is reported beside it, and every round's tokens are checked against local
generate.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch
from make_random_model import save_random_llama  # run as a script: examples/ is on sys.path
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM, ClientConfig
from swarm.testing import LocalSwarm


class KillAfterToken:
    """A generate streamer that kills the peer of the session's last span right after token `kill_after`."""

    def __init__(self, model, local_swarm: LocalSwarm, kill_after: int):  # type: ignore[no-untyped-def]
        self.model, self.local_swarm, self.kill_after = model, local_swarm, kill_after
        self.token_times: list[float] = []
        self.killed_at: float | None = None
        self.victim = None

    def put(self, value: torch.Tensor) -> None:
        self.token_times.append(time.perf_counter())
        generated = len(self.token_times) - 1  # the first call carries the prompt
        if generated == self.kill_after:
            session = self.model._conversation.session
            self.victim = self.local_swarm.process_of(session.route.spans[-1].peer_id)
            self.victim.signal_group(signal.SIGKILL)
            self.victim.wait(timeout=30)
            self.killed_at = time.perf_counter()

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "bench-llama-58m"
        save_random_llama(model_dir, "58m")
        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        prompt = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        options = dict(
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None
        )
        expected = local.generate(prompt, **options)
        failover, normal, equal = [], [], []
        with LocalSwarm(model_dir, [(0, 4), (4, 8), (4, 8)], num_threads=1) as local_swarm:
            config = ClientConfig(initial_peers=tuple(local_swarm.initial_peers))
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, config=config)
            try:
                for round_index in range(args.kills):
                    streamer = KillAfterToken(model, local_swarm, args.kill_after)
                    with model.inference_session(max_length=16 + args.new_tokens):
                        tokens = model.generate(prompt, streamer=streamer, **options)
                    assert streamer.killed_at is not None
                    next_token = streamer.token_times[args.kill_after + 1]
                    failover.append(next_token - streamer.killed_at)
                    gaps = [b - a for a, b in zip(streamer.token_times[1:], streamer.token_times[2:], strict=False)]
                    normal.append(statistics.median(gaps))
                    equal.append(bool(torch.equal(tokens, expected)))
                    print(f"round {round_index + 1}: next token {failover[-1] * 1000:.0f} ms after the kill")
                    local_swarm.add_peer(4, 8)  # restore two replicas for the next round
            finally:
                model.close()

    results = {
        "kills": args.kills,
        "failover_median_s": statistics.median(failover),
        "failover_max_s": max(failover),
        "normal_inter_token_median_s": statistics.median(normal),
        "all_outputs_equal_local": all(equal),
        "failover_s": failover,
    }
    print(
        f"time from SIGKILL to the next token: median {results['failover_median_s'] * 1000:.0f} ms, "
        f"max {results['failover_max_s'] * 1000:.0f} ms over {args.kills} kills "
        f"(normal inter-token time {results['normal_inter_token_median_s'] * 1000:.1f} ms); "
        f"outputs equal local generate: {results['all_outputs_equal_local']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
