"""`finetune`: what `swarm finetune` runs. A text file becomes equal-length token chunks; each local step trains
the client's trainable parameters (soft prompts or LoRA adapters) on a random batch of them, through the swarm's
frozen blocks. A `hivemind.Optimizer` averages the gradients of every trainer in the run or, with `local_steps`
H > 1, the change that H local AdamW steps made to the parameters (DiLoCo; averaging.py).

Data: `.txt` gives one example per non-empty line, `.jsonl` one per line from its "text" field. Each example is
tokenized and ends with the EOS token; all of them are concatenated and cut into chunks of `seq_len` tokens, so
every batch has one length (the swarm takes no padding) and no token is wasted on it.

Every trainer starts from the same parameters (`INIT_SEED`), so trainers that start together agree from the
first step; one that joins a run already under way downloads the current state from the others instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from swarm.client.remote_model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from swarm.client.tuning import TuningConfig
from swarm.config import ClientConfig
from swarm.errors import ConfigError
from swarm.training.averaging import CollaborationConfig, CollaborativeOptimizer, collaborative_optimizer
from swarm.training.metrics import TrainingMetrics

logger = logging.getLogger(__name__)

INIT_SEED = 0  # seeds the trainable parameters' initialisation, the same in every trainer of a run


@dataclass(frozen=True, slots=True)
class FinetuneConfig:
    model: str  # model directory or Hugging Face id (its tokenizer is loaded too)
    client: ClientConfig  # how to reach the swarm (host_maddrs: where other trainers reach this one)
    collaboration: CollaborationConfig
    tuning: TuningConfig
    data: Path  # .txt or .jsonl
    output: Path  # where the trained parameters go
    max_steps: int  # stop once the run's epoch (averaged optimizer steps, outer ones with local_steps > 1) reaches this
    lr: float = 1e-3  # AdamW's: at every averaged step, or (local_steps > 1) at every local step
    seq_len: int = 64  # tokens per training example
    seed: int | None = None  # data order of this trainer; None: a fresh random one, so trainers see different batches

    def __post_init__(self) -> None:
        if self.tuning.mode is None:
            raise ConfigError("pick what to train: --method ptune, deep-ptune or lora")
        if self.max_steps <= 0 or self.seq_len < 2 or self.lr <= 0:
            raise ConfigError("max_steps and lr must be positive and seq_len at least 2")
        if self.data.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"{self.data}: give a .txt file (one example per line) or .jsonl ({{'text': ...}})")


def read_examples(path: Path) -> list[str]:
    """The non-empty examples in a .txt (one per line) or .jsonl (a "text" field per line) file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read --data {path}: {e}") from e
    if path.suffix == ".txt":
        examples = [line for line in lines if line.strip()]
    else:
        examples = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f'{path}:{number}: expected a JSON object with a "text" field') from e
            examples.append(str(text))
    if not examples:
        raise ConfigError(f"{path} holds no examples")
    return examples


def token_chunks(examples: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """[num_chunks, seq_len] token ids: the examples, each ended by EOS, concatenated and cut into chunks (the
    remainder is dropped; a corpus shorter than seq_len becomes one shorter chunk)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for text in examples for token in tokenizer(text, add_special_tokens=False).input_ids + eos]
    if len(stream) < 2:
        raise ConfigError("the data holds fewer than 2 tokens")
    if len(stream) < seq_len:
        return torch.tensor([stream])
    num_chunks = len(stream) // seq_len
    return torch.tensor(stream[: num_chunks * seq_len]).view(num_chunks, seq_len)


def batches(chunks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of `batch_size` chunks: each pass over the data in a fresh random order."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(chunks), generator=generator)
        order = order.repeat(math.ceil(batch_size / len(order)))  # a dataset smaller than one batch
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield chunks[order[start : start + batch_size]]


def save_trainable(model: DistributedModelForCausalLM, output: Path, base_model: str) -> Path:
    """LoRA adapters in PEFT's format; soft prompts (and deep-ptune's per-block prompts) as safetensors."""
    output.mkdir(parents=True, exist_ok=True)
    if model.lora is not None:
        model.lora.save_pretrained(output, base_model_name_or_path=base_model)
        return output / "adapter_model.safetensors"
    if model.prompts is None:
        raise ConfigError("this model has neither LoRA adapters nor soft prompts to save")
    return model.prompts.save_pretrained(output)


def finetune(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Train until the run reaches epoch `config.max_steps`, save, and return the saved file's path.

    Prints one line per epoch (mean local loss, trainers in the run, tokens/s) to stdout; the progress bar goes
    to stderr when it is a terminal.
    """
    chunks = token_chunks(read_examples(config.data), tokenizer, config.seq_len)
    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
    batch_size = config.collaboration.batch_size_per_step
    torch.manual_seed(INIT_SEED)
    model = AutoDistributedModelForCausalLM.from_pretrained(config.model, config=config.client, tuning=config.tuning)
    optimizer = None
    try:
        # before the first forward: the client's loop thread starts there, and the averagers fork here
        optimizer = collaborative_optimizer(
            model.swarm.dht,
            model.trainable_parameters(),
            config.collaboration,
            lambda params: torch.optim.AdamW(params, lr=config.lr),
        )
        _train(model, optimizer, batches(chunks, batch_size, seed), config.max_steps)
        saved = save_trainable(model, config.output, config.model)
        print(f"saved {saved} at epoch {optimizer.local_epoch}", flush=True)
        return saved
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        model.close()


def _train(
    model: DistributedModelForCausalLM, optimizer: CollaborativeOptimizer, data: Iterator[torch.Tensor], max_steps: int
) -> None:
    epoch = optimizer.local_epoch
    losses: list[float] = []
    tokens, started = 0, time.monotonic()
    metrics = TrainingMetrics()
    with tqdm(total=max_steps, initial=epoch, unit="epoch", disable=None, file=sys.stderr) as progress:
        while epoch < max_steps:
            batch = next(data)
            step_began = time.monotonic()
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            tokens += batch.numel()
            tokens_per_second = tokens / max(time.monotonic() - started, 1e-9)
            peers = optimizer.tracker.global_progress.num_peers
            new_epoch = optimizer.local_epoch
            metrics.record_step(
                losses[-1], batch.numel(), time.monotonic() - step_began, new_epoch, new_epoch - epoch, peers
            )
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tokens_per_s=f"{tokens_per_second:.0f}", peers=peers)
            if new_epoch != epoch:
                progress.update(new_epoch - epoch)
                mean = sum(losses) / len(losses)
                progress.write(  # above the bar, on a terminal
                    f"epoch {new_epoch}: loss {mean:.4f} over {len(losses)} steps, {peers} trainers in the run, "
                    f"{tokens_per_second:.0f} tokens/s",
                    file=sys.stdout,
                )
                sys.stdout.flush()
                epoch, losses = new_epoch, []
