"""The demo model: a small Llama trained on Shakespeare, shipped inside this package in `swarm/demo-model/`.

`swarm demo` needs a model that exists on every machine without a download (and without the Hugging Face hub),
splits over 2-3 peers and runs fast on CPU. `examples/train_demo_model.py` trained this one (6 blocks, hidden size
256, tied embeddings, 5.5M parameters, a byte-level BPE tokenizer of 4096 tokens) on the plays and poems, in 25
minutes on a 2-core CPU, so its greedy text reads like a play; `training_log.json` beside the weights records the
loss curve. The files are plain `save_pretrained` output (float32 safetensors, 22 MB), so `AutoModelForCausalLM`
and `AutoTokenizer` load the directory offline like any other.

$BLOCKSWARM_DEMO_MODEL_DIR points the demo at another directory. `ensure_demo_model()` copies the shipped files into
a directory that does not hold a complete model yet; tests use this to give the model the name they expect (a
directory's name is the model's name in the swarm). The copy appears atomically: it is written to a temporary
directory beside the target, then renamed into place, so a crash leaves no half model and two processes racing
each other both end with the same complete one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_ENV = "BLOCKSWARM_DEMO_MODEL_DIR"
SHIPPED_DEMO_MODEL_DIR = Path(__file__).resolve().with_name("demo-model")  # package data, see setup.cfg
# Files whose presence means a complete model; in a copy, the rename makes them appear together.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def demo_model_dir() -> Path:
    """Where the demo model lives: $BLOCKSWARM_DEMO_MODEL_DIR, else the copy shipped in this package."""
    return Path(os.environ.get(DEMO_MODEL_ENV) or SHIPPED_DEMO_MODEL_DIR).expanduser()


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_model(directory: Path | None = None) -> Path:
    """The demo model's directory (default: `demo_model_dir()`), the shipped files copied there first if it does not
    hold a complete model yet.

    Safe to call from several processes at once: each copies into its own temporary directory and the first
    rename wins; the others discard their copy. An existing directory that is neither empty nor complete is
    left alone (it may be someone's files) and reported.
    """
    directory = (directory or demo_model_dir()).expanduser().absolute()
    if is_complete(directory):
        return directory
    if not is_complete(SHIPPED_DEMO_MODEL_DIR):
        missing = [name for name in REQUIRED_FILES if not (SHIPPED_DEMO_MODEL_DIR / name).is_file()]
        raise FileNotFoundError(
            f"the demo model in {SHIPPED_DEMO_MODEL_DIR} lacks {', '.join(missing)}; reinstall blockswarm, "
            "or recreate it with examples/train_demo_model.py"
        )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{directory} exists but is not a complete demo model; remove it, "
            f"or point {DEMO_MODEL_ENV} at another directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Copying the demo model to %s", directory)
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        copy_demo_model(building)
        try:
            os.rename(building, directory)  # replaces an empty directory; fails if another process got there first
        except OSError:
            if not is_complete(directory):
                raise
            logger.info("Another process copied the demo model first; using it")
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return directory


def copy_demo_model(directory: Path) -> None:
    """Copy the shipped files (model, tokenizer, configs, training log) into `directory` (not atomic)."""
    for source in sorted(SHIPPED_DEMO_MODEL_DIR.iterdir()):
        if source.is_file():
            shutil.copyfile(source, directory / source.name)
