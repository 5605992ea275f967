"""`examples/benchmark_idle_steps.py` runs on a saved checkpoint and reports each kind of step in every round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.model_factory import save_tiny_model

SCRIPT = Path(__file__).parents[2] / "examples" / "benchmark_idle_steps.py"


def test_every_round_reports_the_step_back_to_back_after_sleeping_and_after_busy_waiting(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path, num_layers=4)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--blocks", "1:3", "--idle-ms", "1", "--rounds", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rounds = re.findall(
        r"^round (\d): back to back ([\d.]+), after sleeping 1 ms ([\d.]+), after busy-waiting 1 ms ([\d.]+)$",
        run.stdout,
        re.MULTILINE,
    )
    assert [number for number, *_ in rounds] == ["1", "2"], run.stdout
    assert all(float(ms) > 0 for _, *medians in rounds for ms in medians)
    assert "blocks 1:3" in run.stdout
