"""Several `swarm finetune` processes in one run: they average gradients (or, with --local-steps, parameter changes),
agree, survive a dead trainer and let a late one catch up. Real swarm, real trainer processes, all on 127.0.0.1,
each stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from swarm.process import ProcessExitedError, SwarmProcess, descendants
from swarm.testing import LOOPBACK, METRICS_LINE, LocalSwarm
from tests.model_factory import save_byte_tokenizer
from tests.prometheus_tools import http_get, promtool, scrape, wait_for

pytestmark = pytest.mark.slow

EPOCH_LINE = r"^epoch (\d+): loss ([0-9.]+) over"
STEPS_LINE = r"^epoch \d+: loss [0-9.]+ over (\d+) steps"
ROUND_LINE = "Beginning optimizer step #"  # hivemind, at INFO: the start of each averaged optimizer step
SAVED_LINE = r"^saved (\S+) at epoch (\d+)$"
PARAM_ATOL = 1e-6  # uncompressed averaging: trainers that share every round take identical steps (measured 0.0)
TRAINER_TIMEOUT = 150.0  # seconds for a trainer to start, train and save on 2 busy cores
MATCHMAKING_TIME = 2.0
AVERAGING_TIMEOUT = 5.0
# trainers whose adapters must end equal have to meet in every round: more patience than the other tests', since a
# trainer that gives up on a busy machine steps alone
PATIENCE = ("--matchmaking-time", str(2 * MATCHMAKING_TIME), "--averaging-timeout", str(6 * AVERAGING_TIMEOUT))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    path = tiny_model_dir("llama", 2)
    save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def local_swarm(model_dir, make_swarm) -> LocalSwarm:  # type: ignore[no-untyped-def]
    return make_swarm(model_dir, [(0, 2)])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "lines.txt"
    path.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i % 5}" for i in range(40)) + "\n")
    return path


@pytest.fixture
def start_trainer(model_dir, local_swarm, data_file, tmp_path) -> Iterator:  # type: ignore[no-untyped-def]
    """`start_trainer(name, run_id, max_steps, *flags)`: a `swarm finetune` process saving to tmp_path/name."""
    trainers: list[SwarmProcess] = []

    def start(name: str, run_id: str, max_steps: int, *flags: str) -> SwarmProcess:
        args = [
            sys.executable, "-m", "swarm.cli", "finetune", model_dir, "--initial-peers", *local_swarm.initial_peers,
            "--host-maddrs", LOOPBACK, "--data", data_file, "--run-id", run_id, "--method", "lora",
            "--target-batch-size", "512", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
            "--max-steps", str(max_steps), "--output", tmp_path / name, "--log-level", "INFO",
            "--matchmaking-time", str(MATCHMAKING_TIME), "--averaging-timeout", str(AVERAGING_TIMEOUT), *flags,
        ]  # fmt: skip
        trainer = SwarmProcess(args, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, name=f"trainer-{name}")
        trainers.append(trainer)
        return trainer

    try:
        yield start
    finally:
        for trainer in trainers:
            trainer.terminate()


def _epoch_losses(trainer: SwarmProcess) -> list[tuple[int, float]]:
    return [(int(m[0]), float(m[1])) for m in re.findall(EPOCH_LINE, trainer.output("stdout"), flags=re.MULTILINE)]


def _epoch_at_least(epoch: int, max_steps: int) -> str:
    """A pattern for the epoch line of any epoch from `epoch` to `max_steps`."""
    return rf"^epoch ({'|'.join(str(e) for e in range(epoch, max_steps + 1))}):"


def _scrape_while_running(url: str, at_least: dict[str, float]) -> dict | None:
    """The trainer's samples (plus the raw text under "text") once every metric reaches its minimum; None before."""
    try:
        samples: dict = scrape(url)
    except OSError:  # the trainer may be between start and serving
        return None
    if any(samples.get(name, 0) < minimum for name, minimum in at_least.items()):
        return None
    samples["text"] = http_get(url)
    return samples


def _exit_code(trainer: SwarmProcess, timeout: float = 60.0) -> int:
    """The trainer's exit code once it exits; a failure with the stacks of its threads (SIGUSR1) and its last output
    if it is still running after `timeout` seconds."""
    try:
        return trainer.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(trainer.pid, signal.SIGUSR1)
        with contextlib.suppress(TimeoutError, ProcessExitedError):
            trainer.wait_for_line(r"^Current thread 0x", 10.0, stream="stderr")
        pytest.fail(f"{trainer.name} runs on after {timeout} s; its threads and output:\n{trainer.output()[-8000:]}")


def _finish(trainer: SwarmProcess) -> Path:
    """Wait for the trainer to save and exit cleanly; the saved adapter file."""
    saved = Path(trainer.wait_for_line(SAVED_LINE, TRAINER_TIMEOUT, stream="stdout").group(1))
    assert _exit_code(trainer) == 0, trainer.output()[-4000:]
    return saved


