"""DeltaFormerAttention: a drop-in for fla's layer (same constructor arguments and forward
signature), running dfgen's kernels.

Differences from fla, by choice: beta goes through a sigmoid by default (fla feeds the raw
projection, which makes the solve expand once beta > 1); `beta_activation="identity"`
keeps fla's raw beta. Grouped key/value heads are native (no repeated heads), and padding
masks are honoured in the solve stage too. Unlike fla's, it decodes: given a cache
(`past_key_values`, fla's Cache or dfgen's DeltaFormerCache), the first call fills it and
each later call attends over it and appends.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.config import SUPPORTED_HEAD_DIMS
from .attention import deltaformer_attn
from .cache import DecodingCache
from .decode import deltaformer_decode


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on [B, T, H, D] (non-interleaved halves, as fla's
    default); positions restart at every sequence of cu_seqlens, or are given ([T] or
    [B, T]: a padded row's tokens counted without its padding, decoding's offsets)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q, k, cu_seqlens=None, positions=None):
        T = q.shape[1]
        if positions is None and cu_seqlens is None:
            positions = torch.arange(T, device=q.device, dtype=torch.float32)
        elif positions is None:
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
            positions = (torch.arange(T, device=q.device) - starts).float()
        freqs = positions.float()[..., None] * self.inv_freq.to(q.device)
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).unsqueeze(-2)  # [(B,) T, 1, D]
        sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1).unsqueeze(-2)

        def rotate(x):
            x32 = x.float()
            return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)

        return rotate(q), rotate(k)


class DeltaFormerAttention(nn.Module):
    """DeltaFormer attention layer (Zhong et al., arXiv:2505.19488), fla-compatible.

    Args: hidden_size, num_heads, num_kv_heads (None: num_heads), qkv_bias, qk_norm
    (per-head RMSNorm of q and k), rope_theta, max_position_embeddings, layer_idx, as
    fla's DeltaFormerAttention; beta_activation: "sigmoid" (default) or "identity" (fla's
    raw beta).
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        max_position_embeddings: int | None = None,
        layer_idx: int | None = None,
        beta_activation: str = "sigmoid",
    ):
        super().__init__()
        if beta_activation not in ("sigmoid", "identity"):
            raise ValueError(f"beta_activation must be 'sigmoid' or 'identity', got {beta_activation!r}")
        _positive_int("hidden_size", hidden_size)
        _positive_int("num_heads", num_heads)
        if num_kv_heads is not None:
            _positive_int("num_kv_heads", num_kv_heads)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size // num_heads not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"hidden_size / num_heads = {hidden_size} / {num_heads} = "
                             f"{hidden_size // num_heads} is not a supported head dim; expected one "
                             f"of {SUPPORTED_HEAD_DIMS}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({num_heads})")
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.layer_idx = layer_idx
        self.beta_activation = beta_activation

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5, dtype=torch.float32)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5, dtype=torch.float32)
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_theta)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None,
                output_attentions: bool = False, use_cache: bool = False, **kwargs):
        """hidden_states [B, T, hidden_size]; attention_mask [B, T] of 0/1 (0 = padding);
        cu_seqlens (keyword) for packed sequences. Returns (o, None, past_key_values).

        past_key_values: fla's Cache or dfgen's DeltaFormerCache (one entry per layer, this
        layer's at layer_idx), as fla's models pass it. Empty for this layer: the call is a
        prefill and stores its DecodingCache there (each row's unpadded tokens; one row per
        sequence with cu_seqlens). Filled: the call decodes, hidden_states being the next
        tokens of each row (an attention_mask, which then spans the past too, is not needed:
        the cache knows each row's length), and appends to it. Rotary positions count each
        row's tokens without its padding, in both."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [batch_size, seq_len] 0/1 padding mask")
        B, T, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")
        large_beta = self.beta_activation == "identity"  # a raw beta is unbounded (see large_beta)
        cache = self._cache_of(past_key_values) if past_key_values is not None else None
        if cache is not None:  # decoding: T more tokens per row after the cached ones
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens cannot continue a cache: pass each sequence's next "
                                 "tokens as a row of hidden_states")
            positions = cache.lengths.long()[:, None] + torch.arange(T, device=hidden_states.device)
            q, k, v, beta = self.project(hidden_states, positions=positions)
            with torch.no_grad():
                o = deltaformer_decode(q, k, v, beta, cache)
            past_key_values.update(recurrent_state=cache, layer_idx=self.layer_idx, offset=T)
        else:
            positions = None
            if attention_mask is not None and cu_seqlens is None:  # count tokens, not padding
                positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            q, k, v, beta = self.project(hidden_states, cu_seqlens, positions)
            prefill = past_key_values is not None  # then keep what decoding needs
            o = deltaformer_attn(q, k, v, beta, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                                 large_beta=large_beta, return_cache=prefill)
            if prefill:
                o, cache = o
                past_key_values.update(recurrent_state=cache, layer_idx=self.layer_idx, offset=T)
        o = self.o_proj(o.reshape(B, T, -1))
        return o, None, past_key_values

    def _cache_of(self, past_key_values):
        """This layer's DecodingCache in `past_key_values`, or None where it holds none yet."""
        if self.layer_idx is None:
            raise ValueError("DeltaFormerAttention needs layer_idx to use past_key_values "
                             "(its entry in the cache)")
        if not (hasattr(past_key_values, "update") and hasattr(past_key_values, "__len__")):
            raise TypeError(f"past_key_values must be a cache with update() and per-layer entries "
                            f"(fla's Cache, dfgen.layers.DeltaFormerCache), got "
                            f"{type(past_key_values).__name__}")
        if len(past_key_values) <= self.layer_idx:
            return None
        try:
            state = past_key_values[self.layer_idx]
        except (KeyError, IndexError):
            return None
        found = state.get("recurrent_state") if isinstance(state, dict) else None
        if found is not None and not isinstance(found, DecodingCache):
            raise TypeError(f"past_key_values' entry for layer {self.layer_idx} holds a "
                            f"{type(found).__name__}, not dfgen's DecodingCache (another layer's "
                            "state at this layer_idx?)")
        return found

    def project(self, hidden_states, cu_seqlens=None, positions=None):
        """(q, k, v, beta) of the attention: projections, optional q/k norm, rotary (at
        `positions`, [T] or [B, T], when given)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        beta = self.b_proj(hidden_states).float()
        if self.beta_activation == "sigmoid":
            beta = torch.sigmoid(beta)
        if self.qk_norm:
            q = self.q_norm(q.float()).to(v.dtype)
            k = self.k_norm(k.float()).to(v.dtype)
        q, k = self.rotary(q, k, cu_seqlens=cu_seqlens, positions=positions)
        return q.contiguous(), k.contiguous(), v.contiguous(), beta
