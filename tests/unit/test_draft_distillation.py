"""`examples/distill_draft_model.py`: a short run writes a loadable draft with fewer blocks and the target's
tokenizer, embeddings and head, whose greedy guesses agree with the target's more often than chance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "examples" / "distill_draft_model.py"


def test_a_short_distillation_writes_a_draft_that_shares_the_targets_head(demo_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "draft"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(output), "--target", str(demo_model), "--minutes", "0.05"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    agreement = float(re.search(r"greedy agreement with the target ([\d.]+)%\n", run.stdout).group(1))
    assert agreement > 10.0  # chance, over a 4096-token vocabulary, is 0.02%
    draft = AutoModelForCausalLM.from_pretrained(output)
    target = AutoModelForCausalLM.from_pretrained(demo_model)
    assert draft.config.num_hidden_layers == 2 < target.config.num_hidden_layers
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert AutoTokenizer.from_pretrained(output).get_vocab() == AutoTokenizer.from_pretrained(demo_model).get_vocab()
