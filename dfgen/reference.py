"""Naive DeltaFormer attention: the ground truth every kernel is tested against.

Layout: q, k, v are [B, T, H, D]; beta is [B, T, H] (None means all ones). Per batch
and head, with scale = 1/sqrt(D) unless a function's `scale` gives another:

    s_ij = scale * q_i . k_j
    P_ij = exp(s_ij - lse_i) for j < i, 0 otherwise      (strictly causal softmax)
    lse_i = logsumexp_{j<i} s_ij                          (row 0: -inf, its P row is zero)
    u_i  = v_i - beta_i * sum_{j<i} P_ij u_j              (the solve stage)
    o_i  = sum_{j<=i} softmax_{j<=i}(s_i)_j u_j           (the attention stage)

In matrix form u = L^{-1} v with L = I + diag(beta) P, unit lower triangular. Everything
here is computed in `compute_dtype` (float64 by default) with dense T x T matrices, so
it is meant for tests and small checks, not for speed.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "naive_scores",
    "naive_strict_lse",
    "naive_lse",
    "naive_deltaformer_u",
    "naive_causal_attention",
    "naive_strict_attention",
    "naive_deltaformer_attn",
    "naive_backward_terms",
]


def naive_scores(q: torch.Tensor, k: torch.Tensor, compute_dtype=torch.float64,
                 scale=None) -> torch.Tensor:
    """scale * q k^T as [B, H, T, T] in compute_dtype (scale None: 1/sqrt(D)); k may have
    fewer heads than q (grouped heads share them)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = _per_query_head(k, q.shape[2])
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2)
    return scale * (qh @ kh.transpose(-1, -2))


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H_kv, D] repeated to [B, T, heads, D] (grouped heads)."""
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)


def _strict_softmax(s: torch.Tensor):
    T = s.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=s.device).tril(-1)
    masked = s.masked_fill(~strict, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)  # row 0: -inf
    p = torch.exp(masked - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    return p.masked_fill(~strict, 0.0), lse


def naive_strict_lse(q: torch.Tensor, k: torch.Tensor, compute_dtype=torch.float64,
                     scale=None) -> torch.Tensor:
    """lse_i = logsumexp_{j<i} s_ij as [B, H, T] (row 0 is -inf)."""
    return _strict_softmax(naive_scores(q, k, compute_dtype, scale))[1]


def naive_lse(q: torch.Tensor, k: torch.Tensor, compute_dtype=torch.float64,
              scale=None) -> torch.Tensor:
    """The attention's lse_i = logsumexp_{j<=i} s_ij as [B, H, T] (causal, inclusive)."""
    s = naive_scores(q, k, compute_dtype, scale)
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    return torch.logsumexp(s.masked_fill(~causal, float("-inf")), dim=-1)


def naive_deltaformer_u(q, k, v, beta=None, compute_dtype=torch.float64, scale=None) -> torch.Tensor:
    """u = (I + diag(beta) P)^{-1} v, returned as [B, T, H, D] in compute_dtype.

    Equivalent to the recurrence u_i = v_i - beta_i * sum_{j<i} P_ij u_j, solved here
    with one triangular solve per batch and head.
    """
    B, T, H, D = q.shape
    p, _ = _strict_softmax(naive_scores(q, k, compute_dtype, scale))
    if beta is None:
        beta_h = torch.ones(B, H, T, dtype=compute_dtype, device=q.device)
    else:
        beta_h = beta.to(compute_dtype).transpose(1, 2)
    eye = torch.eye(T, dtype=compute_dtype, device=q.device)
    lower = eye + beta_h.unsqueeze(-1) * p
    vh = _per_query_head(v, H).to(compute_dtype).transpose(1, 2)
    u = torch.linalg.solve_triangular(lower, vh, upper=False, unitriangular=True)
    return u.transpose(1, 2).contiguous()


