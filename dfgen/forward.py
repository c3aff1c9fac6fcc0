"""Host side of the forward pass: allocate, then launch the generated stages.

Inputs are assumed validated (dfgen.runtime does that); tensors are [B, T, H, D] with a
unit stride on D, any other strides.
"""

from __future__ import annotations

import math

import torch

from . import codegen
from .config import ForwardConfig


def solve_stage(q, k, v, beta, knobs, *, write_o: bool):
    """Run the solve stage alone. Returns (u, o or None, lse [B, H, T] float32)."""
    B, T, H, D = q.shape
    module = codegen.load("solve_fwd", q.dtype, D, knobs)
    u = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    o = torch.empty_like(u) if write_o else None
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    n_chunks = -(-T // module.CHUNK_ROWS)
    sync = torch.zeros(1 + B * H * n_chunks, dtype=torch.int32, device=q.device)
    module.launch(q, k, v, beta, u, o, lse, sync, 1.0 / math.sqrt(D), write_o)
    return u, o, lse


def attention_stage(q, k, u, knobs):
    """Causal attention of q over (k, u): o_i = sum_{j<=i} softmax(s_i)_j u_j."""
    D = q.shape[-1]
    module = codegen.load("attn_fwd", q.dtype, D, knobs)
    o = torch.empty_like(u)
    module.launch(q, k, u, o, 1.0 / math.sqrt(D))
    return o


def forward(q, k, v, beta, config: ForwardConfig):
    """o, plus (u, lse) for a backward, under `config`'s strategy."""
    if config.strategy == "fused":
        u, o, lse = solve_stage(q, k, v, beta, config.solve, write_o=True)
    else:
        u, _, lse = solve_stage(q, k, v, beta, config.solve, write_o=False)
        o = attention_stage(q, k, u, config.attn)
    return o, u, lse
