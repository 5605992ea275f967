"""Loss parity: three averaging trainers with batch b against one trainer with batch 3b, over the same samples.

    .venv/bin/python examples/benchmark_loss_parity.py [--epochs 8] [--batch-size 4] [--target-batch-size 384]

Both runs train LoRA on the demo model through one loopback swarm, with the same global batch per epoch
(`--target-batch-size`) and the same learning rate, so each epoch takes one AdamW step on the same number of
samples. With exact (uncompressed) averaging the averaged gradient is the mean over a batch of the same size as
the single trainer's, so the per-epoch loss curves should agree up to sampling noise. Prints the mean loss of the
last epoch of each run and their relative difference.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from swarm.demo_model import demo_model_dir
from swarm.process import SwarmProcess
from swarm.testing import LOOPBACK, LocalSwarm

EPOCH_LINE = r"^epoch (\d+): loss ([0-9.]+) over"
SAVED_LINE = r"^saved \S+ at epoch \d+$"
TEXT = (Path(__file__).resolve().parent / "finetune_swarm.py").read_text()  # any English-ish text will do


def run(
    local_swarm: LocalSwarm, work: Path, run_id: str, trainers: int, batch_size: int, args: argparse.Namespace
) -> dict[int, float]:
    data = work / "data.txt"
    data.write_text("\n".join(line for line in TEXT.splitlines() if line.strip()) + "\n")
    processes = []
    for index in range(trainers):
        command = [
            sys.executable, "-m", "swarm.cli", "finetune", demo_model_dir(),
            "--initial-peers", *local_swarm.initial_peers, "--host-maddrs", LOOPBACK,
            "--data", data, "--run-id", run_id, "--method", "lora", "--seed", str(index),
            "--target-batch-size", str(args.target_batch_size), "--batch-size", str(batch_size),
            "--seq-len", "32", "--lr", "3e-3", "--max-steps", str(args.epochs), "--compression", "none",
            "--matchmaking-time", "3", "--averaging-timeout", "20", "--output", work / f"{run_id}-{index}",
        ]  # fmt: skip
        processes.append(SwarmProcess(command, env={"OMP_NUM_THREADS": "1"}, name=f"{run_id}-{index}"))
    try:
        for process in processes:
            process.wait_for_line(SAVED_LINE, args.timeout, stream="stdout")
        # per epoch: the mean over trainers of each trainer's mean loss in that epoch
        curves = [
            {int(e): float(loss) for e, loss in re.findall(EPOCH_LINE, p.output("stdout"), flags=re.MULTILINE)}
            for p in processes
        ]
        epochs = sorted(set.intersection(*(set(curve) for curve in curves)))
        return {epoch: sum(curve[epoch] for curve in curves) / len(curves) for epoch in epochs}
    finally:
        for process in processes:
            process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="b: each of the three trainers' batch")
    parser.add_argument("--target-batch-size", type=int, default=384)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, LocalSwarm(demo_model_dir(), [(0, 6)]) as local_swarm:
        three = run(local_swarm, Path(work), "parity-3", 3, args.batch_size, args)
        one = run(local_swarm, Path(work), "parity-1", 1, 3 * args.batch_size, args)
    print("epoch  3 trainers (batch b)  1 trainer (batch 3b)")
    for epoch in sorted(set(three) & set(one)):
        print(f"{epoch:5d}  {three[epoch]:20.4f}  {one[epoch]:20.4f}")
    last = max(set(three) & set(one))
    print(f"last epoch {last}: relative difference {abs(three[last] - one[last]) / one[last]:.2%}")


if __name__ == "__main__":
    main()
