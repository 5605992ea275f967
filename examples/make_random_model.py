"""Save a seeded random Llama of a named size, for benchmarks where no checkpoint can be downloaded.

    .venv/bin/python examples/make_random_model.py OUTPUT [--size 58m|1b] [--device cuda] [--dtype bfloat16]

58m is the shape of the reference measurement in `benchmark_inference.py` (hidden 512, 8 layers); 1b is
TinyLlama-1.1B's shape (hidden 2048, 22 layers, 4 key-value heads, vocabulary 32000). Random weights give
nonsense text, but every figure `swarm bench` reports (speed, and tokens and logits against the local model)
is as meaningful as with trained ones. `--device cuda` builds the 1b model in seconds instead of minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "58m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}  # fmt: skip


def save_random_llama(path: Path, size: str = "58m", device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[size]
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", choices=sorted(SHAPES), default="58m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    save_random_llama(args.output, args.size, args.device, getattr(torch, args.dtype))
    print(f"saved a random {args.size} Llama to {args.output}")


if __name__ == "__main__":
    main()
