"""Cut a causal LM into two block slices and generate greedily through them by hand, as a swarm client does.

    .venv/bin/python examples/slice_model.py              # a tiny random llama in a temporary directory
    .venv/bin/python examples/slice_model.py MODEL_DIR    # any local model directory blockswarm supports

The client keeps the embeddings and the LM head; each slice keeps its own KV cache. The tokens are checked against
the full model's `generate` (loaded whole, which only a check needs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from swarm.models import BlockSlice, ClientModules, ModelSource, load_block_slice, load_client_modules

NEW_TOKENS = 20


def save_tiny_llama(path: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def generate(client: ClientModules, slices: list[BlockSlice], prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding: the prompt in one step, then one token per step, each step through every slice."""
    caches = [block_slice.new_cache() for block_slice in slices]
    tokens, step_input = prompt, prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            position = tokens.shape[1] - step_input.shape[1]
            hidden = client.embed(step_input, position)
            for block_slice, cache in zip(slices, caches, strict=True):
                hidden = block_slice(hidden, cache=cache, position=position)
            step_input = client.logits(hidden)[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, step_input], dim=1)
    return tokens


def main(model_dir: Path) -> bool:
    source = ModelSource.open(model_dir)
    num_blocks = source.layout.num_blocks
    if num_blocks < 2:
        raise SystemExit(f"{model_dir} has {num_blocks} block; two slices need at least 2")
    middle = num_blocks // 2
    slices = [load_block_slice(source, 0, middle), load_block_slice(source, middle, num_blocks)]
    client = load_client_modules(source)
    print(f"{source.layout.model_type}: {num_blocks} blocks served as 0:{middle} and {middle}:{num_blocks}")

    prompt = torch.tensor([[5, 17, 42, 99, 123]])
    tokens = generate(client, slices, prompt, NEW_TOKENS)
    print("through slices:", tokens[0, prompt.shape[1] :].tolist())

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        expected = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
    print("model.generate:", expected[0, prompt.shape[1] :].tolist())
    matches = torch.equal(tokens, expected)
    print("match" if matches else "MISMATCH")
    return matches


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir", nargs="?", type=Path, help="a local model directory (default: a tiny random llama)"
    )
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    if args.model_dir is not None:
        raise SystemExit(0 if main(args.model_dir) else 1)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_llama(Path(tmp))
        raise SystemExit(0 if main(Path(tmp)) else 1)
