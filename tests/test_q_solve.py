"""A solve stage with its own scores (q_solve): forward and every gradient, dq_solve too."""

import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.errors import InputError
from dfgen.reference import naive_deltaformer_attn
from dfgen.runtime import deltaformer_attn

SOLVE = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16, LOOKAHEAD=2)
CONFIG = KernelConfig("two_stage", SOLVE, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
                      solve_bwd=dict(default_config(32, torch.float32).solve_bwd, CHUNK=16, BLOCK_M=16),
                      attn_bwd=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2))


def _inputs(B, T, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, q_solve = (torch.randn(B, T, H, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(B, T, H_kv, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    return q, q_solve, k, v, beta


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 32), (1, 50, 4, 2, 32), (1, 1, 1, 1, 32)],
                         ids=["B2-T37-H2", "B1-T50-H4-kv2", "T1"])
@pytest.mark.parametrize("config", [CONFIG, None], ids=["config", "default"])
def test_q_solve_forward_and_gradients(shape, dtype_name, config):
    B, T, H, H_kv, D = shape
    dtype = DTYPES[dtype_name]
    q, q_solve, k, v, beta = _inputs(*shape, dtype, seed=T)
    leaves = [t.requires_grad_() for t in (q, q_solve, k, v, beta)]
    o = deltaformer_attn(q, k, v, beta, q_solve=q_solve, config=config)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    group = H // H_kv
    ref_o = naive_deltaformer_attn(ref[0], ref[2].repeat_interleave(group, 2),
                                   ref[3].repeat_interleave(group, 2), ref[4], q_solve=ref[1])
    ref_grads = torch.autograd.grad(ref_o, ref, do.double())
    fp32_tol = 1e-4
    tol = fp32_tol if dtype == torch.float32 else 2e-2
    assert_close(o, ref_o, dtype, "o", tol)
    for name, got, want in zip(("dq", "dq_solve", "dk", "dv", "dbeta"), grads, ref_grads):
        assert got.shape == want.shape, name
        if want.abs().max() == 0:
            assert got.abs().max() == 0, name
        else:
            assert_close(got, want, dtype, name, tol)


def test_q_solve_equal_to_q_matches_the_fused_form():
    q, _, k, v, beta = _inputs(1, 45, 2, 2, 32, torch.float32, seed=3)
    two = deltaformer_attn(q, k, v, beta, q_solve=q, config=CONFIG)
    fused = deltaformer_attn(q, k, v, beta, config=KernelConfig("fused", SOLVE))
    assert torch.allclose(two, fused, atol=1e-5)


def test_q_solve_shape_is_checked():
    q, q_solve, k, v, beta = _inputs(1, 8, 2, 2, 32, torch.float32, seed=0)
    with pytest.raises(InputError, match="q_solve must have q's shape"):
        deltaformer_attn(q, k, v, beta, q_solve=q_solve[:, :4])
