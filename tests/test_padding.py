"""Padding masks ([B, T] of 0/1, left or right padding): padded positions influence no
other position (in the solve stage too) and get a zero output; against the reference on
the unpadded sequences, forward and every gradient."""

import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import InputError
from dfgen.reference import naive_deltaformer_attn
from dfgen.runtime import deltaformer_attn

SOLVE = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16, LOOKAHEAD=2)
CONFIG = KernelConfig("fused", SOLVE,
                      solve_bwd=dict(default_config(32, torch.float32).solve_bwd, CHUNK=16, BLOCK_M=16),
                      attn_bwd=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2))


def _mask(lengths, T, side):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, T - n:] = 1
    return mask.to(DEVICE)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask(side, dtype_name):
    dtype = DTYPES[dtype_name]
    lengths, T, H, D = [37, 5, 0, 40], 40, 2, 32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(lengths), T, H, D, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    beta = torch.rand(len(lengths), T, H, generator=gen).to(DEVICE)
    # garbage at padded positions must not leak anywhere
    mask = _mask(lengths, T, side)
    for t in (q, k, v):
        t.masked_fill_(~mask.bool()[:, :, None, None], 1e3)
    leaves = [t.requires_grad_() for t in (q, k, v, beta)]
    o = deltaformer_attn(q, k, v, beta, attention_mask=mask, config=CONFIG)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    pad = ~mask.bool()
    assert (o[pad] == 0).all()
    for g in grads:
        assert (g[pad] == 0).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for row, n in enumerate(lengths):
        if n == 0:
            continue
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ref = [t[row:row + 1, sl].detach().double().requires_grad_() for t in leaves]
        ref_o = naive_deltaformer_attn(*ref)
        ref_grads = torch.autograd.grad(ref_o, ref, do[row:row + 1, sl].double())
        assert_close(o[row:row + 1, sl], ref_o, dtype, f"o row {row}", tol)
        for name, got, want in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
            if want.abs().max() > 0:
                assert_close(got[row:row + 1, sl], want, dtype, f"{name} row {row}", tol)


def test_mask_is_checked():
    q, k, v = (torch.randn(2, 8, 1, 32, device=DEVICE) for _ in range(3))
    with pytest.raises(InputError, match="attention_mask must be a \\[B, T\\]"):
        deltaformer_attn(q, k, v, attention_mask=torch.ones(2, 7, device=DEVICE))
    with pytest.raises(InputError, match="only 0"):
        deltaformer_attn(q, k, v, attention_mask=torch.full((2, 8), 2, device=DEVICE))


@pytest.mark.parametrize("with_beta,with_q_solve", [(True, False), (False, False), (True, True)])
def test_all_padding_mask_gives_zero_gradients(with_beta, with_q_solve):
    """A mask of zeros only: zero output, and zero (not missing) gradients for every input
    that requires grad, so a training step on an all-padding batch runs."""
    q, k, v = (torch.randn(2, 8, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    beta = torch.rand(2, 8, 2, device=DEVICE, requires_grad=True) if with_beta else None
    q_solve = torch.randn(2, 8, 2, 32, device=DEVICE, requires_grad=True) if with_q_solve else None
    o = deltaformer_attn(q, k, v, beta, q_solve=q_solve, config=CONFIG,
                         attention_mask=torch.zeros(2, 8, dtype=torch.long, device=DEVICE))
    assert o.shape == q.shape and o.dtype == q.dtype and not o.abs().max()
    leaves = [t for t in (q, k, v, beta, q_solve) if t is not None]
    grads = torch.autograd.grad(o.sum(), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and not grad.abs().max()
    with torch.no_grad():  # no graph when nothing is differentiated
        assert not deltaformer_attn(q, k, v, beta, config=CONFIG,
                                    attention_mask=torch.zeros(2, 8, device=DEVICE)).requires_grad
