"""DeltaFormerAttention: a drop-in for fla's layer (same constructor arguments and forward
signature), running dfgen's kernels.

Differences from fla, by choice: beta goes through a sigmoid by default (fla feeds the raw
projection, which makes the solve expand once beta > 1); `beta_activation="identity"`
keeps fla's raw beta. Grouped key/value heads are native (no repeated heads), and padding
masks are honoured in the solve stage too.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..kernels.config import SUPPORTED_HEAD_DIMS
from .attention import deltaformer_attn

_warned_cache = False  # the past_key_values warning is given once per process


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on [B, T, H, D] (non-interleaved halves, as fla's
    default); positions restart at every sequence of cu_seqlens."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q, k, cu_seqlens=None):
        T = q.shape[1]
        if cu_seqlens is None:
            positions = torch.arange(T, device=q.device, dtype=torch.float32)
        else:
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
            positions = (torch.arange(T, device=q.device) - starts).float()
        freqs = positions[:, None] * self.inv_freq.to(q.device)[None, :]
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[None, :, None, :]
        sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1)[None, :, None, :]

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

        past_key_values (fla's model passes its cache in eval with use_cache=True) is
        returned unchanged: there is no incremental decoding yet, so attention covers the
        given tokens only and the caller must pass the whole sequence (warned once)."""
        if past_key_values is not None:
            global _warned_cache
            if not _warned_cache:
                _warned_cache = True
                warnings.warn("DeltaFormerAttention: past_key_values is passed through unchanged; "
                              "incremental decoding is not supported yet, so attention covers only "
                              "the tokens given: pass the whole sequence at each step",
                              UserWarning, stacklevel=2)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [batch_size, seq_len] 0/1 padding mask")
        B, T, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")
        q, k, v, beta = self.project(hidden_states, cu_seqlens)
        # a raw beta is unbounded: the solve then keeps float32 accuracy (see large_beta)
        o = deltaformer_attn(q, k, v, beta, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                             large_beta=self.beta_activation == "identity")
        o = self.o_proj(o.reshape(B, T, -1))
        return o, None, past_key_values

    def project(self, hidden_states, cu_seqlens=None):
        """(q, k, v, beta) of the attention: projections, optional q/k norm, rotary."""
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
        q, k = self.rotary(q, k, cu_seqlens=cu_seqlens)
        return q.contiguous(), k.contiguous(), v.contiguous(), beta