def naive_strict_attention(q, k, u, compute_dtype=torch.float64, scale=None) -> torch.Tensor:
    """a_i = sum_{j<i} P_ij u_j (strictly causal; row 0 is zero) as [B, T, H, D]."""
    p, _ = _strict_softmax(naive_scores(q, k, compute_dtype, scale))
    return (p @ u.to(compute_dtype).transpose(1, 2)).transpose(1, 2).contiguous()


def naive_causal_attention(q, k, v, compute_dtype=torch.float64, scale=None) -> torch.Tensor:
    """o_i = sum_{j<=i} softmax_{j<=i}(s_i)_j v_j as [B, T, H, D] in compute_dtype."""
    s = naive_scores(q, k, compute_dtype, scale)
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    v = _per_query_head(v, q.shape[2])
    return (p @ v.to(compute_dtype).transpose(1, 2)).transpose(1, 2).contiguous()


def naive_deltaformer_attn(q, k, v, beta=None, compute_dtype=torch.float64, q_solve=None,
                           scale=None) -> torch.Tensor:
    """DeltaFormer attention o = causal_softmax(q k^T) u with u from the solve stage.

    q, k, v: [B, T, H, D]; beta: [B, T, H] or None (ones). q_solve: the solve stage's own
    queries (u = (I + diag(beta) P')^{-1} v, P' the strict softmax of q_solve k^T), None
    for q. k and v may have fewer heads than q. scale: the scores' scale (None: 1/sqrt(D)).
    Returns o as [B, T, H, D] in compute_dtype (float64 or float32).
    """
    u = naive_deltaformer_u(q if q_solve is None else q_solve, k, v, beta, compute_dtype, scale)
    return naive_causal_attention(q, k, u, compute_dtype, scale)


def naive_backward_terms(q, k, v, beta, do, compute_dtype=torch.float64) -> dict:
    """The backward's intermediate quantities from the math note's formulas, dense:

        g_i = sigmoid(lse_i - s_ii),  Delta_i = do_i . o_i
        dv = L^{-T} du_out, du_out_j = (1 - g_j) do_j + sum_{i>j} g_i P_ij do_i
        e_i = g_i do_i - beta_i dv_i,  dbeta_i = -dv_i . a_i,  delta_i = g_i Delta_i + beta_i dbeta_i
        ds_ii = (1 - g_i)(do_i . u_i - Delta_i)

    Returns dv, e, a ([B, T, H, D]); dbeta ([B, T, H]); g, delta, ds_diag ([B, H, T]).
    """
    B, T, H, D = q.shape
    cd = compute_dtype
    s = naive_scores(q, k, cd)
    p, lse = _strict_softmax(s)
    beta_h = (torch.ones(B, H, T, dtype=cd, device=q.device) if beta is None
              else beta.to(cd).transpose(1, 2))
    u = naive_deltaformer_u(q, k, v, beta, cd).transpose(1, 2)
    a = p @ u
    g = torch.sigmoid(lse - torch.diagonal(s, dim1=-2, dim2=-1))  # row 0: sigmoid(-inf) = 0
    o = g.unsqueeze(-1) * a + (1 - g).unsqueeze(-1) * u
    doh = do.to(cd).transpose(1, 2)
    big_delta = (doh * o).sum(-1)
    du_out = (1 - g).unsqueeze(-1) * doh + p.transpose(-1, -2) @ (g.unsqueeze(-1) * doh)
    lower = torch.eye(T, dtype=cd, device=q.device) + beta_h.unsqueeze(-1) * p
    dv = torch.linalg.solve_triangular(lower.transpose(-1, -2), du_out, upper=True,
                                       unitriangular=True)
    e = g.unsqueeze(-1) * doh - beta_h.unsqueeze(-1) * dv
    dbeta = -(dv * a).sum(-1)
    delta = g * big_delta + beta_h * dbeta
    ds_diag = (1 - g) * ((doh * u).sum(-1) - big_delta)
    bthd = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    return dict(dv=bthd(dv), e=bthd(e), a=bthd(a), dbeta=bthd(dbeta), g=g, delta=delta,
                ds_diag=ds_diag)
