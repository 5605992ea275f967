"""Distil a small draft model for speculative decoding from a target model, with no data but the target itself.

    .venv/bin/python examples/distill_draft_model.py OUTPUT [--target DIR] [--layers 2] [--minutes 8]

The draft shares the target's tokenizer, embeddings, final norm and LM head, and starts from `--layers` of its
blocks spread over its depth (the first and the last among them). It is then trained to match the target's
next-token distributions (KL divergence) on text the target samples from its own BOS token, so it learns to
guess what the target would say, which is what speculative decoding rewards. The target defaults to the demo
model. Then measure the pair through a swarm:

    swarm bench MODEL --draft OUTPUT --added-latency-ms 50

The log prints the draft's greedy agreement with the target on held-out samples, every minute.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from swarm.demo_model import ensure_demo_model

SAMPLE_BATCH = 16  # sequences the target samples per training step
SAMPLE_TOKENS = 96


def draft_from(target: PreTrainedModel, layers: int) -> PreTrainedModel:
    """The target with only `layers` of its blocks, evenly spread and always including the first and the last."""
    draft = copy.deepcopy(target)
    blocks = draft.model.layers
    keep = sorted({round(i * (len(blocks) - 1) / max(layers - 1, 1)) for i in range(layers)})
    draft.model.layers = torch.nn.ModuleList(blocks[i] for i in keep)
    for index, block in enumerate(draft.model.layers):
        block.self_attn.layer_idx = index
    draft.config.num_hidden_layers = len(keep)
    if hasattr(draft.config, "layer_types") and draft.config.layer_types is not None:
        draft.config.layer_types = [draft.config.layer_types[i] for i in keep]
    return draft


@torch.no_grad()
def sample(target: PreTrainedModel, bos: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.full((SAMPLE_BATCH, 1), bos)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return target.generate(start, max_new_tokens=SAMPLE_TOKENS, do_sample=True, top_k=0, eos_token_id=None)


@torch.no_grad()
def agreement(target: PreTrainedModel, draft: PreTrainedModel, tokens: torch.Tensor) -> float:
    """How often the draft's greedy next token equals the target's, over every position of `tokens`."""
    return (target(tokens).logits.argmax(-1) == draft(tokens).logits.argmax(-1)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--target", type=Path, help="the target model directory (default: the demo model)")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the draft (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target_dir = args.target or ensure_demo_model()
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    draft = draft_from(target, args.layers)
    for module in (draft.model.embed_tokens, draft.model.norm, draft.lm_head):
        module.requires_grad_(False)  # shared with the target: the draft learns only its blocks
    generator = torch.Generator().manual_seed(0)
    held_out = sample(target, tokenizer.bos_token_id, generator)
    print(f"draft: {args.layers} of {target.config.num_hidden_layers} blocks; greedy agreement with the target "
          f"before training {agreement(target, draft.eval(), held_out):.1%}")  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=args.lr)
    began = last_report = time.monotonic()
    steps = 0
    while time.monotonic() - began < args.minutes * 60:
        tokens = sample(target, tokenizer.bos_token_id, generator)
        with torch.no_grad():
            teacher = F.log_softmax(target(tokens).logits.float(), dim=-1)
        draft.train()
        student = F.log_softmax(draft(tokens).logits.float(), dim=-1)
        loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            print(f"{(last_report - began) / 60:4.1f} min, step {steps}: KL {loss.item():.3f}, "
                  f"greedy agreement {agreement(target, draft.eval(), held_out):.1%}", flush=True)  # fmt: skip
    draft.eval()
    print(f"after {steps} steps: greedy agreement with the target {agreement(target, draft, held_out):.1%}")
    draft.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"saved the draft to {args.output}")


if __name__ == "__main__":
    main()
