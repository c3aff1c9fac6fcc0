"""Host side of the forward pass: allocate, then launch the generated stages.

Inputs are assumed validated (dfgen.runtime does that); tensors are [B, T, H, D] with a
unit stride on D, any other strides.
"""

from __future__ import annotations

import math

import torch

from . import codegen
from .config import KernelConfig


def solve_stage(q, k, v, beta, knobs, *, write_o: bool, write_a: bool = False):
    """Run the solve stage alone. Returns (u, o or None, lse [B, H, T] float32, a or None),
    a_i = sum_{j<i} P_ij u_j being what the backward needs."""
    B, T, H, D = q.shape
    module = codegen.load("solve_fwd", q.dtype, D, knobs)
    u = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    o = torch.empty_like(u) if write_o else None
    a = torch.empty_like(u) if write_a else None
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    n_chunks = -(-T // module.CHUNK_ROWS)
    sync = torch.zeros(1 + B * H * n_chunks, dtype=torch.int32, device=q.device)
    module.launch(q, k, v, beta, u, o, a, lse, sync, 1.0 / math.sqrt(D))
    return u, o, lse, a


def attention_stage(q, k, u, knobs, *, return_lse: bool = False):
    """Causal attention of q over (k, u): o_i = sum_{j<=i} softmax(s_i)_j u_j; with
    return_lse also (o, lse_i = logsumexp_{j<=i} s_ij as [B, H, T] float32)."""
    B, T, H, D = q.shape
    module = codegen.load("attn_fwd", q.dtype, D, knobs)
    o = torch.empty_like(u)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device) if return_lse else None
    module.launch(q, k, u, o, 1.0 / math.sqrt(D), lse)
    return (o, lse) if return_lse else o


def forward(q, k, v, beta, config: KernelConfig, *, for_backward: bool = False):
    """(o, u, lse, a) under `config`'s strategy; a (None unless for_backward) is
    sum_{j<i} P_ij u_j, which the backward needs besides u and lse."""
    fused = config.strategy == "fused"
    u, o, lse, a = solve_stage(q, k, v, beta, config.solve, write_o=fused, write_a=for_backward)
    if not fused:
        o = attention_stage(q, k, u, config.attn)
    return o, u, lse, a


def forward_q_solve(q, q_solve, k, v, beta, config: KernelConfig, *, for_backward: bool = False):
    """The two-stage pass with the solve stage's own queries: u from the strict softmax of
    q_solve k^T, then o = causal softmax(q k^T) u. Returns (o, u, lse_solve, a, lse_attn),
    a and lse_attn (inclusive) being None unless for_backward."""
    u, _, lse_solve, a = solve_stage(q_solve, k, v, beta, config.solve, write_o=False,
                                     write_a=for_backward)
    if for_backward:
        o, lse_attn = attention_stage(q, k, u, config.attn, return_lse=True)
    else:
        o, lse_attn = attention_stage(q, k, u, config.attn), None
    return o, u, lse_solve, a, lse_attn
