"""Grouped key/value heads: k and v with fewer heads than q, forward and every gradient,
against the reference with the kv heads repeated (which dfgen never materializes)."""

import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close, make_grouped_inputs
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.reference import naive_deltaformer_attn
from dfgen.runtime import deltaformer_attn

SOLVE = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16, LOOKAHEAD=2)
BWD = dict(solve_bwd=dict(default_config(32, torch.float32).solve_bwd, CHUNK=16, BLOCK_M=16),
           attn_bwd=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2))
CONFIGS = {
    "fused": KernelConfig("fused", SOLVE, **BWD),
    "two_stage": KernelConfig("two_stage", SOLVE, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4,
                                                      num_stages=2), **BWD),
}



@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)], ids=["H4-kv2", "H3-kv1"])
def test_grouped_heads_forward_and_gradients(H, H_kv, config_name, dtype_name):
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_grouped_inputs(2, 37, H, H_kv, 32, dtype, seed=H * 10 + H_kv)
    leaves = [t.requires_grad_() for t in (q, k, v, beta)]
    o = deltaformer_attn(q, k, v, beta, config=CONFIGS[config_name])
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv, rb = ref_leaves
    group = H // H_kv
    ref_o = naive_deltaformer_attn(rq, rk.repeat_interleave(group, dim=2),
                                   rv.repeat_interleave(group, dim=2), rb)
    ref_grads = torch.autograd.grad(ref_o, ref_leaves, do.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the gradient bound
    assert_close(o, ref_o, dtype, "o", tol)
    for name, got, want in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert_close(got, want, dtype, name, tol)


def test_heads_must_divide():
    q, k, v, beta = make_grouped_inputs(1, 8, 3, 2, 32, torch.float32, seed=0)
    from dfgen.errors import InputError

    with pytest.raises(InputError, match="multiple of k and v's heads"):
        deltaformer_attn(q, k, v, beta)
