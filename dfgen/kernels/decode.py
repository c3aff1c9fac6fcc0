"""Host side of a decoding step: n new tokens per batch row against a cache of earlier keys
and solved values (templates/decode.py.jinja), in two launches.

Inputs are assumed validated (dfgen.api.decode does that); the caches are the buffers of a
dfgen.api.cache.DecodingCache.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from . import build
from .forward import softmax_scale
from .padding import kernel_head_dim
from .spec import DECODE, spec


def default_decode_knobs(head_dim: int, dtype) -> dict[str, Any]:
    """The decoding step's knobs where no tuned entry serves: 128-token cache steps in 16-bit
    (64 in float32 up to head dim 64, else 32: its tiles are twice as wide), enough cache
    slices for about one program per SM of an H200 (132 SMs), three pipeline stages. On the
    H200 (run 37, bf16, head dim 128) these were the fastest of 108 points at batch 8 x 8192
    cached tokens x 16 heads and at 1 x 32768 x 16: 1.12x and 1.33x faster than the first
    defaults (64-token steps, 256 programs, two stages)."""
    if dtype == torch.float32:
        block_n = 64 if head_dim <= 64 else 32
    else:
        block_n = 128 if head_dim <= 128 else 64
    return dict(BLOCK_M=16, BLOCK_N=block_n, MIN_PROGRAMS=128, num_warps=4, num_stages=3)


def describe_decode_knobs(knobs: Mapping[str, Any]) -> str:
    """A decoding step's knobs in one line, as logs and `dfgen show` print them."""
    return "decode(" + " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) + ")"


def decode_knobs(given: Mapping[str, Any] | None, head_dim: int, dtype) -> dict[str, Any]:
    """`given` (a mapping of decode knobs, each optional) over the defaults, checked against
    the template's spec at the kernels' head dim (ConfigError naming the knob otherwise)."""
    knobs = default_decode_knobs(head_dim, dtype)
    if given:
        knobs.update(given)
    spec(DECODE).check(knobs, kernel_head_dim(head_dim, dtype))
    return knobs


def decode_step(q, k, v, beta, k_cache, u_cache, lengths, new_lengths, max_len: int,
                knobs: Mapping[str, Any], *, scale=None, return_lse: bool = False, q_solve=None):
    """o [B, n, H, D] of n new tokens per row (and their inclusive lse [B, H, n] float32 with
    return_lse); writes their keys and u into the caches at rows lengths[b] .. + n - 1 and
    lengths + n into new_lengths (both int32 [B] on the device). max_len: at least the
    longest length (host int: no sync), the caches' capacity at least max_len + n. q_solve
    (like q): the solve's own queries (u from q_solve's scores, o from q's)."""
    B, n, H, D = q.shape
    # 16-bit head dim 16 runs the 32-column kernels, the extra columns masked (as the other
    # stages pad it: Triton 3.6 miscompiled 16-column 16-bit tiles for Hopper)
    module = build.load(DECODE, q.dtype, kernel_head_dim(D, q.dtype), knobs)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, n, dtype=torch.float32, device=q.device) if return_lse else None
    module.launch(q, k, v, beta, k_cache, u_cache, lengths, new_lengths, o,
                  softmax_scale(D, scale), max_len, lse, q_solve=q_solve)
    return (o, lse) if return_lse else o
