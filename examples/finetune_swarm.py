"""Two trainers fine-tune one LoRA adapter together through a local swarm, averaging what they learn.

    .venv/bin/python examples/finetune_swarm.py [--max-steps 5] [--compression none] [--method lora]
        [--local-steps 1] [--outer-lr 0.7] [--target-batch-size 256]

A loopback swarm (a bootstrap node and two peers) serves the demo model shipped with blockswarm, split 0:3 and
3:6. Two `swarm finetune` processes with the same --run-id train on a few lines of text: each epoch they pool
their samples, all-reduce their gradients and take the same step; with --local-steps H they take H AdamW steps
each alone and all-reduce the change in the parameters instead (DiLoCo). The script prints each trainer's epoch
lines, its averaging rounds and local steps, the loss of its saved adapter on the whole text, and the largest
difference between the two saved adapters. Run the trainers by hand the same way:

    swarm finetune MODEL --initial-peers MADDR --data lines.txt --run-id demo-run --target-batch-size 256 \\
        --batch-size 4 --max-steps 5 --output adapter-a

To compare H=1 and H=4 at the same number of samples, give H=4 a target H times larger and H times fewer epochs:

    .venv/bin/python examples/finetune_swarm.py --local-steps 1 --target-batch-size 8 --max-steps 40
    .venv/bin/python examples/finetune_swarm.py --local-steps 4 --target-batch-size 32 --max-steps 10
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from swarm import AutoDistributedModelForCausalLM, ClientConfig
from swarm.demo_model import demo_model_dir
from swarm.process import SwarmProcess
from swarm.testing import LOOPBACK, LocalSwarm
from swarm.training.trainer import token_chunks

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die, to sleep;",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to: 'tis a consummation",
]
SEQ_LEN = 32
EPOCH_LINE = re.compile(r"^epoch \d+: .* over (\d+) steps")
SAVED_LINE = r"^saved (\S+) at epoch \d+$"
ROUND_LINE = "Beginning optimizer step #"  # hivemind, at INFO: one per averaged (outer) optimizer step
JOINT_ROUND_LINE = "Averaged gradients with 2 peers"  # ... whose all-reduce both trainers joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=5, help="epochs (averaged steps) to train")
    parser.add_argument("--compression", choices=["none", "fp16", "8bit"], default="none")
    parser.add_argument("--method", choices=["ptune", "deep-ptune", "lora"], default="lora")
    parser.add_argument("--local-steps", type=int, default=1, help="AdamW steps alone between averaging rounds")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="with --local-steps above 1: outer Nesterov SGD lr")
    parser.add_argument("--target-batch-size", type=int, default=256, help="samples of the run per epoch")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the trainers to finish")
    args = parser.parse_args()

    model = demo_model_dir()
    with tempfile.TemporaryDirectory() as work, LocalSwarm(model, [(0, 3), (3, 6)]) as local_swarm:
        data = Path(work) / "lines.txt"
        data.write_text("\n".join(TEXT * 4) + "\n")
        trainers = [_start_trainer(name, model, local_swarm, data, Path(work), args) for name in ("a", "b")]
        try:
            saved = [Path(t.wait_for_line(SAVED_LINE, args.timeout, stream="stdout").group(1)) for t in trainers]
            for trainer in trainers:
                trainer.wait(timeout=60)
            print(f"text loss of the demo model before training: {_text_loss(model, local_swarm, None):.4f}")
            for trainer, path in zip(trainers, saved, strict=True):
                epoch_lines = [line for line in trainer.lines("stdout") if EPOCH_LINE.match(line)]
                local_steps = sum(int(EPOCH_LINE.match(line)[1]) for line in epoch_lines)  # type: ignore[index]
                output = trainer.output()
                print(f"{trainer.name}:")
                for line in epoch_lines:
                    print(f"  {line}")
                print(
                    f"  {local_steps} local steps, {output.count(ROUND_LINE)} averaging rounds "
                    f"({output.count(JOINT_ROUND_LINE)} with both trainers); "
                    f"text loss of its adapter: {_text_loss(model, local_swarm, path.parent):.4f}"
                )
            first, second = (load_file(path) for path in saved)
            difference = max(float((first[name] - second[name]).abs().max()) for name in first)
            print(f"largest difference between the two trainers' saved parameters: {difference:.3g}")
        finally:
            for trainer in trainers:
                trainer.terminate()


def _text_loss(model: Path, local_swarm: LocalSwarm, adapter: Path | None) -> float:
    """Mean loss over every chunk of the training text, through the swarm, with `adapter` applied."""
    chunks = token_chunks(TEXT * 4, AutoTokenizer.from_pretrained(model), SEQ_LEN)
    config = ClientConfig(initial_peers=tuple(local_swarm.initial_peers))
    distributed = AutoDistributedModelForCausalLM.from_pretrained(model, config=config, adapter=adapter)
    try:
        with torch.no_grad():
            return float(distributed(chunks, labels=chunks).loss)
    finally:
        distributed.close()


def _start_trainer(
    name: str, model: Path, local_swarm: LocalSwarm, data: Path, work: Path, args: argparse.Namespace
) -> SwarmProcess:
    command = [
        sys.executable, "-m", "swarm.cli", "finetune", model,
        "--initial-peers", *local_swarm.initial_peers, "--host-maddrs", LOOPBACK,
        "--data", data, "--run-id", "demo-run", "--method", args.method,
        "--target-batch-size", str(args.target_batch_size), "--batch-size", "4", "--seq-len", str(SEQ_LEN),
        "--lr", "3e-3", "--local-steps", str(args.local_steps), "--outer-lr", str(args.outer_lr),
        "--max-steps", str(args.max_steps), "--compression", args.compression,
        "--matchmaking-time", "2", "--averaging-timeout", "10", "--output", work / name, "--log-level", "INFO",
    ]  # fmt: skip
    return SwarmProcess(command, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, name=f"trainer-{name}")


if __name__ == "__main__":
    main()
