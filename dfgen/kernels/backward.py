"""Host side of the backward pass: the reverse sweep (dv, e, dbeta, delta), then dq and dk.

Needs only what the forward saved: q, k, beta, u, a = P u and the strict lse.
"""

from __future__ import annotations

import torch

from . import build
from .flags import zeroed_flags
from .forward import diagonal_scores, softmax_scale
from .padding import kernel_head_dim, narrow, packing, widen


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


def reverse_sweep(q, k, do, u, a, beta, lse, knobs, *, gated: bool = True, seqs=None, inv=None,
                  scale=None):
    """The solve_bwd stage alone: (dv, e, dbeta or None, delta, ds_diag); dv is per query
    head ([B, T, H, D], float32 with grouped kv heads), dbeta [B, T, H] in beta's dtype (the
    kernel's float32 sums rounded as they are stored: no conversion launch), delta and
    ds_diag float32 [B, H, T]. inv: the forward's in-chunk inverses (forward.inverse_buffer),
    read where their chunk is these knobs' CHUNK, else the sweep builds its own."""
    B, T, H, D = q.shape
    wide = kernel_head_dim(D, q.dtype)
    if wide != D:
        q, k, do, u, a = (widen(t, wide) for t in (q, k, do, u, a))
    dv = _per_query_head(u, H // k.shape[2])
    e = torch.empty_like(u)  # e_i = g_i do_i - beta_i dv_i
    dbeta = torch.empty(B, T, H, dtype=beta.dtype, device=q.device) if beta is not None else None
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    ds_diag = torch.empty_like(delta)
    module = build.load("solve_bwd", q.dtype, wide, knobs)
    n_seqs, longest = (B, T) if seqs is None else (seqs[0].numel() - 1, seqs[1])
    n_chunks = -(-longest // module.CHUNK_ROWS)
    sync = zeroed_flags(1 + n_seqs * H * n_chunks, q.device)
    if inv is not None and inv.shape[-1] != module.CHUNK_ROWS:
        inv = None  # built under another CHUNK
    module.launch(q, k, do, u, a, beta, lse, dv, e, dbeta, delta, ds_diag, sync,
                  softmax_scale(D, scale), gated, *packing(seqs), inv=inv)
    if wide != D:
        dv, e = narrow(dv, D), narrow(e, D)
    return dv, e, dbeta, delta, ds_diag


def query_key_grads(q, k, u, e, lse, delta, ds_diag, knobs, *, with_du: bool = False, seqs=None,
                    scale=None):
    """The attn_bwd stage alone: (dq, dk), dk summed over grouped query heads; with_du
    also the strictly-later part of P^T e (float32, per query head)."""
    D = q.shape[-1]
    wide = kernel_head_dim(D, q.dtype)
    if wide != D:
        q, k, u, e = (widen(t, wide) for t in (q, k, u, e))
    dq = torch.empty_like(q)
    dk = _per_query_head(q, q.shape[2] // k.shape[2])
    du = torch.empty(q.shape, dtype=torch.float32, device=q.device) if with_du else None
    build.load("attn_bwd", q.dtype, wide, knobs).launch(q, k, u, e, lse, delta, ds_diag, dq, dk,
                                                          softmax_scale(D, scale), du,
                                                          *packing(seqs))
    dk = _sum_groups(dk, k)
    if wide != D:
        dq, dk, du = narrow(dq, D), narrow(dk, D), narrow(du, D)
    return (dq, dk, du) if with_du else (dq, dk)


def backward(q, k, beta, u, a, lse, do, solve_knobs, attn_knobs, seqs=None, inv=None, scale=None):
    """(dq, dk, dv, dbeta or None) for o = deltaformer_attn(q, k, v, beta) given do; k and
    v (hence dk, dv) may have fewer heads than q; inv: the forward's in-chunk inverses;
    scale: the forward's (None: 1/sqrt(D))."""
    dv, e, dbeta, delta, ds_diag = reverse_sweep(q, k, do, u, a, beta, lse, solve_knobs, seqs=seqs,
                                                 inv=inv, scale=scale)
    dq, dk = query_key_grads(q, k, u, e, lse, delta, ds_diag, attn_knobs, seqs=seqs, scale=scale)
    return dq, dk, _sum_groups(dv, k), dbeta


def attention_stage_grads(q, k, u, o, lse_attn, do, attn_knobs, seqs=None, scale=None):
    """The two-stage backward's first part, the attention stage's: (dq, dk of that stage,
    du = P^T do float32 per query head, the diagonal included), one attn_bwd launch pair
    (e = do, delta = do . o, the diagonal in ds_ii)."""
    do32, u32 = do.float(), u.float()
    big_delta = (do32 * o.float()).sum(-1)  # [B, T, H]
    s_ii = diagonal_scores(q, k, scale)
    p_ii = torch.exp(s_ii - lse_attn.transpose(1, 2))  # the diagonal of the inclusive softmax
    ds_ii = p_ii * ((do32 * u32).sum(-1) - big_delta)
    dq, dk_attn, du = query_key_grads(q, k, u, do, lse_attn, big_delta.transpose(1, 2).contiguous(),
                                      ds_ii.transpose(1, 2).contiguous(), attn_knobs,
                                      with_du=True, seqs=seqs, scale=scale)
    du += p_ii.unsqueeze(-1) * do32
    return dq, dk_attn, du


def backward_q_solve(q, q_solve, k, beta, u, a, lse_solve, o, lse_attn, do, config, seqs=None,
                     inv=None, scale=None):
    """(dq, dq_solve, dk, dv, dbeta or None) for o = causal_softmax(q k^T) u with
    u = (I + diag(beta) P')^{-1} v, P' from q_solve k^T. The attention stage's backward
    (e = do, delta = do . o, the diagonal in ds_ii) gives dq, part of dk and
    du = P^T do; the solve stage's reverse sweep without the gate (do := du) gives dv,
    dbeta and, through a second dq/dk pass over q_solve, dq_solve and the rest of dk."""
    dq, dk_attn, du = attention_stage_grads(q, k, u, o, lse_attn, do, config.attn_bwd, seqs=seqs,
                                            scale=scale)
    dv, e, dbeta, delta, ds_diag = reverse_sweep(q_solve, k, du, u, a, beta, lse_solve,
                                                 config.solve_bwd, gated=False, seqs=seqs, inv=inv,
                                                 scale=scale)
    dq_solve, dk_solve = query_key_grads(q_solve, k, u, e, lse_solve, delta, ds_diag,
                                         config.attn_bwd, seqs=seqs, scale=scale)
    dk = (dk_attn.float() + dk_solve.float()).to(k.dtype)
    return dq, dq_solve, dk, _sum_groups(dv, k), dbeta
