"""The `swarm` command as users run it: real subprocesses against real local swarms of the demo model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.cli import build_parser, print_status, status_document
from swarm.demo import even_spans
from swarm.demo_model import DEMO_MODEL_ENV
from swarm.directory import RemoteSpan, SwarmView
from swarm.process import ProcessInfo, SwarmProcess, descendants
from swarm.protocol import ServerInfo, ServerState
from swarm.testing import LocalSwarm
from tests.model_factory import save_tiny_model

CLI = [sys.executable, "-m", "swarm.cli"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
COMMAND_TIMEOUT = 120.0  # one CLI run: imports, DHT start, generation, shutdown on a busy 2-core machine
DEMO_TIMEOUT = 240.0  # the demo also starts a bootstrap node and two peers
GONE_TIMEOUT = 15.0  # for processes to disappear after the command that started them has exited
PROMPT = "Alice was"


@dataclass(frozen=True, slots=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, timeout: float = COMMAND_TIMEOUT) -> CliRun:
    """Run `swarm ARGS` to completion in its own process group; the group is killed whatever happens."""
    process = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV},
        start_new_session=True,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return CliRun(process.returncode, stdout, stderr)


def run_watched(process: SwarmProcess, timeout: float) -> list[ProcessInfo]:
    """Wait for `process` to exit, noting every process it started on the way (an orphan leaves its tree)."""
    seen: dict[tuple[int, int], ProcessInfo] = {}
    deadline = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < deadline:
        seen.update({(info.pid, info.start_ticks): info for info in descendants(process.pid)})
        time.sleep(0.1)
    assert process.returncode is not None, f"still running after {timeout}s:\n{process.output()}"
    return list(seen.values())


def still_running(processes: list[ProcessInfo], timeout: float = GONE_TIMEOUT) -> list[ProcessInfo]:
    deadline = time.monotonic() + timeout
    while (running := [info for info in processes if info.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


@pytest.fixture(scope="module")
def full_swarm(demo_model: Path) -> Iterator[LocalSwarm]:
    local_swarm = LocalSwarm(demo_model, spans=[(0, 3), (3, 6)], num_threads=1)
    try:
        yield local_swarm.start()
    finally:
        local_swarm.close()


@pytest.fixture(scope="module")
def partial_swarm(demo_model: Path) -> Iterator[LocalSwarm]:
    local_swarm = LocalSwarm(demo_model, spans=[(0, 2)], num_threads=1)
    try:
        yield local_swarm.start()
    finally:
        local_swarm.close()


@pytest.mark.slow
def test_demo_generates_equal_to_local_and_leaves_no_process(tmp_path: Path) -> None:
    demo = SwarmProcess([*CLI, "demo", "--max-new-tokens", "8"], env={**ENV, DEMO_MODEL_ENV: str(tmp_path / "m")})
    try:
        started = run_watched(demo, DEMO_TIMEOUT)
        demo.wait_for_line(r"^Stopped\.$", timeout=5, stream="stdout")
    finally:
        demo.terminate()

    output = demo.output("stdout")
    assert demo.returncode == 0, demo.output()
    assert "--initial-peers /ip4/127.0.0.1/" in output
    assert "serves blocks 0:3" in output and "serves blocks 3:6" in output
    assert "Route: 0:3 via …" in output
    assert "\nIt was the best of times," in output  # the prompt, followed by the streamed text
    assert "tokens/s" in output and "time to first token" in output
    assert "equal to local output, token for token (8 tokens)" in output
    assert sum(info.name == "p2pd" for info in started) >= 4  # bootstrap, two peers and the client
    assert still_running(started) == []


@pytest.mark.slow
def test_bench_reports_every_figure_with_tokens_equal_local(tmp_path: Path) -> None:
    """`swarm bench` on a loopback swarm, with emulated round trips: every figure present and positive, exact wire
    tokens equal local, lossy wire compressions measured against the local logits. (Its speeds are reported, never
    asserted.)"""
    model_dir = tmp_path / "tiny-llama"
    save_tiny_model("llama", model_dir, num_layers=4)
    result_file = tmp_path / "bench.json"
    run = run_cli(
        "bench", str(model_dir), "--new-tokens", "6", "--repeats", "1", "--clients", "2", "--long-prompt", "24",
        "--prefill-chunk", "8", "--added-latency-ms", "10", "--peer-latency-ms", "4", "--json", str(result_file),
        timeout=DEMO_TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "decode tokens/s" in run.stdout and "wire 8bit" in run.stdout
    result = json.loads(result_file.read_text())
    assert result["tokens_equal_local"] and result["speculative_tokens_equal_local"]
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    figures = (
        "swarm_decode_tokens_per_s", "swarm_ttft_s", "unforwarded_decode_tokens_per_s", "unforwarded_ttft_s",
        "concurrent_tokens_per_s", "headless_steps_per_s", "pipelined_prefill_s", "unforwarded_pipelined_prefill_s",
        "local_column_major_decode_tokens_per_s",  # the tiny model's MLP and head are wide: the local model's twin
    )  # fmt: skip
    for figure in figures:
        assert result[figure] > 0, figure
    floor = result["transport_floor"]  # 3 messages a token, delayed 10 / 2 + 4 / 2 + 10 / 2 ms by the emulation
    assert floor["round_trip_s"] > 0 and floor["messages_per_token"] == 3
    assert floor["token_path_s"] == pytest.approx(0.012 + 1.5 * floor["round_trip_s"])
    local_token, swarm_token = result["local_token_time"], result["swarm_token_time"]
    for token in (local_token, swarm_token):
        assert token["total_s"] > 0 and token["blocks_s"] > 0 and token["head_s"] > 0
    assert len(swarm_token["peer_blocks_s"]) == 2 and min(swarm_token["peer_blocks_s"]) > 0  # each peer's compute
    assert swarm_token["blocks_s"] == pytest.approx(sum(swarm_token["peer_blocks_s"]))
    assert "decoder blocks" in run.stdout and "the peers':" in run.stdout
    batching = result["concurrent_batching"]  # 2 sessions: each pass served one or both
    assert 1 <= batching["head_callers_per_pass"] <= 2
    assert len(batching["peer_sessions_per_pass"]) == 2
    assert all(1 <= sessions <= 2 for sessions in batching["peer_sessions_per_pass"])
    assert "sessions per pass" in run.stdout
    phases = (
        "loading", "starting a loopback swarm of 2 peers", "transport's floor", "connecting the client",
        "decode and first token", "2 concurrent sessions", "speculative decoding", "prefill of 24 tokens",
        "wire compressions", "where a decode token's time goes",
    )  # fmt: skip
    progress = [line for line in run.stderr.splitlines() if line.startswith("swarm bench [")]
    assert len(progress) == len(phases), run.stderr
    for line, phase in zip(progress, phases, strict=True):
        assert phase in line, (line, phase)
    wire = {entry["compression"]: entry for entry in result["wire"]}
    assert set(wire) == {"none", "fp16", "8bit"}
    assert wire["none"]["max_logit_error"] == 0 and wire["none"]["tokens_equal_local"]
    assert 0 < wire["fp16"]["relative_logit_error"] < wire["8bit"]["relative_logit_error"] < 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "returncode", "message"),
    [
        (lambda demo: demo.signal_group(signal.SIGINT), 130, "interrupted"),  # Ctrl-C in a terminal
        (lambda demo: demo.send_signal(signal.SIGTERM), 143, "terminated"),  # `kill PID`, a service manager
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_demo_stops_everything_when_stopped_early(
    tmp_path: Path, stop: Callable[[SwarmProcess], None], returncode: int, message: str
) -> None:
    # 1000 tokens keep the demo busy for seconds after its peers serve: the default 32 can all be generated, and
    # the demo finish, before a busy machine delivers the signal
    demo = SwarmProcess([*CLI, "demo", "--max-new-tokens", "1000"], env={**ENV, DEMO_MODEL_ENV: str(tmp_path / "m")})
    try:
        demo.wait_for_line("serves blocks 3:6", timeout=DEMO_TIMEOUT, stream="stdout")
        started = descendants(demo.pid)
        stop(demo)
        demo.wait(timeout=60)
        demo.wait_for_line(r"^Stopped\.$", timeout=5, stream="stdout")
    finally:
        demo.terminate()

    assert demo.returncode == returncode, demo.output()
    assert f"swarm demo: {message}" in demo.output("stderr")
    assert any(info.name == "p2pd" for info in started)
    assert still_running(started) == []


@pytest.mark.slow
def test_a_started_local_swarm_refuses_to_start_again(full_swarm: LocalSwarm) -> None:
    peers = list(full_swarm.peers)
    with pytest.raises(RuntimeError, match="started already"):
        full_swarm.start()
    assert full_swarm.peers == peers and all(peer.returncode is None for peer in peers)


def test_status_json_lists_every_block_with_its_peer(full_swarm: LocalSwarm, demo_model: Path) -> None:
    run = run_cli("status", str(demo_model), "--initial-peers", *full_swarm.initial_peers, "--json")

    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["model_prefix"] == "demo-model" and status["num_blocks"] == 6
    assert status["missing_blocks"] == []
    spans = {(peer["start"], peer["end"]): peer for peer in status["peers"]}
    assert sorted(spans) == [(0, 3), (3, 6)]
    assert all(peer["state"] == "online" and peer["cache_tokens_left"] > 0 for peer in status["peers"])
    for block in status["blocks"]:
        owner = spans[(0, 3) if block["index"] < 3 else (3, 6)]
        assert block["peer_ids"] == [owner["peer_id"]]
        assert block["throughput"] == owner["throughput"] > 0
    weakest_throughput = min(peer["throughput"] for peer in status["peers"])
    assert status["blocks"][status["weakest_block"]]["throughput"] == weakest_throughput
    peer_logs = "\n".join(peer.output() for peer in full_swarm.peers)
    assert all(f"Peer …{peer['peer_id'][-6:]} reachable" in peer_logs for peer in status["peers"])


@pytest.mark.slow
def test_status_text_says_the_model_is_fully_served(full_swarm: LocalSwarm, demo_model: Path) -> None:
    run = run_cli("status", str(demo_model), "--initial-peers", *full_swarm.initial_peers)

    assert run.returncode == 0, run.stderr
    assert "blocks 0:3\n" in run.stdout and "blocks 3:6\n" in run.stdout
    assert "6/6 blocks covered" in run.stdout
    assert re.search(r"weakest block: \d \(\d+\.\d tokens/s from its peers\)", run.stdout)
    assert re.search(r"…\w{6}  online   serves 0:3  \d+\.\d tokens/s", run.stdout)  # each peer's throughput


@pytest.mark.slow
def test_generate_streams_the_local_models_greedy_text(full_swarm: LocalSwarm, demo_model: Path) -> None:
    run = run_cli(
        "generate", str(demo_model), "--initial-peers", *full_swarm.initial_peers,
        "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy",
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    local = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = local.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8)
    new_text = tokenizer.decode(expected[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert run.stdout == PROMPT + new_text + "\n"
    assert "Route: 0:3 via …" in run.stderr
    assert "8 tokens in " in run.stderr and "tokens/s" in run.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21
def test_generate_with_an_adapter_streams_peft_greedy_text(
    full_swarm: LocalSwarm, demo_model: Path, tmp_path: Path
) -> None:
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model), lora).eval()
    local.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = local.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8)
        with local.disable_adapter():
            plain = local.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8)
    assert not torch.equal(expected, plain), "the adapter must change the text, or the test proves nothing"

    run = run_cli(
        "generate", str(demo_model), "--initial-peers", *full_swarm.initial_peers,
        "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy", "--adapter", str(tmp_path),
    )  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert run.stdout == PROMPT + tokenizer.decode(expected[0, input_ids.shape[1] :], skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_generate_samples_repeatably_with_a_seed(full_swarm: LocalSwarm, demo_model: Path) -> None:
    args = ["generate", str(demo_model), "--initial-peers", *full_swarm.initial_peers, "--prompt", PROMPT]
    sampling = ["--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "50", "--seed", "7"]

    first, second = run_cli(*args, *sampling), run_cli(*args, *sampling)

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and first.stdout.startswith(PROMPT)


@pytest.mark.slow
def test_generate_names_missing_blocks_and_fails_quickly(partial_swarm: LocalSwarm, demo_model: Path) -> None:
    began = time.monotonic()
    run = run_cli(
        "generate", str(demo_model), "--initial-peers", *partial_swarm.initial_peers,
        "--prompt", PROMPT, "--connect-timeout", "1",
    )  # fmt: skip

    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "swarm generate: error: blocks 2:6 of demo-model have no live peer; "
        "start one with `swarm-peer demo-model --blocks 2:6`"
    ]
    assert time.monotonic() - began < 60


@pytest.mark.slow
def test_status_reports_missing_blocks_and_still_succeeds(partial_swarm: LocalSwarm, demo_model: Path) -> None:
    text = run_cli("status", str(demo_model), "--initial-peers", *partial_swarm.initial_peers)
    document = run_cli("status", str(demo_model), "--initial-peers", *partial_swarm.initial_peers, "--json")

    assert text.returncode == document.returncode == 0
    assert "2/6 blocks covered; MISSING blocks 2:6" in text.stdout
    assert json.loads(document.stdout)["missing_blocks"] == [2, 3, 4, 5]


def test_generate_refuses_a_model_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")

    run = run_cli("generate", str(tmp_path), "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--prompt", "x")

    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"swarm generate: error: {tmp_path} has no tokenizer")


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "m", "--initial-peers", "not-a-multiaddr", "--prompt", "x"],
        ["generate", "m", "--prompt", "x"],
        ["status", "m", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--max-new-tokens", "3"],
        ["demo", "--peers", "4"],
        ["bench", "--new-tokens", "1"],  # the decode rate is timed after the first token
    ],
)
def test_parser_rejects_bad_flags(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(args)
    assert exit_info.value.code == 2


def test_even_spans_cover_every_block_once() -> None:
    assert even_spans(6, 2) == [(0, 3), (3, 6)]
    assert even_spans(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert even_spans(7, 3) == [(0, 2), (2, 5), (5, 7)]


def _span(peer_id: str, start: int, end: int, state: ServerState = ServerState.ONLINE) -> RemoteSpan:
    return RemoteSpan(peer_id, ServerInfo(state, start, end, 12.5, 1024, "float32", "0.1.0", public_name="alice"))


def test_status_counts_only_online_peers_as_covering(capsys: pytest.CaptureFixture[str]) -> None:
    view = SwarmView("m", 6, (_span("Qm111111", 0, 3), _span("Qm222222", 3, 5, ServerState.JOINING)))

    print_status("m", view)
    document = status_document("m", view)

    output = capsys.readouterr().out
    assert "  …111111  online   serves 0:3  12.5 tokens/s  1024 cache tokens left  'alice'" in output
    assert "  …222222  joining  serves 3:5" in output
    assert "blocks 5:6  no peer" in output
    assert "3/6 blocks covered; MISSING blocks 3:6" in output
    assert document["missing_blocks"] == [3, 4, 5]
    assert document["blocks"][4] == {"index": 4, "peer_ids": ["Qm222222"], "throughput": 12.5}  # joining counts
    assert document["blocks"][5]["throughput"] == 0.0 and document["weakest_block"] == 5
    assert "weakest block: 5 (0.0 tokens/s from its peers)" in output
