"""Hugging Face ``transformers`` interop: protperf models as ``PreTrainedModel`` classes.

``pip install protperf[hf]``, then::

    import protperf.hf  # registers the classes with AutoConfig and AutoModelFor{CausalLM,MaskedLM}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("runs/x/hf")   # written by `protperf export`
    tokenizer = AutoTokenizer.from_pretrained("runs/x/hf")

The classes wrap :class:`protperf.model.PerformerLM` unchanged (its state dict under
``performer.``), so their logits equal protperf's on the same tokens, and everything built on
``transformers`` works with them: ``Trainer``, PEFT / LoRA, pipelines, ``save_pretrained``.
Conventions are Hugging Face's: ``attention_mask`` is 1 at real tokens; a causal model's
``labels`` are the inputs themselves (shifted inside, as in GPT-2); a masked model's labels are
-100 wherever nothing is predicted. Nothing here contacts the Hub unless asked to.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )
    from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput
except ImportError as error:  # the core package does not need transformers
    raise ImportError(
        "protperf.hf needs Hugging Face transformers: pip install 'protperf[hf]'"
    ) from error

from protperf import tokenizer as alphabet
from protperf.model import PerformerConfig, PerformerLM, Rotary
from protperf.objectives import IGNORE_INDEX

MODEL_TYPE = "protperf-performer"
#: PerformerConfig fields -> their names in the Hugging Face config: the same, but for
#: ``max_length``, which Hugging Face reserves for generation (the training crop here).
_NAMES = {field.name: field.name for field in dataclasses.fields(PerformerConfig)}
_NAMES["max_length"] = "max_train_length"


class PerformerLMConfig(PretrainedConfig):
    """A :class:`~protperf.model.PerformerConfig` as a ``PretrainedConfig``: the same field
    names, but ``max_train_length`` for ``max_length`` and ``tie_word_embeddings`` for
    ``tie_embeddings``; the special token ids are the protperf alphabet's."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        defaults = PerformerConfig()
        for name, key in _NAMES.items():
            setattr(self, key, kwargs.pop(key, getattr(defaults, name)))
        kwargs.setdefault("tie_word_embeddings", self.tie_embeddings)
        for name, token in (("pad", alphabet.PAD), ("bos", alphabet.BOS), ("eos", alphabet.EOS)):
            kwargs.setdefault(f"{name}_token_id", token)
        super().__init__(**kwargs)

    def to_performer_config(self) -> PerformerConfig:
        """The protperf config (``tie_word_embeddings`` wins over ``tie_embeddings``)."""
        values = {name: getattr(self, key) for name, key in _NAMES.items()}
        values["tie_embeddings"] = bool(getattr(self, "tie_word_embeddings", True))
        return PerformerConfig(**values)

    @classmethod
    def from_performer_config(cls, config: PerformerConfig) -> PerformerLMConfig:
        return cls(**{_NAMES[name]: value for name, value in dataclasses.asdict(config).items()})


class PerformerLMPreTrainedModel(PreTrainedModel):
    """What the two heads share: the config class, the wrapped model, tied embeddings."""

    config_class = PerformerLMConfig
    base_model_prefix = "performer"
    main_input_name = "input_ids"
    causal: bool

    def __init__(self, config: PerformerLMConfig) -> None:
        super().__init__(config)
        protperf_config = dataclasses.replace(config.to_performer_config(), causal=self.causal)
        self.performer = PerformerLM(protperf_config)
        if protperf_config.tie_embeddings:
            self._tied_weights_keys = {"performer.head.weight": "performer.embed.weight"}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        PerformerLM._init_weights(module)
        if isinstance(module, Rotary):  # a buffer left out of checkpoints: computed, never loaded
            config = self.config
            fresh = Rotary(config.dim // config.heads, config.rotary_base)
            module.inv_freq.copy_(fresh.inv_freq.to(module.inv_freq.device))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.performer.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.performer.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.performer.head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | MaskedLMOutput:
        """``output_class(loss, logits (B, L, V), hidden_states)``: hidden states of layers
        0..depth with ``output_hidden_states``, the loss (see :meth:`loss`) given ``labels``."""
        padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding_mask = attention_mask == 0
        layers = list(range(self.performer.config.depth + 1)) if output_hidden_states else []
        out = self.performer(input_ids, padding_mask, repr_layers=layers)
        hidden = tuple(out["representations"][layer] for layer in layers) or None
        logits = out["logits"]
        loss = None if labels is None else self.loss(logits, labels, attention_mask)
        return self.output_class(loss=loss, logits=logits, hidden_states=hidden)

    def loss(self, logits: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        raise NotImplementedError


class PerformerLMForCausalLM(PerformerLMPreTrainedModel):
    """The unidirectional (next-token) protperf model.

    ``forward(input_ids (B, L), attention_mask (B, L) 1 = token, labels (B, L))``: the loss is
    the mean cross-entropy of predicting ``labels[:, 1:]`` from positions ``:-1`` (-100 and
    padding ignored), as protperf's own training computes it.
    """

    causal = True
    output_class = CausalLMOutput

    def loss(self, logits: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        targets = labels[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        return F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )


class PerformerLMForMaskedLM(PerformerLMPreTrainedModel):
    """The bidirectional (masked) protperf model: ``labels`` hold the original residue at the
    corrupted positions and -100 elsewhere (``DataCollatorForLanguageModeling``'s convention)."""

    causal = False
    output_class = MaskedLMOutput

    def loss(self, logits: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )


def protperf_tokenizer() -> PreTrainedTokenizerFast:
    """The protperf alphabet as a ``PreTrainedTokenizerFast`` (``<bos> residues <eos>``)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=alphabet.build_hf_tokenizer(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
        unk_token="<unk>",
        model_max_length=int(1e9),  # FAVOR+ and rotary positions: no length limit
    )


def to_hf(model: PerformerLM) -> PerformerLMPreTrainedModel:
    """A Hugging Face model holding ``model``'s weights (the head of its mode)."""
    cls = PerformerLMForCausalLM if model.config.causal else PerformerLMForMaskedLM
    wrapped = cls(PerformerLMConfig.from_performer_config(model.config))
    wrapped.performer.load_state_dict(model.state_dict(), strict=True)
    return wrapped.eval()


def save_hf(model: PerformerLM, out: str | Path) -> Path:
    """Write a folder that ``AutoModelFor{CausalLM,MaskedLM}.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load (after ``import protperf.hf``)."""
    out = Path(out)
    to_hf(model).save_pretrained(out)
    protperf_tokenizer().save_pretrained(out)
    return out


def register() -> None:
    """Register the classes with the Auto factories (done on import; safe to repeat)."""
    try:
        AutoConfig.register(MODEL_TYPE, PerformerLMConfig)
    except ValueError:  # already registered
        return
    AutoModelForCausalLM.register(PerformerLMConfig, PerformerLMForCausalLM)
    AutoModelForMaskedLM.register(PerformerLMConfig, PerformerLMForMaskedLM)
    AutoTokenizer.register(PerformerLMConfig, fast_tokenizer_class=PreTrainedTokenizerFast)


register()
