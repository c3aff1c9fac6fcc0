"""scale= (the softmax scale of every score, backward included) and return_lse=True (the
attention's inclusive lse), against the float64 reference: fused and two-stage configs,
q_solve, packed sequences, padding masks, grouped heads, torch.compile; bad values."""

import math

import pytest
import torch

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, make_grouped_inputs
from dfgen.errors import InputError
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.reference import naive_deltaformer_attn, naive_lse
from dfgen.runtime import deltaformer_attn

SOLVE = dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16, LOOKAHEAD=1)
SOLVE_BWD = dict(default_config(32, torch.float32).solve_bwd, CHUNK=16, BLOCK_M=16)
ATTN_BWD = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
FUSED = KernelConfig("fused", SOLVE, solve_bwd=SOLVE_BWD, attn_bwd=ATTN_BWD)
TWO_STAGE = KernelConfig("two_stage", SOLVE, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
                         solve_bwd=SOLVE_BWD, attn_bwd=ATTN_BWD)
CONFIGS = {"fused": FUSED, "two_stage": TWO_STAGE}



def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def _assert_grad(got, want, dtype, name, tol):
    assert got.shape == want.shape, name
    if want.abs().max() == 0:  # (T = 1: no score reaches q or k)
        assert got.abs().max() == 0, name
    else:
        assert_close(got, want, dtype, name, tol)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["fused", "two_stage"])
@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 32), (1, 29, 4, 2, 32), (1, 1, 1, 1, 32)],
                         ids=["B2-T37", "GQA", "T1"])
def test_scale_changes_every_stage_forward_and_gradients(shape, strategy, dtype_name):
    """A scale other than 1/sqrt(D) (here 0.3, about 1.7x it) in the output, every gradient
    and the returned lse."""
    dtype = DTYPES[dtype_name]
    scale = 0.3
    q, k, v, beta = make_grouped_inputs(*shape, dtype, seed=shape[1])
    leaves = [t.requires_grad_() for t in (q, k, v, beta)]
    o, lse = deltaformer_attn(q, k, v, beta, config=CONFIGS[strategy], scale=scale, return_lse=True)
    assert lse.shape == (shape[0], shape[2], shape[1]) and lse.dtype == torch.float32
    assert not lse.requires_grad
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_o = naive_deltaformer_attn(*ref, scale=scale)
    ref_grads = torch.autograd.grad(ref_o, ref, do.double())
    tol = _tol(dtype)
    assert_close(o, ref_o, dtype, "o", tol)
    assert_close(lse, naive_lse(ref[0], ref[1], scale=scale), dtype, "lse", 1e-4 if dtype == torch.float32 else 1e-2)
    for name, got, want in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
        _assert_grad(got, want, dtype, name, tol)
    # and the default scale differs: the test would catch a scale that is ignored
    default = naive_deltaformer_attn(*[t.detach() for t in ref])
    if shape[1] > 1:
        assert (default - ref_o).norm() > 10 * tol * ref_o.norm()


@pytest.mark.parametrize("strategy", ["fused", "two_stage"])
def test_default_scale_and_lse_without_grad(strategy):
    q, k, v, beta = make_grouped_inputs(1, 33, 2, 1, 32, torch.float32, seed=5)
    o, lse = deltaformer_attn(q, k, v, beta, config=CONFIGS[strategy], return_lse=True)
    assert torch.equal(o, deltaformer_attn(q, k, v, beta, config=CONFIGS[strategy]))
    explicit = deltaformer_attn(q, k, v, beta, config=CONFIGS[strategy], scale=1 / math.sqrt(32))
    assert torch.allclose(o, explicit, atol=1e-6)
    ref = naive_lse(q.double(), k.double())
    assert_close(lse, ref, torch.float32, "lse", 1e-5)
    s_00 = (q[:, 0] * k[:, 0].repeat_interleave(2, 1)).sum(-1) / math.sqrt(32)  # [B, H]
    assert torch.allclose(lse[:, :, 0], s_00, atol=1e-5)  # row 0 attends to itself only


