"""Two trainers fine-tune one LoRA adapter together through a local swarm, averaging their gradients.

    .venv/bin/python examples/finetune_swarm.py [--max-steps 5] [--compression none] [--method lora]

A loopback swarm (a bootstrap node and two peers) serves the demo model shipped with blockswarm, split 0:3 and
3:6. Two `swarm finetune` processes with the same --run-id train on a few lines of text: each epoch they pool
their samples, all-reduce their gradients and take the same step. The script prints each trainer's epoch lines
and, at the end, the largest difference between the two saved adapters. Run the trainers by hand the same way:

    swarm finetune MODEL --initial-peers MADDR --data lines.txt --run-id demo-run --target-batch-size 256 \\
        --batch-size 4 --max-steps 5 --output adapter-a
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from swarm.demo_model import demo_model_dir
from swarm.process import SwarmProcess
from swarm.testing import LOOPBACK, LocalSwarm

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
EPOCH_LINE = re.compile(r"^epoch \d+: .*$")
SAVED_LINE = r"^saved (\S+) at epoch \d+$"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=5, help="epochs (averaged steps) to train")
    parser.add_argument("--compression", choices=["none", "fp16", "8bit"], default="none")
    parser.add_argument("--method", choices=["ptune", "deep-ptune", "lora"], default="lora")
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
                print(f"{trainer.name}:")
                for line in trainer.lines("stdout"):
                    if EPOCH_LINE.match(line):
                        print(f"  {line}")
            first, second = (load_file(path) for path in saved)
            difference = max(float((first[name] - second[name]).abs().max()) for name in first)
            print(f"largest difference between the two trainers' saved parameters: {difference:.3g}")
        finally:
            for trainer in trainers:
                trainer.terminate()


def _start_trainer(
    name: str, model: Path, local_swarm: LocalSwarm, data: Path, work: Path, args: argparse.Namespace
) -> SwarmProcess:
    command = [
        sys.executable, "-m", "swarm.cli", "finetune", model,
        "--initial-peers", *local_swarm.initial_peers, "--host-maddrs", LOOPBACK,
        "--data", data, "--run-id", "demo-run", "--method", args.method,
        "--target-batch-size", "256", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
        "--max-steps", str(args.max_steps), "--compression", args.compression,
        "--matchmaking-time", "2", "--averaging-timeout", "10", "--output", work / name,
    ]  # fmt: skip
    return SwarmProcess(command, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, name=f"trainer-{name}")


if __name__ == "__main__":
    main()
