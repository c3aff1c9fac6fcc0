"""The reference itself: its solve against the token-by-token recurrence, and the
fused-output identity of the math note against the two-pass definition."""

import math

import torch

from dfgen.reference import (naive_backward_terms, naive_causal_attention, naive_deltaformer_attn,
                         naive_deltaformer_u,
                         naive_strict_lse, naive_scores)


def _loop_u(q, k, v, beta):
    """u_i = v_i - beta_i sum_{j<i} P_ij u_j, one token at a time, float64."""
    B, T, H, D = q.shape
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    u = torch.zeros_like(v)
    for i in range(T):
        u[:, i] = v[:, i]
        if i > 0:
            s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, :i]) / math.sqrt(D)
            p = torch.softmax(s, dim=-1)
            u[:, i] -= beta[:, i, :, None] * torch.einsum("bhj,bjhd->bhd", p, u[:, :i])
    return u


def test_u_matches_recurrence():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 8, generator=gen) for _ in range(3))
    beta = torch.rand(2, 13, 3, generator=gen) * 1.5
    assert torch.allclose(naive_deltaformer_u(q, k, v, beta), _loop_u(q, k, v, beta), atol=1e-10)


def test_beta_none_is_ones():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=gen) for _ in range(3))
    ones = torch.ones(1, 9, 2)
    assert torch.allclose(naive_deltaformer_attn(q, k, v), naive_deltaformer_attn(q, k, v, ones), atol=1e-14)


def test_fused_output_identity():
    """o_i = g_i a_i + (1 - g_i) u_i with a_i = sum_{j<i} P_ij u_j, g_i = sigmoid(lse_i - s_ii)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 17, 2, 8, generator=gen) for _ in range(3))
    beta = torch.rand(2, 17, 2, generator=gen)
    u = naive_deltaformer_u(q, k, v, beta)
    s = naive_scores(q, k)
    lse = naive_strict_lse(q, k)
    T = s.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1)).masked_fill(~strict, 0)
    a = (p @ u.transpose(1, 2)).transpose(1, 2)
    g = torch.sigmoid(lse - torch.diagonal(s, dim1=-2, dim2=-1)).transpose(1, 2).unsqueeze(-1)
    fused = g * a + (1 - g) * u
    assert torch.allclose(fused, naive_deltaformer_attn(q, k, v, beta), atol=1e-12)
    assert torch.equal(naive_causal_attention(q, k, u)[:, 0], u[:, 0])  # row 0 attends to itself


def test_t1_output_is_v():
    q, k, v = (torch.randn(2, 1, 2, 4) for _ in range(3))
    assert torch.allclose(naive_deltaformer_attn(q, k, v), v.double())


def test_backward_terms_match_autograd():
    """The math note's backward (dv by a transposed solve, dbeta, and dq, dk from ds)
    against torch autograd of the reference, in float64."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 11, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    beta = (torch.rand(2, 11, 2, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    do = torch.randn(2, 11, 2, 8, generator=gen, dtype=torch.float64)
    o = naive_deltaformer_attn(q, k, v, beta)
    dq, dk, dv, dbeta = torch.autograd.grad(o, (q, k, v, beta), do)
    t = naive_backward_terms(q.detach(), k.detach(), v.detach(), beta.detach(), do)
    assert torch.allclose(t["dv"], dv, atol=1e-12)
    assert torch.allclose(t["dbeta"], dbeta, atol=1e-12)
    # ds_ij = P_ij (e_i . u_j - delta_i) below the diagonal, ds_ii on it
    s = naive_scores(q.detach(), k.detach())
    T = s.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    lse = naive_strict_lse(q.detach(), k.detach())
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1)).masked_fill(~strict, 0)
    u = naive_deltaformer_u(q.detach(), k.detach(), v.detach(), beta.detach()).transpose(1, 2)
    e = t["e"].transpose(1, 2)
    ds = p * (e @ u.transpose(-1, -2) - t["delta"].unsqueeze(-1)) + torch.diag_embed(t["ds_diag"])
    scale = 1 / math.sqrt(8)
    assert torch.allclose(scale * (ds @ k.detach().transpose(1, 2)).transpose(1, 2), dq, atol=1e-12)
    assert torch.allclose(scale * (ds.transpose(-1, -2) @ q.detach().transpose(1, 2)).transpose(1, 2),
                          dk, atol=1e-12)
