"""Host side of the backward pass: the reverse sweep (dv, e, dbeta, delta), then dq and dk.

Needs only what the forward saved: q, k, beta, u, a = P u and the strict lse.
"""

from __future__ import annotations

import math

import torch

from . import codegen


def _per_query_head(like, group):
    """A [B, T, H, D] gradient buffer: float32 when heads of a group will be summed."""
    return torch.empty(like.shape, dtype=torch.float32 if group > 1 else like.dtype,
                       device=like.device)


def _sum_groups(grad, kv_like):
    """Sum per-query-head gradients over each group of query heads sharing a kv head."""
    B, T, H, D = grad.shape
    H_kv = kv_like.shape[2]
    if H_kv == H:
        return grad
    return grad.view(B, T, H_kv, H // H_kv, D).sum(3).to(kv_like.dtype)


def reverse_sweep(q, k, do, u, a, beta, lse, knobs):
    """The solve_bwd stage alone: (dv, e, dbeta or None, delta, ds_diag); dv is per query
    head ([B, T, H, D], float32 with grouped kv heads), dbeta float32 [B, T, H], delta and
    ds_diag float32 [B, H, T]."""
    B, T, H, D = q.shape
    dv = _per_query_head(u, H // k.shape[2])
    e = torch.empty_like(u)  # e_i = g_i do_i - beta_i dv_i
    dbeta = torch.empty(B, T, H, dtype=torch.float32, device=q.device) if beta is not None else None
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    ds_diag = torch.empty_like(delta)
    module = codegen.load("solve_bwd", q.dtype, D, knobs)
    n_chunks = -(-T // module.CHUNK_ROWS)
    sync = torch.zeros(1 + B * H * n_chunks, dtype=torch.int32, device=q.device)
    module.launch(q, k, do, u, a, beta, lse, dv, e, dbeta, delta, ds_diag, sync,
                  1.0 / math.sqrt(D))
    return dv, e, dbeta, delta, ds_diag


def query_key_grads(q, k, u, e, lse, delta, ds_diag, knobs):
    """The attn_bwd stage alone: (dq, dk), dk summed over grouped query heads."""
    D = q.shape[-1]
    dq = torch.empty_like(q)
    dk = _per_query_head(q, q.shape[2] // k.shape[2])
    codegen.load("attn_bwd", q.dtype, D, knobs).launch(q, k, u, e, lse, delta, ds_diag, dq, dk,
                                                       1.0 / math.sqrt(D))
    return dq, _sum_groups(dk, k)


def backward(q, k, beta, u, a, lse, do, solve_knobs, attn_knobs):
    """(dq, dk, dv, dbeta or None) for o = deltaformer_attn(q, k, v, beta) given do; k and
    v (hence dk, dv) may have fewer heads than q."""
    dv, e, dbeta, delta, ds_diag = reverse_sweep(q, k, do, u, a, beta, lse, solve_knobs)
    dq, dk = query_key_grads(q, k, u, e, lse, delta, ds_diag, attn_knobs)
    if dbeta is not None:
        dbeta = dbeta.to(beta.dtype)
    return dq, dk, _sum_groups(dv, k), dbeta
