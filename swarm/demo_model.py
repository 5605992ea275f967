"""The demo model: a small Llama with seeded random weights and a byte-level BPE tokenizer, built locally.

`swarm demo` needs a model that exists on every machine without a download (and without the Hugging Face hub),
splits over 2-3 peers and runs fast on CPU. Until a trained one ships, `ensure_demo_model()` builds it on first
use in about a second: the same seed and the same embedded text give the same files on every run.

Its text is gibberish (the weights are random), but generation through the swarm must still equal local
generation token for token, which is what the demo shows. Tokens that would print control characters or broken
UTF-8 are suppressed in its generation config, so random output never garbles a terminal.

The directory appears atomically: everything is written to a temporary directory beside it, then renamed into
place. A crash leaves no half model, and two first runs racing each other both end with the same complete one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEMO_MODEL_ENV = "BLOCKSWARM_DEMO_MODEL_DIR"
DEFAULT_DEMO_MODEL_DIR = Path("~/.cache/blockswarm/demo-model")
# Files whose presence means a complete model; the rename makes them appear together.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"  # ids 0, 1, 2: trained first, in this order
VOCAB_SIZE_TARGET = 1024  # an upper bound: the BPE trainer stops when the corpus has no pair left to merge
MAX_LENGTH = 1024  # tokens: position embeddings of the model, model_max_length of the tokenizer


@dataclass(frozen=True, slots=True)
class DemoModelSpec:
    """The architecture: 6 blocks split evenly over 2 or 3 peers; small enough that a CPU step takes milliseconds."""

    num_layers: int = 6
    hidden_size: int = 192
    intermediate_size: int = 512
    num_attention_heads: int = 6
    num_key_value_heads: int = 2  # grouped-query attention, as in current Llamas
    max_position_embeddings: int = MAX_LENGTH
    vocab_size_target: int = VOCAB_SIZE_TARGET
    initializer_range: float = 0.1  # wider than Llama's 0.02, so greedy choices are not near-ties between tokens
    seed: int = 0


# Public-domain text (Lincoln, 1863; Dickens, 1859; Carroll, 1865; the US Declaration of Independence, 1776)
# to train the tokenizer on: enough English for a few hundred merges in well under a second.
CORPUS = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, \
and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, \
can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, \
as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting \
and proper that we should do this.
But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The \
world will little note, nor long remember what we say here, but it can never forget what they did here. It is for \
us the living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so \
nobly advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these \
honored dead we take increased devotion to that cause for which they gave the last full measure of devotion -- \
that we here highly resolve that these dead shall not have died in vain -- that this nation, under God, shall \
have a new birth of freedom -- and that government of the people, by the people, for the people, shall not \
perish from the earth.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it \
was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of \
Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing \
before us, we were all going direct to Heaven, we were all going direct the other way -- in short, the period was \
so far like the present period, that some of its noisiest authorities insisted on its being received, for good \
or for evil, in the superlative degree of comparison only.
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: once or \
twice she had peeped into the book her sister was reading, but it had no pictures or conversations in it, "and \
what is the use of a book," thought Alice "without pictures or conversations?"
So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy and \
stupid), whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the \
daisies, when suddenly a White Rabbit with pink eyes ran close by her.
There was nothing so very remarkable in that; nor did Alice think it so very much out of the way to hear the \
Rabbit say to itself, "Oh dear! Oh dear! I shall be late!"
When in the Course of human events, it becomes necessary for one people to dissolve the political bands which \
have connected them with another, and to assume among the powers of the earth, the separate and equal station to \
which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires \
that they should declare the causes which impel them to the separation.
We hold these truths to be self-evident, that all men are created equal, that they are endowed by their Creator \
with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness.
"""


def demo_model_dir() -> Path:
    """Where the demo model lives: $BLOCKSWARM_DEMO_MODEL_DIR, else ~/.cache/blockswarm/demo-model."""
    return Path(os.environ.get(DEMO_MODEL_ENV) or DEFAULT_DEMO_MODEL_DIR).expanduser()


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def ensure_demo_model(directory: Path | None = None, spec: DemoModelSpec | None = None) -> Path:
    """The demo model's directory, built there first if it does not hold a complete model yet.

    Safe to call from several processes at once: each builds in its own temporary directory and the first
    rename wins; the others discard their copy. An existing directory that is neither empty nor complete is
    left alone (it may be someone's files) and reported.
    """
    directory = (directory or demo_model_dir()).expanduser().absolute()
    if is_complete(directory):
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{directory} exists but is not a complete demo model; remove it, "
            f"or point {DEMO_MODEL_ENV} at another directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Creating the demo model in %s", directory)
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        save_demo_model(building, spec or DemoModelSpec())
        try:
            os.rename(building, directory)  # replaces an empty directory; fails if another process got there first
        except OSError:
            if not is_complete(directory):
                raise
            logger.info("Another process created the demo model first; using it")
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return directory


def save_demo_model(directory: Path, spec: DemoModelSpec) -> None:
    """Write the tokenizer, model weights, config and generation config into `directory` (not atomic)."""
    tokenizer = build_tokenizer(spec.vocab_size_target)
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's random state
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        suppress_tokens=unprintable_token_ids(tokenizer),
    )
    model.save_pretrained(directory)


def build_tokenizer(vocab_size: int = VOCAB_SIZE_TARGET) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `CORPUS`: encodes any text (unseen characters fall back to bytes) and decodes
    it back exactly. Adds `<s>` in front of every sequence, as Llama tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_LENGTH,
    )


def unprintable_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ordinary tokens that decode to control characters or to a fragment of a multi-byte UTF-8 character.

    A random-weight model picks such tokens as often as any other; printed, they would move the cursor, ring the
    bell or show as '�'. Newlines stay allowed.
    """
    special = set(tokenizer.all_special_ids)
    unprintable = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id not in special and (
            "\N{REPLACEMENT CHARACTER}" in text or not text.replace("\n", "").isprintable()
        ):
            unprintable.append(token_id)
    return unprintable
