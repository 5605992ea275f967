"""Decode speed and time to first token through a 2-peer loopback swarm, against local generate of the same model.

    .venv/bin/python examples/benchmark_inference.py [--new-tokens 64] [--repeats 5] [--json results.json]

Both sides run in the same invocation on the same machine: a seeded random Llama with the shape of the reference
measurement (hidden 512, 8 layers, ~58M parameters) is saved, split over two `swarm-peer` processes
(blocks 0:4 and 4:8) behind a `swarm-dht` node on 127.0.0.1, and compared with `AutoModelForCausalLM.generate`
in this process (`--threads`, default 2: this machine's cores) with one torch thread per peer (`--peer-threads`).
Set OMP_WAIT_POLICY=PASSIVE to stop idle OpenMP threads spinning; it slows local generate more than the swarm.
Greedy decoding with a fixed number of new tokens; medians over repeats. Both figures are taken as a streaming
caller sees the tokens arrive (`swarm.bench.time_generate`): time to first token, and decode rate = (N - 1) /
(time between the first and the last new token).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from make_random_model import save_random_llama  # this folder: the script's own
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.bench import time_generate
from swarm.testing import LocalSwarm

REFERENCE_RATIO = 0.55  # decode tokens/s through 2 servers / local, measured for an established system of this kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (client and local)")
    parser.add_argument(
        "--peer-threads", type=int, default=1, help="torch threads per peer (2 measured slower here: idle spinning)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "bench-llama-58m"
        save_random_llama(model_dir, "58m")
        prompt = torch.randint(3, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        options = dict(do_sample=False, eos_token_id=None)

        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        parameters = sum(p.numel() for p in local.parameters())
        with torch.inference_mode():
            local_timing = time_generate(
                lambda n, clock: local.generate(
                    prompt, max_new_tokens=n, min_new_tokens=n, streamer=clock, **options
                ),
                args.new_tokens, args.repeats,
            )  # fmt: skip

        with LocalSwarm(model_dir, [(0, 4), (4, 8)], num_threads=args.peer_threads) as local_swarm:
            initial_peers = local_swarm.initial_peers
            distributed = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=initial_peers)
            try:
                swarm_timing = time_generate(
                    lambda n, clock: distributed.generate(
                        prompt, max_new_tokens=n, min_new_tokens=n, streamer=clock, **options
                    ),
                    args.new_tokens, args.repeats,
                )  # fmt: skip
            finally:
                distributed.close()

    local_result, swarm_result = (
        {"ttft_s": t.ttft_s, "total_s": t.total_s, "decode_tokens_per_s": t.decode_tokens_per_s}
        for t in (local_timing, swarm_timing)
    )
    results = {
        "model": f"llama hidden 512, 8 layers, {parameters / 1e6:.0f}M parameters, float32",
        "threads": {"local_and_client": args.threads, "per_peer": args.peer_threads},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "local": local_result,
        "swarm_2_peers": swarm_result,
        "decode_ratio": swarm_result["decode_tokens_per_s"] / local_result["decode_tokens_per_s"],
        "ttft_ratio": swarm_result["ttft_s"] / local_result["ttft_s"],
        "tokens_equal_local": bool(torch.equal(swarm_timing.output, local_timing.output)),
    }
    print(f"model: {results['model']}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs")
    print(f"{'':24}{'decode tokens/s':>18}{'time to first token':>22}")
    for name, row in [("local generate", local_result), ("swarm, 2 peers", swarm_result)]:
        print(f"{name:24}{row['decode_tokens_per_s']:>18.1f}{row['ttft_s'] * 1000:>19.1f} ms")
    print(f"{'swarm / local':24}{results['decode_ratio']:>17.2f}x{results['ttft_ratio']:>21.2f}x")
    print(f"reference system, 2 servers / local decode: {REFERENCE_RATIO:.2f}x")
    print(f"swarm tokens equal local tokens: {results['tokens_equal_local']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
