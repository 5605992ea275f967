"""`AutoDistributedModelForCausalLM`: a transformers causal LM whose decoder blocks run in the swarm.

Embeddings, final norm and LM head are loaded locally (never the blocks). The model is a real `GenerationMixin`
model, so `generate` with greedy search, sampling, streamers and stopping criteria works unchanged:

  * inside `with model.inference_session(max_length=N):` every forward sends only the tokens the peers have
    not seen yet, and consecutive `generate` calls continue the same conversation;
  * `generate` outside a session opens one for the call;
  * `model(input_ids)` outside a session is a stateless, differentiable forward through the swarm; with
    `labels` it returns the loss, and `loss.backward()` reaches `trainable_parameters()`: soft prompts, LoRA
    adapters and unfrozen client modules, as chosen by a `TuningConfig` (swarm/client/tuning.py).

Soft prompts, LoRA adapters and deep prompts (trained here or loaded with `adapter=DIR`) apply to sessions too:
the session sends its span's adapters to each peer once, with its first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client._sync import run_sync
from swarm.client.lora import LoraAdapters
from swarm.client.remote_blocks import ModelAdapters, RemoteBlocks
from swarm.client.session import InferenceSession
from swarm.client.swarm_client import SwarmClient
from swarm.client.tuning import PROMPTS_FILE, SoftPrompts, TuningConfig
from swarm.config import ClientConfig
from swarm.errors import ConfigError
from swarm.models import ClientModules, ModelLayout, ModelSource, load_client_modules
from swarm.protocol import model_prefix_for

logger = logging.getLogger(__name__)


class _Conversation:
    """An inference session plus the token ids it has been given, so `generate` calls can continue it."""

    def __init__(self, session: InferenceSession):
        self.session = session
        self.token_ids: torch.Tensor | None = None  # everything generate has returned so far
        self.sent_ids: torch.Tensor | None = None  # the tokens whose hidden states the peers have processed


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "client_modules"
    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_sdpa = True  # the client runs no attention itself; any implementation is fine

    def __init__(
        self,
        config: PretrainedConfig,
        client_modules: ClientModules,
        swarm: SwarmClient,
        tuning: TuningConfig | None = None,
        adapter: LoraAdapters | SoftPrompts | None = None,
    ):
        super().__init__(config)
        self.client_modules = client_modules
        self.swarm = swarm
        self.tuning = tuning
        self.prompts: SoftPrompts | None = None
        self.lora: LoraAdapters | None = None
        if tuning is not None:
            self._add_trainable_parts(tuning, client_modules.layout)
        if adapter is not None:
            self._use_adapter(adapter)
        self._conversation: _Conversation | None = None

    def _use_adapter(self, adapter: LoraAdapters | SoftPrompts) -> None:
        """A trained adapter takes the place of the tuning mode's fresh one of its kind (and trains on), or is
        applied frozen next to it."""
        mode = self.tuning.mode if self.tuning is not None else None
        if isinstance(adapter, LoraAdapters):
            if mode != "lora":
                adapter.requires_grad_(False)
            self.lora = adapter
            return
        kind = "ptune" if adapter.block_prompts is None else "deep-ptune"
        if mode in ("ptune", "deep-ptune") and mode != kind:
            raise ConfigError(f"the adapter holds {kind} prompts; it cannot continue as tuning_mode={mode!r}")
        if mode != kind:
            adapter.requires_grad_(False)
        self.prompts = adapter

    def _add_trainable_parts(self, tuning: TuningConfig, layout: ModelLayout) -> None:
        dtype = self.client_modules.final_norm.weight.dtype
        if tuning.mode in ("ptune", "deep-ptune"):
            num_blocks = layout.num_blocks if tuning.mode == "deep-ptune" else 0
            self.prompts = SoftPrompts(tuning.pre_seq_len, self.config.hidden_size, num_blocks=num_blocks, dtype=dtype)
        elif tuning.mode == "lora":
            self.lora = LoraAdapters(
                self.config, layout, rank=tuning.lora_rank, alpha=tuning.lora_alpha,
                target_modules=tuning.lora_target_modules, dtype=dtype,
            )  # fmt: skip
        modules = self.client_modules
        if tuning.tune_embeddings:
            for module in (modules.embeddings, modules.position_embeddings, modules.embedding_norm):
                if module is not None:
                    module.requires_grad_(True)
        if tuning.tune_head:
            modules.final_norm.requires_grad_(True)
            modules.lm_head.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What `loss.backward()` fills and an optimizer should update (empty when nothing is tuned)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model_name_or_path: str | os.PathLike[str],
        *,
        initial_peers: list[str] | tuple[str, ...] | None = None,
        model_prefix: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        config: ClientConfig | None = None,
        tuning: TuningConfig | None = None,
        tuning_mode: str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        verify_rate: float | None = None,
        swarm_key: str | os.PathLike[str] | None = None,
        **tuning_options: Any,
    ) -> DistributedModelForCausalLM:
        """Load the local parts of `model_name_or_path` and connect to the swarm through `initial_peers`
        (or `config.initial_peers`; when both are given they must agree).

        For training, pass `tuning=TuningConfig(...)`, or its fields as keywords:
        `tuning_mode="ptune", pre_seq_len=16` or `tuning_mode="lora", lora_rank=8, tune_head=True`.

        `verify_rate` overrides `config.verify_rate`: the share of each peer's steps that an independent peer
        recomputes to catch wrong outputs (swarm/client/verification.py; 0 trusts every peer).

        `dtype` and `device` place the parts that run here (embeddings, final norm, LM head); the peers choose
        their own. Pass inputs on that device.

        `swarm_key=FILE` joins a private swarm (swarm/swarm_key.py); it overrides `config.swarm_key`.

        `adapter=DIR` applies a trained adapter to everything the model runs, generation included: a PEFT LoRA
        directory (adapter_config.json) or soft prompts (prompts.safetensors), as `swarm finetune` saves them.
        The peers apply it per request and per session; their weights never change. With the matching tuning
        mode it trains on from there (its own rank and targets win over the tuning options).
        """
        if tuning_mode is not None or tuning_options:
            if tuning is not None:
                raise ConfigError("pass either tuning=TuningConfig(...) or its fields as keywords, not both")
            tuning = TuningConfig(mode=tuning_mode, **tuning_options)
        if config is None:
            if not initial_peers:
                raise ConfigError("pass initial_peers=[MULTIADDR, ...] (printed by `swarm-dht` or any peer)")
            config = ClientConfig(initial_peers=tuple(initial_peers))
        elif initial_peers is not None and tuple(initial_peers) != config.initial_peers:
            raise ConfigError("initial_peers and config.initial_peers differ; pass the peers in one place")
        if verify_rate is not None:
            config = dataclasses.replace(config, verify_rate=verify_rate)
        if swarm_key is not None:
            config = dataclasses.replace(config, swarm_key=str(swarm_key))
        source = ModelSource.open(model_name_or_path, revision=revision)
        client_modules = load_client_modules(source, dtype=dtype, device=device)
        prefix = model_prefix or config.model_prefix or model_prefix_for(str(model_name_or_path))
        swarm = SwarmClient(config, prefix, source.layout.num_blocks)
        loaded = None if adapter is None else _load_adapter(adapter, source.config, client_modules)
        model = cls(source.config, client_modules, swarm, tuning, loaded)
        model.generation_config = _generation_config(source)
        return model.eval()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.client_modules.embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.client_modules.lm_head

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """Keep the peers' KV caches across forward and `generate` calls, for up to `max_length` tokens."""
        if self._conversation is not None:
            raise ConfigError("an inference session is already open on this model")
        prompt_length = 0 if self.prompts is None else self.prompts.pre_seq_len  # soft prompts take cache too
        conversation = _Conversation(InferenceSession(self.swarm, max_length + prompt_length, self._adapters()))
        self._conversation = conversation
        try:
            yield conversation.session
        finally:
            self._conversation = None
            run_sync(conversation.session.close())

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        generation_config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or generation_config.num_beams or 1) > 1:
            raise ConfigError("beam search is not supported: it reorders KV caches that live on the peers")
        conversation = self._conversation
        if conversation is None:
            max_length = _max_length_of(inputs, kwargs, self.generation_config)
            with self.inference_session(max_length=max_length) as session:
                if inputs is not None:
                    session.open_soon(inputs.shape[0])  # while transformers sets generation up
                return self.generate(inputs, *args, **kwargs)
        if conversation.token_ids is not None:
            previous = conversation.token_ids
            inputs = previous if inputs is None else torch.cat([previous, inputs.to(previous.device)], dim=1)
        if inputs is not None and "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(inputs)
        outputs = super().generate(inputs, *args, **kwargs)
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        conversation.token_ids = sequences
        return outputs

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # The whole sequence each time: forward itself sends only what the peers have not seen.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "logits_to_keep" in kwargs:  # generate asks for the last position's logits only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` (or for token embeddings `inputs_embeds`, outside a session only), and with
        `labels` the mean next-token cross-entropy (positions labelled -100 are ignored).

        `logits_to_keep` as in transformers: N > 0 computes the LM head for the last N positions only (generate
        passes 1: a long prompt's other logits would cost as much as a layer), a tensor selects positions."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ConfigError("padded batches are not supported yet: give prompts of equal length")
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("pass exactly one of input_ids and inputs_embeds")
        conversation = self._conversation
        if conversation is None:
            logits = self._stateless_logits(input_ids, inputs_embeds, logits_to_keep)
        else:
            if input_ids is None:
                raise ConfigError("inference sessions take input_ids; inputs_embeds work in stateless forward calls")
            logits = self._session_logits(conversation, input_ids, logits_to_keep)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _session_logits(
        self, conversation: _Conversation, input_ids: torch.Tensor, logits_to_keep: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Logits for the tokens of `input_ids` the session has not processed yet; the peers keep the rest in
        their caches. Where `input_ids` leaves what was processed (rejected speculative tokens, an edited
        conversation), the session and the peers' caches roll back to the last common token first; when nothing is
        new, the last token is computed again. Soft prompts go in front of the first step, as in a stateless
        forward."""
        session, sent = conversation.session, conversation.sent_ids
        done = 0 if sent is None else common_prefix_length(sent, input_ids)
        done = min(done, input_ids.shape[1] - 1)  # at least one token to compute, for its logits
        if sent is not None and done < sent.shape[1]:
            prompt_length = 0 if self.prompts is None else self.prompts.pre_seq_len
            session.rollback(prompt_length + done if done else 0)  # back to 0: the soft prompts go again
        new_ids = input_ids[:, done:]
        token_vectors = self.client_modules.embeddings(new_ids)
        prompt_length = 0
        if self.prompts is not None and session.position == 0:
            token_vectors, prompt_length = self.prompts.prepend(token_vectors), self.prompts.pre_seq_len
        hidden = self.client_modules.embed_vectors(token_vectors, session.position)
        outputs = run_sync(session.step(hidden))
        conversation.sent_ids = input_ids.clone()
        outputs = _kept(outputs[:, prompt_length:], logits_to_keep)
        return self.client_modules.logits(outputs.to(device=hidden.device, dtype=hidden.dtype), caller=session)

    def _adapters(self) -> ModelAdapters | None:
        """The LoRA adapter and deep prompts as inference sessions send them to the peers."""
        deep_prompts = None if self.prompts is None else self.prompts.block_prompts
        if self.lora is None:
            return ModelAdapters.detached(None, (), deep_prompts)
        return ModelAdapters.detached(self.lora.header, self.lora.tensors(), deep_prompts)

    def _stateless_logits(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Embeddings (+ soft prompts) here, blocks (+ LoRA, deep prompts) on the peers, head here; differentiable
        throughout."""
        token_vectors = self.client_modules.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.prompts is not None:
            token_vectors = self.prompts.prepend(token_vectors)
        hidden = self.client_modules.embed_vectors(token_vectors, 0)
        deep_prompts = None if self.prompts is None else self.prompts.block_prompts
        lora = (None,) if self.lora is None else (self.lora.header, *self.lora.tensors())
        hidden = RemoteBlocks.apply(hidden, self.swarm, deep_prompts, *lora)
        if self.prompts is not None:
            hidden = hidden[:, self.prompts.pre_seq_len :]
        return self.client_modules.logits(_kept(hidden, logits_to_keep))

    def close(self) -> None:
        """Leave the swarm (shuts down this client's DHT process)."""
        self.swarm.close()


def _kept(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of [batch, seq, hidden] states whose logits were asked for (`logits_to_keep`, as in
    transformers: 0 all, N > 0 the last N, a tensor those positions)."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    return hidden[:, logits_to_keep]


class AutoDistributedModelForCausalLM:
    """Entry point mirroring transformers' Auto classes: `AutoDistributedModelForCausalLM.from_pretrained(...)`."""

    from_pretrained = DistributedModelForCausalLM.from_pretrained


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions two [batch, seq] token tensors share in every row."""
    length = min(a.shape[1], b.shape[1])
    if a.shape[0] != b.shape[0]:
        return 0
    differs = (a[:, :length] != b[:, :length]).any(0).nonzero()
    return int(differs[0]) if len(differs) else length


def _load_adapter(
    path: str | os.PathLike[str], config: PretrainedConfig, client_modules: ClientModules
) -> LoraAdapters | SoftPrompts:
    dtype = client_modules.final_norm.weight.dtype
    if (Path(path) / "adapter_config.json").exists():
        return LoraAdapters.from_pretrained(path, config, client_modules.layout, dtype=dtype)
    if (Path(path) / PROMPTS_FILE).exists():
        return SoftPrompts.from_pretrained(path, config.hidden_size, client_modules.layout.num_blocks, dtype=dtype)
    raise ConfigError(f"adapter {path}: neither a PEFT LoRA directory (adapter_config.json) nor {PROMPTS_FILE}")


def _generation_config(source: ModelSource) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(source.checkpoint.config_dir)
    except OSError:
        return GenerationConfig.from_model_config(source.config)


def _max_length_of(inputs: torch.Tensor | None, kwargs: dict[str, Any], generation_config: GenerationConfig) -> int:
    prompt_length = 0 if inputs is None else inputs.shape[1]
    generation = kwargs.get("generation_config") or generation_config
    if kwargs.get("max_new_tokens") is not None:
        return prompt_length + kwargs["max_new_tokens"]
    if kwargs.get("max_length") is not None:
        return kwargs["max_length"]
    if generation.max_new_tokens is not None:
        return prompt_length + generation.max_new_tokens
    return max(generation.max_length or 0, prompt_length + 1)