def test_two_trainers_average_gradients_and_end_with_equal_adapters(start_trainer) -> None:  # type: ignore[no-untyped-def]
    max_steps = 4
    trainers = [
        start_trainer(name, "run-agree", max_steps, "--compression", "none", *PATIENCE, *flags)
        for name, flags in [("a", ["--metrics-port", "0"]), ("b", [])]
    ]
    url = trainers[0].wait_for_line(METRICS_LINE, TRAINER_TIMEOUT).group(1)
    samples = wait_for(
        lambda: _scrape_while_running(url, {"blockswarm_training_epoch{}": 1, "blockswarm_training_run_peers{}": 2}),
        TRAINER_TIMEOUT,
        "a scrape at epoch 1+ that counts both trainers",
    )
    saved = [_finish(trainer) for trainer in trainers]
    assert samples["blockswarm_training_run_peers{}"] == 2 and samples["blockswarm_training_epochs_total{}"] >= 1
    assert samples["blockswarm_training_loss{}"] > 0 and samples["blockswarm_training_tokens_total{}"] > 0
    assert promtool("check", "metrics", stdin=samples["text"]).returncode == 0

    for trainer in trainers:
        assert "Averaged gradients with 2 peers" in trainer.output(), trainer.output()[-4000:]
        losses = _epoch_losses(trainer)
        assert losses[-1][0] == max_steps
        assert losses[-1][1] < losses[0][1], f"{trainer.name}: loss did not decrease: {losses}"
    first, second = (load_file(path) for path in saved)
    assert first.keys() == second.keys() and first
    assert any(bool(tensor.abs().max() > 0) for name, tensor in first.items() if "lora_B" in name)  # it trained
    differences = {name: float((first[name] - second[name]).abs().max()) for name in first}
    print(f"max |adapter difference| between the trainers: {max(differences.values()):.3g}")
    assert max(differences.values()) <= PARAM_ATOL, differences


def test_late_trainer_catches_up_and_a_dead_one_stalls_nobody(start_trainer) -> None:  # type: ignore[no-untyped-def]
    max_steps = 15  # a trainer takes 10-25 s to start on 2 busy cores; the run must still be going by then
    first = start_trainer("a", "run-churn", max_steps, "--compression", "8bit")
    doomed = start_trainer("b", "run-churn", max_steps, "--compression", "8bit")
    first.wait_for_line(r"^epoch 1:", TRAINER_TIMEOUT, stream="stdout")
    run_epoch = _epoch_losses(first)[-1][0]

    late = start_trainer("c", "run-churn", max_steps, "--compression", "8bit")
    # hivemind's tracker notices that the run is ahead, and the trainer downloads the others' state
    late.wait_for_line(r"Peer is out of sync", TRAINER_TIMEOUT)
    caught_up = late.wait_for_line(_epoch_at_least(run_epoch, max_steps), TRAINER_TIMEOUT, stream="stdout")
    print(f"late trainer started when the run was at epoch {run_epoch}; its epoch after catching up: {caught_up[1]}")

    doomed.kill()  # SIGKILL to its whole process group: its DHT, averagers and p2pd go with it
    killed_at = _epoch_losses(first)[-1][0]
    assert killed_at < max_steps, "the run ended before the kill; raise max_steps"
    # the survivors lose at most one averaging round to the dead trainer
    first.wait_for_line(rf"^epoch {killed_at + 1}:", AVERAGING_TIMEOUT + 4 * MATCHMAKING_TIME + 30, stream="stdout")
    for trainer in (first, late):
        _finish(trainer)
        assert _epoch_losses(trainer)[-1][0] == max_steps


def test_local_steps_average_once_per_h_steps_and_end_with_equal_adapters(start_trainer) -> None:  # type: ignore[no-untyped-def]
    """DiLoCo: H local AdamW steps, then an outer gradient for the run; one averaged outer step per epoch.

    The target batch (512) is the other tests': each trainer's first epoch must outlast hivemind's first refresh of
    the run's progress (3 s), or both trainers take it alone (10 ms steps here) and start apart."""
    max_steps, local_steps = 4, 4
    flags = ["--compression", "none", "--local-steps", str(local_steps), *PATIENCE]
    trainers = [start_trainer(name, "run-local-steps", max_steps, *flags) for name in ("a", "b")]
    saved = [_finish(trainer) for trainer in trainers]

    for trainer in trainers:
        output = trainer.output()
        assert "Averaged gradients with 2 peers" in output, output[-4000:]
        losses = _epoch_losses(trainer)
        assert losses[-1][0] == max_steps
        assert losses[-1][1] < losses[0][1], f"{trainer.name}: loss did not decrease: {losses}"
        # epochs change only in an outer step, which every H-th local step takes
        steps = [int(n) for n in re.findall(STEPS_LINE, trainer.output("stdout"), flags=re.MULTILINE)]
        assert steps and all(n % local_steps == 0 for n in steps), steps
        rounds = output.count(ROUND_LINE)  # averaging rounds: one per epoch
        print(f"{trainer.name}: {sum(steps)} local steps, {rounds} averaging rounds, epoch losses {losses}")
        assert rounds <= max_steps < sum(steps) // local_steps, (rounds, steps)
    first, second = (load_file(path) for path in saved)
    differences = {name: float((first[name] - second[name]).abs().max()) for name in first}
    print(f"max |adapter difference| between the trainers: {max(differences.values()):.3g}")
    assert max(differences.values()) <= PARAM_ATOL, differences


def test_ctrl_c_stops_a_training_trainer(start_trainer) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C (SIGINT to the trainer's whole process group) once it trains: it stops, says so, and its processes
    end within seconds. hivemind's averagers ignore SIGINT in the process that starts them and never restore it,
    so a trainer used to train on through Ctrl-C."""
    trainer = start_trainer("stopped", "run-stopped", 1000)
    trainer.wait_for_line(_epoch_at_least(1, 1000), TRAINER_TIMEOUT, stream="stdout")
    started = descendants(trainer.pid)
    trainer.signal_group(signal.SIGINT)
    assert _exit_code(trainer) == 130, trainer.output()[-4000:]
    assert "swarm finetune: interrupted" in trainer.output("stderr")
    # torch's shared-memory manager leaves once the processes it served are gone
    wait_for(lambda: not any(info.is_running() for info in started), 10, "the trainer's processes to end")