def test_scale_and_lse_with_q_solve():
    dtype = torch.float32
    q, k, v, beta = make_grouped_inputs(2, 27, 2, 2, 32, dtype, seed=7)
    q_solve = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, q_solve, k, v, beta)]
    o, lse = deltaformer_attn(q, k, v, beta, q_solve=q_solve, config=TWO_STAGE, scale=0.25,
                              return_lse=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_o = naive_deltaformer_attn(ref[0], ref[2], ref[3], ref[4], q_solve=ref[1], scale=0.25)
    ref_grads = torch.autograd.grad(ref_o, ref, do.double())
    assert_close(o, ref_o, dtype, "o", 1e-4)
    assert_close(lse, naive_lse(ref[0], ref[2], scale=0.25), dtype, "lse", 1e-5)
    for name, got, want in zip(("dq", "dq_solve", "dk", "dv", "dbeta"), grads, ref_grads):
        _assert_grad(got, want, dtype, name, 1e-4)
    with torch.no_grad():
        o2, lse2 = deltaformer_attn(q, k, v, beta, q_solve=q_solve, config=TWO_STAGE, scale=0.25,
                                    return_lse=True)
    assert torch.allclose(o2, o, atol=1e-6) and torch.allclose(lse2, lse, atol=1e-6)


def test_scale_and_lse_with_packed_sequences_and_padding():
    """cu_seqlens: lse is [1, H, total]; attention_mask: [B, H, T] with -inf where padded."""
    dtype = torch.float32
    lengths = [5, 17, 1]
    q, k, v, beta = make_grouped_inputs(1, sum(lengths), 2, 2, 32, dtype, seed=9)
    cu = torch.tensor([0, 5, 22, 23], dtype=torch.int32, device=DEVICE)
    o, lse = deltaformer_attn(q, k, v, beta, cu_seqlens=cu, config=FUSED, scale=0.2, return_lse=True)
    assert lse.shape == (1, 2, 23)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [t[:, a:b].double() for t in (q, k, v, beta)]
        assert_close(o[:, a:b], naive_deltaformer_attn(*part, scale=0.2), dtype, "o", 1e-4)
        assert_close(lse[:, :, a:b], naive_lse(part[0], part[1], scale=0.2), dtype, "lse", 1e-5)
    # a right-padded batch of two rows: padded positions get o = 0 and lse = -inf
    B, T = 2, 12
    q, k, v, beta = make_grouped_inputs(B, T, 2, 2, 32, dtype, seed=10)
    mask = torch.ones(B, T, dtype=torch.int64, device=DEVICE)
    mask[1, 7:] = 0
    o, lse = deltaformer_attn(q, k, v, beta, attention_mask=mask, config=FUSED, scale=0.2,
                              return_lse=True)
    assert lse.shape == (B, 2, T)
    assert torch.isneginf(lse[1, :, 7:]).all() and (o[1, 7:] == 0).all()
    rows = [(0, T), (1, 7)]
    for b, n in rows:
        part = [t[b:b + 1, :n].double() for t in (q, k, v, beta)]
        assert_close(lse[b:b + 1, :, :n], naive_lse(part[0], part[1], scale=0.2), dtype, "lse", 1e-5)
        assert_close(o[b:b + 1, :n], naive_deltaformer_attn(*part, scale=0.2), dtype, "o", 1e-4)
    mask[:] = 0  # all padding
    o, lse = deltaformer_attn(q, k, v, beta, attention_mask=mask, config=FUSED, return_lse=True)
    assert (o == 0).all() and torch.isneginf(lse).all() and lse.shape == (B, 2, T)


def test_scale_and_lse_under_torch_compile():
    q, k, v, beta = make_grouped_inputs(1, 24, 2, 2, 32, torch.float32, seed=11)

    def step(q, k, v, beta):
        o, lse = deltaformer_attn(q, k, v, beta, config=FUSED, scale=0.3, return_lse=True)
        return o.sum(-1), lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    out, lse = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    eager_out, eager_lse = step(*eager)
    eager_grads = torch.autograd.grad(eager_out.sum(), eager)
    assert torch.allclose(out, eager_out, atol=1e-5) and torch.allclose(lse, eager_lse, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)
    with torch.no_grad():
        o_nograd = torch.compile(lambda *a: deltaformer_attn(*a, config=FUSED, scale=0.3),
                                 fullgraph=True, backend="aot_eager")(q, k, v, beta)
    assert torch.allclose(o_nograd.sum(-1), eager_out, atol=1e-5)


@pytest.mark.parametrize("bad", ["0.1", float("nan"), float("inf"), True, torch.tensor(0.1), [0.1]])
def test_bad_scale_is_an_input_error(bad):
    q, k, v, beta = make_grouped_inputs(1, 4, 1, 1, 32, torch.float32, seed=1)
    with pytest.raises(InputError, match="scale"):
        deltaformer_attn(q, k, v, beta, scale=bad)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_return_lse_is_an_input_error(bad):
    q, k, v, beta = make_grouped_inputs(1, 4, 1, 1, 32, torch.float32, seed=1)
    with pytest.raises(InputError, match="return_lse"):
        deltaformer_attn(q, k, v, beta, return_lse=bad)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
def test_scale_and_lse_every_head_dim_and_dtype_on_the_gpu(D, dtype_name):
    """The runtime's pick (tuned or default config) with a non-default scale, forward and
    backward, at every head dim and dtype, T not a multiple of any block."""
    dtype = DTYPES[dtype_name]
    scale = 1.5 / math.sqrt(D)
    q, k, v, beta = make_grouped_inputs(2, 301, 4, 2, D, dtype, seed=D)
    leaves = [t.requires_grad_() for t in (q, k, v, beta)]
    o, lse = deltaformer_attn(q, k, v, beta, scale=scale, return_lse=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_o = naive_deltaformer_attn(*ref, scale=scale)
    ref_grads = torch.autograd.grad(ref_o, ref, do.double())
    tol = 3e-3 if dtype == torch.float32 else 2e-2  # float32 through the tf32 / fp16-inverse solve
    assert_close(o, ref_o, dtype, "o", tol)
    assert_close(lse, naive_lse(ref[0], ref[1], scale=scale), dtype, "lse", 1e-3)
    for name, got, want in zip(("dq", "dk", "dv", "dbeta"), grads, ref_grads):
        _assert_grad(got, want, dtype, name, tol)
