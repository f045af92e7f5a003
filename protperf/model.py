"""The Performer protein language model: one config dataclass and one encoder, nanoGPT-sized.

A stack of pre-LayerNorm blocks (attention -> residual, MLP -> residual) over token embeddings,
a final LayerNorm and a language-model head. Attention goes through
:class:`protperf.attention.FastAttention`, so ``kernel`` alone switches between Performer (softmax,
FAVOR+), Performer (generalized, ReLU features) and the regular Transformer (exact softmax) with
everything else equal. The same encoder serves both objectives: ``causal=True`` for the
unidirectional (next-token) model, ``causal=False`` for the bidirectional (masked) one.

Shapes: B batch, L length, D ``dim``, H ``heads``, V ``vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from protperf.attention import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_HASHES,
    DEFAULT_LINFORMER_K,
    KERNEL_NAMES,
    LINFORMER_NOT_CAUSAL,
    NO_STEP,
    Backend,
    FastAttention,
    Kernel,
    check_backend,
    check_kernel,
)
from protperf.favor import DecodeState
from protperf.objectives import IGNORE_INDEX
from protperf.seeds import derive_seed
from protperf.tokenizer import VOCAB_SIZE


@dataclass
class PerformerConfig:
    """Architecture of :class:`PerformerLM`. Defaults: the paper's 36-layer protein model."""

    vocab_size: int = VOCAB_SIZE
    """Token ids (protperf.tokenizer: 5 specials + 25 residues)."""
    dim: int = 512
    """Width of the residual stream (d_model)."""
    depth: int = 36
    """Number of blocks."""
    heads: int = 8
    """Attention heads; head_dim = dim / heads (64 in the paper)."""
    ff_dim: int = 1024
    """Hidden width of the MLP (the concat model uses 2048)."""
    max_length: int = 1024
    """Training crop length incl. <bos>/<eos>; caps only learned positions, not rotary ones."""
    kernel: Kernel = "softmax"
    """Performer (FAVOR+: softmax) / Performer (generalized: relu) / Transformer (exact) /
    Reformer (LSH attention: reformer) / Linformer (linformer, bidirectional only)."""
    num_features: int = 256
    """m, random features per head (softmax kernel)."""
    feature_type: Literal["orthogonal", "iid", "deterministic"] | None = None
    """Random features; None: the kernel's default (orthogonal for softmax, none for relu)."""
    causal: bool = False
    """True for the unidirectional LM; set by the training mode, not by hand."""
    positions: Literal["rotary", "learned"] = "rotary"
    """Rotary (relative, no length cap) or learned absolute embeddings (capped at max_length)."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies."""
    dropout: float = 0.1
    """On the embeddings and on each residual branch."""
    tie_embeddings: bool = True
    """LM head shares the token embedding matrix."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    chunk_size: int = 128
    """Block length of the causal FAVOR+ computation."""
    local_conv: int = 0
    """Kernel size of a depthwise convolution over the values whose output is added to the
    attention's (0 = none): direct access to the nearest residues, which linear attention over
    thousands of positions blurs. Causal (the last ``local_conv`` positions) for causal models,
    centred for masked ones; O(L), and a constant-size state when decoding."""
    feature_seed: int = 0
    """Seed of the initial random features (per-layer seeds derive from it)."""
    gradient_checkpointing: bool = False
    """Recompute each block in the backward pass: less activation memory, ~30% slower."""
    attention_backend: Backend = "auto"
    """FAVOR+'s kernels: auto (Triton on CUDA when installed, else PyTorch), torch or triton.
    The same function either way: a run's exports load on any backend."""
    lsh_bucket_size: int = DEFAULT_BUCKET_SIZE
    """Reformer: the chunk length of LSH attention; a sequence of n tokens gets about
    n / lsh_bucket_size buckets."""
    lsh_hashes: int = DEFAULT_HASHES
    """Reformer: rounds of hashing (more: closer to exact attention, slower)."""
    linformer_k: int = DEFAULT_LINFORMER_K
    """Linformer: k, the projected length of keys and values; its projections read at most
    max_length tokens."""

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        check_kernel(self.kernel)
        check_backend(self.attention_backend)
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"positions must be 'rotary' or 'learned', got {self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kernel == "linformer" and self.causal:
            raise ValueError(LINFORMER_NOT_CAUSAL)
        positive = ("vocab_size", "depth", "ff_dim", "max_length", "num_features", "chunk_size",
                    "lsh_bucket_size", "lsh_hashes", "linformer_k")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.local_conv < 0:
            raise ValueError(f"local_conv must be 0 (none) or a kernel size, got {self.local_conv}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def decodes(self) -> bool:
        """Whether :meth:`PerformerLM.decode_step` runs: a causal model whose attention keeps a
        state (FAVOR+) or a cache (exact); LSH attention re-sorts the whole prefix every token."""
        return self.causal and self.kernel not in ("reformer", "linformer")

    @property
    def length_limit(self) -> tuple[int, str] | None:
        """(the most tokens one input may have, what sets it), or None: no limit.

        Learned positions and Linformer's projections have ``max_length`` rows; rotary
        positions and the other kernels read any length.
        """
        if self.positions == "learned":
            return self.max_length, "learned positions"
        if self.kernel == "linformer":
            return self.max_length, "Linformer projections"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PerformerConfig:
        """Build from a dict (e.g. config.json), rejecting unknown keys with a clear error."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PerformerConfig fields: {sorted(unknown)}")
        return cls(**values)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, half-split layout): relative positions, no length cap."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (length, head_dim), for positions offset .. offset+length-1.

        ``offset`` is what incremental decoding will pass for the tokens after a prompt.
        """
        positions = torch.arange(offset, offset + length, device=self.inv_freq.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (B, H, L, d) by angles (L, d); computed in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class LayerState:
    """What one causal layer remembers while decoding token by token.

    attention: the attention's :class:`~protperf.attention.DecodeState`;
    recent_values: (B, local_conv - 1, D) the values of the last positions (local convolution
    only, else None).
    """

    attention: DecodeState
    recent_values: Tensor | None = None


class LocalConv(nn.Module):
    """Depthwise convolution of the values over the nearest ``size`` positions.

    Causal: position t sees t-size+1 .. t; otherwise centred. Padded positions are zeroed first,
    so a sequence's output does not depend on the padding of its batch.
    """

    def __init__(self, dim: int, size: int, causal: bool) -> None:
        super().__init__()
        self.size, self.causal = size, causal
        self.weight = nn.Parameter(torch.zeros(dim, 1, size))
        nn.init.normal_(self.weight, std=size**-0.5)

    def forward(self, v: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """v: (B, L, D), padding_mask: (B, L) bool, True = padding -> (B, L, D)."""
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        left = self.size - 1 if self.causal else self.size // 2
        padded = F.pad(v.transpose(1, 2), (left, self.size - 1 - left))
        return F.conv1d(padded, self.weight.to(v.dtype), groups=v.shape[-1]).transpose(1, 2)

    def step(self, v: Tensor, recent: Tensor | None) -> tuple[Tensor, Tensor]:
        """One causal decoding position. v: (B, 1, D); recent: (B, size-1, D) or None (start).

        Returns (B, 1, D) and the new ``recent``.
        """
        if recent is None:
            recent = v.new_zeros(v.shape[0], self.size - 1, v.shape[-1])
        window = torch.cat([recent, v], dim=1)  # (B, size, D), oldest first
        out = torch.einsum("bkd,dk->bd", window, self.weight[:, 0].to(v.dtype))[:, None]
        return out, window[:, 1:]


class SelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v projection, rotary, FastAttention, output projection.

    :meth:`forward` runs a whole sequence; :meth:`step` one new position of a causal layer,
    threading the attention's :class:`~protperf.attention.DecodeState` (incremental decoding).
    """

    def __init__(self, config: PerformerConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        # Reformer hashes one vector per position as query and key (shared QK): two projections.
        self.shared_qk = config.kernel == "reformer"
        self.qkv = nn.Linear(config.dim, (2 if self.shared_qk else 3) * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attention = FastAttention(
            head_dim=config.head_dim,
            num_features=config.num_features,
            kernel=config.kernel,
            causal=config.causal,
            feature_type=config.feature_type,
            chunk_size=config.chunk_size,
            seed=derive_seed(config.feature_seed, layer),
            backend=config.attention_backend,
            bucket_size=config.lsh_bucket_size,
            n_hashes=config.lsh_hashes,
            max_length=config.max_length,
            linformer_k=config.linformer_k,
        )
        self.local = (
            LocalConv(config.dim, config.local_conv, config.causal) if config.local_conv else None
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, L, D); padding_mask: (B, L) bool, True = padding; rope: (cos, sin) -> (B, L, D)."""
        batch, length, dim = x.shape
        projected = self.qkv(x)  # (B, L, 3D): queries, keys, values (shared QK: 2D)
        parts = projected.view(batch, length, -1, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (parts[0], parts[0], parts[1]) if self.shared_qk else parts
        if rope is not None:
            q = apply_rotary(q, *rope)
            k = q if self.shared_qk else apply_rotary(k, *rope)
        out = self.attention(q, k, v, key_padding_mask=padding_mask)  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        if self.local is not None:
            out = out + self.local(projected[..., -dim:], padding_mask)
        return self.dropout(self.proj(out))

    def step(
        self,
        x: Tensor,
        state: LayerState | None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, LayerState]:
        """One decoding position. x: (B, 1, D); rope: (cos, sin) of that position, each (1, d).

        ``state`` is None on the first position. Returns (B, 1, D) and the updated state.
        """
        batch, _, dim = x.shape
        projected = self.qkv(x)  # (B, 1, 3D)
        q, k, v = projected.view(batch, 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attention_state = None if state is None else state.attention
        out, attention_state = self.attention.step(q, k, v, attention_state)  # (B, H, 1, d)
        out = out.transpose(1, 2).reshape(batch, 1, dim)
        recent = None
        if self.local is not None:
            local, recent = self.local.step(
                projected[..., -dim:], None if state is None else state.recent_values
            )
            out = out + local
        return self.dropout(self.proj(out)), LayerState(attention_state, recent)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear (the paper's FFN)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ff_dim)
        self.proj = nn.Linear(config.ff_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: PerformerConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, layer)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), padding_mask, rope)
        return x + self.mlp(self.norm2(x))

    def step(
        self, x: Tensor, state: LayerState | None, rope: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, LayerState]:
        """One decoding position: x (B, 1, D) -> (B, 1, D), new attention state."""
        attended, state = self.attn.step(self.norm1(x), state, rope)
        x = x + attended
        return x + self.mlp(self.norm2(x)), state


class PerformerLM(nn.Module):
    """Performer encoder with a language-model head (causal or masked, by ``config.causal``)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions = (
            nn.Embedding(config.max_length, config.dim) if config.positions == "learned" else None
        )
        self.rotary = (
            Rotary(config.head_dim, config.rotary_base) if config.positions == "rotary" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance stays O(1) in depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.depth))
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Tensor | None = None,
        targets: Tensor | None = None,
        repr_layers: tuple[int, ...] | list[int] = (),
    ) -> dict[str, Any]:
        """Run the model.

        Args:
            tokens: (B, L) token ids.
            padding_mask: (B, L) bool, True at padding (excluded from attention). None: no padding.
            targets: (B, L) ids to predict at each position, ``IGNORE_INDEX`` where there is none
                (the caller shifts them for the causal LM or masks them for the masked LM).
            repr_layers: layers whose hidden states to return (ESM-style): 0 is the embedding
                output, i the output of block i, ``depth`` the final (layer-normed) states.

        Returns:
            ``{"logits": (B, L, V), "representations": {layer: (B, L, D)}}`` plus ``"loss"``
            (mean cross-entropy over the non-ignored targets, float32) when targets are given.
        """
        config = self.config
        length = tokens.shape[1]
        if self.positions is not None and length > config.max_length:
            raise ValueError(
                f"length {length} exceeds learned positions' max_length {config.max_length}"
            )
        for layer in repr_layers:
            if not 0 <= layer <= config.depth:
                raise ValueError(f"repr_layers must be in [0, {config.depth}], got {layer}")
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(length, device=tokens.device))
        x = self.dropout(x)
        rope = self.rotary(length) if self.rotary is not None else None
        representations: dict[int, Tensor] = {}
        if 0 in repr_layers:
            representations[0] = x
        for layer, block in enumerate(self.blocks, start=1):
            if config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, padding_mask, rope, use_reentrant=False)
            else:
                x = block(x, padding_mask, rope)
            if layer in repr_layers and layer != config.depth:
                representations[layer] = x
        x = self.norm(x)
        if config.depth in repr_layers:
            representations[config.depth] = x
        logits = self.head(x)
        out: dict[str, Any] = {"logits": logits, "representations": representations}
        if targets is not None:
            out["loss"] = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
            )
        return out

    @torch.no_grad()
    def decode_step(
        self, tokens: Tensor, states: list[LayerState] | None, position: int
    ) -> tuple[Tensor, list[LayerState]]:
        """Incremental decoding of a causal model: feed the token at ``position``, get the next.

        Equals ``forward`` on the whole prefix (up to rounding) at a cost that does not grow with
        ``position`` for FAVOR+: each layer keeps a constant m x (d+1) state per head (exact
        attention keeps a key/value cache that grows with the prefix).

        Args:
            tokens: (B,) ids of the tokens at ``position`` (one per sequence).
            states: one :class:`LayerState` per layer, as returned by the previous step; None at
                position 0.
            position: index of ``tokens`` in their sequences (0 for ``<bos>``), the same for the
                whole batch.

        Returns:
            (logits (B, V) for the token at ``position + 1``, the states after ``position``).
        """
        config = self.config
        if not config.causal:
            raise RuntimeError("decode_step needs a causal (unidirectional) model")
        if not config.decodes:
            raise RuntimeError(NO_STEP.format(kernel=KERNEL_NAMES[config.kernel]))
        if (states is None) != (position == 0):
            raise ValueError(f"states must be None exactly at position 0 (position {position})")
        x = self.embed(tokens.view(-1, 1))
        if self.positions is not None:
            if position >= config.max_length:
                raise ValueError(
                    f"position {position} exceeds learned positions' max_length {config.max_length}"
                )
            x = x + self.positions.weight[position]
        x = self.dropout(x)
        rope = self.rotary(1, offset=position) if self.rotary is not None else None
        new_states = []
        for layer, block in enumerate(self.blocks):
            x, state = block.step(x, None if states is None else states[layer], rope)
            new_states.append(state)
        return self.head(self.norm(x))[:, 0], new_states

    @staticmethod
    def select_decode_states(states: list[LayerState], rows: Tensor) -> list[LayerState]:
        """Keep (or reorder) the batch rows ``rows`` ((B',) long indices) of decoding states."""

        def keep(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[rows]

        return [
            LayerState(
                DecodeState(
                    state.attention.context[rows],
                    state.attention.value_sum[rows],
                    keep(state.attention.key_max),
                ),
                keep(state.recent_values),
            )
            for state in states
        ]

    @torch.no_grad()
    def redraw_features(self, seed: int) -> None:
        """Draw new random features in every layer; layer i uses ``derive_seed(seed, i)``."""
        for layer, block in enumerate(self.blocks):
            block.attn.attention.redraw(derive_seed(seed, layer))

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups: weight decay on matrices (2-D: linears, embeddings), none on the rest."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
